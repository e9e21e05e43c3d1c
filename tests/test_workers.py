"""WorkerPool: ordered bounded map over spawned processes; a dead or failing worker ends the map, never hangs."""

import os
import pathlib
import signal
import threading
import time

import pytest

from convnext_audio_jax.data.workers import WorkerDied, WorkerError, WorkerPool
from multiprocess import spawned_children


def _square(x):
    return x * x


def _slow_square(x):
    time.sleep(0.05)
    return x * x


def _fail_on_seven(x):
    if x == 7:
        raise KeyError(f"no entry {x}")
    return x


def _record(item):
    folder, k = item
    pathlib.Path(folder, str(k)).touch()
    return k


def _alive(pid: int) -> bool:
    """True while pid is a live (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("workers,chunksize", [(1, 1), (2, 4), (3, 5)])
def test_map_is_ordered_and_complete(workers, chunksize):
    with WorkerPool(workers, chunksize=chunksize) as pool:
        assert list(pool.map(_square, range(53))) == [x * x for x in range(53)]
        assert list(pool.map(_square, [])) == []
        assert list(pool.map(_square, iter(range(5)))) == [0, 1, 4, 9, 16]  # the pool is reusable
        pids = pool.pids
    assert len(pids) == workers and not any(_alive(pid) for pid in pids)


@pytest.mark.parametrize("workers,max_pending", [(1, 1), (2, 1), (2, 2)])
def test_a_drained_window_sends_more_instead_of_waiting(workers, max_pending):
    """When every chunk sent has been yielded, the map sends the next ones rather than waiting for an answer that
    cannot come (one worker, one chunk at a time met that state after every chunk)."""
    outcome = {}

    def run():
        with WorkerPool(workers, chunksize=1, max_pending=max_pending) as pool:
            outcome["result"] = list(pool.map(_square, range(20)))

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    runner.join(timeout=60)
    assert not runner.is_alive(), "the map waits with nothing in flight"
    assert outcome["result"] == [x * x for x in range(20)]


def test_a_slow_consumer_bounds_the_work_in_flight(tmp_path):
    """At most workers × max_pending chunks are sent and not yet yielded (the one being yielded included)."""
    with WorkerPool(2, chunksize=3, max_pending=2) as pool:
        results = pool.map(_record, ((str(tmp_path), k) for k in range(200)))
        assert next(results) == 0
        time.sleep(1.0)
        computed = len(list(tmp_path.iterdir()))
        assert 3 <= computed <= 2 * 2 * 3, computed
        assert list(results) == list(range(1, 200))


def test_an_exception_in_fn_is_raised_with_the_workers_traceback():
    with pytest.raises(WorkerError, match="(?s)KeyError.*no entry 7") as caught:
        with WorkerPool(2, chunksize=2) as pool:
            pids = pool.pids
            list(pool.map(_fail_on_seven, range(20)))
    assert "_fail_on_seven" in str(caught.value)
    assert not any(_alive(pid) for pid in pids)


def test_a_killed_worker_ends_the_map_at_once_and_the_others_are_killed():
    pool = WorkerPool(3, chunksize=1)
    pids = pool.pids
    results = pool.map(_slow_square, range(10_000))
    assert next(results) == 0
    os.kill(pids[1], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(WorkerDied, match=rf"died \(pid {pids[1]}, killed by SIGKILL\)"):
        list(results)
    assert time.monotonic() - start < 30
    assert not any(_alive(pid) for pid in pids)
    with pytest.raises(WorkerDied):  # the pool stays broken
        list(pool.map(_square, range(3)))
    pool.close()


def test_a_worker_killed_before_any_work_fails_the_first_map():
    with WorkerPool(2) as pool:
        os.kill(pool.pids[0], signal.SIGKILL)
        with pytest.raises(WorkerDied, match="killed by SIGKILL"):
            list(pool.map(_square, range(100)))


@pytest.mark.parametrize("attempt", range(3))
def test_a_worker_killed_while_the_pool_starts_is_an_error_not_a_hang(attempt):
    """The race that hung ProcessPoolExecutor: the first worker dies while the others are still starting."""
    before = spawned_children()
    outcome = {}

    def start_and_map():
        try:
            with WorkerPool(4, chunksize=1) as pool:
                outcome["result"] = list(pool.map(_slow_square, range(400)))
        except WorkerDied as error:
            outcome["error"] = error

    runner = threading.Thread(target=start_and_map, daemon=True)
    runner.start()
    deadline = time.monotonic() + 60
    while not (new := spawned_children() - before) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert new, "no worker started"
    os.kill(min(new), signal.SIGKILL)
    runner.join(timeout=60)
    assert not runner.is_alive(), "the pool hangs after a worker was killed while starting"
    assert "error" in outcome and "result" not in outcome
    time.sleep(0.1)
    assert not (spawned_children() - before)


def test_close_asks_idle_workers_to_exit():
    pool = WorkerPool(2)
    pids = pool.pids
    assert list(pool.map(_square, range(4))) == [0, 1, 4, 9]
    pool.close()
    assert pool.pids == [] and not any(_alive(pid) for pid in pids)
    with pytest.raises(ValueError, match="closed"):
        list(pool.map(_square, range(3)))
