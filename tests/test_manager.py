"""CheckpointManager: encoding, batching, flushing, backpressure and replay."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import sys
import uuid
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from tests.conftest import OpenStorage
from tests.helpers import ClosingStorage, RecordingStorage
from yoink import CheckpointManager, CorruptCheckpointError, ReadOnlyError, StorageClosedError, StorageError
from yoink.storage import LocalFileStorage, MemoryStorage

pytestmark = pytest.mark.usefixtures("async_backend")  # every test runs under asyncio and trio


async def replay_all(manager: CheckpointManager) -> list[dict[str, Any]]:
    return [record async for record in manager.replay()]


def journal(text: str) -> MemoryStorage:
    """A memory journal that already holds ``text``, as if written by an earlier process."""
    name = f"journal-{uuid.uuid4()}"
    MemoryStorage._journals[name] = [text]
    return MemoryStorage(name)


@dataclasses.dataclass
class Page:
    url: str
    fetched_at: datetime.datetime
    id: uuid.UUID


async def test_records_round_trip_through_a_restart(open_storage: OpenStorage) -> None:
    when = datetime.datetime(2026, 11, 21, 6, 30, tzinfo=datetime.timezone.utc)
    page_id = uuid.UUID(int=7)
    async with CheckpointManager(open_storage()) as manager:
        await manager.append({"url": "https://example.com/", "status": 200, "links": ["a", "b"]})
        await manager.append(Page("https://example.com/a", when, page_id))
        await manager.append_many({"n": n, "text": "café ✓"} for n in range(3))
    async with CheckpointManager(storage=open_storage()) as manager:
        assert await replay_all(manager) == [
            {"url": "https://example.com/", "status": 200, "links": ["a", "b"]},
            {"url": "https://example.com/a", "fetched_at": "2026-11-21T06:30:00+00:00", "id": str(page_id)},
            *({"n": n, "text": "café ✓"} for n in range(3)),
        ]


@pytest.mark.parametrize("record", [[1, 2], 3, "text", None, True])
async def test_a_record_that_is_not_an_object_is_refused_and_nothing_is_written(record: Any) -> None:
    storage = RecordingStorage()
    async with CheckpointManager(storage) as manager:
        await manager.append({"kept": 1})
        with pytest.raises(TypeError, match="must encode as a JSON object.*nothing was appended"):
            await manager.append(record)
        assert await replay_all(manager) == [{"kept": 1}]


@pytest.mark.parametrize("record", [{"tags": {1, 2}}, {"obj": object()}, {1: "int key"}, {"big": 2**70}])
async def test_an_unserializable_record_is_refused_with_the_reason(record: dict[Any, Any]) -> None:
    async with CheckpointManager(RecordingStorage()) as manager:
        await manager.append({"kept": 1})
        with pytest.raises(TypeError, match="cannot encode a dict record as JSON: .+; nothing was appended"):
            await manager.append(record)
        assert await replay_all(manager) == [{"kept": 1}]


async def test_append_many_is_all_or_nothing() -> None:
    async with CheckpointManager(RecordingStorage()) as manager:
        with pytest.raises(TypeError, match="must encode as a JSON object .*not list; nothing was appended"):
            await manager.append_many([{"a": 1}, {"b": 2}, ["not", "an", "object"]])
        assert await replay_all(manager) == []
        assert not await manager.exists()


async def test_default_encodes_types_orjson_does_not_know() -> None:
    class Money:
        def __init__(self, cents: int) -> None:
            self.cents = cents

    def default(value: Any) -> Any:
        if isinstance(value, Money):
            return value.cents
        raise TypeError

    storage = RecordingStorage()
    async with CheckpointManager(storage, default=default, flush_interval=None) as manager:
        await manager.append({"price": Money(250)})
        await manager.append_many([{"price": Money(199)}, {"prices": [Money(1), Money(2)]}])
        with pytest.raises(TypeError, match="cannot encode a dict record as JSON"):
            await manager.append_many([{"n": 1}, {"price": object()}])  # default refuses it
        assert await replay_all(manager) == [{"price": 250}, {"price": 199}, {"prices": [1, 2]}]
        await manager.flush()
    assert storage.durable == '{"price":250}\n{"price":199}\n{"prices":[1,2]}\n'


async def test_records_reach_the_storage_in_batches_of_batch_bytes() -> None:
    storage = RecordingStorage()
    line = orjson.dumps({"url": "https://example.com/page/0000", "status": 200}) + b"\n"
    manager = CheckpointManager(storage, batch_bytes=16 * 1024, flush_interval=None)
    for n in range(10_000):
        await manager.append({"url": f"https://example.com/page/{n:04}", "status": 200})
    full_batches = 10_000 * len(line) // (16 * 1024)
    assert len(storage.writes) == full_batches
    assert all(16 * 1024 <= len(data) < 16 * 1024 + len(line) for data in storage.writes)
    await manager.flush()
    assert len(storage.writes) == full_batches + 1
    assert storage.flushes == 1
    await manager.close()


async def test_the_first_flush_reaches_the_storage_even_with_nothing_appended() -> None:
    storage = RecordingStorage()
    async with CheckpointManager(storage, flush_interval=None) as manager:
        await manager.flush()  # a backend may have a crashed writer's staged records to upload
        assert storage.flushes == 1
        await manager.flush()  # from then on, an empty flush costs nothing
        assert storage.flushes == 1


async def test_a_flush_or_close_with_nothing_to_write_hands_the_storage_no_empty_write() -> None:
    """The storage is flushed, not written to, when no record waits: a flush costs a backend no
    write("") call (the built-in backends ignore one; a custom backend may make a request for it)."""
    storage = RecordingStorage()
    manager = CheckpointManager(storage, flush_interval=None)
    await manager.flush()
    assert (storage.writes, storage.flushes) == ([], 1)
    await manager.append({"n": 1})
    await manager.flush()
    await manager.close()
    assert storage.writes == ['{"n":1}\n']


def flusher_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The delays that code in yoink._manager (its background flusher) passes to anyio.sleep."""
    sleeps: list[float] = []
    sleep = anyio.sleep

    def recording_sleep(delay: float) -> Any:
        if sys._getframe(1).f_globals.get("__name__") == "yoink._manager":
            sleeps.append(delay)
        return sleep(delay)

    monkeypatch.setattr(anyio, "sleep", recording_sleep)
    return sleeps


async def test_flush_interval_hands_records_to_the_storage_without_a_flush_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sleeps = flusher_sleeps(monkeypatch)
    storage = RecordingStorage()
    async with CheckpointManager(storage, flush_interval=0.05) as manager:
        await manager.append({"a": 1})
        with anyio.fail_after(5):
            while storage.flushes == 0:
                await anyio.sleep(0.01)
        assert storage.durable == '{"a":1}\n'
    assert sleeps
    assert set(sleeps) == {0.05}  # the interval given, not the default


async def test_the_default_flush_interval_is_one_second(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps = flusher_sleeps(monkeypatch)
    async with CheckpointManager(RecordingStorage()):
        with anyio.fail_after(5):
            while not sleeps:  # the background flusher has started its first wait
                await anyio.sleep(0.01)
    assert sleeps == [1.0]


async def test_without_flush_interval_nothing_is_written_before_a_flush(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sleeps = flusher_sleeps(monkeypatch)
    storage = RecordingStorage()
    async with CheckpointManager(storage, flush_interval=None) as manager:
        await manager.append({"a": 1})
        await anyio.sleep(0.2)  # a flusher, had one been started, would be waiting by now
        assert storage.writes == []
        assert sleeps == []  # no background flusher, not even one on the default interval
    assert storage.durable == '{"a":1}\n'


async def test_when_flush_returns_every_record_appended_before_it_is_durable() -> None:
    storage = RecordingStorage(delay=0.001)
    async with CheckpointManager(storage, batch_bytes=256) as manager:

        async def worker(n: int) -> None:
            for j in range(20):
                record = {"worker": n, "j": j}
                await manager.append(record)
                await manager.flush()
                assert orjson.dumps(record).decode() + "\n" in storage.durable

        async with anyio.create_task_group() as tg:
            for n in range(16):
                tg.start_soon(worker, n)


async def test_a_flush_called_while_a_batch_is_being_written_waits_for_its_own_records() -> None:
    # The batch under way is neither buffered nor written yet: a flush that did not count it
    # would return as soon as that batch was flushed, before its caller's own record was.
    storage = RecordingStorage(delay=0.05)
    storage.write_began = anyio.Event()
    async with CheckpointManager(storage, flush_interval=None) as manager:
        await manager.append({"n": 1, "pad": "x" * 100})
        async with anyio.create_task_group() as tg:
            tg.start_soon(manager.flush)
            with anyio.fail_after(5):
                await storage.write_began.wait()
            assert (storage.writing, storage.writes) == (1, [])  # the first flush is writing its batch
            await manager.append({"n": 2})
            await manager.flush()
            assert '{"n":2}' in storage.durable


async def test_tasks_that_flush_together_share_one_storage_flush() -> None:
    storage = RecordingStorage(delay=0.01)
    async with CheckpointManager(storage, flush_interval=None) as manager:

        async def append_and_flush(n: int) -> None:
            await manager.append({"n": n})
            await manager.flush()

        async with anyio.create_task_group() as tg:
            for n in range(64):
                tg.start_soon(append_and_flush, n)
        # The first flush covers the first record; all the others share the next one.
        assert storage.flushes <= 3
        assert len(storage.durable.splitlines()) == 64


async def test_a_slow_storage_makes_append_wait_so_memory_stays_bounded() -> None:
    storage = RecordingStorage(delay=0.005)
    record = {"pad": "x" * 1000}
    line_size = len(orjson.dumps(record)) + 1
    batch = 32 * 1024
    bound = batch + 10 * line_size  # a full batch, and the line each of 10 producers added meanwhile
    appended = 0  # bytes of the records whose append() was called: in the buffer at once
    buffered: list[int] = []  # what the manager held, seen as each write ends and each append returns
    waited = 0  # appends that returned only after a write had ended

    def look() -> None:
        buffered.append(appended - storage.handed)

    storage.before_write_ends = look
    async with CheckpointManager(storage, batch_bytes=batch, flush_interval=None) as manager:

        async def producer() -> None:
            nonlocal appended, waited
            for _ in range(200):
                ended = len(storage.writes)
                appended += line_size
                await manager.append(record)
                look()
                waited += len(storage.writes) > ended

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(producer)
        # A batch holds at most what each of the 10 producers added while a write was under way.
        assert max(len(data) for data in storage.writes) <= bound
    assert len(storage.durable.splitlines()) == 2000
    assert waited > 0, "append never waited for a write"
    assert min(buffered) >= 0
    assert max(buffered) <= bound, "append went on while the buffer was full"


async def test_appenders_that_waited_for_a_full_batch_do_not_each_write_the_few_records_left() -> None:
    # Ten producers find the buffer full while one batch is written. The first to get the storage
    # writes the next batch; the others find it gone and write nothing: every write but the last
    # (the flush at close) is a full batch, not a handful of records per producer.
    storage = RecordingStorage(delay=0.005)
    record = {"pad": "x" * 1000}
    batch = 32 * 1024
    async with CheckpointManager(storage, batch_bytes=batch, flush_interval=None) as manager:

        async def producer() -> None:
            for _ in range(200):
                await manager.append(record)

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(producer)
        written_by_appends = list(storage.writes)
    assert written_by_appends, "no batch filled up"
    assert min(len(data) for data in written_by_appends) >= batch
    assert len(storage.durable.splitlines()) == 2000


async def test_thousands_of_tasks_appending_at_once_never_interleave_lose_or_duplicate(
    tmp_path: Path,
) -> None:
    async with CheckpointManager.from_uri(tmp_path / "j.jsonl", batch_bytes=4096) as manager:

        async def task(n: int) -> None:
            for j in range(5):
                await manager.append({"task": n, "j": j, "pad": "z" * (n % 50)})

        async with anyio.create_task_group() as tg:
            for n in range(5000):
                tg.start_soon(task, n)
    async with CheckpointManager.from_uri(tmp_path / "j.jsonl") as manager:
        records = await replay_all(manager)
    assert sorted((r["task"], r["j"]) for r in records) == [(n, j) for n in range(5000) for j in range(5)]
    for n in range(0, 5000, 499):
        assert [r["j"] for r in records if r["task"] == n] == list(range(5))


async def test_a_replay_abandoned_part_way_closes_the_storages_read() -> None:
    storage = ClosingStorage(f"closing-{uuid.uuid4()}")
    for n in range(5):
        await storage.write(f'{{"n":{n}}}\n')
    async with CheckpointManager(storage, flush_interval=None) as manager:
        async with contextlib.aclosing(manager.replay()) as records:
            async for record in records:
                assert storage.reads_open == 1
                if record["n"] == 1:
                    break  # the consumer has what it wanted
        assert (storage.reads_open, storage.reads_closed) == (0, 1)
        with pytest.raises(ValueError, match="the consumer's own error"):
            async with contextlib.aclosing(manager.replay()) as records:
                async for _ in records:
                    raise ValueError("the consumer's own error")
        assert (storage.reads_open, storage.reads_closed) == (0, 2)


async def test_replay_sees_records_that_were_not_flushed() -> None:
    async with CheckpointManager(RecordingStorage(), flush_interval=None) as manager:
        await manager.append({"a": 1})
        assert await replay_all(manager) == [{"a": 1}]
        await manager.append({"b": 2})
        assert await replay_all(manager) == [{"a": 1}, {"b": 2}]


async def test_a_torn_last_line_is_skipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    async with CheckpointManager(journal('{"a":1}\n{"b":2}\n{"c":')) as manager:
        with caplog.at_level(logging.WARNING, logger="yoink"):
            assert await replay_all(manager) == [{"a": 1}, {"b": 2}]
    [warning] = caplog.messages
    source, reason = warning.split(": skipped line 3 (byte offset 16), the last line, as a torn write: ")
    assert source == repr(manager.storage)
    assert reason.startswith("unexpected end of data"), reason  # why it is not a record


async def test_a_corrupt_line_names_its_line_and_byte_offset_after_the_records_before_it() -> None:
    text = '{"t":"café"}\n\n{"n":2}\n{"n":\x00garbage\n{"n":4}\n'
    async with CheckpointManager(journal(text)) as manager:
        seen = []
        with pytest.raises(CorruptCheckpointError, match="line 4 \\(byte offset 23\\)") as caught:
            async for record in manager.replay():
                seen.append(record)
    assert seen == [{"t": "café"}, {"n": 2}]
    assert (caught.value.line, caught.value.offset) == (4, 23)
    assert text.encode()[23:].startswith(b'{"n":\x00')


@pytest.mark.parametrize("bad", ["[1,2]", "42", '"text"', "null", '{"a":1}{"b":2}', "\udcff"])
async def test_any_line_that_is_not_one_json_object_is_corrupt(bad: str) -> None:
    async with CheckpointManager(journal(f'{{"a":1}}\n{bad}\n{{"b":2}}\n')) as manager:
        with pytest.raises(CorruptCheckpointError, match="line 2 "):
            await replay_all(manager)


async def test_on_corrupt_skip_yields_every_intact_record_and_counts_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    text = '{"n":1}\nnot json\n{"n":3}\n[4]\n{"n":5}\n{"n":'
    async with CheckpointManager(journal(text), on_corrupt="skip") as manager:
        assert manager.corrupt_lines_skipped == 0  # none, before a replay
        with caplog.at_level(logging.WARNING, logger="yoink"):
            assert await replay_all(manager) == [{"n": 1}, {"n": 3}, {"n": 5}]
        assert manager.corrupt_lines_skipped == 2
    assert "line 2 (byte offset 8) is not a JSON object" in caplog.text
    assert "line 4 (byte offset 25) is not a JSON object" in caplog.text


async def test_a_corrupt_journal_can_still_be_appended_to() -> None:
    storage = journal('{"n":1}\nnot json\n{"n":3}\n')
    async with CheckpointManager(storage, on_corrupt="skip") as manager:
        await manager.append({"n": 4})
        assert [r["n"] for r in await replay_all(manager)] == [1, 3, 4]


async def test_close_flushes_closes_the_storage_and_is_safe_twice(tmp_path: Path) -> None:
    manager = CheckpointManager.from_uri(tmp_path / "j.jsonl", flush_interval=None)
    await manager.append({"a": 1})
    await manager.close()
    await manager.close()
    with pytest.raises(StorageClosedError):
        await manager.storage.write("{}\n")
    for call in (manager.append({"b": 2}), manager.append_many([{"b": 2}]), manager.flush()):
        with pytest.raises(StorageClosedError, match="closed"):
            await call
    with pytest.raises(
        StorageClosedError, match=r"^CheckpointManager\(LocalFileStorage\('.*j.jsonl'\)\) is closed$"
    ):
        await replay_all(manager)
    assert (tmp_path / "j.jsonl").read_text() == '{"a":1}\n'


async def test_exists_counts_records_not_yet_written() -> None:
    storage = RecordingStorage()
    async with CheckpointManager(storage, flush_interval=None) as manager:
        assert not await manager.exists()
        await manager.append({"a": 1})
        assert await manager.exists()
        assert storage.writes == []


async def test_a_failed_write_keeps_the_records_for_the_next_flush() -> None:
    storage = RecordingStorage()
    async with CheckpointManager(storage, flush_interval=None) as manager:
        await manager.append({"n": 1})
        storage.fail_writes = 1
        with pytest.raises(StorageError, match="injected"):
            await manager.flush()
        await manager.append({"n": 2})
        await manager.flush()
        assert storage.durable == '{"n":1}\n{"n":2}\n'


async def test_records_appended_while_a_write_fails_follow_the_failed_batch_once_each() -> None:
    # The failed batch goes back in front of what was appended meanwhile, so order is kept, and
    # its bytes are counted as buffered again, so a flush waits for them and for its own records.
    storage = RecordingStorage(delay=0.05)
    storage.write_began = anyio.Event()
    with anyio.fail_after(10):  # a flush that miscounts what it waits for never returns
        async with CheckpointManager(storage, flush_interval=None) as manager:
            await manager.append_many({"n": n} for n in range(3))
            storage.fail_writes = 1

            async def failing_flush() -> None:
                with pytest.raises(StorageError, match="injected write failure"):
                    await manager.flush()

            async with anyio.create_task_group() as tg:
                tg.start_soon(failing_flush)
                await storage.write_began.wait()
                assert (storage.writing, storage.writes) == (1, [])  # the failing write is under way
                await manager.append({"n": 3})
                await manager.append_many([{"n": 4}, {"n": 5}])
                await manager.flush()  # a retry: it waits out the failed round, then writes again
                assert storage.durable == "".join(f'{{"n":{n}}}\n' for n in range(6))
            await manager.append({"n": 6})
            await manager.flush()
            assert storage.durable == "".join(f'{{"n":{n}}}\n' for n in range(7))
            assert await replay_all(manager) == [{"n": n} for n in range(7)]


async def test_a_second_close_whose_caller_is_cancelled_still_waits_for_the_first_to_finish() -> None:
    """As close() itself does: its caller finds the journal flushed and released when it returns,
    cancelled or not."""
    storage = RecordingStorage(delay=0.2)  # the first close()'s flush is under way for 0.2 s
    manager = CheckpointManager(storage, flush_interval=None)
    await manager.append({"n": 1})
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(manager.close)
        await anyio.sleep(0.05)
        with anyio.move_on_after(0.01):
            await manager.close()
        assert storage.durable == '{"n":1}\n', "the cancelled close() returned before the first had flushed"


async def test_a_close_that_fails_after_the_block_raised_is_logged_and_the_blocks_error_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage = RecordingStorage()
    with caplog.at_level(logging.ERROR, logger="yoink"), pytest.raises(ValueError, match="the job's own"):
        async with CheckpointManager(storage, flush_interval=None) as manager:
            await manager.append({"n": 1})
            storage.fail_writes = 1  # close()'s flush fails
            raise ValueError("the job's own error")
    [logged] = [record for record in caplog.records if record.levelname == "ERROR"]
    assert logged.getMessage() == f"closing {manager!r} after its block raised failed as well"
    assert logged.exc_info, "the log does not say why closing failed"
    assert isinstance(logged.exc_info[1], StorageError)


async def test_a_failing_background_flush_is_logged_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    storage = RecordingStorage()
    storage.fail_writes = 2
    with caplog.at_level(logging.WARNING, logger="yoink"):
        async with CheckpointManager(storage, flush_interval=0.02) as manager:
            await manager.append({"n": 1})
            with anyio.fail_after(5):
                while not storage.durable:
                    await anyio.sleep(0.01)
    assert storage.durable == '{"n":1}\n'
    failed = [record for record in caplog.records if record.getMessage().startswith("periodic flush of ")]
    assert failed, caplog.text
    assert failed[0].getMessage() == (
        f"periodic flush of {manager!r} failed; the records stay buffered for the next flush"
    )
    # the log says why the flush failed: the storage's error, with its traceback (exc_info=False
    # would leave False there, which is not None)
    assert failed[0].exc_info, "the log does not say why the flush failed"
    assert isinstance(failed[0].exc_info[1], StorageError)
    assert str(failed[0].exc_info[1]) == "injected write failure"


async def test_from_uri_gives_the_manager_its_options_and_the_storage_the_rest(tmp_path: Path) -> None:
    manager = CheckpointManager.from_uri(str(tmp_path / "j.jsonl"), on_corrupt="skip", fsync=False)
    assert isinstance(manager.storage, LocalFileStorage)
    assert manager.storage._fsync is False
    assert manager._on_corrupt == "skip"
    with pytest.raises(
        TypeError, match="LocalFileStorage does not take the option\\(s\\) flush_intreval; it takes: fsync"
    ):
        CheckpointManager.from_uri(tmp_path / "j.jsonl", flush_intreval=5)
    await manager.close()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch_bytes": 0}, "batch_bytes must be a positive"),
        ({"batch_bytes": (64 << 20) + 1}, "^batch_bytes must be at most 67,108,864, got 67,108,865$"),
        ({"flush_interval": 0}, "flush_interval must be positive"),
        ({"on_corrupt": "ignore"}, "on_corrupt must be 'raise' or 'skip'"),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CheckpointManager(MemoryStorage(), **options)


def test_compact_must_be_a_policy() -> None:
    with pytest.raises(TypeError, match="^compact must be a CompactionPolicy or None, got str$"):
        CheckpointManager(MemoryStorage(), compact="url")  # type: ignore[arg-type]


def test_a_storage_must_be_a_checkpoint_storage() -> None:
    with pytest.raises(TypeError, match="storage must be a CheckpointStorage, got str"):
        CheckpointManager("./crawl.jsonl")  # type: ignore[arg-type]


async def test_skipping_many_corrupt_lines_warns_for_the_first_ten_then_once_in_all(
    caplog: pytest.LogCaptureFixture,
) -> None:
    storage = MemoryStorage()
    await storage.write('{"n":1}\nbad\n' * 50 + '{"n":2}\n')
    async with CheckpointManager(storage, on_corrupt="skip") as manager:
        with caplog.at_level(logging.WARNING, logger="yoink"):
            assert len([r async for r in manager.replay()]) == 51
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 11
    assert warnings[-1].endswith("skipped 50 corrupt lines in all (a warning was logged for the first 10)")


async def test_a_read_only_manager_replays_beside_a_writer_and_refuses_to_write(
    open_storage: OpenStorage,
) -> None:
    async with CheckpointManager(open_storage(), flush_interval=None) as writer:
        await writer.append({"n": 1})
        await writer.flush()  # the writer holds the journal's lock or lease
        async with CheckpointManager(open_storage(), read_only=True) as reader:
            assert await replay_all(reader) == [{"n": 1}]  # no lock or lease needed
            for refused in (reader.append({"n": 2}), reader.append_many([{"n": 3}]), reader.flush()):
                with pytest.raises(ReadOnlyError, match=r"is read-only \(read_only=True\)"):
                    await refused
        await writer.append({"n": 4})  # the reader took nothing from the writer
    async with CheckpointManager(open_storage(), read_only=True) as reader:
        assert await replay_all(reader) == [{"n": 1}, {"n": 4}]
    with pytest.raises(StorageClosedError):  # after close(), the error says closed, not read-only
        await reader.append({"n": 5})


@pytest.mark.parametrize(
    "fragment", [b'{"a":\n1}', b"1\n", b"\n2", b'"x"\n\n'], ids=["inside", "after", "before", "two"]
)
async def test_a_record_whose_fragment_holds_a_newline_is_refused_and_nothing_is_appended(
    fragment: bytes,
) -> None:
    async with CheckpointManager(MemoryStorage(f"m-{uuid.uuid4()}")) as manager:
        await manager.append({"n": 0})
        message = (
            r"^a dict record encodes as more than one line \(an orjson\.Fragment in it holds a newline\), "
            r"which would break the journal's line format; nothing was appended$"
        )
        with pytest.raises(TypeError, match=message):
            await manager.append({"raw": orjson.Fragment(fragment)})
        with pytest.raises(TypeError, match="more than one line"):
            await manager.append_many([{"n": 1}, {"raw": [orjson.Fragment(fragment)]}])
        await manager.append({"n": 2, "fine": orjson.Fragment(b'{"a":[1,2]}')})
        await manager.flush()
        assert await replay_all(manager) == [{"n": 0}, {"n": 2, "fine": {"a": [1, 2]}}]


async def test_integers_beyond_64_bits_in_a_hand_written_journal_replay_exactly() -> None:
    big = 2**64 + 1
    text = (
        f'{{"n": {big}}}\n{{"list":[1,-{2**63 + 1},{{"k":{10**40}}}],"id":"{"7" * 25}"}}\n'
        '{"n":18446744073709551615,"f":1e20,"small":-9223372036854775808}\n'
        f'{{"pad":"{"p" * 100}","n":{big}}}\n'
    )
    for storage in (journal(text), journal(text * 200)):  # one line an item, and one block of many
        async with CheckpointManager(storage) as manager:
            records = await replay_all(manager)
        assert repr(records[:4]) == repr(  # repr tells 1e+20 from 100000000000000000000
            [
                {"n": big},
                {"list": [1, -(2**63 + 1), {"k": 10**40}], "id": "7" * 25},
                {"n": 2**64 - 1, "f": 1e20, "small": -(2**63)},
                {"pad": "p" * 100, "n": big},
            ]
        )


async def test_a_long_line_nested_deeper_than_python_parses_is_corrupt_never_a_crash(
    caplog: pytest.LogCaptureFixture,
) -> None:
    deep = '{"pad":"' + "p" * (5 << 20) + '","deep":' + "[" * 5000 + "]" * 5000 + "}"  # over 4 MiB
    text = f'{{"n":0}}\n{deep}\n{{"n":2}}\n'
    async with CheckpointManager(journal(text)) as manager:
        seen: list[dict[str, Any]] = []
        with pytest.raises(CorruptCheckpointError, match=r"line 2 \(byte offset 8\).*nested too deeply"):
            async for record in manager.replay():
                seen.append(record)
        assert seen == [{"n": 0}]
    async with CheckpointManager(journal(text), on_corrupt="skip") as manager:
        assert await replay_all(manager) == [{"n": 0}, {"n": 2}]
        assert manager.corrupt_lines_skipped == 1
    async with CheckpointManager(journal(f'{{"n":0}}\n{deep}\n')) as manager:  # last: a torn tail
        assert await replay_all(manager) == [{"n": 0}]
    assert "nested too deeply" in caplog.text


@pytest.mark.parametrize(
    "line",
    [
        '{"pad":"' + "p" * (5 << 20) + '","x":1e400}',
        '{"pad":"' + "p" * (5 << 20) + '\udcff"}',
    ],
    ids=["overflow", "not-utf8"],
)
async def test_a_long_line_is_corrupt_where_a_short_one_would_be(line: str) -> None:
    async with CheckpointManager(journal(f'{{"n":0}}\n{line}\n{{"n":2}}\n'), on_corrupt="skip") as manager:
        assert await replay_all(manager) == [{"n": 0}, {"n": 2}]
        assert manager.corrupt_lines_skipped == 1


@pytest.mark.parametrize("how", ["append", "append_many"])
async def test_a_batch_is_written_as_soon_as_it_is_exactly_full(how: str) -> None:
    line = '{"n":1}\n'
    storage = RecordingStorage()
    async with CheckpointManager(storage, flush_interval=None, batch_bytes=3 * len(line)) as manager:
        for _ in range(2):
            await manager.append({"n": 1})
        assert storage.writes == []
        if how == "append":
            await manager.append({"n": 1})
        else:
            await manager.append_many([{"n": 1}])
        assert storage.writes == [3 * line], "the batch reached batch_bytes exactly: it is written"


async def test_append_many_after_waiting_for_a_write_leaves_a_batch_that_is_not_full() -> None:
    line = '{"n":1}\n'
    storage = RecordingStorage(delay=0.05)
    storage.write_began = anyio.Event()
    async with CheckpointManager(storage, flush_interval=None, batch_bytes=3 * len(line)) as manager:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(manager.append_many, [{"n": 1}] * 3)  # a full batch, being written
                await storage.write_began.wait()
                storage.write_began = anyio.Event()
                tg.start_soon(manager.append_many, [{"n": 1}] * 3)  # full again: waits to write it
                tg.start_soon(manager.append_many, [{"n": 1}] * 3)  # waits too; finds it written...
                await storage.write_began.wait()  # the second write, of both, is under way
                await manager.append({"n": 1})  # ...with one record after it: not a batch to write
        assert storage.writes == [3 * line, 6 * line], "an append_many that waited wrote a part batch"
        await manager.flush()
        assert storage.writes == [3 * line, 6 * line, line]


async def test_an_appender_that_waited_for_a_write_writes_its_batch_if_it_is_exactly_full() -> None:
    line = '{"n":1}\n'
    storage = RecordingStorage(delay=0.05)
    storage.write_began = anyio.Event()
    async with CheckpointManager(storage, flush_interval=None, batch_bytes=3 * len(line)) as manager:

        async def fill_a_batch() -> None:
            for _ in range(3):
                await manager.append({"n": 1})

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(fill_a_batch)
                await storage.write_began.wait()  # the first batch is being written
                for _ in range(3):  # a second batch, exactly full, while the first is written
                    await manager.append({"n": 1})
        assert storage.writes == [3 * line, 3 * line]


async def test_a_flush_that_waited_for_another_round_flushes_what_it_was_called_for() -> None:
    """The first flush's round covers what was handed before it; a second flush, called for more
    while that round is under way, waits for it, then makes its own records durable too."""
    gate = anyio.Event()

    class Gated(RecordingStorage):
        async def flush(self) -> None:
            await gate.wait()
            await super().flush()

    storage = Gated()
    checkpoint = CheckpointManager(storage, flush_interval=None)
    await checkpoint.append({"n": 1})
    returned: list[int] = []

    async def flush(n: int) -> None:
        await checkpoint.flush()
        returned.append(n)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(flush, 1)
        await anyio.wait_all_tasks_blocked()  # its round waits in the storage's flush
        await checkpoint.append({"n": 2})
        tasks.start_soon(flush, 2)
        await anyio.wait_all_tasks_blocked()
        gate.set()
        with anyio.fail_after(5):
            while 2 not in returned:
                await anyio.sleep(0.01)
        assert '{"n":2}' in storage.durable, (
            "flush() returned before the record it was called for was durable"
        )
    await checkpoint.close()
