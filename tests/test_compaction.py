"""CheckpointManager.compact(): a snapshot, or the last record per key, replaces the journal."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import fcntl
import functools
import logging
import os
import re
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import orjson
import pytest

from tests.helpers import RecordingStorage, spy_on_fsync
from yoink import (
    CheckpointLockedError,
    CheckpointManager,
    CompactionNotSupportedError,
    CorruptCheckpointError,
    ReadOnlyError,
    StorageClosedError,
    StorageError,
)
from yoink._compaction import Compaction, CompactionPolicy
from yoink.storage import (
    CheckpointStorage,
    FsspecStorage,
    LocalFileStorage,
    MemoryStorage,
    RedisStreamStorage,
)
from yoink.storage._local import REPLACEMENT_SUFFIX

pytestmark = pytest.mark.usefixtures("async_backend")


async def replay(uri: str | Path, **options: Any) -> list[dict[str, Any]]:
    async with CheckpointManager.from_uri(uri, read_only=True, **options) as reader:
        return [record async for record in reader.replay()]


async def test_compact_by_key_keeps_the_last_record_per_key_in_journal_order(tmp_path: Path) -> None:
    path = tmp_path / "crawl.jsonl"
    async with CheckpointManager.from_uri(path) as checkpoint:
        for n in range(10):
            await checkpoint.append({"url": f"u{n % 3}", "n": n})
        await checkpoint.append({"note": "no url", "n": 10})
        await checkpoint.append({"url": "u1", "n": 11})
        result = await checkpoint.compact(key="url")
        assert [record async for record in checkpoint.replay()] == [
            {"url": "u2", "n": 8},
            {"url": "u0", "n": 9},
            {"note": "no url", "n": 10},
            {"url": "u1", "n": 11},
        ]
    assert (result.key, result.records_before, result.records) == ("url", 12, 4)
    before = [{"url": f"u{n % 3}", "n": n} for n in range(10)] + [
        {"note": "no url", "n": 10},
        {"url": "u1", "n": 11},
    ]
    assert result.bytes_before == sum(len(orjson.dumps(record)) + 1 for record in before)
    lines = path.read_bytes().splitlines(keepends=True)
    assert len(lines) == 5
    assert lines[0].startswith(b'["$yoink",{"compaction":{')
    assert result.bytes == sum(map(len, lines[1:]))
    header = await _header(path)
    assert header is not None
    assert result.at == header.at  # when it began, as the journal's header says
    assert datetime.datetime.fromisoformat(result.at).tzinfo == datetime.timezone.utc


async def test_keys_are_told_apart_as_json_tells_them_apart(tmp_path: Path) -> None:
    path = tmp_path / "keys.jsonl"
    values: list[Any] = [1, 1.0, True, "1", None, [1], {"a": 1, "b": 2}]
    path.write_text(f'{{"k":{2**70},"first":true}}\n')  # beyond 64 bits: written by another tool
    async with CheckpointManager.from_uri(path) as checkpoint:
        for value in values:
            await checkpoint.append({"k": value, "first": True})
        await checkpoint.append({"k": {"b": 2, "a": 1}, "first": False})  # the same object as JSON
        await checkpoint.compact(key="k")
    records = await replay(path)
    assert [record["k"] for record in records] == [2**70, 1, 1.0, True, "1", None, [1], {"b": 2, "a": 1}]
    assert type(records[2]["k"]) is float
    assert type(records[3]["k"]) is bool
    assert records[-1]["first"] is False


async def test_a_snapshot_replaces_the_journal_and_later_records_follow_it(tmp_path: Path) -> None:
    path = tmp_path / "job.jsonl"

    async def state() -> AsyncIterator[dict[str, int]]:
        for n in range(3):
            await anyio.lowlevel.checkpoint()
            yield {"total": n}

    async with CheckpointManager.from_uri(path) as checkpoint:
        for n in range(100):
            await checkpoint.append({"step": n})
        result = await checkpoint.compact(state())
        header = await _header(path)
        await checkpoint.append({"step": 100})
        assert (result.key, result.records_before, result.bytes_before) == (None, None, None)
        assert result.records == 3
        assert result.bytes == sum(len(orjson.dumps({"total": n})) + 1 for n in range(3))
        assert header is not None
        assert result.at == header.at
        second = await checkpoint.compact([{"total": 9}])  # a plain iterable too
        await checkpoint.append({"step": 101})
    assert second.records == 1
    assert await replay(path) == [{"total": 9}, {"step": 101}]


async def test_the_policy_counts_the_growth_after_a_snapshot_from_the_snapshots_size(
    async_backend: str,
) -> None:
    """After compact(records), the policy's next compaction comes once the journal has grown by
    ``growth`` times the snapshot's bytes (its header included), not a byte sooner."""
    sizes = []  # the journal's bytes at each compaction's call

    class Sizing(MemoryStorage):
        async def replace(self, text: Any) -> None:
            sizes.append(sum(len(item) for item in self._journals.get(self.name, [])))
            await super().replace(text)

    storage = Sizing(f"growth-after-snapshot-{async_backend}-{uuid.uuid4()}")  # not a run before's
    policy = CompactionPolicy(key="k", growth=2.0, min_bytes=1)
    async with CheckpointManager(storage, batch_bytes=1, compact=policy) as checkpoint:
        await checkpoint.compact([{"k": n, "state": "x" * 50} for n in range(10)])
        assert sizes == [0]
        snapshot = sum(len(item) for item in storage._journals[storage.name])
        frame = len(orjson.dumps({"k": "pad", "p": ""})) + 1
        await checkpoint.append({"k": "pad", "p": "x" * (snapshot - 1 - frame)})  # grown by one byte short
        await checkpoint.flush()
        await anyio.sleep(0.05)
        assert sizes == [0], "compacted before the journal had grown by the snapshot's size"
        await checkpoint.append({"k": "pad", "p": ""})
        with anyio.fail_after(5):
            while len(sizes) < 2:
                await anyio.sleep(0.01)
    assert sizes[1] == 2 * snapshot - 1 + frame


async def test_records_appended_while_a_compaction_runs_follow_the_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "busy.jsonl"
    async with CheckpointManager.from_uri(path, batch_bytes=4096) as checkpoint:
        for n in range(20_000):
            await checkpoint.append({"k": n % 100, "n": n})
        appended_during = 0

        async def append_meanwhile() -> None:
            nonlocal appended_during
            n = 20_000
            while not done.is_set():
                appended_during += 1  # append() buffers the record before its first await
                await checkpoint.append({"k": "during", "n": n})  # never waits for the compaction
                n += 1
                if n % 50 == 0:
                    await anyio.lowlevel.checkpoint()

        done = anyio.Event()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(append_meanwhile)
            while not appended_during:
                await anyio.lowlevel.checkpoint()
            before = appended_during  # appended before the call: in the journal the snapshot replaces
            result = await checkpoint.compact(key="k")
            done.set()
        await checkpoint.flush()
    assert appended_during > before > 0, (
        "nothing was appended while the compaction ran: the test proved nothing"
    )
    records = await replay(path)
    assert (result.records_before, result.records) == (20_000 + before, 101)
    assert records[:101] == [
        *({"k": k, "n": 19_900 + k} for k in range(100)),
        {"k": "during", "n": 20_000 + before - 1},
    ]
    assert [record["n"] for record in records[101:]] == list(range(20_000 + before, 20_000 + appended_during))


class SlowReplace(MemoryStorage):
    """A memory journal whose replace() waits for ``go`` before it reads the snapshot."""

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self.go = anyio.Event()
        self.replacing = anyio.Event()
        self.writes: list[str] = []

    async def write(self, data: str) -> None:
        self.writes.append(data)
        await super().write(data)

    async def replace(self, text: Any) -> None:
        self.replacing.set()
        await self.go.wait()
        await super().replace(text)


async def test_appends_held_during_a_compaction_give_the_loop_a_turn_once_a_batch_not_at_each() -> None:
    """Held in memory while a compaction runs, appends keep their fast path: they give the event
    loop a turn each time a batch's worth (``batch_bytes``, at most 64 KiB) has piled up, as
    appends that write do, not at every call."""
    storage = SlowReplace()
    checkpoint = CheckpointManager(storage, batch_bytes=4096, flush_interval=None)
    await checkpoint.append({"before": 1})
    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            turns += 1
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(functools.partial(checkpoint.compact, [{"snapshot": 1}]))
        await storage.replacing.wait()
        try:
            async with anyio.create_task_group() as counting:
                counting.start_soon(count_turns)
                await anyio.lowlevel.checkpoint()
                before = turns
                for n in range(1000, 2000):  # 16,000 bytes: four batches' worth
                    await checkpoint.append({"during": n})
                given = turns - before
                counting.cancel_scope.cancel()
        finally:
            storage.go.set()
    await checkpoint.close()
    # about one a batch (a turn may fall in a scheduler tick of its own): not one an append, 1,000
    assert 1 <= given <= 10, f"appends gave the loop {given} turns for four batches' worth"


def _stat_often() -> None:
    for _ in range(100):
        os.stat(".")


class ThreadedFlush(MemoryStorage):
    """A memory journal whose flush() makes ``calls`` calls in a worker thread, as a file's flush
    does (its write, its fsync), and tells how much had been appended when the first one ended."""

    def __init__(self, calls: int, appended: list[int]) -> None:
        super().__init__(f"threaded-{uuid.uuid4().hex}")
        self.calls = calls
        self.appended = appended  # bytes appended so far, kept by the test
        self.appended_at_flush: list[int] = []

    async def flush(self) -> None:
        for _ in range(self.calls):
            await anyio.to_thread.run_sync(_stat_often)  # lets go of the GIL, and takes it again
        self.appended_at_flush.append(self.appended[0])
        await super().flush()


@pytest.mark.parametrize("tasks", [1, 64])
async def test_loops_appending_flat_out_let_the_threads_of_a_compaction_holding_their_appends_run(
    tasks: int,
) -> None:
    """A compaction holds appends in memory until the journal before its call is flushed, and that
    flush may wait for threads. A loop appending flat out gave it turns of the event loop, but
    each turn let go of the GIL and took it back at once, so a thread never got it: each call in
    a thread took up to a second, and the appends piled up in memory for as long (358 MiB on the
    policy's benchmark). Once 16 MiB are held, appends pause a moment at each turn; every task's
    appends, or the other tasks would keep the loop busy (a pause of each task's own held 125 MiB
    with 64 tasks)."""
    appended = [0]
    storage = ThreadedFlush(40, appended)
    checkpoint = CheckpointManager(storage, flush_interval=None)
    line = len(orjson.dumps({"k": 0, "pad": "x" * 40})) + 1
    limit = 256 << 20  # the test's own bound: the compaction's flush never ended before it

    async def compacting(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        task_status.started()
        await checkpoint.compact(key="k")  # its cut is taken before it first waits: before the appends

    async def append_flat_out() -> None:
        while not storage.appended_at_flush and appended[0] < limit:
            appended[0] += line
            await checkpoint.append({"k": appended[0] % 1000, "pad": "x" * 40})

    async with anyio.create_task_group() as group:
        await checkpoint.append({"k": 0, "pad": "x" * 40})
        await group.start(compacting)
        for _ in range(tasks):
            group.start_soon(append_flat_out)
    assert storage.appended_at_flush, f"the compaction's flush had not ended when {limit:,} bytes were held"
    # 16 MiB before the pauses, then a few pauses for each of the 40 calls
    assert storage.appended_at_flush[0] < 48 << 20, storage.appended_at_flush
    await checkpoint.close()
    async with CheckpointManager(storage, read_only=True) as reader:
        records = [record async for record in reader.replay()]
    assert len(records) == 1 + appended[0] // line, "the records held are not all in the journal"


async def test_appends_never_wait_for_a_compaction_and_flushes_do() -> None:
    storage = SlowReplace()
    checkpoint = CheckpointManager(storage, batch_bytes=100, flush_interval=None)
    await checkpoint.append({"before": 1})
    flushed = anyio.Event()
    async with anyio.create_task_group() as tasks:

        async def compact() -> None:
            await checkpoint.compact([{"snapshot": 1}])

        async def flush() -> None:
            await checkpoint.flush()
            flushed.set()

        tasks.start_soon(compact)
        await storage.replacing.wait()
        try:
            with anyio.fail_after(5):
                for n in range(1000):  # 10 batches' worth: each would write, were it not compacting
                    await checkpoint.append({"during": n})
            assert storage.writes == ['{"before":1}\n'], "a write went to the storage during the compaction"
            tasks.start_soon(flush)
            await anyio.sleep(0.05)
            assert not flushed.is_set(), "flush() returned before the compaction it must follow"
        finally:
            storage.go.set()
    assert flushed.is_set()
    await checkpoint.close()
    assert [record async for record in CheckpointManager(MemoryStorage(storage.name)).replay()] == [
        {"snapshot": 1},
        *({"during": n} for n in range(1000)),
    ]


class _PausesInReplace(CheckpointStorage):
    """replace() stops after the new journal's first piece (the fold is done by then) until ``go``."""

    go: anyio.Event
    replacing: anyio.Event

    async def replace(self, text: Any) -> None:
        async def paused() -> AsyncIterator[str]:
            async for piece in text:
                yield piece
                self.replacing.set()
                await self.go.wait()

        await super().replace(paused())


class PausingLocal(_PausesInReplace, LocalFileStorage):
    pass


class PausingMemory(_PausesInReplace, MemoryStorage):
    pass


class PausingHolding(PausingMemory):
    writes_during_replace = False


class PausingRedis(_PausesInReplace, RedisStreamStorage):
    pass


class PausingFsspec(_PausesInReplace, FsspecStorage):
    pass


@pytest.mark.parametrize(
    "kind", ["local", "memory", "redis", "fsspec-local", "fsspec-memory", "a storage that holds writes"]
)
async def test_flushes_during_a_compaction_by_key_return_at_once_where_the_storage_carries_them(
    tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    key = f"carried-{uuid.uuid4()}"
    stage = tmp_path / "stage"
    storage: _PausesInReplace = {
        "local": lambda: PausingLocal(tmp_path / "carried.jsonl"),
        "memory": PausingMemory,
        "redis": lambda: PausingRedis(request.getfixturevalue("redis_url"), key),
        "fsspec-local": lambda: PausingFsspec(f"fsspec+file://{tmp_path}/j.jsonl", stage_dir=stage),
        "fsspec-memory": lambda: PausingFsspec(f"fsspec+memory://{key}/j.jsonl", stage_dir=stage),
        "a storage that holds writes": PausingHolding,
    }[kind]()
    storage.go, storage.replacing = anyio.Event(), anyio.Event()
    carries = kind != "a storage that holds writes"
    checkpoint = CheckpointManager(storage, batch_bytes=100, flush_interval=None)
    for n in range(100):
        await checkpoint.append({"k": n % 10, "n": n})
    flushed = anyio.Event()
    results: list[Compaction] = []

    async def compact() -> None:
        results.append(await checkpoint.compact(key="k"))

    async def append_and_flush() -> None:
        for n in range(100, 150):
            await checkpoint.append({"k": "during", "n": n})
        await checkpoint.flush()
        flushed.set()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(compact)
        await storage.replacing.wait()
        try:
            tasks.start_soon(append_and_flush)
            with anyio.move_on_after(5 if carries else 0.2):
                await flushed.wait()
            journal = "".join([item async for item in storage.read()])
            if carries:
                assert flushed.is_set(), "flush() waited for the compaction's swap"
                assert journal.count('"during"') == 50, "flushed, yet not in the storage's journal"
            else:
                assert not flushed.is_set(), "flush() returned before the compaction it must follow"
                assert '"during"' not in journal, "a write went to a storage that holds them"
        finally:
            storage.go.set()
    journal = "".join([item async for item in storage.read()])
    assert journal.count('"during"') == 50, "flush() returned before its records were written"
    await checkpoint.close()
    assert (results[0].records_before, results[0].records) == (100, 10)  # the cut: before the call
    if kind == "redis":  # a new storage, as after a restart
        storage = RedisStreamStorage(request.getfixturevalue("redis_url"), key)  # type: ignore[assignment]
    assert [record async for record in CheckpointManager(storage).replay()] == [
        *({"k": k, "n": 90 + k} for k in range(10)),
        *({"k": "during", "n": n} for n in range(100, 150)),
    ]
    await storage.close()


async def test_a_flush_behind_a_queued_compaction_waits_for_it_without_flushing_over_and_over() -> None:
    """The first compaction carries appends; a second one, queued, holds those after its call: a
    flush of those waits for the second to let them go, rather than flushing again and again."""

    class Counting(PausingMemory):
        flushes = 0

        async def flush(self) -> None:
            self.flushes += 1
            await super().flush()

    storage = Counting()
    storage.go, storage.replacing = anyio.Event(), anyio.Event()
    checkpoint = CheckpointManager(storage, batch_bytes=100, flush_interval=None)
    await checkpoint.append({"k": 1, "n": 0})
    flushed = anyio.Event()

    async def flush() -> None:
        await checkpoint.flush()
        flushed.set()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(functools.partial(checkpoint.compact, key="k"))
        await storage.replacing.wait()  # the first carries: it waits in its swap
        tasks.start_soon(functools.partial(checkpoint.compact, key="k"))  # queued behind it
        await anyio.sleep(0.01)
        await checkpoint.append({"k": 1, "n": 1})  # after the second's call: held by it
        before = storage.flushes
        tasks.start_soon(flush)
        await anyio.sleep(0.2)
        assert not flushed.is_set(), "the flush returned before the compaction that holds its record"
        assert storage.flushes - before <= 2, f"{storage.flushes - before} storage flushes while it waited"
        storage.go.set()
    assert flushed.is_set()
    await checkpoint.close()
    # the second compaction folded what was there at its call; the record appended after follows
    assert [record async for record in CheckpointManager(storage).replay()] == [
        {"k": 1, "n": 0},
        {"k": 1, "n": 1},
    ]


class HoldingRecordingStorage(RecordingStorage):
    writes_during_replace = False


@pytest.mark.parametrize("storage_class", [RecordingStorage, HoldingRecordingStorage])
async def test_a_compaction_whose_first_write_fails_raises_the_storages_error_and_keeps_the_records(
    storage_class: type[RecordingStorage],
) -> None:
    storage = storage_class()
    checkpoint = CheckpointManager(storage, batch_bytes=1 << 20, flush_interval=None)
    await checkpoint.append({"k": 1, "n": 0})
    storage.fail_writes = 1
    with pytest.raises(StorageError, match="injected write failure"):  # itself, not in a group
        await checkpoint.compact(key="k")
    await checkpoint.append({"k": 1, "n": 1})
    await checkpoint.close()
    assert [record async for record in CheckpointManager(storage).replay()] == [
        {"k": 1, "n": 0},
        {"k": 1, "n": 1},
    ]


async def test_once_a_compaction_is_over_appends_stop_waiting_for_writes_under_way() -> None:
    """After a compaction, an append() to a batch that is not full returns at once again, as before
    it: it does not queue for the storage behind a flush's slow write."""
    storage = RecordingStorage(delay=0.05)
    checkpoint = CheckpointManager(storage, batch_bytes=1 << 20, flush_interval=None)
    await checkpoint.append({"before": 1})
    await checkpoint.compact([{"snapshot": 1}])
    await checkpoint.append({"after": 1})
    async with anyio.create_task_group() as tasks:
        storage.write_began = began = anyio.Event()
        tasks.start_soon(checkpoint.flush)
        await began.wait()
        await checkpoint.append({"after": 2})
        assert storage.writing == 1, "append() waited for the flush's write to end"
    await checkpoint.close()
    assert [record async for record in CheckpointManager(MemoryStorage(storage.name)).replay()] == [
        {"snapshot": 1},
        {"after": 1},
        {"after": 2},
    ]


async def test_a_record_that_cannot_be_encoded_leaves_the_journal_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    async with CheckpointManager.from_uri(path) as checkpoint:
        await checkpoint.append({"n": 0})
        with pytest.raises(TypeError, match="nothing was appended|must encode as a JSON object"):
            await checkpoint.compact([{"ok": 1}, ["not", "an", "object"]])
        with pytest.raises(TypeError, match="cannot encode"):
            await checkpoint.compact([{"ok": 1}, {"set": {1, 2}}])
        await checkpoint.append({"n": 1})
    assert await replay(path) == [{"n": 0}, {"n": 1}]
    assert not Path(str(path) + REPLACEMENT_SUFFIX).exists()


async def test_a_snapshots_records_are_encoded_with_the_managers_default(tmp_path: Path) -> None:
    """compact(records) encodes as append() does: a type only the manager's default= converts (a
    set) is written, not refused."""
    path = tmp_path / "default.jsonl"
    async with CheckpointManager.from_uri(path, default=sorted) as checkpoint:
        await checkpoint.append({"tags": {"b", "a"}})
        result = await checkpoint.compact([{"tags": {"c", "a"}}, {"tags": set()}])
        assert result.records == 2
    assert await replay(path) == [{"tags": ["a", "c"]}, {"tags": []}]


@pytest.mark.parametrize("error", [ValueError, anyio.ClosedResourceError, anyio.BrokenResourceError])
async def test_the_records_own_error_comes_out_of_compact_and_the_journal_stays(
    tmp_path: Path, error: type[Exception]
) -> None:
    """Whatever the records raise is compact()'s error, even an error of anyio's streams (a closed
    stream they read), which the hand-over to the compaction's task raises too (attack B4: it was
    taken for the compaction's end, and compact() said it was cancelled)."""
    path = tmp_path / "j.jsonl"

    async def records() -> AsyncIterator[dict[str, int]]:
        for n in range(10):
            yield {"state": n}
        raise error("the producer's own")

    async with CheckpointManager.from_uri(path) as checkpoint:
        await checkpoint.append({"n": 0})
        with pytest.raises(error, match="the producer's own"):
            await checkpoint.compact(records())
        await checkpoint.append({"n": 1})
    assert await replay(path) == [{"n": 0}, {"n": 1}]


class SlowToGiveBack(MemoryStorage):
    """A memory journal whose replace(), once its snapshot failed, waits for ``go`` before it ends:
    a storage undoing a swap (removing the new journal it began) takes a while."""

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self.giving_back = anyio.Event()
        self.go = anyio.Event()
        self.given_back = False

    async def replace(self, text: Any) -> None:
        try:
            await super().replace(text)
        except BaseException:
            self.giving_back.set()
            await self.go.wait()
            self.given_back = True
            raise


@pytest.mark.parametrize("when", ["as the records fail", "while it waits"])
async def test_compact_whose_records_failed_returns_once_the_old_journal_is_back_even_if_cancelled(
    when: str,
) -> None:
    """When the records raise, compact() waits for the compaction to give the old journal back
    before it returns, even if its caller is cancelled (as the records fail, or meanwhile): a
    caller that went on (or an event loop that ended) while the storage was still undoing the swap
    would cut that short."""
    storage = SlowToGiveBack()
    checkpoint = CheckpointManager(storage, flush_interval=None)
    await checkpoint.append({"old": 1})
    returned = anyio.Event()

    async def records() -> AsyncIterator[dict[str, int]]:
        yield {"state": 1}
        if when == "as the records fail":
            scope.cancel()
        raise ValueError("the producer's own")

    scope = anyio.CancelScope()
    async with anyio.create_task_group() as tasks:

        async def compact(scope: anyio.CancelScope) -> None:
            with scope, contextlib.suppress(ValueError):  # the records' error, unless cancelled first
                await checkpoint.compact(records())
            returned.set()

        tasks.start_soon(compact, scope)
        with anyio.fail_after(10):
            await storage.giving_back.wait()
        scope.cancel()
        await anyio.sleep(0.05)
        try:
            assert not returned.is_set(), (
                "compact() returned while the storage was giving the old journal back"
            )
        finally:
            storage.go.set()
        with anyio.fail_after(10):
            await returned.wait()
    assert storage.given_back
    await checkpoint.append({"old": 2})
    await checkpoint.close()
    assert [record async for record in CheckpointManager(MemoryStorage(storage.name)).replay()] == [
        {"old": 1},
        {"old": 2},
    ]


async def test_compact_takes_records_or_a_key(tmp_path: Path) -> None:
    """The refusal says both ways to call it, in full: the caller learns what to pass."""
    both_ways = re.escape(
        "compact() takes the snapshot's records, or key=FIELD to keep the last record for each "
        "value of a field; one of the two"
    )
    async with CheckpointManager.from_uri(tmp_path / "j.jsonl") as checkpoint:
        with pytest.raises(TypeError, match=f"^{both_ways}$"):
            await checkpoint.compact()
        with pytest.raises(TypeError, match=f"^{both_ways}$"):
            await checkpoint.compact([], key="url")
        with pytest.raises(ValueError, match="name of a record field"):
            await checkpoint.compact(key="")


async def test_a_corrupt_journal_is_not_compacted_unless_told_to_skip(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.jsonl"
    path.write_text('{"k":1,"n":0}\nnot json\n{"k":1,"n":2}\n')
    async with CheckpointManager.from_uri(path) as checkpoint:
        with pytest.raises(CorruptCheckpointError) as caught:
            await checkpoint.compact(key="k")
        assert caught.value.line == 2
    assert path.read_text() == '{"k":1,"n":0}\nnot json\n{"k":1,"n":2}\n'
    async with CheckpointManager.from_uri(path, on_corrupt="skip") as checkpoint:
        await checkpoint.compact(key="k")
    assert await replay(path) == [{"k": 1, "n": 2}]


async def test_the_header_is_not_a_record_and_lines_are_counted_with_it(tmp_path: Path) -> None:
    path = tmp_path / "header.jsonl"
    async with CheckpointManager.from_uri(path) as checkpoint:
        await checkpoint.compact([{"n": 0}])
    with path.open("a") as file:
        file.write('garbage\n{"n":1}\n')
    with pytest.raises(CorruptCheckpointError) as caught:
        await replay(path)
    header = path.read_bytes().split(b"\n")[0]
    assert (caught.value.line, caught.value.offset) == (3, len(header) + 1 + len('{"n":0}\n'))


async def test_a_storage_that_cannot_replace_says_so_and_keeps_appending() -> None:
    class NoReplace(MemoryStorage):
        replace = MemoryStorage.__mro__[2].replace  # CheckpointStorage's: it refuses

    storage = NoReplace()
    async with CheckpointManager(storage) as checkpoint:
        await checkpoint.append({"n": 0})
        with pytest.raises(CompactionNotSupportedError, match="does not implement replace"):
            await checkpoint.compact(key="n")
        await checkpoint.append({"n": 1})
        assert [record async for record in checkpoint.replay()] == [{"n": 0}, {"n": 1}]


async def test_a_reader_and_a_closed_manager_cannot_compact(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    async with CheckpointManager.from_uri(path, read_only=True) as reader:
        with pytest.raises(ReadOnlyError):
            await reader.compact(key="k")
    checkpoint = CheckpointManager.from_uri(path)
    await checkpoint.close()
    with pytest.raises(StorageClosedError):
        await checkpoint.compact(key="k")


async def test_a_cancelled_compaction_finishes_and_loses_nothing(tmp_path: Path) -> None:
    if not _on_asyncio():
        pytest.skip("asyncio's own cancellation")
    path = tmp_path / "cancelled.jsonl"
    async with CheckpointManager.from_uri(path) as checkpoint:
        for n in range(50_000):
            await checkpoint.append({"k": n % 10, "n": n})
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await checkpoint.compact(key="k")
        await checkpoint.append({"k": "after", "n": -1})
    records = await replay(path)
    assert records == [{"k": k, "n": 49_990 + k} for k in range(10)] + [{"k": "after", "n": -1}]


async def test_the_local_swap_fsyncs_the_new_journal_before_the_rename_and_the_directory_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "synced.jsonl"
    renames: list[tuple[int, int]] = []  # fsyncs seen at each rename
    rename = os.rename
    async with CheckpointManager.from_uri(path, fsync=False) as checkpoint:  # compaction fsyncs anyway
        await checkpoint.append({"k": 1})
        with spy_on_fsync(monkeypatch) as fsyncs:
            monkeypatch.setattr(os, "rename", lambda a, b: (renames.append(len(fsyncs.calls)), rename(a, b)))
            await checkpoint.compact(key="k")
    assert renames == [1], "the new journal was not fsynced (once) before it was renamed over the old"
    assert fsyncs.calls[0].path == str(path) + REPLACEMENT_SUFFIX
    assert fsyncs.calls[0].size > 0
    assert fsyncs.directories() == [str(tmp_path)], "the directory was not fsynced after the rename"


async def test_a_second_writer_is_refused_after_a_compaction_and_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "locked.jsonl"
    async with CheckpointManager.from_uri(path) as checkpoint:
        await checkpoint.append({"n": 0})
        await checkpoint.compact(key="n")
        second = LocalFileStorage(path)
        with pytest.raises(CheckpointLockedError):
            await second.write('{"n":99}\n')
        await second.close()
        await checkpoint.append({"n": 1})
    assert await replay(path) == [{"n": 0}, {"n": 1}]


async def test_a_writer_that_locks_the_file_compaction_renamed_away_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second writer opens the old file; the first compacts and lets go of it; the second locks it."""
    path = tmp_path / "race.jsonl"
    first = LocalFileStorage(path)
    await first.write('{"n":0}\n')
    real_flock = fcntl.flock
    swapped = False

    def flock_after_a_compaction(fd: int, operation: int) -> None:
        nonlocal swapped
        if not swapped and operation & fcntl.LOCK_NB:  # the second writer, its old file open
            swapped = True
            new = str(path) + ".new"
            Path(new).write_text('{"n":1}\n')
            held = os.open(new, os.O_RDONLY)
            real_flock(held, fcntl.LOCK_EX)  # the first writer locks the new journal
            os.rename(new, path)
            os.close(first._fd) if first._fd is not None else None  # and lets go of the old one
            first._fd = held
        real_flock(fd, operation)

    second = LocalFileStorage(path)
    monkeypatch.setattr(fcntl, "flock", flock_after_a_compaction)
    with pytest.raises(CheckpointLockedError, match="compacted by another writer") as refused:
        await second.write('{"n":99}\n')
    monkeypatch.undo()
    assert str(refused.value) == (
        f"{path} was compacted by another writer as this one opened it; yoink allows one writer at a "
        "time, and nothing was written"
    )
    await second.close()
    assert path.read_text() == '{"n":1}\n', "the refused writer wrote to the journal"
    await first.close()


async def test_a_crashed_compactions_leftover_is_removed_by_the_next_writer(tmp_path: Path) -> None:
    path = tmp_path / "left.jsonl"
    path.write_text('{"n":0}\n')
    leftover = Path(str(path) + REPLACEMENT_SUFFIX)
    leftover.write_text('{"half":')  # a compaction killed as it wrote the new journal
    async with CheckpointManager.from_uri(path) as checkpoint:
        await checkpoint.append({"n": 1})
    assert not leftover.exists()
    assert await replay(path) == [{"n": 0}, {"n": 1}]


async def test_the_policy_compacts_in_the_background_as_the_journal_grows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="yoink._manager")
    path = tmp_path / "policy.jsonl"
    policy = CompactionPolicy(key="k", growth=2.0, min_bytes=50_000)

    def compactions() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage().startswith("compacted")]

    async with CheckpointManager.from_uri(path, batch_bytes=4096, compact=policy) as checkpoint:
        n = 0
        while len(compactions()) < 3 and n < 1_000_000:
            await checkpoint.append({"k": n % 50, "n": n})
            n += 1
            if n % 1000 == 0:
                await anyio.sleep(0.001)  # a real job awaits its work: the compaction's turns
        await checkpoint.flush()
    assert len(compactions()) >= 3, "the policy did not compact again as the journal grew"
    records = await replay(path)
    assert len(records) < n // 2, "the journal holds most records: the compactions did not shrink it"
    last = {record["k"]: record["n"] for record in records}
    assert last == {k: n - 50 + (k - n) % 50 for k in range(50)}, "a record was lost or a stale one kept"
    header = await _header(path)
    assert header is not None
    assert header.key == "k"


async def test_the_policy_counts_the_journal_replayed_at_opening_as_its_size(
    caplog: pytest.LogCaptureFixture, async_backend: str
) -> None:
    """A journal replayed when the job opened it is compacted only once it has grown by ``growth``
    times that size, not as soon as min_bytes were appended."""
    caplog.set_level(logging.INFO, logger="yoink._manager")
    storage = MemoryStorage(f"policy-base-{async_backend}-{os.getpid()}-{id(caplog)}")

    def record(n: int) -> dict[str, str]:
        return {"k": f"{n % 50:02}", "n": f"{n:06}"}  # every record the same size

    before = 2000
    async with CheckpointManager(storage, flush_interval=None) as checkpoint:
        await checkpoint.append_many(record(n) for n in range(before))
    policy = CompactionPolicy(key="k", growth=2.0, min_bytes=1000)
    async with CheckpointManager(MemoryStorage(storage.name), batch_bytes=1024, compact=policy) as checkpoint:
        assert len([r async for r in checkpoint.replay()]) == before
        n = before
        while not [r for r in caplog.records if r.getMessage().startswith("compacted")] and n < 20_000:
            await checkpoint.append(record(n))
            n += 1
            if n % 100 == 0:
                await anyio.sleep(0.001)  # the compaction's turns
    compacted = [r for r in caplog.records if r.getMessage().startswith("compacted")]
    assert compacted, "the policy never compacted"
    records_before = compacted[0].args[2]
    assert records_before >= 2 * before, f"compacted at {records_before} records, before the journal doubled"


async def test_the_policy_compacts_again_with_the_write_that_makes_the_journal_growth_times_its_size(
    caplog: pytest.LogCaptureFixture, async_backend: str
) -> None:
    """After a compaction left a journal of B bytes (its header and snapshot), the next one starts
    with the write that brings it to ``growth`` x B, and not with the one before, a byte short."""
    caplog.set_level(logging.INFO, logger="yoink._manager")
    storage = MemoryStorage(f"policy-exact-{async_backend}-{os.getpid()}-{id(caplog)}")
    policy = CompactionPolicy(key="k", growth=2.0, min_bytes=0)

    def compactions() -> int:
        return sum(r.getMessage().startswith("compacted") for r in caplog.records)

    async def journal_bytes() -> int:
        return len("".join([item async for item in MemoryStorage(storage.name).read()]).encode())

    async def replayed(checkpoint: CheckpointManager) -> int:
        """The records, once a compaction the last write started (in a task of its own) is over."""
        for _ in range(3):
            await anyio.lowlevel.checkpoint()  # the task starts, and its cut makes replay() wait
        return len([record async for record in checkpoint.replay()])

    async with CheckpointManager(storage, flush_interval=None, compact=policy) as checkpoint:
        await checkpoint.append({"k": "a"})
        await checkpoint.flush()  # a journal that was never compacted is due at once (min_bytes=0)
        with anyio.fail_after(10):  # not replay(), which would take the journal's size for its own
            while not compactions():
                await anyio.sleep(0.01)
        size = await journal_bytes()
        short = '{"k":"b","p":""}\n'
        await checkpoint.append({"k": "b", "p": "x" * (size - 1 - len(short))})  # size - 1 bytes
        await checkpoint.flush()
        assert await replayed(checkpoint) == 2
        assert compactions() == 1, "compacted before the journal had grown to twice its size"
        await checkpoint.append({"k": "c"})
        await checkpoint.flush()
        assert await replayed(checkpoint) == 3
        assert compactions() == 2, "not compacted once the journal had grown to twice its size"


@pytest.mark.parametrize(
    "error",
    [
        StorageError("the disk is full"),
        CorruptCheckpointError("line 3 is not a record", line=3, offset=40),
        RuntimeError("a bug"),
    ],
)
async def test_a_failed_background_compaction_is_logged_and_tried_again_once_the_journal_grew_again(
    caplog: pytest.LogCaptureFixture, error: Exception, async_backend: str
) -> None:
    failures = [error]
    sizes = []  # the journal's bytes at each compaction's call

    class FailingOnce(MemoryStorage):
        async def replace(self, text: Any) -> None:
            sizes.append(sum(len(item) for item in self._journals.get(self.name, [])))
            if failures:
                raise failures.pop()
            await super().replace(text)

    caplog.set_level(logging.INFO, logger="yoink._manager")
    storage = FailingOnce(f"failing-once-{async_backend}-{id(error)}")
    policy = CompactionPolicy(key="k", growth=2.0, min_bytes=20_000)
    async with CheckpointManager(storage, batch_bytes=1024, compact=policy) as checkpoint:
        n = 0
        while not [r for r in caplog.records if r.getMessage().startswith("compacted")] and n < 100_000:
            await checkpoint.append({"k": n % 50, "n": n})
            n += 1
            if n % 100 == 0:
                await anyio.lowlevel.checkpoint()
        await checkpoint.flush()
        numbers = [record["n"] async for record in checkpoint.replay()]
    assert numbers == sorted(numbers)
    assert {number % 50: number for number in numbers} == {k: n - 50 + (k - n) % 50 for k in range(50)}
    failed, compacted = caplog.records[0], caplog.records[-1]
    if isinstance(error, (StorageError, CorruptCheckpointError)):  # not a bug: no traceback
        assert (failed.levelname, failed.getMessage()) == (
            "WARNING",
            f"background compaction of {checkpoint!r} failed; appending goes on: {error}",
        )
        assert failed.exc_info is None
    else:
        assert (failed.levelname, failed.getMessage()) == (
            "ERROR",
            f"background compaction of {checkpoint!r} failed; appending goes on",
        )
        assert failed.exc_info is not None
        assert failed.exc_info[1] is error
    assert compacted.getMessage() == f"compacted {checkpoint!r} by 'k': {compacted.args[2]} records to 50"
    # tried again only once the journal grew by min_bytes again
    assert len(sizes) == 2
    assert sizes[1] - sizes[0] >= 20_000
    assert len(caplog.records) == 2


async def _header(path: Path) -> Compaction | None:
    from yoink._records import JournalDecoder

    decoder = JournalDecoder(str(path))
    async for _ in decoder.batches(LocalFileStorage(path).read()):
        pass
    return None if decoder.header is None else Compaction.from_header(decoder.header)


def test_a_policy_with_bad_settings_is_refused() -> None:
    with pytest.raises(ValueError, match="key"):
        CompactionPolicy(key="")
    with pytest.raises(ValueError, match="growth"):
        CompactionPolicy(key="k", growth=1.0)
    with pytest.raises(ValueError, match="min_bytes"):
        CompactionPolicy(key="k", min_bytes=-1)
    with pytest.raises(TypeError, match="CompactionPolicy"):
        CheckpointManager(MemoryStorage(), compact="url")  # type: ignore[arg-type]


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


SECOND_WRITER = """
import asyncio, sys
from yoink import CheckpointLockedError
from yoink.storage import LocalFileStorage

async def main():
    storage = LocalFileStorage(sys.argv[1])
    try:
        await storage.write('{"n":-1}\\n')
    except CheckpointLockedError as exc:
        print("refused", exc)
    else:
        print("wrote")
    await storage.close()

asyncio.run(main())
"""


async def test_a_second_process_is_refused_while_a_compaction_runs_and_nothing_is_lost(
    tmp_path: Path,
) -> None:
    path = tmp_path / "busy.jsonl"
    attempts: list[str] = []

    async def snapshot() -> AsyncIterator[dict[str, int]]:
        for n in range(3):
            yield {"n": n}
            # Another process tries to write as the new journal is written, then once more.
            attempts.append(await _run_second_writer(path))

    async with CheckpointManager.from_uri(path) as checkpoint:
        await checkpoint.append({"old": 1})
        await checkpoint.compact(snapshot())
        attempts.append(await _run_second_writer(path))  # and after the swap
        await checkpoint.append({"n": 3})
    assert len(attempts) == 4
    assert all(attempt.startswith("refused") for attempt in attempts), attempts
    assert await replay(path) == [{"n": 0}, {"n": 1}, {"n": 2}, {"n": 3}]


async def _run_second_writer(path: Path) -> str:
    result = await anyio.run_process([sys.executable, "-c", SECOND_WRITER, str(path)], check=True)
    return result.stdout.decode().strip()


async def test_a_reader_replaying_during_a_compaction_sees_the_old_journal_whole(tmp_path: Path) -> None:
    path = tmp_path / "read.jsonl"
    pad = "p" * 200
    async with CheckpointManager.from_uri(path) as checkpoint:
        for n in range(50_000):  # about 11 MB: several read chunks
            await checkpoint.append({"k": n % 10, "n": n, "pad": pad})
        await checkpoint.flush()
        async with CheckpointManager.from_uri(path, read_only=True) as reader:
            records = reader.replay()
            first = await records.__anext__()
            await checkpoint.compact(key="k")
            rest = [record["n"] async for record in records]
    assert [first["n"], *rest] == list(range(50_000)), "the reader saw part of each journal"
    assert [record["n"] for record in await replay(path)] == list(range(49_990, 50_000))


async def test_compactions_called_together_run_in_turn_each_after_what_was_appended_before_it() -> None:
    storage = SlowReplace()
    checkpoint = CheckpointManager(storage, batch_bytes=10, flush_interval=None)
    await checkpoint.append({"before": 1})
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(checkpoint.compact, [{"snapshot": 1}])
        await storage.replacing.wait()
        await checkpoint.append({"between": 1})  # replaced by the second snapshot
        tasks.start_soon(checkpoint.compact, [{"snapshot": 2}])
        await anyio.sleep(0.01)
        await checkpoint.append({"after": 2})  # follows it
        storage.go.set()
    await checkpoint.close()
    assert [record async for record in CheckpointManager(MemoryStorage(storage.name)).replay()] == [
        {"snapshot": 2},
        {"after": 2},
    ]


async def test_a_compaction_cancelled_before_it_began_holds_nothing_back(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    async with CheckpointManager.from_uri(path, batch_bytes=10) as checkpoint:
        await checkpoint.append({"n": 0})
        with anyio.CancelScope() as scope:
            scope.cancel()
            await checkpoint.compact(key="n")
        await checkpoint.append({"n": 1})
        with anyio.fail_after(5):
            await checkpoint.flush()  # would wait for ever behind a cut left in place
    assert await replay(path) == [{"n": 0}, {"n": 1}]


async def test_a_first_record_never_passes_for_the_header(tmp_path: Path) -> None:
    path = tmp_path / "lookalike.jsonl"
    lookalikes = [
        {"$yoink": {"compaction": {"at": "x", "key": None}}},
        {"$yoink": {"user": 1}, "url": "a"},
    ]
    for first in lookalikes:
        path.unlink(missing_ok=True)
        async with CheckpointManager.from_uri(path) as checkpoint:
            await checkpoint.append(first)
            await checkpoint.append({"url": "b"})
        assert await replay(path) == [first, {"url": "b"}], "a flushed record was taken for the header"
        async with CheckpointManager.from_uri(path) as checkpoint:
            await checkpoint.compact(key="url")
        assert await replay(path) == [first, {"url": "b"}], "compaction dropped a record taken for the header"


async def test_a_compaction_whose_caller_is_cancelled_before_its_snapshot_ends_keeps_the_old_journal(
    tmp_path: Path,
) -> None:
    # A producer in the caller's task group streams the state; a sibling fails, the group cancels
    # the producer (whose stream then ends) and compact(): the snapshot is not complete.
    path = tmp_path / "state.jsonl"
    async with CheckpointManager.from_uri(path) as checkpoint:
        for n in range(1000):
            await checkpoint.append({"n": n})
        send, receive = anyio.create_memory_object_stream[dict[str, int]](10)

        async def produce() -> None:
            async with send:
                for n in range(1000):
                    await send.send({"state": n})
                    await anyio.sleep(0.001)

        async def fail() -> None:
            await anyio.sleep(0.1)
            raise RuntimeError("another part of the job failed")

        failure: BaseException | None = None
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(produce)
                tasks.start_soon(fail)
                async with receive:
                    await checkpoint.compact(receive)
        except BaseException as exc:  # the task group's group of errors
            failure = exc
        assert "another part of the job failed" in repr(failure)
        await checkpoint.append({"n": 1000})
    assert await replay(path) == [{"n": n} for n in range(1001)], "a partial snapshot replaced the journal"


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio tasks count their cancellations from 3.11")
@pytest.mark.parametrize("how", ["task.cancel", "asyncio.timeout", "TaskGroup"])
def test_a_snapshot_ended_by_a_swallowed_asyncio_cancellation_keeps_the_old_journal(
    tmp_path: Path, how: str
) -> None:
    """A producer that ends its stream when cancelled (a queue consumer that returns on
    CancelledError) swallows asyncio's cancellation, which is delivered once: its end is still not
    the snapshot's, and compact() is cancelled (attack B1: the journal became a partial snapshot)."""
    path = tmp_path / "j.jsonl"

    async def main() -> None:
        async with CheckpointManager.from_uri(path) as checkpoint:
            for n in range(100):
                await checkpoint.append({"old": n})
            await checkpoint.flush()
            queue: asyncio.Queue[dict[str, int]] = asyncio.Queue()
            for n in range(10):
                queue.put_nowait({"state": n})

            async def from_queue() -> AsyncIterator[dict[str, int]]:
                while True:
                    try:
                        item = await queue.get()
                    except asyncio.CancelledError:
                        return
                    yield item

            if how == "task.cancel":
                task = asyncio.create_task(checkpoint.compact(from_queue()))
                while queue.qsize():  # the producer waits for more once it has taken these
                    await asyncio.sleep(0.01)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            elif how == "asyncio.timeout":
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.2):
                        await checkpoint.compact(from_queue())
            else:

                async def fail() -> None:
                    await asyncio.sleep(0.2)
                    raise RuntimeError("another part of the job failed")

                failure: BaseException | None = None
                try:
                    async with asyncio.TaskGroup() as group:
                        group.create_task(fail())
                        await checkpoint.compact(from_queue())
                except BaseException as exc:  # the task group's group of errors
                    failure = exc
                assert "another part of the job failed" in repr(failure)
            await checkpoint.append({"old": 100})

    asyncio.run(main())
    records = anyio.run(replay, path)
    assert records == [{"old": n} for n in range(101)], "a partial snapshot replaced the journal"


async def test_a_cancelled_compaction_stops_waiting_on_every_event_loop(tmp_path: Path) -> None:
    async def endless() -> AsyncIterator[dict[str, int]]:
        n = 0
        while True:
            await anyio.sleep(0.01)
            yield {"n": n}
            n += 1

    async with CheckpointManager.from_uri(tmp_path / "j.jsonl") as checkpoint:
        await checkpoint.append({"old": 1})
        # The records never end: a compact() that did not stop waiting would never return.
        with anyio.fail_after(10), anyio.move_on_after(0.2) as scope:
            await checkpoint.compact(endless())
        assert scope.cancelled_caught
    assert await replay(tmp_path / "j.jsonl") == [{"old": 1}]


async def test_a_snapshot_may_replay_the_journal_it_replaces_to_filter_it(tmp_path: Path) -> None:
    path = tmp_path / "filter.jsonl"
    async with CheckpointManager.from_uri(path, batch_bytes=64) as checkpoint:
        for n in range(10):
            await checkpoint.append({"n": n})
        kept = (record async for record in checkpoint.replay() if record["n"] % 3 == 0)
        with anyio.fail_after(10):
            result = await checkpoint.compact(kept)
        await checkpoint.append({"n": 10})
        assert result.records == 4
    assert await replay(path) == [{"n": 0}, {"n": 3}, {"n": 6}, {"n": 9}, {"n": 10}]


@pytest.mark.parametrize("call", ["flush", "compact", "close"])
async def test_a_snapshot_that_flushes_compacts_or_closes_its_own_manager_is_refused(
    tmp_path: Path, call: str
) -> None:
    path = tmp_path / "self.jsonl"
    async with CheckpointManager.from_uri(path) as checkpoint:
        await checkpoint.append({"n": 0})

        async def snapshot() -> AsyncIterator[dict[str, int]]:
            yield {"n": 1}
            if call == "compact":
                await checkpoint.compact(key="n")
            else:
                await getattr(checkpoint, call)()
            yield {"n": 2}

        with (
            anyio.fail_after(10),
            pytest.raises(
                RuntimeError,
                match="^"
                + re.escape(
                    f"{call}() in the records of a compact() of the same manager would wait for that "
                    "compaction, which waits for its records; append() and replay() may be called there"
                )
                + "$",
            ),
        ):
            await checkpoint.compact(snapshot())
        await checkpoint.append({"n": 3})
    assert await replay(path) == [{"n": 0}, {"n": 3}]


async def test_close_waits_for_the_compactions_called_before_it() -> None:
    storage = SlowReplace()
    checkpoint = CheckpointManager(storage, flush_interval=None)
    await checkpoint.append({"before": 1})
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(checkpoint.compact, [{"snapshot": 1}])
        await storage.replacing.wait()
        tasks.start_soon(checkpoint.compact, [{"snapshot": 2}])  # queued behind the first
        await anyio.sleep(0.01)
        tasks.start_soon(checkpoint.close)
        await anyio.sleep(0.01)
        storage.go.set()
    assert [record async for record in CheckpointManager(MemoryStorage(storage.name)).replay()] == [
        {"snapshot": 2}
    ], "close() closed the storage under a compaction called before it"


async def test_appends_are_refused_after_a_close_that_waited_for_a_compaction() -> None:
    """close() refuses appends from the moment it is called; a compaction that ends while close()
    waits for it does not open the manager to appends again (they would be lost, never written)."""
    storage = SlowReplace()
    checkpoint = CheckpointManager(storage, flush_interval=None)
    await checkpoint.append({"before": 1})
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(checkpoint.compact, [{"snapshot": 1}])
        await storage.replacing.wait()
        tasks.start_soon(checkpoint.close)
        await anyio.sleep(0.01)
        storage.go.set()
    with pytest.raises(StorageClosedError, match="is closed"):
        await checkpoint.append({"after": 1})
    with pytest.raises(StorageClosedError, match="is closed"):
        await checkpoint.append_many([{"after": 2}])


async def test_replay_beside_queued_compactions_sees_every_record_appended_before_it() -> None:
    storage = SlowReplace()
    checkpoint = CheckpointManager(storage, batch_bytes=10, flush_interval=None)
    seen: list[dict[str, Any]] = []
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(checkpoint.compact, [{"snapshot": 1}])
        await storage.replacing.wait()
        await checkpoint.append({"n": "X"})  # follows the first snapshot
        tasks.start_soon(checkpoint.compact, [{"snapshot": 1}, {"n": "X"}])  # queued, X in it
        await anyio.sleep(0.01)
        await checkpoint.append({"n": "Y"})  # follows the second

        async def read() -> None:
            seen.extend([record async for record in checkpoint.replay()])

        tasks.start_soon(read)
        await anyio.sleep(0.01)
        storage.go.set()
    await checkpoint.close()
    assert seen == [{"snapshot": 1}, {"n": "X"}, {"n": "Y"}]


def test_a_child_forked_during_a_compaction_is_refused_its_parents_manager(tmp_path: Path) -> None:
    async def main() -> str:
        checkpoint = CheckpointManager.from_uri(tmp_path / "j.jsonl", flush_interval=None)
        await checkpoint.append({"n": 0})
        answers: list[str] = []

        def snapshot() -> Iterator[dict[str, int]]:
            yield {"n": 1}
            answers.append(_in_a_forked_child(checkpoint))  # the parent holds its locks now
            yield {"n": 2}

        await checkpoint.compact(snapshot())
        await checkpoint.close()
        return answers[0]

    answer = anyio.run(main)
    assert answer.startswith("refused: StorageClosedError"), answer
    # the child is told which process opened the manager: this one, its parent
    assert f"it was opened by process {os.getpid()}, and this process is a fork of it" in answer, answer


def _in_a_forked_child(checkpoint: CheckpointManager) -> str:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: use the inherited manager from a thread of its own, with a deadline

        def use() -> str:
            async def flush() -> None:
                await checkpoint.append({"n": "child"})
                await checkpoint.flush()

            try:
                anyio.run(flush)
            except Exception as exc:
                return f"refused: {type(exc).__name__}: {exc}"
            return "flushed"

        answer: list[str] = []
        thread = threading.Thread(target=lambda: answer.append(use()), daemon=True)
        thread.start()
        thread.join(5)
        os.write(write, (answer[0] if answer else "hung").encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as answer_pipe:
        answer = answer_pipe.read().decode()
    os.waitpid(pid, 0)
    return answer


async def test_a_record_nested_deeper_than_orjson_writes_is_compacted(tmp_path: Path) -> None:
    path = tmp_path / "deep.jsonl"
    deep = "[" * 1000 + "]" * 1000
    path.write_text(f'{{"k":1,"deep":{deep}}}\n{{"k":2}}\n{{"k":1,"deep":{deep}}}\n')
    async with CheckpointManager.from_uri(path) as checkpoint:
        await checkpoint.compact(key="k")
    records = await replay(path)
    assert [record["k"] for record in records] == [2, 1]


async def test_a_record_decoded_line_by_line_is_written_back_as_yoink_writes_a_line(tmp_path: Path) -> None:
    """Where the decoder read an item line by line (here a blank line in it), the fold keeps records,
    not lines, and writes them again: compact UTF-8, as orjson writes, even where orjson cannot
    write the record (an integer beyond 64 bits) and the json module does; the fields in their order."""
    path = tmp_path / "mixed.jsonl"
    big = 2**64
    first = '{"k": 1, "v": "é", "x": 1e16, "a": 1e-7}'
    second = '{"k": 2, "id": ' + str(big) + ', "v": "é", "z": [1, {"a": 2}]}'
    path.write_text(f"{first}\n\n{second}\n", encoding="utf-8")
    async with CheckpointManager.from_uri(path) as checkpoint:
        await checkpoint.compact(key="k")
    lines = path.read_bytes().splitlines()
    assert lines[1:] == [
        orjson.dumps({"k": 1, "v": "é", "x": 1e16, "a": 1e-7}),  # 1e16 and 1e-7, as orjson writes them
        b'{"k":2,"id":18446744073709551616,"v":"\xc3\xa9","z":[1,{"a":2}]}',
    ]
    assert await replay(path) == [
        {"k": 1, "v": "é", "x": 1e16, "a": 1e-7},
        {"k": 2, "id": big, "v": "é", "z": [1, {"a": 2}]},
    ]


async def test_keys_holding_an_integer_beyond_64_bits_are_one_key_whatever_the_order_of_their_fields(
    tmp_path: Path,
) -> None:
    """A key is compared as JSON with its fields sorted; orjson cannot write such a key, the json
    module does, and must sort them too."""
    path = tmp_path / "keys.jsonl"
    big = 2**64
    path.write_text(
        f'{{"k":{{"a":1,"id":{big}}},"n":1}}\n{{"k":{{"id":{big},"a":1}},"n":2}}\n{{"k":{{"id":{big},"a":2}},"n":3}}\n'
    )
    async with CheckpointManager.from_uri(path) as checkpoint:
        result = await checkpoint.compact(key="k")
    assert [record["n"] for record in await replay(path)] == [2, 3]
    assert (result.records_before, result.records) == (3, 2)


async def test_a_write_that_failed_in_a_compaction_leaves_the_next_ones_cut_where_it_was_called() -> None:
    """The failed write's records go back to the buffer, and the count of bytes handed to the
    storage back to what it was: the next compaction, called before the failure, still replaces
    every record appended before its call."""
    go = anyio.Event()

    class FailsFirstWrite(MemoryStorage):
        failed = False

        async def write(self, data: str) -> None:
            if not self.failed:
                self.failed = True
                await go.wait()
                raise StorageError("the disk is full")
            await super().write(data)

    storage = FailsFirstWrite(f"failed-cut-{uuid.uuid4()}")
    checkpoint = CheckpointManager(storage, flush_interval=None)
    await checkpoint.append({"k": 1, "n": 1})
    snapshot: list[Compaction] = []
    async with anyio.create_task_group() as tasks:

        async def first() -> None:
            with pytest.raises(StorageError, match="the disk is full"):
                await checkpoint.compact(key="k")

        async def second() -> None:
            snapshot.append(await checkpoint.compact([{"snapshot": "b"}]))

        tasks.start_soon(first)
        await anyio.sleep(0.05)  # its write waits
        await checkpoint.append({"k": 2, "n": 2})
        tasks.start_soon(second)
        await anyio.sleep(0.05)  # called: its cut is after both records
        go.set()
    await checkpoint.close()
    assert snapshot[0].records == 1
    assert [record async for record in CheckpointManager(MemoryStorage(storage.name)).replay()] == [
        {"snapshot": "b"}
    ]


async def test_a_flush_round_behind_a_compactions_cut_hands_the_storage_no_empty_write() -> None:
    """A flush called while the compaction flushes up to its cut finds, once it has the lock,
    nothing before the cut left to write: it writes nothing (not an empty string) and waits."""
    gate = anyio.Event()

    class Recording(PausingHolding):
        writes: list[str]

        async def write(self, data: str) -> None:
            self.writes.append(data)
            await super().write(data)

        async def flush(self) -> None:
            await gate.wait()
            await super().flush()

    storage = Recording(f"no-empty-write-{uuid.uuid4()}")
    storage.writes, storage.go, storage.replacing = [], anyio.Event(), anyio.Event()
    checkpoint = CheckpointManager(storage, flush_interval=None)
    await checkpoint.append({"k": 1})
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(functools.partial(checkpoint.compact, key="k"))
        await anyio.sleep(0.05)  # it has written up to its cut, and flushes
        await checkpoint.append({"k": 2})
        tasks.start_soon(checkpoint.flush)
        await anyio.sleep(0.05)
        gate.set()
        await storage.replacing.wait()
        storage.go.set()
    await checkpoint.close()
    assert storage.writes == ['{"k":1}\n', '{"k":2}\n']


async def test_the_policy_counts_a_journal_this_manager_never_replayed_from_nothing() -> None:
    """No replay, no compaction yet: the journal's size is unknown, so its growth counts from 0,
    and the first write past ``min_bytes`` is due whatever the ``growth``."""
    replaced = anyio.Event()

    class Counting(MemoryStorage):
        async def replace(self, text: Any) -> None:
            await super().replace(text)
            replaced.set()

    policy = CompactionPolicy(key="k", growth=100.0, min_bytes=1)
    storage = Counting(f"policy-from-nothing-{uuid.uuid4()}")
    async with CheckpointManager(storage, batch_bytes=1, flush_interval=None, compact=policy) as checkpoint:
        await checkpoint.append({"k": 1})  # 8 bytes, a full batch: written at once
        with anyio.fail_after(5):
            await replaced.wait()


async def test_the_policy_on_a_fresh_journal_is_due_at_min_bytes_not_a_byte_sooner() -> None:
    replaced = anyio.Event()

    class Counting(MemoryStorage):
        async def replace(self, text: Any) -> None:
            await super().replace(text)
            replaced.set()

    policy = CompactionPolicy(key="k", growth=2.0, min_bytes=9)  # a record of 8 bytes, then another
    storage = Counting(f"policy-min-bytes-{uuid.uuid4()}")
    async with CheckpointManager(storage, batch_bytes=1, flush_interval=None, compact=policy) as checkpoint:
        await checkpoint.append({"k": 1})
        await anyio.sleep(0.05)
        assert not replaced.is_set(), "compacted with 8 bytes written, under min_bytes"
        await checkpoint.append({"k": 2})
        with anyio.fail_after(5):
            await replaced.wait()
