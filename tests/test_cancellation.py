"""Cancellation, shutdown, forks and event loops: the manager's promises however code stops it.

One test (or more) per way that real asyncio code cancels or stops a manager. The cancellation
fuzzer in tests/reliability/ tries them all at random; these pin each one down.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import pickle
import random
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from tests.conftest import OpenStorage
from tests.helpers import random_seed
from yoink import CheckpointLockedError, CheckpointManager, StorageClosedError, StorageError
from yoink.storage import LocalFileStorage, MemoryStorage, RedisStreamStorage, S3Storage


def run_script(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a Python process of its own (for fork, rlimits and other process-wide state)."""
    command = [sys.executable, "-c", textwrap.dedent(code), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


async def replay_all(manager: CheckpointManager) -> list[dict[str, Any]]:
    return [record async for record in manager.replay()]


async def numbers(open_storage: OpenStorage) -> list[int]:
    async with CheckpointManager(open_storage(), flush_interval=None) as manager:
        return [record["n"] for record in await replay_all(manager)]


# -- native asyncio cancellation never writes a batch twice -------------------------------------


NATIVE_CANCELLATIONS: dict[str, Callable[[Coroutine[Any, Any, None], float], Coroutine[Any, Any, None]]] = {}


def cancels(name: str) -> Callable[[Any], Any]:
    def register(function: Any) -> Any:
        NATIVE_CANCELLATIONS[name] = function
        return function

    return register


@cancels("wait_for")
async def _wait_for(operation: Coroutine[Any, Any, None], delay: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(operation, delay)


@cancels("timeout")
async def _timeout(operation: Coroutine[Any, Any, None], delay: float) -> None:
    try:
        async with asyncio.timeout(delay):
            await operation
    except TimeoutError:
        pass


@cancels("task.cancel")
async def _task_cancel(operation: Coroutine[Any, Any, None], delay: float) -> None:
    task = asyncio.ensure_future(operation)
    await asyncio.sleep(delay)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@cancels("TaskGroup")
async def _task_group(operation: Coroutine[Any, Any, None], delay: float) -> None:
    async def fail() -> None:
        await asyncio.sleep(delay)
        raise LookupError("a sibling failed")

    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(operation)
            group.create_task(fail())
    except Exception as exc:  # the group's ExceptionGroup, holding the sibling's error
        if not all(isinstance(error, LookupError) for error in getattr(exc, "exceptions", [exc])):
            raise


if sys.version_info < (3, 11):  # asyncio.timeout and TaskGroup came in 3.11
    del NATIVE_CANCELLATIONS["timeout"], NATIVE_CANCELLATIONS["TaskGroup"]


@pytest.mark.parametrize("mechanism", sorted(NATIVE_CANCELLATIONS))
async def test_a_flush_cancelled_by_native_asyncio_writes_nothing_twice(
    open_storage: OpenStorage, mechanism: str
) -> None:
    cancel = NATIVE_CANCELLATIONS[mechanism]
    rng = random.Random(random_seed())
    manager = CheckpointManager(open_storage(), batch_bytes=1 << 14, flush_interval=None)
    total = 0
    for _ in range(30):
        for _ in range(300):
            await manager.append({"n": total, "pad": "p" * 30})
            total += 1
        await cancel(manager.flush(), rng.uniform(0, 0.004))
    await manager.close()
    assert await numbers(open_storage) == list(range(total))


async def test_an_append_cancelled_while_its_batch_is_written_has_appended_its_record_once(
    open_storage: OpenStorage,
) -> None:
    rng = random.Random(random_seed())
    manager = CheckpointManager(open_storage(), batch_bytes=1 << 12, flush_interval=None)
    for n in range(3000):
        await _wait_for(manager.append({"n": n, "pad": "p" * 30}), rng.uniform(0, 0.001))
    await manager.close()
    assert await numbers(open_storage) == list(range(3000))


def test_a_refused_write_after_cancelled_ones_cuts_no_flushed_record(tmp_path: Path) -> None:
    # Cancelled writes must leave the storage knowing the file's real size: a later write that the
    # OS refuses (RLIMIT_FSIZE: "file too large") is undone to what the file held, not further.
    child = run_script(REFUSED_AFTER_CANCELLED, str(tmp_path / "j.jsonl"), str(random_seed()))
    assert child.returncode == 0, child.stderr
    flushed = int(child.stdout.split("flushed:")[1].split()[0])
    assert "the journal is unchanged" in child.stdout
    after, _, before = child.stdout.split("size after the refused write:")[1].split()[:3]
    assert after == before, "the refused write was not undone to the file's real size"
    lines = (tmp_path / "j.jsonl").read_text().splitlines()
    numbers = [int(line.split(",")[0].removeprefix('{"n":')) for line in lines]
    assert numbers == list(range(flushed + 1000)), "a flushed record was cut off, or written twice"


REFUSED_AFTER_CANCELLED = """
    import asyncio, random, resource, signal, sys
    from yoink import CheckpointManager, StorageError
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    async def main():
        rng = random.Random(int(sys.argv[2]))
        manager = CheckpointManager.from_uri(sys.argv[1], batch_bytes=1 << 14, flush_interval=None)
        n = 0
        for _ in range(40):
            for _ in range(500):
                await manager.append({"n": n, "pad": "p" * 30})
                n += 1
            try:
                await asyncio.wait_for(manager.flush(), rng.uniform(0, 0.003))
            except TimeoutError:
                pass
        await manager.flush()
        with open(sys.argv[1], "rb") as f:
            size = len(f.read())
        print("flushed:", n)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 1000, resource.RLIM_INFINITY))
        try:
            await manager.append_many({"n": m, "pad": "x" * 100} for m in range(n, n + 1000))
            await manager.flush()
        except StorageError as exc:
            print("error:", exc)
        with open(sys.argv[1], "rb") as f:
            print("size after the refused write:", len(f.read()), "of", size)
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        await manager.close()  # the refused records, handed over again
    asyncio.run(main())
"""


# -- close() with appenders still running --------------------------------------------------------


async def test_every_append_during_close_is_flushed_by_it_or_refused(open_storage: OpenStorage) -> None:
    manager = CheckpointManager(open_storage(), batch_bytes=1 << 12, flush_interval=None)
    returned: list[int] = []
    refused = 0

    async def appender(first: int) -> None:
        nonlocal refused
        for n in range(first, first + 100_000):
            try:
                await manager.append({"n": n})
            except StorageClosedError:
                refused += 1
                return
            returned.append(n)
            if n % 50 == 0:
                await asyncio.sleep(0)

    tasks = [asyncio.ensure_future(appender(w * 1_000_000)) for w in range(8)]
    await asyncio.sleep(0.05)
    await manager.close()
    await asyncio.gather(*tasks)
    assert refused == 8, "every appender meets the closed manager"
    assert returned, "the appenders ran while the manager closed"
    assert sorted(await numbers(open_storage)) == sorted(returned)


@pytest.mark.usefixtures("async_backend")
async def test_a_flush_called_in_a_cancelled_scope_leaves_the_next_flush_and_close_working(
    tmp_path: Path,
) -> None:
    # On trio, such a flush() was refused its round after it had said one was under way: every
    # flush after it, and close(), waited for that round forever (found by an attacker).
    path = tmp_path / "j.jsonl"
    manager = CheckpointManager.from_uri(path, flush_interval=None)
    await manager.append({"n": 1})
    with anyio.CancelScope() as scope:
        scope.cancel()
        await manager.flush()
    await manager.append({"n": 2})
    with anyio.fail_after(10):
        await manager.flush()
        assert path.read_text() == '{"n":1}\n{"n":2}\n'
        await manager.close()


# -- async with: cancelled bodies, close() inside, fixtures ------------------------------------


async def test_a_body_cancelled_by_an_anyio_deadline_still_flushes_and_releases_the_journal(
    open_storage: OpenStorage,
) -> None:
    with anyio.move_on_after(0.2) as scope:
        async with CheckpointManager(open_storage(), flush_interval=None) as manager:
            for n in range(1000):
                await manager.append({"n": n})
            await anyio.sleep(10)
    assert scope.cancelled_caught
    async with CheckpointManager(open_storage(), flush_interval=None) as again:  # not locked
        await again.append({"n": 1000})
    assert await numbers(open_storage) == list(range(1001))


async def test_a_body_cancelled_by_asyncio_timeout_twice_still_flushes_and_releases_the_journal(
    open_storage: OpenStorage,
) -> None:
    async def body() -> None:
        async with CheckpointManager(open_storage(), flush_interval=None) as manager:
            for n in range(1000):
                await manager.append({"n": n})
            await asyncio.sleep(10)

    task = asyncio.ensure_future(body())
    await asyncio.sleep(0.1)
    for _ in range(5):  # cancelled again and again while it closes
        task.cancel()
        await asyncio.sleep(0)
    with pytest.raises(asyncio.CancelledError):
        await task
    async with CheckpointManager(open_storage(), flush_interval=None) as again:
        await again.append({"n": 1000})
    assert await numbers(open_storage) == list(range(1001))


async def test_an_error_in_the_body_is_what_async_with_raises_even_when_closing_fails() -> None:
    class Failing(MemoryStorage):
        async def flush(self) -> None:
            raise StorageError("the disk is gone")

    with pytest.raises(KeyError, match="the body's own error"):
        async with CheckpointManager(Failing(), flush_interval=None) as manager:
            await manager.append({"n": 1})
            raise KeyError("the body's own error")


async def test_close_inside_async_with_stops_the_background_flusher(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="yoink")
    async with CheckpointManager.from_uri(tmp_path / "j.jsonl", flush_interval=0.02) as manager:
        await manager.append({"n": 1})
        await manager.close()
        await anyio.sleep(0.2)
        assert not [r for r in caplog.records if "periodic flush" in r.getMessage()]
    assert manager._flusher is None


async def test_the_background_flusher_runs_while_the_manager_is_open(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    async with CheckpointManager.from_uri(path, flush_interval=0.05) as manager:
        await manager.append({"n": 1})
        with anyio.fail_after(5):
            while not path.exists() or not path.read_text():
                await anyio.sleep(0.01)


@pytest.fixture
async def checkpoint(tmp_path: Path) -> AsyncIterator[CheckpointManager]:
    """A manager held by a fixture, as users of pytest-asyncio write it: set up and torn down in
    different tasks."""
    async with CheckpointManager.from_uri(tmp_path / "j.jsonl", flush_interval=0.05) as manager:
        yield manager


async def test_a_pytest_asyncio_fixture_can_hold_a_manager(checkpoint: CheckpointManager) -> None:
    await checkpoint.append({"n": 1})
    await checkpoint.flush()
    assert await replay_all(checkpoint) == [{"n": 1}]


async def test_a_pytest_asyncio_fixture_can_hold_a_manager_that_the_test_closes(
    checkpoint: CheckpointManager,
) -> None:
    await checkpoint.append({"n": 1})
    await checkpoint.close()


# -- fork ----------------------------------------------------------------------------------------


def _append_in_worker(blob: bytes) -> int:
    async def work() -> int:
        async with pickle.loads(blob) as manager:
            await manager.append({"n": "from the worker"})
            return len(await replay_all(manager))

    return asyncio.run(work())


@pytest.mark.parametrize("backend", ["local", "s3-object", "redis"])
async def test_a_forked_worker_can_write_once_the_parent_has_closed(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if backend == "local":
        storage: Any = LocalFileStorage(tmp_path / "j.jsonl")
    elif backend == "redis":
        storage = RedisStreamStorage(request.getfixturevalue("redis_url"), f"fork-{tmp_path.name}")
    else:
        bucket, moto = request.getfixturevalue("bucket"), request.getfixturevalue("moto")
        storage = S3Storage(f"s3://{bucket}/j.jsonl", stage_dir=tmp_path / "stage", endpoint_url=moto.url)
    manager = CheckpointManager(storage, flush_interval=None)
    await manager.append({"n": 1})
    await manager.flush()  # the parent holds the journal's lock, lease or client
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:  # forked while the parent holds them
        await manager.close()
        result = pool.apply_async(_append_in_worker, (pickle.dumps(manager),))
        assert await anyio.to_thread.run_sync(result.get, 60) == 2


def test_a_forked_child_cannot_use_its_parents_open_storage(tmp_path: Path) -> None:
    child = run_script(FORKED_CHILD, str(tmp_path / "j.jsonl"))
    assert child.returncode == 0, child.stderr
    parent = child.stdout.split("parent:", 1)[1].split()[0]
    assert (
        f"child: StorageClosedError LocalFileStorage('{tmp_path / 'j.jsonl'}') is closed: it was opened by "
        f"process {parent}, and this process is a fork of it; open a new storage or manager here "
        "(a pickled one opens anew)\n"
    ) in child.stdout
    assert "child closed its copy" in child.stdout, "closing a storage dropped in a fork works"
    assert "parent appended after the fork" in child.stdout


FORKED_CHILD = """
    import asyncio, os, sys
    from yoink import CheckpointManager
    async def main():
        manager = CheckpointManager.from_uri(sys.argv[1], flush_interval=None)
        await manager.append({"n": 1})
        await manager.flush()
        print("parent:", os.getpid(), flush=True)
        pid = os.fork()
        if pid == 0:
            async def child():
                try:
                    await manager.storage.write('{"n":"child"}\\n')
                except Exception as exc:
                    print("child:", type(exc).__name__, exc, flush=True)
                await manager.storage.close()
                print("child closed its copy", flush=True)
            asyncio.run(child())
            os._exit(0)
        os.waitpid(pid, 0)
        await manager.append({"n": 2})
        await manager.close()  # the parent's lock and file were untouched by the child
        print("parent appended after the fork", flush=True)
    asyncio.run(main())
"""


# -- two event loops, and trio ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["local", "memory"])
def test_one_manager_works_across_two_asyncio_runs(backend: str, tmp_path: Path) -> None:
    uri = str(tmp_path / "j.jsonl") if backend == "local" else f"memory://loops-{uuid.uuid4().hex}"
    manager = CheckpointManager.from_uri(uri, flush_interval=None)

    async def first() -> None:
        await manager.append({"n": 1})
        await manager.flush()

    async def second() -> list[dict[str, Any]]:
        await manager.append({"n": 2})
        records = await replay_all(manager)
        await manager.close()
        return records

    asyncio.run(first())
    assert asyncio.run(second()) == [{"n": 1}, {"n": 2}]


@pytest.mark.parametrize("backend", ["s3-object", "redis"])
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_asyncio_only_storage_on_a_second_event_loop_says_why_and_lets_go(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if backend == "redis":
        url = request.getfixturevalue("redis_url")

        def open_storage() -> Any:
            return RedisStreamStorage(url, f"loops-{tmp_path.name}", lease_ttl=60)
    else:
        bucket, moto = request.getfixturevalue("bucket"), request.getfixturevalue("moto")

        def open_storage() -> Any:
            return S3Storage(f"s3://{bucket}/j.jsonl", stage_dir=tmp_path / "stage", endpoint_url=moto.url)

    manager = CheckpointManager(open_storage(), flush_interval=None)

    async def first(manager: CheckpointManager) -> None:
        await manager.append({"n": 1})
        await manager.flush()

    async def second(manager: CheckpointManager) -> None:
        with pytest.raises(StorageError, match="was opened on a closed event loop"):
            await manager.append({"n": 2})
            await manager.flush()
        with pytest.raises(StorageError, match="event loop"):
            await manager.close()  # still lets go of the journal
        async with CheckpointManager(open_storage(), flush_interval=None) as again:  # not locked
            await again.append({"n": 3})
            # S3 kept the unflushed record in its stage; Redis keeps pending blocks in memory only.
            kept = [1, 3] if backend == "redis" else [1, 2, 3]
            assert [r["n"] async for r in again.replay()] == kept

    asyncio.run(first(manager))
    asyncio.run(second(manager))
    del manager
    gc.collect()  # the dead loop's connections warn here, where the warning is expected, not later


async def _trio_round_trip(uri: str) -> list[dict[str, Any]]:
    async with CheckpointManager.from_uri(uri, flush_interval=0.01) as manager:
        await manager.append({"n": 1})
        with anyio.move_on_after(0.001):
            await manager.append_many({"n": n} for n in range(2, 100))
            await manager.flush()
        await anyio.sleep(0.05)  # the background flusher runs under trio too
    async with CheckpointManager.from_uri(uri) as manager:
        return await replay_all(manager)


@pytest.mark.parametrize("backend", ["local", "memory", "fsspec"])
def test_the_manager_runs_under_trio(backend: str, tmp_path: Path) -> None:
    uri = {
        "local": str(tmp_path / "j.jsonl"),
        "memory": f"memory://trio-{uuid.uuid4().hex}",
        "fsspec": f"fsspec+file://{tmp_path}/f.jsonl",
    }[backend]
    records = anyio.run(_trio_round_trip, uri, backend="trio")
    assert records == [{"n": n} for n in range(1, 100)]


@pytest.mark.parametrize("backend", ["s3-object", "redis"])
def test_an_asyncio_only_storage_refuses_trio_with_a_clear_error(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if backend == "redis":
        storage: Any = RedisStreamStorage(request.getfixturevalue("redis_url"), f"trio-{tmp_path.name}")
    else:
        bucket, moto = request.getfixturevalue("bucket"), request.getfixturevalue("moto")
        storage = S3Storage(f"s3://{bucket}/j.jsonl", stage_dir=tmp_path / "stage", endpoint_url=moto.url)

    async def use() -> None:
        async with CheckpointManager(storage, flush_interval=None) as manager:
            await manager.append({"n": 1})
            await manager.flush()

    with pytest.raises(StorageError, match="runs on asyncio only"):
        anyio.run(use, backend="trio")


async def test_a_storage_that_raises_cancelled_by_itself_stops_the_manager_instead_of_guessing() -> None:
    class Interrupted(MemoryStorage):
        async def write(self, data: str) -> None:
            await super().write(data)  # it landed, but the manager is told it was cancelled
            raise asyncio.CancelledError

    manager = CheckpointManager(Interrupted(), flush_interval=None)
    await manager.append({"n": 1})
    with pytest.raises(asyncio.CancelledError):
        await manager.flush()
    with pytest.raises(StorageError, match="outcome unknown"):
        await manager.flush()  # nothing new to write: still not to be taken for durable
    await manager.append({"n": 2})
    with pytest.raises(
        StorageError,
        match="outcome unknown. Nothing is written twice or guessed at: open a new manager, whose replay "
        "shows what the journal holds$",
    ):
        await manager.flush()
    with pytest.raises(StorageError, match="closed without writing its last 8 bytes"):
        await manager.close()
    assert [item async for item in manager.storage.read()] == ['{"n":1}\n']


async def test_a_second_close_waits_for_the_first_to_release_the_journal(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    manager = CheckpointManager.from_uri(path, flush_interval=None)
    await manager.append({"n": 1})
    first = asyncio.ensure_future(manager.close())
    await asyncio.sleep(0)
    await _wait_for(manager.close(), 0.0001)  # even a second close() that is cancelled waits
    async with CheckpointManager.from_uri(path, flush_interval=None) as again:
        await again.append({"n": 2})
    await first
    with pytest.raises(CheckpointLockedError):  # the lock is still enforced between live writers
        async with CheckpointManager.from_uri(path, flush_interval=None) as a:
            await a.append({"n": 3})
            await a.flush()
            async with CheckpointManager.from_uri(path, flush_interval=None) as b:
                await b.append({"n": 4})
                await b.flush()


# -- found by attacking the above ----------------------------------------------------------------


async def _deadline_loop(path: str) -> tuple[bool, float]:
    manager = CheckpointManager.from_uri(path, flush_interval=None)
    started = anyio.current_time()
    with anyio.move_on_after(0.05) as scope:
        for n in range(3000):
            await manager.append({"n": n})
            await manager.flush()
    elapsed = anyio.current_time() - started
    await manager.close()
    return scope.cancelled_caught, elapsed


@pytest.mark.parametrize("library", ["asyncio", "trio"])
def test_a_deadline_stops_a_loop_of_appends_and_flushes(library: str, tmp_path: Path) -> None:
    caught, elapsed = anyio.run(_deadline_loop, str(tmp_path / "j.jsonl"), backend=library)
    assert caught, "the deadline never cancelled the loop"
    assert elapsed < 1.0, f"the deadline of 0.05 s took {elapsed:.2f} s to act"


def test_a_fork_while_the_journal_is_being_opened_does_not_keep_its_lock(tmp_path: Path) -> None:
    child = run_script(FORK_WHILE_OPENING, str(tmp_path / "j.jsonl"))
    assert child.returncode == 0, child.stderr
    assert child.stdout.count("a new writer works") == 20, child.stdout


FORK_WHILE_OPENING = """
    import asyncio, multiprocessing, os, sys
    from yoink import CheckpointManager, CheckpointLockedError
    context = multiprocessing.get_context("fork")
    async def main(path):
        # Forked as soon as the file exists: the worker thread may hold the new, locked descriptor.
        manager = CheckpointManager.from_uri(path, flush_interval=None)
        await manager.append({"a": 1})
        flush = asyncio.ensure_future(manager.flush())
        while not os.path.exists(path):
            await asyncio.sleep(0)
        event = context.Event()
        process = context.Process(target=event.wait, args=(10,))
        process.start()
        await flush
        await manager.close()
        try:
            async with CheckpointManager.from_uri(path, flush_interval=None) as again:
                await again.append({"b": 2})
            print("a new writer works")
        except CheckpointLockedError as exc:
            print("refused:", exc)
        finally:
            event.set()
            process.join()
            os.unlink(path)
    for _ in range(20):
        asyncio.run(main(sys.argv[1]))
"""


async def test_replays_cancelled_at_random_leave_no_file_open(tmp_path: Path) -> None:
    import warnings

    path = tmp_path / "j.jsonl"
    async with CheckpointManager.from_uri(path, flush_interval=None) as manager:
        await manager.append_many({"n": n} for n in range(100))
    rng = random.Random(random_seed())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with CheckpointManager.from_uri(path, flush_interval=None) as manager:
            for _ in range(300):
                await _wait_for(replay_all(manager), rng.uniform(0, 0.0005))
        gc.collect()
    assert not [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


async def _abandon_replays(uri: str) -> None:
    async with CheckpointManager.from_uri(uri, flush_interval=None) as manager:
        await manager.append_many({"n": n} for n in range(5000))
    async with (
        CheckpointManager.from_uri(uri, flush_interval=None) as manager,
        contextlib.aclosing(manager.replay()) as records,  # type: ignore[type-var]
    ):
        async for _ in records:
            break


@pytest.mark.parametrize("library", ["asyncio", "trio"])
@pytest.mark.parametrize("backend", ["local", "fsspec"])
def test_an_abandoned_replay_closes_what_it_opened_at_once(
    library: str, backend: str, tmp_path: Path
) -> None:
    import warnings

    uri = str(tmp_path / "j.jsonl") if backend == "local" else f"fsspec+file://{tmp_path}/f.jsonl"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        anyio.run(_abandon_replays, uri, backend=library)
        gc.collect()
    assert not [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


async def test_a_write_that_could_not_be_sent_early_is_kept_and_flushed_once(tmp_path: Path) -> None:
    from tests.servers.redis import RedisServer

    server = RedisServer(tmp_path / "redis", appendonly=True)
    try:
        url = server.url
        storage = RedisStreamStorage(url, "early", max_pending=1000)
        manager = CheckpointManager(storage, batch_bytes=1500, flush_interval=None)
        await manager.append({"n": -1})
        await manager.flush()
        server.kill()  # Redis goes away while batches are sent early
        for n in range(100):
            await manager.append({"n": n, "pad": "x" * 100})  # accepted: kept for the next flush
        server.start()
        await manager.flush()
        await manager.close()
        async with CheckpointManager(RedisStreamStorage(url, "early"), flush_interval=None) as reader:
            assert [record["n"] for record in await replay_all(reader)] == list(range(-1, 100))
    finally:
        server.stop()


def test_a_reader_beside_a_series_of_writers_never_makes_one_refused(tmp_path: Path) -> None:
    uri = f"fsspec+file://{tmp_path}/j.jsonl"
    options = {"stage_dir": str(tmp_path / "stage")}

    async def main() -> None:
        stop = anyio.Event()

        async def reader() -> None:
            async with CheckpointManager.from_uri(uri, flush_interval=None, **options) as manager:
                while not stop.is_set():
                    await manager.exists()  # asks whether a writer holds the stage
                    await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as group:
            group.start_soon(reader)
            for n in range(300):
                async with CheckpointManager.from_uri(uri, flush_interval=None, **options) as writer:
                    await writer.append({"n": n})
                    await writer.flush()
            stop.set()

    anyio.run(main)
