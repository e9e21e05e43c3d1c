"""An ordered, bounded map over spawned worker processes that fails at once when a worker dies.

`WorkerPool.map(fn, items)` yields `fn(item)` in the order of `items`. At most `max_pending` chunks of
`chunksize` items are sent to a worker at a time, and at most `workers × max_pending` chunks are sent and not yet
yielded, so a slow consumer (or one slow chunk) never makes the pool hold more results than that.

Why not `concurrent.futures.ProcessPoolExecutor`: on CPython 3.11, a worker killed while the executor is still
starting its other workers can leave the executor's manager thread dead or waiting (a race between the thread
that spawns workers on `submit` and the manager thread that reacts to a death), and then both the map and the
interpreter's exit wait forever. Here every worker has its own pipe (no lock shared between processes that a
killed worker could hold), all workers are started before any work is sent, and the parent waits on the
workers' pipes and process sentinels together: a worker that exits during a map ends every other worker with
SIGKILL and raises `WorkerDied`.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import signal
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NoReturn


class WorkerDied(Exception):
    """A worker process exited while it had work (killed by a signal, e.g. by the out-of-memory killer)."""


class WorkerError(Exception):
    """`fn` raised in a worker; the message holds the worker's traceback."""


def _serve(conn, initializer: Callable[..., None] | None = None, initargs: tuple = ()) -> None:
    """A worker's loop: ``initializer(*initargs)`` once, then receive (chunk id, fn, items), send back (chunk id,
    ok, results or traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which ends the workers
    if initializer is not None:
        initializer(*initargs)
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the parent is gone
            return
        if message is None:
            return
        chunk_id, fn, items = message
        try:
            reply = (chunk_id, True, [fn(item) for item in items])
        except Exception:  # noqa: BLE001 - any failure of fn goes back to the parent, which raises it
            reply = (chunk_id, False, traceback.format_exc())
        conn.send(reply)


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


class WorkerPool:
    """`workers` spawned processes (spawn, not fork: the parent may hold JAX or grain threads, and forking a
    threaded process can deadlock), each running ``initializer(*initargs)`` first (what every item needs, sent
    once per worker rather than with each chunk). Use as a context manager; leaving it on an exception kills the
    workers."""

    def __init__(self, workers: int, *, chunksize: int = 4, max_pending: int = 2, name: str = "worker",
                 initializer: Callable[..., None] | None = None, initargs: tuple = ()):
        if workers < 1 or chunksize < 1 or max_pending < 1:
            raise ValueError(f"workers, chunksize and max_pending must be ≥ 1, got {workers}, {chunksize}, "
                             f"{max_pending}")
        self._chunksize = chunksize
        self._max_pending = max_pending
        self._name = name
        self._broken: str | None = None
        self._processes: list[multiprocessing.process.BaseProcess] = []
        self._conns: list[multiprocessing.connection.Connection] = []
        context = multiprocessing.get_context("spawn")
        try:
            for _ in range(workers):
                parent_end, child_end = context.Pipe(duplex=True)
                process = context.Process(target=_serve, args=(child_end, initializer, initargs), daemon=True)
                process.start()
                child_end.close()  # the parent keeps only its end, so a dead worker reads as EOF
                self._processes.append(process)
                self._conns.append(parent_end)
        except OSError as error:  # e.g. a worker killed while it was being started (broken pipe)
            self._kill_all()
            raise WorkerDied(f"a {name} could not be started ({error})") from None

    @property
    def window(self) -> int:
        """Items sent to the workers and not yet yielded by :meth:`map`, at most."""
        return self._max_pending * len(self._processes) * self._chunksize

    @property
    def pids(self) -> list[int]:
        """Process ids of the live pool's workers (empty once closed)."""
        return [process.pid for process in self._processes]

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(kill=exc_type is not None)

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        """`fn(item)` for each item, in order. `fn` must be picklable (a module-level function)."""
        if self._broken:
            raise WorkerDied(self._broken)
        if not self._processes:
            raise ValueError("map on a closed WorkerPool")
        source = iter(items)
        exhausted = False
        next_chunk = 0  # id of the next chunk to send
        next_out = 0  # id of the next chunk to yield
        in_flight: list[int] = [0] * len(self._processes)  # chunks sent to each worker, not yet answered
        window = self._max_pending * len(self._processes)
        finished: dict[int, list] = {}
        while True:
            # Chunks sent but not yet yielded stay within the window, so results held here are bounded even when
            # one slow chunk holds back the ones after it. Below the window some worker has fewer than
            # max_pending chunks in flight, and the least loaded one gets the next chunk.
            while not exhausted and next_chunk - next_out < window:
                chunk = [item for _, item in zip(range(self._chunksize), source)]
                if not chunk:
                    exhausted = True
                    break
                worker = in_flight.index(min(in_flight))
                self._send(worker, (next_chunk, fn, chunk))
                in_flight[worker] += 1
                next_chunk += 1
            while next_out in finished:
                yield from finished.pop(next_out)
                next_out += 1
            if next_out == next_chunk:  # all sent chunks yielded: finish, or send more before waiting
                if exhausted:
                    return
                continue
            self._receive(in_flight, finished)  # chunk next_out is in flight, so this wait ends

    def _send(self, worker: int, message) -> None:
        try:
            self._conns[worker].send(message)
        except (OSError, EOFError):
            self._fail(worker)

    def _receive(self, in_flight: list[int], finished: dict[int, list]) -> None:
        sentinels = {process.sentinel: k for k, process in enumerate(self._processes)}
        ready = multiprocessing.connection.wait([*self._conns, *sentinels])
        for handle in ready:  # results first: a worker that answered and then died still failed the map
            if handle in sentinels:
                continue
            worker = self._conns.index(handle)
            try:
                chunk_id, ok, payload = handle.recv()
            except (OSError, EOFError):
                self._fail(worker)
            if not ok:
                self._kill_all()
                self._broken = f"a {self._name} raised"
                raise WorkerError(f"a {self._name} raised:\n{payload}")
            finished[chunk_id] = payload
            in_flight[worker] -= 1
        for handle in ready:
            if handle in sentinels:
                self._fail(sentinels[handle])

    def _fail(self, worker: int) -> NoReturn:
        process = self._processes[worker]
        process.join(timeout=1)
        self._broken = f"a {self._name} died (pid {process.pid}, {_describe_exit(process.exitcode)})"
        self._kill_all()
        raise WorkerDied(self._broken)

    def _kill_all(self) -> None:
        for process in self._processes:
            if process.is_alive():
                process.kill()  # SIGKILL: cannot be caught or ignored, so the joins below cannot hang
        for process in self._processes:
            process.join()
        for conn in self._conns:
            conn.close()
        self._conns = []
        self._processes = []

    def close(self, kill: bool = False) -> None:
        """Ask the workers to exit (or kill them), and wait for them; never blocks on a stuck worker for long."""
        if not kill:
            for conn in self._conns:
                try:
                    conn.send(None)
                except (OSError, EOFError):
                    pass
            for process in self._processes:
                process.join(timeout=10)
        self._kill_all()
