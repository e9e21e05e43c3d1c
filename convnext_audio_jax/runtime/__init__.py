"""Where programs run: XLA options, the data mesh and its per-device programs, multi-process jobs, host memory, durable files and locks."""
