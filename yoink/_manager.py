"""CheckpointManager: encode, batch, flush, replay."""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import Any

import anyio
import anyio.lowlevel
import orjson

from yoink import _records
from yoink._compaction import Compaction, CompactionPolicy, SnapshotFeed, feeding, now
from yoink._compat import Self
from yoink._exceptions import CorruptCheckpointError, ReadOnlyError, StorageClosedError, StorageError
from yoink._fold import Fold, fold_by_key
from yoink._fork import drop_in_forked_children, forked_note
from yoink._records import (
    JournalDecoder,
    OnCorrupt,
    encode_record,
    not_a_record,
    record_too_long,
    refused,
)
from yoink._tasks import start_background, uninterrupted
from yoink.storage import CheckpointStorage, StorageFactory

__all__ = ["CheckpointManager"]

logger = logging.getLogger(__name__)

_dumps = orjson.dumps  # a global, not an attribute: one lookup fewer per append()
# While a compaction runs, append() lets it have the event loop once per this many bytes appended:
# its swap takes tens of turns of the loop (frames from the worker, writes in threads), which at
# one per batch_bytes would keep records waiting in memory for seconds in a loop that appends flat out.
_HELD_STEP = 64 << 10
# Once this much is held, each of those turns is a pause (the shortest sleep the event loop takes,
# a millisecond), not a bare checkpoint. A bare one polls for I/O without blocking, which lets go of
# the GIL and takes it back at once: a thread the compaction waits for (a file's read or fsync)
# loses it every time, and its calls took up to a second each, while what was appended piled up in
# memory for the whole compaction (358 MiB on the policy's benchmark, 419 MiB on S3). The pauses
# begin once the compaction is slow to let appends go: one that ends quickly costs appends nothing.
# A pause is every task's: appends from other tasks wait for its end, or the loop would not wait.
# It lasts as long as the appends between it and the last one took (waking many tasks takes long),
# so that the loop waits half the time whatever the number of tasks appending.
_PAUSE_FROM = 16 << 20
_PAUSE = 0.0005
_MOST_PAUSE = 0.1


class CheckpointManager:
    """Appends records to a journal and replays them after a restart.

    A record is a JSON object: a dict, or anything orjson encodes as one (a dataclass, with
    datetimes and UUIDs inside; ``default`` converts other types). Records are encoded as they
    are appended and handed to the storage in batches: one :meth:`CheckpointStorage.write` when
    ``batch_bytes`` have gathered, when ``flush_interval`` seconds have passed (while the manager
    is open with ``async with``), and on :meth:`flush` and :meth:`close`.

    ``read_only=True`` makes a reader: it takes no lock or lease, writes and uploads nothing (not
    even what a crashed writer left staged on this machine, which its replay shows), and refuses
    :meth:`append` and :meth:`flush` with :class:`~yoink.ReadOnlyError`. The ``yoink`` command
    reads through one.

    Durability: when :meth:`flush` returns, every record appended before it was called is durable
    in the storage. A crash loses at most the records appended since the last flush that returned.

    Cancellation never cuts a storage call short: each write and flush runs in a task of its own
    (on asyncio; shielded on trio), so a cancelled :meth:`flush` or :meth:`append` stops waiting
    while the write it started finishes, and nothing is written twice or lost. A cancelled
    :meth:`append` has appended its record. :meth:`close` finishes its flush and releases the
    storage before its caller's cancellation goes on.

    >>> async with CheckpointManager.from_uri("./crawl.jsonl") as checkpoint:
    ...     done = {record["url"] async for record in checkpoint.replay()}
    ...     await checkpoint.append({"url": url, "status": 200})
    ...     await checkpoint.flush()
    """

    def __init__(
        self,
        storage: CheckpointStorage,
        *,
        batch_bytes: int = 1 << 20,
        flush_interval: float | None = 1.0,
        on_corrupt: OnCorrupt = "raise",
        default: Callable[[Any], Any] | None = None,
        read_only: bool = False,
        compact: CompactionPolicy | None = None,
    ) -> None:
        if not isinstance(storage, CheckpointStorage):
            raise TypeError(f"storage must be a CheckpointStorage, got {type(storage).__name__}")
        if not isinstance(batch_bytes, int) or batch_bytes < 1:
            raise ValueError(f"batch_bytes must be a positive number of bytes, got {batch_bytes!r}")
        if batch_bytes > _records.MAX_LINE_BYTES:
            raise ValueError(f"batch_bytes must be at most {_records.MAX_LINE_BYTES:,}, got {batch_bytes:,}")
        if flush_interval is not None and not flush_interval > 0:
            raise ValueError(f"flush_interval must be positive seconds or None, got {flush_interval!r}")
        if on_corrupt not in ("raise", "skip"):
            raise ValueError(f"on_corrupt must be 'raise' or 'skip', got {on_corrupt!r}")
        if compact is not None and not isinstance(compact, CompactionPolicy):
            raise TypeError(f"compact must be a CompactionPolicy or None, got {type(compact).__name__}")
        self._storage = storage
        self._batch_bytes = batch_bytes
        self._flush_interval = flush_interval
        self._on_corrupt: OnCorrupt = on_corrupt
        self._default = default
        self._read_only = read_only
        self._buffer = bytearray()
        self._handed = 0  # bytes taken from the buffer for the storage, a write under way included
        # Bytes the storage has flushed. -1 sends the first flush to the storage even with nothing
        # to write, so a backend can finish what a crashed writer left (S3's stage) at once.
        self._durable = -1
        self._io_lock = anyio.Lock()  # the one path to the storage: batches never reorder
        self._flushing: anyio.Event | None = None
        self._flusher: anyio.CancelScope | None = None
        self._closed = False  # close() has begun
        self._writable = not read_only  # append() is refused once this is false
        # append()'s one test: the buffer's size from which it leaves its fast path (0 once refused)
        self._full_at = batch_bytes if self._writable else 0
        self._closing: anyio.Event | None = None  # set once close() has released the storage
        self._pause: anyio.Event | None = None  # set at the end of a pause of held appends, if one is on
        self._paused_until: float | None = None  # when the last pause ended (the event loop's clock)
        self._unknown: str | None = None  # why a storage call's outcome is unknown, if one is
        self._policy = compact
        self._compaction_lock = anyio.Lock()
        # The cut of each compaction called and not yet done, in call order: the bytes appended
        # before it (handed included). Nothing after the first is written until that compaction
        # has swapped the journal; appends wait in memory meanwhile.
        self._cuts: collections.deque[int] = collections.deque()
        # How many of the first cuts no longer hold appends (0 or 1): a compact(key=...) whose storage
        # carries what is written during replace() into the new journal lets them go on once its
        # fold is bounded (CheckpointStorage.writes_during_replace).
        self._carried = 0
        self._compactions_over = anyio.Event()  # set while no compaction is under way or waiting
        self._compactions_over.set()
        self._holds_changed = anyio.Event()  # set, and replaced, whenever a compaction stops holding appends
        self._compactor: anyio.CancelScope | None = None  # the policy's compaction in the background
        self._grown = 0  # bytes written since the last compaction
        self._base: int | None = None  # the journal's bytes after its last compaction, or at replay
        self._closed_note = ""  # why, when it was not closed by close(): a fork
        if not read_only:
            drop_in_forked_children(self)
        self.corrupt_lines_skipped = 0
        """Lines the last :meth:`replay` skipped as corrupt (with ``on_corrupt="skip"``)."""

    @classmethod
    def from_uri(cls, uri: str | os.PathLike[str], **options: Any) -> Self:
        """Open a manager on the storage for ``uri`` (see :class:`~yoink.StorageFactory`).

        The manager's own options (``batch_bytes``, ``flush_interval``, ``on_corrupt``,
        ``default``) are taken out; the rest go to the storage.

        >>> CheckpointManager.from_uri("./crawl.jsonl", flush_interval=5, fsync=False)
        """
        own = {name: options.pop(name) for name in _manager_options() & options.keys()}
        return cls(StorageFactory.from_uri(uri, **options), **own)

    @property
    def storage(self) -> CheckpointStorage:
        """The storage this manager writes to."""
        return self._storage

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._storage!r})"

    def __getstate__(self) -> dict[str, Any]:
        """Pickle as the storage (its URI and options) and the options, for another process."""
        if self._buffer or self._handed > max(self._durable, 0):
            raise TypeError(
                f"{self!r} has records that are not flushed; await flush() before pickling it "
                "(a pickled manager carries no records, so they would be lost to the copy)"
            )
        options = {
            "batch_bytes": self._batch_bytes,
            "flush_interval": self._flush_interval,
            "on_corrupt": self._on_corrupt,
            "default": self._default,
            "read_only": self._read_only,
            "compact": self._policy,
        }
        return {"storage": self._storage, "options": options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["storage"], **state["options"])  # type: ignore[misc]

    async def append(self, record: Any) -> None:
        """Append one record; raise ``TypeError``, appending nothing, if it is not a JSON object.

        Refused with ``TypeError`` as well: a record whose ``orjson.Fragment`` holds a newline, which
        would break the line format. NaN and +-Infinity are written as ``null``, as orjson does.

        Waits while a full batch is handed to the storage, so memory stays bounded however slow
        the storage is.
        """
        try:  # encode_record(), inlined
            line = _dumps(record, self._default)
        except TypeError as exc:
            raise not_a_record(record, exc) from exc
        # _records.OBJECT_START and NEWLINE, as literals: two global lookups cost append 2.4%
        if line[0] != 123 or 10 in line:  # an object, on one line (a Fragment may hold "\n")
            raise refused(record, line)
        buffer = self._buffer
        buffer += line
        buffer += b"\n"
        if len(buffer) >= self._full_at:  # a full batch, a line too long, or append refused (0)
            await self._batch_full(len(line) + 1)

    async def append_many(self, records: Iterable[Any]) -> None:
        """Append records in order, all or none: if one cannot be encoded, none is appended."""
        self._check_writable()
        encoded = bytearray()
        for record in records:
            encoded += encode_record(record, self._default)
        buffer = self._buffer
        buffer += encoded
        if len(buffer) >= self._full_at:
            await self._batch_full(0)

    async def flush(self) -> None:
        """Return when every record appended before the call is durable in the storage.

        Tasks that call ``flush()`` together share one storage flush (group commit). A cancelled
        ``flush()`` stops waiting; the storage flush it started goes on to its end.
        """
        self._check_writable()
        if feeding.get() is self:
            raise self._inside_snapshot("flush()")
        await self._flush()

    async def replay(self) -> AsyncIterator[dict[str, Any]]:
        """Yield the journal's records in append order, streaming.

        Sees every record appended before it was called, flushed or not. A torn last line is
        skipped with a WARNING; a bad line before the end raises
        :class:`~yoink.CorruptCheckpointError` after every record before it was yielded (or, with
        ``on_corrupt="skip"``, is skipped and counted in :attr:`corrupt_lines_skipped`).
        """
        async with contextlib.aclosing(self.replay_batches()) as batches:
            async for records in batches:
                for record in records:
                    yield record

    async def replay_batches(self) -> AsyncGenerator[list[dict[str, Any]], None]:
        """:meth:`replay`, a list of records at a time (those of one read from the storage): faster
        where a job folds millions of records into its state."""
        self._check_open()
        if not self._read_only and feeding.get() is not self:  # in a snapshot: the journal it replaces
            await self._compactions_done()  # writes wait for them: the records after their cuts too
            await self._write_batch()
        decoder = JournalDecoder(repr(self._storage), on_corrupt=self._on_corrupt)
        batches = decoder.batches(self._storage.read())
        try:
            async for records in batches:
                if records:
                    yield records
        finally:
            self.corrupt_lines_skipped = decoder.skipped
            await batches.aclose()
        if self._base is None:  # the journal's size, for the compaction policy
            self._base = decoder.offset

    async def compact(
        self, records: Iterable[Any] | AsyncIterable[Any] | None = None, *, key: str | None = None
    ) -> Compaction:
        """Replace the journal, atomically, with a snapshot: ``records``, or the last record per ``key``.

        ``compact(records)`` takes the job's state as records (an iterable or async iterable,
        encoded and streamed to the storage as it comes, never all in memory). ``compact(key="url")``
        keeps, of the journal's records, the last one for each value of the field ``key`` (and
        every record without it), in journal order, as Kafka compacts a log; it holds one record
        per distinct value in memory while it reads the journal.

        Every record appended before the call is written and flushed first (and, with ``records``,
        replaced by the snapshot); records appended while it runs follow the snapshot. A crash at
        any moment leaves the old journal whole, or the snapshot whole and what was flushed after
        it. While it runs, :meth:`append` goes on, records wait in memory until the swap, and
        :meth:`flush` waits for it; except for ``compact(key=...)`` on a storage that carries what
        is written during the swap into the new journal (every built-in one that compacts; see
        :attr:`~yoink.storage.CheckpointStorage.writes_during_replace`): there, once the fold has
        begun reading, records are written and flushed as usual. It returns what it did
        (:class:`~yoink.Compaction`), and the journal's first line, a header that replay skips,
        says the same (``yoink stats`` shows it).

        A storage that cannot swap its journal raises :class:`~yoink.CompactionNotSupportedError`;
        a record that cannot be encoded raises ``TypeError``; a corrupt journal raises
        :class:`~yoink.CorruptCheckpointError` (with ``on_corrupt="skip"``, its bad lines are left
        out of the snapshot). In each case the journal is unchanged.

        The records' iterator runs in the caller's task. There, :meth:`replay` yields the journal
        the snapshot replaces (``compact(r async for r in checkpoint.replay() if keep(r))`` filters
        it), and :meth:`flush`, :meth:`close` and ``compact()``, which would wait for this
        compaction, raise ``RuntimeError``. A ``compact(records)`` cancelled before its records
        ended is abandoned: the journal is unchanged. Cancelled after that, or with ``key``, it
        stops waiting and the compaction goes on to its end; :meth:`close` and :meth:`replay` wait
        for it.
        """
        self._check_writable()
        if (records is None) == (key is None):
            raise TypeError(
                "compact() takes the snapshot's records, or key=FIELD to keep the last record for each "
                "value of a field; one of the two"
            )
        if key is not None and (not isinstance(key, str) or not key):
            raise ValueError(f"key must be the name of a record field, got {key!r}")
        if feeding.get() is self:
            raise self._inside_snapshot("compact()")
        # The cut, the bytes appended before the call, is taken now, before any await lets another
        # task append: nothing after it is written until this compaction has swapped the journal.
        cut = self._handed + len(self._buffer)
        self._cuts.append(cut)
        if self._compactions_over.is_set():
            self._compactions_over = anyio.Event()
        feed = (
            None
            if records is None
            else SnapshotFeed(self, functools.partial(encode_record, default=self._default))
        )
        run = _Run()
        start_background(functools.partial(self._compaction, run, cut, feed, key))
        if feed is not None:
            assert records is not None
            try:
                await feed.feed(records)  # here, in the caller's task: cancelled, it abandons the snapshot
            except Exception:
                await uninterrupted(run.over.wait, finish_first=True)  # the old journal is back
                raise
        await run.over.wait()  # cancelled, it stops waiting: the snapshot is whole, the swap goes on
        return run.outcome()

    async def _compaction(self, run: _Run, cut: int, feed: SnapshotFeed | None, key: str | None) -> None:
        """A compaction, in a task of its own, from the cut to the swap."""
        try:
            # One at a time, in the order they were called: their cuts are queued in that order.
            async with self._compaction_lock:
                if feed is not None:
                    async with self._io_lock:
                        run.result = await self._compact_to_snapshot(feed)
                else:
                    assert key is not None
                    run.result = await self._compact_by_key(key)
        except BaseException as exc:
            run.error = exc
            if not isinstance(exc, Exception):
                raise
        finally:
            if feed is not None:
                feed.close()
            self._carried = 0
            self._cuts.remove(cut)  # the next compaction's cut, if one waits, is the first now
            self._cuts_changed()
            run.over.set()

    async def _compact_to_snapshot(self, feed: SnapshotFeed) -> Compaction:
        await self._flush_to_cut()
        info = Compaction(now(), None, records_before=None, bytes_before=None, records=None)
        text = feed.text(info.header_line())
        feed.ready.set()  # the journal before the cut is durable: a replay in the snapshot reads it
        await self._replace(text)
        self._grown = 0
        self._base = feed.bytes + len(info.header_line().encode())
        return Compaction(info.at, None, None, None, feed.records, feed.bytes)

    async def _compact_by_key(self, key: str) -> Compaction:
        """Fold the journal up to the cut and swap it for what the fold kept, in a task of its own
        (the fold itself in a worker process if the journal is large, so appends go on).

        Appends after the cut wait in memory until the swap; or, on a storage that carries what is
        written during ``replace()`` into the new journal, only until the fold is bounded (it reads
        the journal up to the cut, however long it takes): then they are written and flushed.
        """
        bounded = anyio.Event()
        outcome = _Run()
        async with self._io_lock:
            await self._flush_to_cut()
            start_background(functools.partial(self._fold_and_replace, key, bounded, outcome))
            if self._storage.writes_during_replace:  # the storage's own: it may differ per instance
                await bounded.wait()  # replace() knows where the journal ends, and the fold reads to there
                self._carried = 1
                self._cuts_changed()
            else:
                await outcome.over.wait()
            self._grown = 0  # from here on, written after the snapshot
        await outcome.over.wait()
        return outcome.outcome()

    async def _fold_and_replace(self, key: str, bounded: anyio.Event, outcome: _Run) -> None:
        at = now()
        folds: list[Fold] = []

        async def text() -> AsyncGenerator[str, None]:
            # Its first item is asked for once replace() has fixed where the old journal ends, with
            # writes still held: the fold, begun now, reads to the same place.
            async with fold_by_key(self._storage, key, self._on_corrupt, bounded=bounded.set) as fold:
                folds.append(fold)
                header = Compaction(at, key, fold.records_before, fold.bytes_before, fold.kept).header_line()
                async with contextlib.aclosing(fold.text(header)) as lines:
                    async for piece in lines:
                        yield piece

        try:
            await self._replace(text())
            fold = folds[0]
            info = Compaction(at, key, fold.records_before, fold.bytes_before, fold.kept, fold.bytes)
            self._base = fold.bytes + len(info.header_line().encode())
            outcome.result = info
        except BaseException as exc:  # all of it, for the task that waits: this one has no caller
            outcome.error = exc
        finally:
            bounded.set()
            outcome.over.set()

    async def _flush_to_cut(self) -> None:
        await self._write_locked()  # up to the cut
        handed = self._handed
        await self._storage.flush()
        self._durable = max(self._durable, handed)

    async def _replace(self, text: AsyncGenerator[str, None]) -> None:
        try:
            await self._storage.replace(text)
        finally:
            await text.aclose()

    async def _compactions_done(self) -> None:
        """Return once no compaction is under way or waiting."""
        while self._cuts:
            await self._compactions_over.wait()

    def _inside_snapshot(self, call: str) -> RuntimeError:
        return RuntimeError(
            f"{call} in the records of a compact() of the same manager would wait for that compaction, "
            "which waits for its records; append() and replay() may be called there"
        )

    def _cuts_changed(self) -> None:
        self._holds_changed.set()
        self._holds_changed = anyio.Event()
        if self._held_from() is None:  # no compaction holds appends: they write full batches again
            self._full_at = self._batch_bytes if self._writable else 0
        if not self._cuts:
            self._compactions_over.set()

    def _held_from(self) -> int | None:
        """The cut after which appends wait in memory for a compaction, if one holds them."""
        return self._cuts[self._carried] if len(self._cuts) > self._carried else None

    async def exists(self) -> bool:
        """Whether the journal has any record, here or in the storage."""
        return bool(self._buffer) or self._handed > 0 or await self._storage.exists()

    async def close(self) -> None:
        """Flush, then close the storage. Safe to call twice; a second call waits for the first.

        From the moment it is called, :meth:`append` raises :class:`~yoink.StorageClosedError`;
        every record appended before is flushed. It finishes even when its caller is cancelled,
        and its caller's cancellation goes on once the storage is released.
        """
        if self._closed_note:  # a forked child's copy: what it would close is the parent's
            return
        if self._closing is not None:
            await uninterrupted(self._closing.wait, finish_first=True)
            return
        if feeding.get() is self:
            raise self._inside_snapshot("close()")
        self._closed = True
        self._writable = False
        self._full_at = 0
        self._closing = closing = anyio.Event()
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        if self._compactor is not None:
            self._compactor.cancel()  # a compaction under way goes on to its end; close() waits for it
        try:
            await uninterrupted(self._close_storage, finish_first=True)
        finally:
            closing.set()

    async def __aenter__(self) -> Self:
        self._check_open()
        if self._flush_interval is not None and self._flusher is None and not self._read_only:
            self._flusher = start_background(self._flush_periodically)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.close()
        except Exception:
            if exc is None:
                raise
            logger.error("closing %r after its block raised failed as well", self, exc_info=True)

    def _check_open(self) -> None:
        if self._closed:
            raise StorageClosedError(f"{self!r} is closed{self._closed_note}")

    def _check_writable(self) -> None:
        if not self._writable:
            raise self._refusal()

    def _refusal(self) -> StorageError:
        if self._closed:
            return StorageClosedError(f"{self!r} is closed{self._closed_note}")
        return ReadOnlyError(f"{self!r} is read-only (read_only=True): it neither appends nor flushes")

    async def _batch_full(self, appended: int) -> None:
        """append()'s way out of its fast path: write the full batch, or take back what it added.

        The ``appended`` bytes are taken back when append() is refused or its line is too long.
        """
        if not self._writable or appended > _records.MAX_LINE_BYTES:
            del self._buffer[len(self._buffer) - appended :]  # still at the end: append() did not wait
            if not self._writable:
                raise self._refusal()
            raise record_too_long(appended)
        held_from = self._held_from()
        if held_from is None:
            await self._write_batch(if_full=True)
        elif self._pause is not None:  # another task's append pauses: all of them pause with it
            await self._pause.wait()
        elif self._handed + len(self._buffer) - held_from < _PAUSE_FROM:
            # Held in memory until the compaction lets appends go; let it run meanwhile.
            self._full_at = len(self._buffer) + min(self._batch_bytes, _HELD_STEP)
            await anyio.lowlevel.checkpoint()
        else:
            await self._pause_appends()

    async def _pause_appends(self) -> None:
        """Let no task append for a moment (see _PAUSE_FROM): as long as they appended since the last
        pause, within _PAUSE and _MOST_PAUSE. Each append meanwhile waits for the end."""
        self._pause = pause = anyio.Event()
        self._full_at = 0  # every append() meets the pause
        start = anyio.current_time()
        since = _PAUSE if self._paused_until is None else start - self._paused_until
        busy = since if since <= _MOST_PAUSE else _PAUSE  # the first of a compaction's: no appends to time
        try:
            await anyio.sleep(max(busy, _PAUSE))
        finally:
            self._paused_until = anyio.current_time()
            self._pause = None
            pause.set()
            if self._full_at == 0 and self._writable and self._held_from() is not None:
                self._full_at = len(self._buffer) + min(self._batch_bytes, _HELD_STEP)

    async def _write_batch(self, *, if_full: bool = False) -> None:
        await uninterrupted(functools.partial(self._write_unit, if_full=if_full))

    async def _write_unit(self, *, if_full: bool) -> None:
        async with self._io_lock:
            # Appenders that waited for the lock find the batch written by the one before them;
            # they write only a buffer that is full again, never a handful of records each.
            if not if_full or len(self._buffer) >= self._batch_bytes:
                await self._write_locked()

    async def _write_locked(self) -> None:
        """Hand the buffered records to the storage in one write; keep them if it fails.

        While a compaction is under way, only those appended before it (up to its cut) are written.
        """
        if self._unknown is not None:  # before all: a flush must not take that write for durable
            raise StorageError(
                f"{self!r} stopped writing: {self._unknown}. Nothing is written twice or guessed at: "
                "open a new manager, whose replay shows what the journal holds"
            )
        held = self._held_from()
        upto = None if held is None else held - self._handed
        if not self._buffer or (upto is not None and upto <= 0):
            return
        if upto is None or upto >= len(self._buffer):
            batch, self._buffer = self._buffer, bytearray()
        else:  # a compaction's cut: what was appended after its call stays for after the snapshot
            batch = self._buffer[:upto]
            del self._buffer[:upto]
        self._handed += len(batch)  # before the write, so a flush called meanwhile waits for it
        try:
            await self._storage.write(batch.decode())
        except anyio.get_cancelled_exc_class():
            # Cancelled in its own task: the event loop is shutting down. The write may or may not
            # have reached the storage, so it is neither repeated nor undone.
            self._unknown = f"a write of {len(batch):,} bytes was cancelled part-way, its outcome unknown"
            raise
        except BaseException:
            self._buffer[:0] = batch
            self._handed -= len(batch)
            raise
        self._grown += len(batch)
        policy = self._policy
        if (
            policy is not None
            and not self._cuts
            and self._compactor is None
            and policy.due(self._base or 0, self._grown)
        ):
            self._compactor = start_background(self._compact_in_background)

    async def _compact_in_background(self) -> None:
        assert self._policy is not None
        try:
            result = await self.compact(key=self._policy.key)
        except (StorageError, CorruptCheckpointError) as exc:  # the storage's failure, or the journal's
            if self._writable:  # not a close under way
                logger.warning("background compaction of %r failed; appending goes on: %s", self, exc)
            self._grown = 0  # tried again once the journal has grown as much again
        except Exception:
            logger.exception("background compaction of %r failed; appending goes on", self)
            self._grown = 0
        else:
            logger.info(
                "compacted %r by %r: %s records to %s",
                self,
                result.key,
                result.records_before,
                result.records,
            )
        finally:
            self._compactor = None

    async def _flush(self) -> None:
        target = self._handed + len(self._buffer)
        while self._durable < target:
            if self._flushing is not None:
                await self._flushing.wait()
                continue
            held = self._held_from()
            if held is not None and self._durable >= held:
                # All before a compaction's cut is durable, and what follows waits for it to let
                # appends go again: another round now would write nothing and flush for nothing.
                await self._holds_changed.wait()
                continue
            # A cancelled caller starts no round: on trio, uninterrupted() would refuse to run it,
            # and leave the Event below unset for every flush after.
            await anyio.lowlevel.checkpoint_if_cancelled()
            self._flushing = anyio.Event()  # before the round starts, so that others join it
            await uninterrupted(self._flush_round)

    async def _flush_round(self) -> None:
        try:
            async with self._io_lock:
                await self._write_locked()
                handed = self._handed  # all written: writes happen only under this lock
                await self._storage.flush()
                self._durable = handed
        finally:
            done, self._flushing = self._flushing, None
            if done is not None:
                done.set()

    async def _close_storage(self) -> None:
        try:
            await self._compactions_done()  # called before close(): they go on to their end
            if self._unknown is None and not self._read_only:
                await self._flush()
        finally:
            await self._storage.close()
        if self._buffer:
            raise StorageError(
                f"{self!r} closed without writing its last {len(self._buffer):,} bytes of records: "
                f"{self._unknown}"
            )

    async def _flush_periodically(self) -> None:
        assert self._flush_interval is not None
        while True:
            await anyio.sleep(self._flush_interval)
            try:
                await self.flush()
            except StorageClosedError:
                return
            except Exception:
                logger.warning(
                    "periodic flush of %r failed; the records stay buffered for the next flush",
                    self,
                    exc_info=True,
                )

    def _forget_unwritten(self) -> None:
        """Drop the records no write has taken yet: for a writer the storage refused (the ledger's
        opening record, whose flush met another writer's lock), so that close() does not try again."""
        if self._held_from() is None:
            del self._buffer[:]

    def _drop_after_fork(self) -> None:
        """In a forked child: a task of the parent's may hold this manager's locks, and never will
        let go of them here. Refuse everything, as the storage does, instead of waiting for them."""
        self._closed = True
        self._writable = False
        self._full_at = 0
        self._closed_note = f": {forked_note(os.getppid())}"


class _Run:
    """A compaction under way, in a task of its own: what it returned or raised, once it is over."""

    def __init__(self) -> None:
        self.over = anyio.Event()
        self.result: Compaction | None = None
        self.error: BaseException | None = None

    def outcome(self) -> Compaction:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


@functools.cache
def _manager_options() -> frozenset[str]:
    """The manager's keyword options, read off its constructor so the two never drift apart."""
    parameters = inspect.signature(CheckpointManager).parameters.values()
    return frozenset(p.name for p in parameters if p.kind is p.KEYWORD_ONLY)
