"""The journal's format: one JSON object a line, UTF-8, each line ending in ``"\\n"``.

Encoding is orjson's; decoding is here and nowhere else, with the rules for a damaged journal:

- a blank line is ignored;
- the last line of the journal, if it is not a JSON object, is a torn write from a crash: it is
  skipped with a WARNING;
- any other line that is not a JSON object is corruption: :class:`~yoink.CorruptCheckpointError`
  names its line number and byte offset, after every record before it was yielded; with
  ``on_corrupt="skip"`` it is skipped with a WARNING and counted instead.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

import orjson

from yoink._exceptions import CorruptCheckpointError

__all__ = [
    "ENCODE_OPTIONS",
    "MAX_LINE_BYTES",
    "BadLine",
    "JournalDecoder",
    "OnCorrupt",
    "encode_record",
    "line_too_long",
    "not_a_record",
    "record_too_long",
    "whole_lines",
]

logger = logging.getLogger("yoink")

OnCorrupt = Literal["raise", "skip"]
ENCODE_OPTIONS = orjson.OPT_APPEND_NEWLINE
WARNED_LINES = 10  # corrupt lines skipped with a warning each; finish() logs the total of the rest
LARGE_LINE = 4 << 20  # a line longer than this is parsed by _loads with the json module
MAX_LINE_BYTES = 64 << 20
"""The longest line yoink writes or reads. ``append`` refuses a longer record; replay stops at a
longer line with :class:`~yoink.CorruptCheckpointError`, so memory never grows past it."""
_OBJECT_START = ord("{")


def encode_record(record: Any, default: Callable[[Any], Any] | None = None) -> bytes:
    """Return ``record`` as one JSONL line, or raise ``TypeError`` if it is not a JSON object.

    ``CheckpointManager.append`` inlines these lines: a function call is a tenth of its cost.
    """
    try:
        line = orjson.dumps(record, default, ENCODE_OPTIONS)
    except TypeError as exc:
        raise not_a_record(record, exc) from exc
    if line[0] != _OBJECT_START:
        raise not_a_record(record)
    if len(line) > MAX_LINE_BYTES:
        raise record_too_long(len(line))
    return line


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


async def whole_lines(
    chunks: AsyncIterator[bytes], *, describe: str, keep_tail: bool = False
) -> AsyncGenerator[str, None]:
    """Regroup byte chunks into blocks of whole lines, decoded as UTF-8 (surrogateescape).

    What follows the last newline is yielded last if ``keep_tail`` (the manager then judges it),
    else left out as a torn write, with a WARNING that names ``describe``.
    """
    parts: list[bytes] = []  # the start of a line that continues in the next chunk
    waiting = 0  # their size
    whole = 0  # bytes of whole lines so far
    try:
        async for chunk in chunks:
            cut = chunk.rfind(b"\n") + 1
            if cut == 0:
                parts.append(chunk)
                waiting += len(chunk)
                if waiting > MAX_LINE_BYTES:
                    raise line_too_long(describe, 0, whole)
                continue
            block = b"".join([*parts, chunk[:cut]]) if parts else chunk[:cut]
            parts, waiting = ([chunk[cut:]], len(chunk) - cut) if cut < len(chunk) else ([], 0)
            whole += len(block)
            yield block.decode("utf-8", "surrogateescape")
    finally:  # an abandoned replay closes the reader underneath at once, not at garbage collection
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    carry = b"".join(parts)
    if carry and keep_tail:
        yield carry.decode("utf-8", "surrogateescape")
    elif carry:
        logger.warning(
            "%s ends in %d bytes without a newline (a torn write, or one still under way), from "
            "byte offset %d; they are not part of the journal",
            describe,
            len(carry),
            whole,
            extra={"yoink_torn_tail": len(carry)},
        )


@dataclass(frozen=True)
class BadLine:
    """A line that is not a record: ``line`` is 1-based, ``offset`` the byte offset of its start."""

    line: int
    offset: int
    reason: str


class JournalDecoder:
    """Turns the text items that ``CheckpointStorage.read()`` yields into records.

    Call :meth:`feed` with each item in order and :meth:`finish` at the end. Items hold one or more
    whole lines; the newline that ends an item is optional.
    """

    def __init__(self, source: str, *, on_corrupt: OnCorrupt = "raise", keep_problems: bool = False) -> None:
        self.source = source
        self.on_corrupt = on_corrupt
        self.lines = 0
        self.offset = 0
        self.skipped = 0
        # ("corrupt" or "torn", the line) for each line skipped, if asked for: replay does not keep them.
        self.problems: list[tuple[str, BadLine]] | None = [] if keep_problems else None
        self._suspect: BadLine | None = None  # a bad line that is torn if nothing follows it
        self._error: CorruptCheckpointError | None = None

    def feed(self, item: str) -> list[dict[str, Any]]:
        """Decode one item; raise the corruption found in an earlier item, if any."""
        if self._error is not None:
            raise self._error
        if not item:
            return []
        lines = item.split("\n")
        if not lines[-1]:
            lines.pop()
        if len(item) > MAX_LINE_BYTES // 4:  # a line may be too long (a character is 1 to 4 bytes)
            lines = self._cut_at_a_long_line(lines)
        try:
            if len(item) > LARGE_LINE:  # a long line may be there: leave it to _loads
                raise orjson.JSONDecodeError("", "", 0)
            records = [orjson.loads(line) for line in lines]
        except orjson.JSONDecodeError:
            records = self._decode_slowly(lines)
        else:
            if self._suspect is not None or set(map(type, records)) != {dict}:
                records = self._decode_slowly(lines)
        self.lines += len(lines)
        self.offset += _utf8_len(item) + (not item.endswith("\n"))
        return records

    def _cut_at_a_long_line(self, lines: list[str]) -> list[str]:
        """Keep the lines before the first one over MAX_LINE_BYTES; raise for it at the next call."""
        offset = self.offset
        for index, line in enumerate(lines):
            size = _utf8_len(line)
            if size > MAX_LINE_BYTES:
                self._error = line_too_long(self.source, self.lines + index + 1, offset)
                return lines[:index]
            offset += size + 1
        return lines

    def finish(self) -> None:
        """Call after the last item: a bad last line is a torn tail; raise corruption found earlier."""
        if self._error is not None:
            raise self._error
        if self._suspect is not None:
            if self.problems is not None:
                self.problems.append(("torn", self._suspect))
            logger.warning(
                "%s: skipped line %d (byte offset %d), the last line, as a torn write: %s",
                self.source,
                self._suspect.line,
                self._suspect.offset,
                self._suspect.reason,
            )
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
            start, offset = offset, offset + _utf8_len(line) + 1
            if not line.strip():
                continue
            if self._suspect is not None:
                if self._is_corrupt(self._suspect):
                    return records
                self._suspect = None
            try:
                record = _loads(line)
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
        if self.problems is not None:
            self.problems.append(("corrupt", bad))
        if self.skipped <= WARNED_LINES:
            logger.warning("%s; skipped", message)
        return False


def _loads(line: str) -> Any:
    """Parse one line: with orjson, or, for a long line, with the json module.

    orjson needs about 13 times a document's size while it parses it; json about its size. A
    journal of long lines would otherwise make replay's memory thirteen times its longest line.
    """
    if len(line) <= LARGE_LINE:
        return orjson.loads(line)
    return json.loads(line, parse_constant=_no_constant)


def _no_constant(name: str) -> NoReturn:
    raise json.JSONDecodeError(f"{name} is not JSON", name, 0)  # as orjson says


def line_too_long(source: str, line: int, offset: int) -> CorruptCheckpointError:
    """The error for a line over MAX_LINE_BYTES; ``line`` 0 when the caller cannot count lines."""
    where = f"line {line} (byte offset {offset})" if line else f"the line at byte offset {offset}"
    return CorruptCheckpointError(
        f"{source}: {where} is longer than {MAX_LINE_BYTES:,} bytes, yoink's limit for a line; "
        "yoink never writes such a line, and does not read one (even with on_corrupt='skip')",
        line=line,
        offset=offset,
    )


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogateescape"))
