"""Compaction: the snapshot that replaces a journal, and the fold that makes one from it by key.

:meth:`CheckpointManager.compact <yoink.CheckpointManager.compact>` owns the when (its lock, what
is flushed first, what follows); this module owns the what: the header a compacted journal starts
with, the last record per key in journal order, and the snapshot streamed to
``CheckpointStorage.replace()`` in writes of about a mebibyte.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any, Protocol

import anyio
import anyio.lowlevel
import orjson

from yoink import _json
from yoink._fold_keeper import LastPerKey

__all__ = [
    "Compaction",
    "CompactionPolicy",
    "Keeper",
    "KeyFold",
    "SnapshotAbandoned",
    "SnapshotFeed",
    "encode_replayed",
    "feeding",
    "now",
    "snapshot_text",
]

CHUNK_BYTES = 1 << 20  # the snapshot is handed to the storage in pieces of about this size


@dataclass(frozen=True)
class Compaction:
    """What a compaction did: returned by ``compact()``; its header line in the journal says the same.

    ``at`` is when it began (UTC, ISO 8601). ``records_before`` and ``bytes_before`` are the old
    journal's, ``records`` and ``bytes`` the snapshot's. What was not known when the header was
    written is ``None`` there: the old journal's size when a snapshot was given (the old journal
    is not read then), the snapshot's records then, and its bytes always.
    """

    at: str
    key: str | None
    records_before: int | None
    bytes_before: int | None
    records: int | None
    bytes: int | None = None

    @classmethod
    def from_header(cls, header: dict[str, Any]) -> Compaction | None:
        """The compaction a journal's header tells of, or None if it tells of none yoink knows."""
        fields = header.get("compaction")
        if type(fields) is not dict:
            return None
        if not all(name in fields for name in HEADER_FIELDS):
            return None
        counts = [fields[name] for name in HEADER_FIELDS[2:]]
        if type(fields["at"]) is not str or not isinstance(fields["key"], (str, type(None))):
            return None
        if not all(count is None or (type(count) is int and count >= 0) for count in counts):
            return None  # written by something other than yoink: not to be trusted, nor shown
        return cls(**{name: fields[name] for name in HEADER_FIELDS})

    def header_line(self) -> str:
        """The line a compacted journal starts with."""
        fields = {name: getattr(self, name) for name in HEADER_FIELDS}
        return orjson.dumps(["$yoink", {"compaction": fields}]).decode() + "\n"


HEADER_FIELDS = ("at", "key", "records_before", "bytes_before", "records")


@dataclass(frozen=True)
class CompactionPolicy:
    """Compact by ``key`` in the background once the journal has grown enough since it was last compacted.

    Grown enough: by ``growth`` times its size after the last compaction (or its size when it was
    opened, as far as this manager knows it), and by at least ``min_bytes``. A compaction then runs
    while appends go on: written and flushed as usual on a storage that carries them into the new
    journal (local files, memory, Redis, S3), held in memory until it ends otherwise (fsspec),
    flushes waiting for it.

    >>> CheckpointManager.from_uri("./crawl.jsonl", compact=CompactionPolicy(key="url"))
    """

    key: str
    growth: float = 4.0
    min_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise ValueError(f"CompactionPolicy needs the name of a record field as key, got {self.key!r}")
        if not self.growth > 1:
            raise ValueError(f"CompactionPolicy's growth must be more than 1, got {self.growth!r}")
        if not isinstance(self.min_bytes, int) or self.min_bytes < 0:
            raise ValueError(f"CompactionPolicy's min_bytes must be an int >= 0, got {self.min_bytes!r}")

    def due(self, base: int, grown: int) -> bool:
        """Whether a journal of ``base`` bytes after its last compaction, and ``grown`` since, is due."""
        return grown >= self.min_bytes and base + grown >= base * self.growth


class Keeper(Protocol):
    """Where a :class:`KeyFold` keeps each key's last record: :class:`~yoink._fold_keeper.LastPerKey`,
    or a worker's keeper process (:mod:`yoink._fold_worker`)."""

    def keep(self, keys: Sequence[Any], values: Sequence[Any]) -> None: ...


class KeyFold:
    """The last record for each value of ``key``, in journal order; records without it are all kept.

    Values are told apart as JSON tells them apart: ``1``, ``1.0``, ``true`` and ``"1"`` are four
    keys, where a Python dict would take the first three for one. Each record's key is found here,
    and the record kept by ``keeper`` under it (here by default; a worker hands the keeping to a
    process of its own).
    """

    def __init__(self, key: str, keeper: Keeper | None = None) -> None:
        self.key = key
        self.records = 0  # records folded in
        self._latest = LastPerKey()  # each key's last record, or its line, when kept here
        self._keeper: Keeper = self._latest if keeper is None else keeper
        self._unkeyed = 0

    def add(self, records: list[dict[str, Any]], lines: list[str] | None = None) -> None:
        """Fold ``records`` in; keep ``lines[i]`` (its text, without the newline) for ``records[i]``
        if given: a third of the memory of the record, and written as it was read."""
        keys = list(map(dict.get, records, repeat(self.key), repeat(_MISSING)))
        if set(map(type, keys)) - {str}:  # a key that is not a string, or none
            keys = [value if type(value) is str else self._identity(value) for value in keys]
        self._keeper.keep(keys, records if lines is None else lines)
        self.records += len(records)

    def _identity(self, value: Any) -> tuple[int] | bytes:
        if value is _MISSING:
            self._unkeyed += 1
            return (self._unkeyed,)  # a key of its own: kept, in its place
        return _canonical(value)

    def __len__(self) -> int:
        return len(self._latest)

    def lines(self) -> Iterator[bytes]:
        """The records kept here as lines, in journal order."""
        for kept in self._latest.values():
            yield (kept + "\n").encode() if isinstance(kept, str) else encode_replayed(kept)


_MISSING = object()


def _canonical(value: Any) -> bytes:
    """A JSON value's text with sorted keys: equal for equal JSON, and unlike any str key."""
    return _json.dumps(value, sort_keys=True)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


async def snapshot_text(
    header: str,
    records: Iterable[Any] | AsyncIterable[Any],
    encode: Callable[[Any], bytes],
    counted: Callable[[int, int], None],
) -> AsyncGenerator[str, None]:
    """The header, then ``records`` as lines (``encode`` makes each), in pieces of about CHUNK_BYTES.

    A record that cannot be encoded raises ``TypeError`` (the storage then keeps its old journal).
    ``counted(records, bytes)`` is called at the end with the snapshot's size, header excluded.
    """
    pieces: list[bytes] = [header.encode()]
    size = total = count = 0
    async with contextlib.aclosing(_each(records)) as each:
        async for record in each:
            line = encode(record)
            pieces.append(line)
            size += len(line)
            count += 1
            if size >= CHUNK_BYTES:
                yield b"".join(pieces).decode()
                total += size
                pieces, size = [], 0
    total += size
    yield b"".join(pieces).decode()
    counted(count, total)


def encode_replayed(record: dict[str, Any]) -> bytes:
    """A replayed record as a line again, whatever replay read (see :func:`yoink._json.dumps`)."""
    return _json.dumps(record) + b"\n"


async def _each(records: Iterable[Any] | AsyncIterable[Any]) -> AsyncGenerator[Any, None]:
    if isinstance(records, AsyncIterable):
        async for record in records:
            yield record
    else:
        for record in records:
            yield record


# The manager whose compaction's snapshot the current task is producing (compact(records) runs the
# records' iterator in its caller's task): a replay there reads the journal being replaced, and a
# flush, close or compaction there, which would wait for that compaction, is refused.
feeding: contextvars.ContextVar[object | None] = contextvars.ContextVar("feeding", default=None)


def _asyncio_cancels() -> int:
    """How many cancellations of the current asyncio task are under way (``Task.cancelling()``,
    Python 3.11 and later); 0 outside asyncio."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no asyncio loop runs this task: trio
        return 0
    cancelling = getattr(task, "cancelling", None)
    return cancelling() if cancelling is not None else 0


class SnapshotAbandoned(Exception):
    """compact()'s caller stopped (it was cancelled) before its snapshot was complete."""


class _End:
    """The feed's last item: the snapshot is complete."""


class SnapshotFeed:
    """The records of ``compact(records)``, encoded in the caller's task, handed to the compaction's.

    The compaction's task consumes :meth:`text` for ``CheckpointStorage.replace()``; the caller's
    task runs :meth:`feed`, so that the records' iterator runs where it was made, and is cancelled
    with its caller. The text ends only when the iterator did and its caller was not cancelled:
    a caller cancelled before then abandons the snapshot, and the storage keeps its old journal.
    """

    def __init__(self, owner: object, encode: Callable[[Any], bytes]) -> None:
        self._owner = owner
        self._encode = encode
        self._send, self._receive = anyio.create_memory_object_stream[str | _End](1)
        self.ready = anyio.Event()  # set once the journal before the cut is flushed, or on failure
        self.records = self.bytes = 0

    async def feed(self, records: Iterable[Any] | AsyncIterable[Any]) -> None:
        """Encode and hand over ``records`` (in the caller's task); return early if the compaction ended."""
        token = feeding.set(self._owner)
        cancels = _asyncio_cancels()
        try:
            await self.ready.wait()  # a replay in the records' iterator sees what it replaces
            async with contextlib.aclosing(_each(records)) as each:
                pieces: list[bytes] = []
                size = 0
                async for record in each:
                    line = self._encode(record)
                    pieces.append(line)
                    size += len(line)
                    self.records += 1
                    if size >= CHUNK_BYTES:
                        if not await self._hand(b"".join(pieces).decode()):
                            return
                        self.bytes += size
                        pieces, size = [], 0
            self.bytes += size
            if pieces and not await self._hand(b"".join(pieces).decode()):
                return
            # A cancellation of the caller comes before the end: anyio's and trio's at this checkpoint;
            # asyncio's, which is delivered once, may have been swallowed by the records' iterator,
            # ending them early (a queue consumer that returns when cancelled): it is counted.
            await anyio.lowlevel.checkpoint()
            if _asyncio_cancels() > cancels:
                raise anyio.get_cancelled_exc_class()()
            await self._hand(_End())
        finally:
            feeding.reset(token)
            self._send.close()

    async def _hand(self, item: str | _End) -> bool:
        """Hand ``item`` to the compaction; False if it ended without it (it failed: compact() raises
        its error)."""
        try:
            await self._send.send(item)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return False
        return True

    async def text(self, header: str) -> AsyncGenerator[str, None]:
        """The header, then the fed text, until the end the caller sent (in the compaction's task)."""
        yield header
        async for item in self._receive:
            if isinstance(item, _End):
                return
            yield item
        raise SnapshotAbandoned(
            "compact() was cancelled before its snapshot was complete; the journal is unchanged"
        )

    def close(self) -> None:
        """The compaction is over: let a caller still feeding, or waiting to, go."""
        self.ready.set()
        self._receive.close()
