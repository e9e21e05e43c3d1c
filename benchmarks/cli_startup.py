"""How long the quick ``convnext-audio`` commands take: each is run as a fresh process (import, parse, work, print),
--repeats times, and the table gives the wall time and the CPU time (user + system) of the first run and the median
of the later ones (the models table is computed by the first and read from the cache folder by the later ones,
unless the cache held it already). CPU time is the figure to compare on a shared machine: other processes stretch
the wall time, not the work done. Prints the CPU model and flags with the table.
Run: python benchmarks/cli_startup.py [--repeats 3] [--command "models --no-flops"] [--repo CHECKOUT]
(--repo times another checkout's package, e.g. an export of an older commit, with the same script).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import shlex
import statistics
import subprocess
import sys
import time

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))  # the repository: benchmarks.common and the package

from benchmarks.common import cpu_model_name, cpu_speed_flags  # noqa: E402

COMMANDS = ("models --pretrained", "models --no-flops", "models", "models convnext_tiny")


def run_once(arguments: list[str], repository: pathlib.Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one ``convnext-audio ARGUMENTS`` process running ``repository``'s package; its
    output is discarded."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "convnext_audio_jax.cli", *arguments], check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(repository)}, cwd=repository)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--command", action="append", help="a command line after `convnext-audio` (repeatable); "
                        f"default: {', '.join(COMMANDS)}")
    parser.add_argument("--repo", type=pathlib.Path, default=REPOSITORY, help="the checkout whose package is timed")
    args = parser.parse_args(argv)
    print(f"CPU: {cpu_model_name()} ({', '.join(cpu_speed_flags()) or 'no listed speed flags'}), "
          f"{os.cpu_count()} logical CPUs")
    print(f"package: {args.repo.resolve()}")
    print(f"{'command':<24} {'first: wall s':>14} {'CPU s':>7} {'later: wall s':>14} {'CPU s':>7}")
    for command in args.command or COMMANDS:
        first, *later = [run_once(shlex.split(command), args.repo.resolve()) for _ in range(args.repeats)]
        wall, cpu = (statistics.median(r[i] for r in later) for i in (0, 1)) if later else (float("nan"),) * 2
        print(f"{command:<24} {first[0]:>14.2f} {first[1]:>7.2f} {wall:>14.2f} {cpu:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
