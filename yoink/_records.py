"""The journal's format: one JSON object a line, UTF-8, each line ending in ``"\\n"``.

Encoding is orjson's; decoding is here and nowhere else (each line parsed by :mod:`yoink._json`),
with the rules for a damaged journal:

- a line is written without ``"\n"`` in it (a record whose ``orjson.Fragment`` holds one is
  refused); NaN and +-Infinity are written as ``null``, as orjson writes them;
- a blank line is ignored;
- a first line ``["$yoink", {...}]`` is the journal's header, not a record: what a compaction
  wrote about itself (:attr:`JournalDecoder.header`). It is a JSON array, which no record can be,
  so no record is ever taken for it;
- what JSON holds comes back unchanged: an integer beyond 64 bits, which orjson reads as a float, is
  read again with the json module (only a line with a run of 19 digits or more is);
- a line nested too deeply to parse is a bad line like any other, never an error of its own;
- the last line of the journal, if it is not a JSON object, is a torn write from a crash: it is
  skipped with a WARNING;
- any other line that is not a JSON object is corruption: :class:`~yoink.CorruptCheckpointError`
  names its line number and byte offset, after every record before it was yielded; with
  ``on_corrupt="skip"`` it is skipped with a WARNING and counted instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from yoink import _json
from yoink._exceptions import CorruptCheckpointError

__all__ = [
    "HEADER_START",
    "MAX_LINE_BYTES",
    "NEWLINE",
    "OBJECT_START",
    "BadLine",
    "JournalDecoder",
    "LineTooLongToRead",
    "OnCorrupt",
    "Problem",
    "TornTail",
    "encode_record",
    "left_out_by_storage",
    "line_too_long",
    "not_a_record",
    "record_too_long",
    "refused",
    "utf8_len",
]

logger = logging.getLogger(__name__)

OnCorrupt = Literal["raise", "skip"]
WARNED_LINES = 10  # corrupt lines skipped with a warning each; finish() logs the total of the rest
MAX_LINE_BYTES = 64 << 20
"""The longest line yoink writes or reads. ``append`` refuses a longer record; replay stops at a
longer line with :class:`~yoink.CorruptCheckpointError`, so memory never grows past it."""
OBJECT_START = ord("{")  # the first byte of every line: a JSON object
HEADER_START = '["$yoink",'  # the first line of a compacted journal: an array, so never a record
NEWLINE = ord("\n")  # the last byte of every line, and in no other place


def encode_record(record: Any, default: Callable[[Any], Any] | None = None) -> bytes:
    """Return ``record`` as one JSONL line, or raise ``TypeError`` if it is not a JSON object.

    Refused too: a record that would encode as more than one line, which only an
    ``orjson.Fragment`` holding a newline can. NaN and +-Infinity are written as ``null``, as
    orjson writes them (looking for them would cost append a third of its time).
    ``CheckpointManager.append`` inlines these lines: a function call is a tenth of its cost.
    """
    try:
        line = orjson.dumps(record, default)
    except TypeError as exc:
        raise not_a_record(record, exc) from exc
    if line[0] != OBJECT_START or NEWLINE in line:
        raise refused(record, line)
    if len(line) >= MAX_LINE_BYTES:
        raise record_too_long(len(line) + 1)
    return line + b"\n"


def refused(record: Any, line: bytes) -> TypeError:
    """The error for a record that orjson encoded, but not as one line holding a JSON object."""
    if line[0] != OBJECT_START:
        return not_a_record(record)
    return TypeError(
        f"a {type(record).__name__} record encodes as more than one line (an orjson.Fragment in it "
        "holds a newline), which would break the journal's line format; nothing was appended"
    )


def record_too_long(size: int) -> ValueError:
    return ValueError(
        f"a record of {size:,} bytes is longer than {MAX_LINE_BYTES:,} bytes, yoink's limit for a line; "
        "nothing was appended"
    )


def not_a_record(record: Any, cause: TypeError | None = None) -> TypeError:
    """The error for a record that cannot be journaled; nothing of it has been written."""
    kind = type(record).__name__
    if cause is None:
        return TypeError(
            f"a record must encode as a JSON object (a dict or a dataclass), not {kind}; nothing was appended"
        )
    return TypeError(f"cannot encode a {kind} record as JSON: {cause}; nothing was appended")


@dataclass(frozen=True)
class BadLine:
    """A line that is not a record, before the last line: corruption.

    ``line`` is 1-based, ``offset`` the byte offset of its start.
    """

    line: int
    offset: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line} (byte offset {self.offset}): a corrupt line: {self.reason}"


@dataclass(frozen=True)
class TornTail:
    """The end of a journal that is not a record: a write torn by a crash, or one under way.

    Either the last line, which is not a JSON object, or bytes without a newline after it, which
    the storage left out of what it read (``left_out`` counts them; they are not in the
    decoder's ``offset``).
    """

    line: int
    offset: int
    reason: str
    left_out: int = 0

    def __str__(self) -> str:
        return f"line {self.line} (byte offset {self.offset}): a torn last line: {self.reason}"


Problem = BadLine | TornTail
"""What a decoder reports besides records, in journal order (``on_problem``)."""


class LineTooLongToRead(CorruptCheckpointError):
    """A storage met a line over MAX_LINE_BYTES and stopped; the decoder, which counts lines, says
    which line it was."""

    def __init__(self, source: str, offset: int) -> None:
        super().__init__(_too_long(source, f"the line at byte offset {offset}"), line=0, offset=offset)


# The decoder reading a storage, told of the bytes it leaves out of what it yields (a torn tail).
_reading: contextvars.ContextVar[JournalDecoder | None] = contextvars.ContextVar("_reading", default=None)


def left_out_by_storage(size: int) -> None:
    """A storage's read() left ``size`` bytes without a newline out: tell the decoder reading it."""
    decoder = _reading.get()
    if decoder is not None:
        decoder._storage_left_out(size)


class JournalDecoder:
    """Turns the text items that ``CheckpointStorage.read()`` yields into records.

    :meth:`batches` reads a storage whole: the manager's replay and the ``yoink`` command both
    do. Or call :meth:`feed` with each item in order and :meth:`finish` at the end. Items hold one
    or more whole lines; the newline that ends an item is optional.

    Each line skipped, and each torn tail, is logged, and passed to ``on_problem`` if given.
    """

    def __init__(
        self,
        source: str,
        *,
        on_corrupt: OnCorrupt = "raise",
        on_problem: Callable[[Problem], None] | None = None,
    ) -> None:
        self.source = source
        self.on_corrupt = on_corrupt
        self.lines = 0
        self.offset = 0
        self.skipped = 0
        self.header: dict[str, Any] | None = None
        """The journal's header (the object in ``["$yoink", {...}]``), once read: what compacted it."""
        self.texts: list[str] | None = None
        """The text of each record :meth:`feed` returned last, without its newline, where every line
        of its item was one (as a plain journal's are); else None."""
        self._on_problem = on_problem
        self._suspect: BadLine | None = None  # a bad line that is torn if nothing follows it
        self._error: CorruptCheckpointError | None = None
        self._left_out: list[int] = []  # sizes of torn tails the storage did not yield

    async def batches(self, items: AsyncIterator[str]) -> AsyncGenerator[list[dict[str, Any]], None]:
        """The records of a storage's ``read()``, a list for each item, then :meth:`finish`.

        Closes ``items`` when it ends or is closed. A line too long for the storage to read is
        reported at its line number, after the records before it (and a bad line before it).
        """
        try:
            while True:
                reading = _reading.set(self)
                try:
                    item = await items.__anext__()
                except StopAsyncIteration:
                    break
                except LineTooLongToRead as exc:
                    raise self.followed() or line_too_long(self.source, self.lines + 1, exc.offset) from None
                finally:
                    _reading.reset(reading)
                yield self.feed(item)
        finally:  # an abandoned replay closes the reader underneath at once, not at garbage collection
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                await aclose()
        self.finish()

    def feed(self, item: str) -> list[dict[str, Any]]:
        """Decode one item; raise the corruption found in an earlier item, if any."""
        if self._error is not None:
            raise self._error
        if not self.lines and item.startswith(HEADER_START):
            item = self._take_header(item)
        if not item:
            self.texts = []
            return []
        lines = item.split("\n")
        if not lines[-1]:
            lines.pop()
        too_long = None
        if len(item) > MAX_LINE_BYTES // 4:  # a line may be too long (a character is 1 to 4 bytes)
            lines, too_long = self._cut_at_a_long_line(lines)
        # A long line may be there, or an integer beyond 64 bits: leave them to _json.loads, line by line.
        records = None
        if len(item) <= _json.LARGE_LINE and self._suspect is None and not _json.long_digit_run(item):
            with contextlib.suppress(orjson.JSONDecodeError):
                records = [orjson.loads(line) for line in lines]
        if records is None or set(map(type, records)) != {dict}:
            records = self._decode_slowly(lines)
            self.texts = None
        else:
            self.texts = lines
        self.lines += len(lines)
        self.offset += utf8_len(item) + (not item.endswith("\n"))
        if too_long is not None and self._error is None:
            # Raised at the next call, after the records before it; a bad line just before it first.
            self._error = self.followed() or too_long
        return records

    def _take_header(self, item: str) -> str:
        """Read the header off the journal's first line; return the rest of the item."""
        first, _, rest = item.partition("\n")
        try:
            header = _json.loads(first)
        except json.JSONDecodeError:
            return item  # not a header after all: a bad line, judged like any other
        if type(header) is not list or len(header) != 2 or type(header[1]) is not dict:
            return item
        self.header = header[1]
        self.lines = 1
        self.offset = utf8_len(first) + 1
        return rest

    def followed(self) -> CorruptCheckpointError | None:
        """Say that more follows the lines fed so far, although it cannot be fed (a line too long).

        A bad line waiting to be judged a torn tail is then corrupt: returned as the error to raise
        before the one for what follows it, or, with ``on_corrupt="skip"``, skipped.
        """
        if self._suspect is not None:
            bad, self._suspect = self._suspect, None
            self._is_corrupt(bad)
        return self._error

    def _cut_at_a_long_line(self, lines: list[str]) -> tuple[list[str], CorruptCheckpointError | None]:
        """The lines before the first one over MAX_LINE_BYTES, and the error for that one, if any."""
        offset = self.offset
        for index, line in enumerate(lines):
            size = utf8_len(line)
            if size > MAX_LINE_BYTES:
                return lines[:index], line_too_long(self.source, self.lines + index + 1, offset)
            offset += size + 1
        return lines, None

    def finish(self) -> None:
        """Call after the last item: a bad last line is a torn tail; raise corruption found earlier."""
        if self._error is not None:
            raise self._error
        if self._suspect is not None:
            torn = TornTail(self._suspect.line, self._suspect.offset, self._suspect.reason)
            logger.warning(
                "%s: skipped line %d (byte offset %d), the last line, as a torn write: %s",
                self.source,
                torn.line,
                torn.offset,
                torn.reason,
            )
            self._report(torn)
        for size in self._left_out:  # logged by the storage
            self._report(TornTail(self.lines + 1, self.offset, f"{size} bytes without a newline", size))
        if self.skipped > WARNED_LINES:
            logger.warning(
                "%s: skipped %d corrupt lines in all (a warning was logged for the first %d)",
                self.source,
                self.skipped,
                WARNED_LINES,
            )

    def _decode_slowly(self, lines: list[str]) -> list[dict[str, Any]]:
        """Decode line by line, to find where the bad lines are."""
        records: list[dict[str, Any]] = []
        offset = self.offset
        for index, line in enumerate(lines):
            start, offset = offset, offset + utf8_len(line) + 1
            if not line.strip():
                continue
            if self._suspect is not None:
                if self._is_corrupt(self._suspect):
                    return records
                self._suspect = None
            try:
                record = _json.loads(line)
            except json.JSONDecodeError as exc:  # orjson's is a subclass
                reason = str(exc)
            else:
                if type(record) is dict:
                    records.append(record)
                    continue
                reason = f"a JSON {type(record).__name__}, not an object"
            self._suspect = BadLine(self.lines + index + 1, start, reason)
        return records

    def _is_corrupt(self, bad: BadLine) -> bool:
        """A bad line is followed by another line: raise later, or skip it now. True to stop."""
        message = (
            f"{self.source}: line {bad.line} (byte offset {bad.offset}) is not a JSON object: {bad.reason}"
        )
        if self.on_corrupt == "raise":
            self._error = CorruptCheckpointError(
                f"{message}; it is not the last line, so it is not a torn write "
                "(on_corrupt='skip' skips such lines)",
                line=bad.line,
                offset=bad.offset,
            )
            return True
        self.skipped += 1
        if self.skipped <= WARNED_LINES:
            logger.warning("%s; skipped", message)
        self._report(bad)
        return False

    def _report(self, problem: Problem) -> None:
        if self._on_problem is not None:
            self._on_problem(problem)

    def _storage_left_out(self, size: int) -> None:
        self._left_out.append(size)  # reported by finish(), after the lines fed before it


def line_too_long(source: str, line: int, offset: int) -> CorruptCheckpointError:
    """The error for line number ``line`` (1-based), over MAX_LINE_BYTES, at byte ``offset``."""
    return CorruptCheckpointError(
        _too_long(source, f"line {line} (byte offset {offset})"), line=line, offset=offset
    )


def _too_long(source: str, where: str) -> str:
    return (
        f"{source}: {where} is longer than {MAX_LINE_BYTES:,} bytes, yoink's limit for a line; "
        "yoink never writes such a line, and does not read one (even with on_corrupt='skip')"
    )


def utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogateescape"))
