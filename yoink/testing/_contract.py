"""StorageContract: every promise of CheckpointStorage, as tests a backend's suite inherits."""

from __future__ import annotations

import asyncio
import contextlib
import pickle
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import pytest

from yoink._exceptions import (
    CheckpointLockedError,
    CompactionNotSupportedError,
    CorruptCheckpointError,
    StorageClosedError,
)
from yoink._manager import CheckpointManager
from yoink.storage._base import CheckpointStorage

__all__ = ["StorageContract"]

Reopen = Callable[[], CheckpointStorage]


async def _text(storage: CheckpointStorage) -> str:
    """The journal's text, with each item's missing final newline restored."""
    items = [item async for item in storage.read()]
    for item in items:
        assert isinstance(item, str), f"promise broken: read() yields str, not {type(item).__name__}"
    return "".join(item if item.endswith("\n") else item + "\n" for item in items)


def _lines(first: int, count: int, pad: str = "") -> str:
    return "".join(f'{{"n":{n}{pad}}}\n' for n in range(first, first + count))


async def _chunks(first: int, count: int, per_chunk: int = 1000, pause: float = 0) -> AsyncIterator[str]:
    """``_lines(first, count)`` as an async iterable of chunks, as the manager streams a snapshot."""
    for start in range(first, first + count, per_chunk):
        await anyio.sleep(pause)
        yield _lines(start, min(per_chunk, first + count - start))


class _SnapshotFailed(Exception):
    pass


async def _failing_chunks() -> AsyncIterator[str]:
    yield _lines(500, 1000)
    raise _SnapshotFailed("the snapshot's source failed part-way")


async def replace_while_writing(
    storage: CheckpointStorage,
    pieces: AsyncIterator[str],
    before: Callable[[], Awaitable[None]],
    during: Callable[[], Awaitable[None]] | None = None,
) -> Exception | None:
    """``storage.replace(pieces)``, with ``await before()`` once replace() has asked for its text's
    first item (so has fixed where the old journal ends) and before it gets it, then ``await
    during()`` while it takes the rest. Return what replace() raised, if it did."""
    asked, went = anyio.Event(), anyio.Event()
    raised: list[Exception] = []

    async def text() -> AsyncIterator[str]:
        asked.set()
        await went.wait()
        async for piece in pieces:
            yield piece

    async def replace() -> None:
        try:
            await storage.replace(text())
        except Exception as exc:
            raised.append(exc)

    with anyio.fail_after(30):  # a write that waits for replace() to end would wait for ever
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(replace)
            await asked.wait()
            try:
                await before()
            finally:
                went.set()
            if during is not None:
                await during()
    return raised[0] if raised else None


def _replaces(storage: CheckpointStorage) -> bool:
    return type(storage).replace is not CheckpointStorage.replace


def _carries(storage: CheckpointStorage) -> bool:
    """Whether ``storage`` takes writes during replace(): asked of the storage itself, since a
    backend may set ``writes_during_replace`` per instance (by its options, say)."""
    return _replaces(storage) and storage.writes_during_replace


async def _cancel_after(delay: float, call: Awaitable[None]) -> None:
    """Await ``call``, cancelled after ``delay`` seconds by asyncio's own means where it runs."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # trio: cancellation comes through a scope
        with anyio.move_on_after(delay):
            await call
        return
    with contextlib.suppress(asyncio.TimeoutError):  # TimeoutError itself from Python 3.11 on
        await asyncio.wait_for(call, delay)  # task.cancel(), which goes through shielded scopes


@pytest.mark.asyncio
class StorageContract:
    """The promises of :class:`~yoink.storage.CheckpointStorage`, for a backend's test suite.

    Subclass it in a test module and give it a ``storage`` fixture that returns a new storage on
    an empty journal::

        from yoink.testing import StorageContract

        class TestSQLiteStorage(StorageContract):
            @pytest.fixture
            async def storage(self, tmp_path):
                return SQLiteStorage(tmp_path / "journal.db")

    Some promises need a second storage on the same journal, as a restarted process would open
    it. The ``reopen`` fixture makes one by pickling ``storage`` (yoink's backends pickle as their
    URI and options); override it if yours does not::

            @pytest.fixture
            def reopen(self, tmp_path):
                return lambda: SQLiteStorage(tmp_path / "journal.db")

    A backend that does not refuse a second writer sets ``refuses_a_second_writer = False``. The
    promises of ``replace()`` (compaction) are checked when the backend implements it; one that does
    not must refuse it with :class:`~yoink.CompactionNotSupportedError` and keep its journal.
    Every failure names the promise that was broken. The tests are async (pytest-asyncio): with
    ``asyncio_mode = "strict"``, declare the fixture with ``@pytest_asyncio.fixture``.
    """

    refuses_a_second_writer = True

    @pytest.fixture
    def reopen(self, storage: CheckpointStorage) -> Reopen:
        return lambda: pickle.loads(pickle.dumps(storage))

    async def test_read_yields_what_was_written_in_order(self, storage: CheckpointStorage) -> None:
        async with storage:
            for n in range(100):
                await storage.write(_lines(n, 1))
            await storage.flush()
            assert await _text(storage) == _lines(0, 100), (
                "promise broken: read() yields every write, in order"
            )

    async def test_read_sees_writes_that_were_not_flushed(self, storage: CheckpointStorage) -> None:
        async with storage:
            await storage.write(_lines(0, 2))
            assert await _text(storage) == _lines(0, 2), "promise broken: read your writes, flushed or not"

    async def test_a_new_storage_reads_what_was_flushed(
        self, storage: CheckpointStorage, reopen: Reopen
    ) -> None:
        async with storage:
            await storage.write(_lines(0, 2))
            await storage.flush()
            async with reopen() as reader:
                assert await _text(reader) == _lines(0, 2), (
                    "promise broken: after flush(), any reader sees it"
                )

    async def test_the_journal_outlives_close_and_takes_more_writes(
        self, storage: CheckpointStorage, reopen: Reopen
    ) -> None:
        async with storage:
            await storage.write(_lines(0, 2))
        async with reopen() as again:
            assert await _text(again) == _lines(0, 2), "promise broken: close() flushes"
            await again.write(_lines(2, 1))
        async with reopen() as third:
            assert await _text(third) == _lines(0, 3), "promise broken: a reopened journal is appended to"

    async def test_items_are_whole_lines(self, storage: CheckpointStorage) -> None:
        pad = ',"pad":"' + "x" * 1000 + '"'
        async with storage:
            for first in range(0, 3000, 100):  # megabytes: several read chunks or pages
                await storage.write(_lines(first, 100, pad))
            await storage.flush()
            items = [item async for item in storage.read()]
        lines = [line for item in items for line in item.removesuffix("\n").split("\n")]
        assert lines == _lines(0, 3000, pad).splitlines(), (
            "promise broken: each item read() yields is one or more whole lines"
        )

    async def test_unicode_and_escapes_round_trip(self, storage: CheckpointStorage, reopen: Reopen) -> None:
        text = '{"t":"naïve café ✓ 日本語 🚀","e":"\\u0000\\n\\"tab\\t"}\n'
        async with storage:
            await storage.write(text)
        async with reopen() as reader:
            assert await _text(reader) == text, "promise broken: text round-trips as UTF-8"

    async def test_a_large_write_round_trips(self, storage: CheckpointStorage) -> None:
        text = _lines(0, 100_000, ',"pad":"' + "y" * 100 + '"')  # about 11 MB in one write
        async with storage:
            await storage.write(text)
            await storage.flush()
            assert await _text(storage) == text, "promise broken: a large write is stored whole"

    async def test_a_write_of_several_lines_stays_together(self, storage: CheckpointStorage) -> None:
        async with storage:
            await storage.write(_lines(0, 3))
            await storage.write(_lines(3, 1) + _lines(4, 2))
            assert await _text(storage) == _lines(0, 6), (
                "promise broken: a write of several lines is kept whole"
            )

    async def test_empty_writes_and_flushes_change_nothing(self, storage: CheckpointStorage) -> None:
        async with storage:
            await storage.write("")
            await storage.flush()
            await storage.flush()
            assert await _text(storage) == "", "promise broken: an empty write or flush stores nothing"

    async def test_exists_is_false_before_the_first_write_and_true_after(
        self, storage: CheckpointStorage
    ) -> None:
        async with storage:
            assert not await storage.exists(), "promise broken: a new journal does not exist"
            assert [item async for item in storage.read()] == [], (
                "promise broken: a missing journal reads empty"
            )
            await storage.write(_lines(0, 1))
            await storage.flush()
            assert await storage.exists(), "promise broken: a written journal exists"

    async def test_write_and_flush_after_close_raise_and_close_twice_is_safe(
        self, storage: CheckpointStorage
    ) -> None:
        await storage.write(_lines(0, 1))
        await storage.close()
        await storage.close()
        with pytest.raises(StorageClosedError):
            await storage.write(_lines(1, 1))
        with pytest.raises(StorageClosedError):
            await storage.flush()

    async def test_concurrent_writes_never_interleave(self, storage: CheckpointStorage) -> None:
        async def writer(n: int) -> None:
            for j in range(20):
                await storage.write("".join(f'{{"w":{n},"j":{j},"k":{k}}}\n' for k in range(50)))

        async with storage:
            async with anyio.create_task_group() as tg:
                for n in range(50):
                    tg.start_soon(writer, n)
            lines = (await _text(storage)).splitlines()
        assert len(lines) == 50 * 20 * 50, "promise broken: concurrent writes are all kept"
        for start in range(0, len(lines), 50):
            block = lines[start : start + 50]
            expected = [block[0].replace('"k":0}', f'"k":{k}}}') for k in range(50)]
            assert block == expected, "promise broken: concurrent writes never interleave"

    async def test_a_cancelled_write_is_whole_or_absent_and_later_writes_follow_it(
        self, storage: CheckpointStorage, reopen: Reopen
    ) -> None:
        pad = ',"pad":"' + "c" * 200 + '"'
        delays = (0.0, 0.0002, 0.001, 0.005, 0.02, 0.1)

        def block(r: int) -> list[str]:
            return [f'{{"r":{r},"k":{k}{pad}}}' for k in range(4000)]  # about 1 MB

        async with storage:
            for r, delay in enumerate(delays):
                await _cancel_after(delay, storage.write("\n".join(block(r)) + "\n"))
                await storage.write(f'{{"r":{r},"after":true}}\n')
                await _cancel_after(delay, storage.flush())
            await storage.flush()
        async with reopen() as reader:
            lines = (await _text(reader)).splitlines()
        at = 0
        for r in range(len(delays)):
            if lines[at : at + 4000] == block(r):
                at += 4000
            assert lines[at : at + 1] == [f'{{"r":{r},"after":true}}'], (
                "promise broken: a cancelled write is whole or absent, and the writes after it follow it"
            )
            at += 1
        assert at == len(lines), "promise broken: a cancelled write is whole or absent, never repeated"

    async def test_a_second_writer_is_refused_and_loses_nothing(
        self, storage: CheckpointStorage, reopen: Reopen
    ) -> None:
        if not self.refuses_a_second_writer:
            pytest.skip("this backend does not refuse a second writer (refuses_a_second_writer = False)")
        async with storage:
            await storage.write(_lines(0, 1))
            second = reopen()
            with pytest.raises(CheckpointLockedError):
                await second.write(_lines(100, 1))
            await second.close()
            await storage.write(_lines(1, 1))
        async with reopen() as third:  # the first writer's close() let go
            await third.write(_lines(2, 1))
            assert await _text(third) == _lines(0, 3), (
                "promise broken: one writer at a time, and a refused one writes nothing"
            )

    async def test_the_manager_skips_a_torn_last_line(
        self, storage: CheckpointStorage, reopen: Reopen
    ) -> None:
        async with storage:
            await storage.write(_lines(0, 2) + '{"n":2,"torn')
        async with CheckpointManager(reopen()) as manager:
            records = [record async for record in manager.replay()]
        assert records == [{"n": 0}, {"n": 1}], "promise broken: a torn last line is not a record"

    async def test_the_manager_finds_corruption_before_the_end(
        self, storage: CheckpointStorage, reopen: Reopen
    ) -> None:
        async with storage:
            await storage.write(_lines(0, 1) + "not json\n" + _lines(2, 1))
        seen: list[dict[str, object]] = []
        async with CheckpointManager(reopen()) as manager:

            async def replay_until_corruption() -> None:
                async for record in manager.replay():
                    seen.append(record)

            with pytest.raises(CorruptCheckpointError) as caught:
                await replay_until_corruption()
        assert seen == [{"n": 0}], "promise broken: records before a corrupt line are replayed first"
        assert (caught.value.line, caught.value.offset) == (2, 8), (
            "promise broken: corruption is found by line"
        )
        async with CheckpointManager(reopen(), on_corrupt="skip") as manager:
            records = [record async for record in manager.replay()]
        assert records == [{"n": 0}, {"n": 2}], "promise broken: on_corrupt='skip' keeps every intact record"

    async def test_replace_swaps_the_journal_and_later_writes_follow_it(
        self, storage: CheckpointStorage, reopen: Reopen
    ) -> None:
        async with storage:
            await storage.write(_lines(0, 10))
            await storage.flush()
            if not _replaces(storage):
                with pytest.raises(CompactionNotSupportedError):
                    await storage.replace(_chunks(100, 5))
                assert await _text(storage) == _lines(0, 10), (
                    "promise broken: a storage that cannot replace keeps its journal"
                )
                return
            await storage.replace(_chunks(100, 5000))
            assert await _text(storage) == _lines(100, 5000), "promise broken: replace() swaps the journal"
            await storage.write(_lines(10, 2))
        async with reopen() as reader:
            assert await _text(reader) == _lines(100, 5000) + _lines(10, 2), (
                "promise broken: after replace(), the new journal is durable and later writes follow it"
            )

    async def test_replace_of_a_journal_never_written_and_with_nothing(
        self, storage: CheckpointStorage, reopen: Reopen
    ) -> None:
        if not _replaces(storage):
            pytest.skip("this backend does not implement replace()")
        async with storage:
            await storage.replace(_chunks(0, 3))
            assert await _text(storage) == _lines(0, 3), "promise broken: replace() creates the journal"
            await storage.replace(_chunks(0, 0))
            assert await _text(storage) == "", "promise broken: replace() with no text empties the journal"
            await storage.write(_lines(7, 1))
        async with reopen() as reader:
            assert await _text(reader) == _lines(7, 1), "promise broken: writes follow an empty replace()"

    async def test_a_failed_replace_keeps_the_old_journal(
        self, storage: CheckpointStorage, reopen: Reopen
    ) -> None:
        if not _replaces(storage):
            pytest.skip("this backend does not implement replace()")
        async with storage:
            await storage.write(_lines(0, 10))
            await storage.flush()
            with pytest.raises(_SnapshotFailed):
                await storage.replace(_failing_chunks())
            assert await _text(storage) == _lines(0, 10), (
                "promise broken: a replace() that raises leaves the old journal untouched"
            )
            await storage.write(_lines(10, 1))
        async with reopen() as reader:
            assert await _text(reader) == _lines(0, 11), (
                "promise broken: after a failed replace(), writes follow the old journal"
            )

    async def test_a_cancelled_replace_leaves_one_journal_or_the_other(
        self, storage: CheckpointStorage, reopen: Reopen
    ) -> None:
        if not _replaces(storage):
            pytest.skip("this backend does not implement replace()")
        old, new = _lines(0, 20), _lines(1000, 20000)
        async with storage:
            await storage.write(old)
            await storage.flush()
            for delay in (0.0, 0.001, 0.02, 0.05, 1.0):
                # 100 pieces over 0.1 s or more: cancelled before, during and after
                await _cancel_after(delay, storage.replace(_chunks(1000, 20000, per_chunk=200, pause=0.001)))
                text = await _text(storage)
                assert text in (old, new), (
                    "promise broken: a cancelled replace() leaves the old journal or the new one, whole"
                )
            await storage.write(_lines(5, 1))
        async with reopen() as reader:
            assert await _text(reader) in (old + _lines(5, 1), new + _lines(5, 1)), (
                "promise broken: after a cancelled replace(), writes follow whichever journal is there"
            )

    async def test_a_read_under_way_during_replace_sees_one_journal(self, storage: CheckpointStorage) -> None:
        if not _replaces(storage):
            pytest.skip("this backend does not implement replace()")
        pad = ',"pad":"' + "r" * 200 + '"'
        old = "".join(f'{{"old":{n}{pad}}}\n' for n in range(20000))  # several read chunks or pages
        async with storage:
            await storage.write(old)
            await storage.flush()
            reader = storage.read()
            first = await reader.__anext__()
            await storage.replace(_chunks(0, 100))
            rest = [item async for item in reader]
            text = "".join(item if item.endswith("\n") else item + "\n" for item in [first, *rest])
            assert text in (old, _lines(0, 100)), (
                "promise broken: a read under way during replace() yields one journal whole"
            )

    async def test_writes_during_replace_follow_the_new_journal(
        self, storage: CheckpointStorage, reopen: Reopen
    ) -> None:
        if not _carries(storage):
            pytest.skip("this backend does not take writes during replace()")

        async def write_before_the_text() -> None:
            await storage.write(_lines(10, 2))
            await storage.flush()

        async def write_during_the_text() -> None:
            for n in range(12, 15):
                await anyio.sleep(0.001)
                await storage.write(_lines(n, 1))

        async with storage:
            await storage.write(_lines(0, 10))
            await storage.flush()
            pieces = _chunks(100, 5000, pause=0.001)
            await replace_while_writing(storage, pieces, write_before_the_text, write_during_the_text)
            assert await _text(storage) == _lines(100, 5000) + _lines(10, 5), (
                "promise broken: what is written during replace() follows the new journal, in order"
            )
            await storage.write(_lines(15, 1))
        async with reopen() as reader:
            assert await _text(reader) == _lines(100, 5000) + _lines(10, 6), (
                "promise broken: what is written during replace() is durable in the new journal"
            )

    async def test_writes_during_a_failed_replace_stay_in_the_old_journal(
        self, storage: CheckpointStorage, reopen: Reopen
    ) -> None:
        if not _carries(storage):
            pytest.skip("this backend does not take writes during replace()")

        async def write() -> None:
            await storage.write(_lines(10, 2))
            await storage.flush()

        async with storage:
            await storage.write(_lines(0, 10))
            await storage.flush()
            raised = await replace_while_writing(storage, _failing_chunks(), write)
            assert isinstance(raised, _SnapshotFailed), (
                "promise broken: replace() raises what its text raised"
            )
            assert await _text(storage) == _lines(0, 12), (
                "promise broken: what is written during a replace() that raises stays in the old journal"
            )
            await storage.write(_lines(12, 1))
        async with reopen() as reader:
            assert await _text(reader) == _lines(0, 13), (
                "promise broken: after a failed replace(), writes follow the old journal"
            )

    async def test_a_read_yields_nothing_written_after_its_first_item(
        self, storage: CheckpointStorage
    ) -> None:
        if not _carries(storage):
            pytest.skip("this backend does not take writes during replace()")
        pad = ',"pad":"' + "r" * 200 + '"'
        old = "".join(f'{{"old":{n}{pad}}}\n' for n in range(20000))  # several read chunks or pages
        async with storage:
            await storage.write(old)
            await storage.flush()
            reader = storage.read()
            first = await reader.__anext__()
            await storage.write(_lines(0, 10))
            await storage.flush()
            rest = [item async for item in reader]
            text = "".join(item if item.endswith("\n") else item + "\n" for item in [first, *rest])
            assert text == old, (
                "promise broken: with writes_during_replace, read() yields only what was written "
                "before its first item"
            )

    async def test_a_second_writer_is_refused_after_replace(
        self, storage: CheckpointStorage, reopen: Reopen
    ) -> None:
        if not _replaces(storage) or not self.refuses_a_second_writer:
            pytest.skip("this backend does not implement replace() or refuse a second writer")
        async with storage:
            await storage.write(_lines(0, 1))
            await storage.replace(_chunks(10, 2))
            second = reopen()
            with pytest.raises(CheckpointLockedError):
                await second.write(_lines(100, 1))
            await second.close()
            await storage.write(_lines(1, 1))
        async with reopen() as reader:
            assert await _text(reader) == _lines(10, 2) + _lines(1, 1), (
                "promise broken: the writer keeps its lock through replace(); a refused writer writes nothing"
            )

    async def test_replace_after_close_raises(self, storage: CheckpointStorage) -> None:
        if not _replaces(storage):
            pytest.skip("this backend does not implement replace()")
        await storage.close()
        with pytest.raises(StorageClosedError):
            await storage.replace(_chunks(0, 1))
