"""A storage's bytes as whole lines: the framing of the journal's format, for backends.

A backend's :meth:`~yoink.storage.CheckpointStorage.read` yields text in whole lines; these turn
the chunks a file or an object is read in into such blocks, and find an object's last line
without reading it all. What the lines hold is :mod:`yoink._records`' business: a torn tail a
backend leaves out is logged here and reported to the decoder reading the backend.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from typing import NamedTuple

from yoink import _records
from yoink._records import HEADER_START, JournalDecoder, LineTooLongToRead, left_out_by_storage, utf8_len

__all__ = [
    "JournalEnd",
    "end_reads",
    "is_record_tail",
    "journal_end",
    "judge_end",
    "lines_end",
    "tail_reads",
    "whole_lines",
    "without_torn_tail",
]

logger = logging.getLogger(__name__)


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
                if waiting > _records.MAX_LINE_BYTES:
                    raise LineTooLongToRead(describe, whole)
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
        )
        left_out_by_storage(len(carry))


def tail_reads(size: int) -> Iterator[int]:
    """Where to start reading, back from the end of ``size`` bytes, to find the last newline.

    One byte first (a journal yoink wrote ends in one), then 64 KiB, growing sixteenfold to just
    past MAX_LINE_BYTES. The caller reads from each start to ``size`` and stops at a block that
    holds a newline or starts at 0; if the starts run out first, the last line is too long to read.
    """
    want = 1
    while True:
        start = max(0, size - want)
        yield start
        if start == 0 or want > _records.MAX_LINE_BYTES:
            return
        want = min(max(want, 1 << 12) * 16, _records.MAX_LINE_BYTES + 1)


def is_record_tail(tail: str) -> bool:
    """Whether a last line without its newline is kept: it is blank or a JSON object, as replay judges
    a last line. Anything else is a torn tail. Remote backends, whose uploads are whole, call this
    before appending after another tool's last line: a kept one gets its newline, a torn one is set
    aside."""
    return not tail.strip() or bool(JournalDecoder("").feed(tail))


FIRST_READ = 1 << 10  # how much of a journal's end journal_end reads first
JUDGED_LINE = 1 << 20  # a whole last line longer than this is left as it is: replay judges it


class JournalEnd(NamedTuple):
    """How a journal another tool may have written ends cleanly before records are appended to it."""

    keep: int  # how many of its bytes stay; the rest is set aside
    between: bytes  # what goes between them and the appended records: a newline, or nothing
    bad_line: bool  # whether what is set aside holds a whole last line that is not a record


async def journal_end(read: Callable[[int], Awaitable[bytes]], size: int) -> JournalEnd | None:
    """Judge the end of a journal of ``size`` bytes, read back with ``read(start)`` (its bytes from
    ``start`` to its end) as far as needed, as replay judges a last line.

    A last line without a newline (yoink's uploads end in one) that is blank or a JSON object is kept
    and gets its newline; anything else there is a torn tail, set aside. So is the last line that is
    not blank, if it is not a record either (nor a compacted journal's header at offset 0): replay
    skips it as a torn last line, but records appended after it would make it a corrupt line in the
    middle. Such a line longer than JUDGED_LINE, or out of reach of :func:`tail_reads`, is left for
    replay to judge. None if the bytes after the last newline are longer than MAX_LINE_BYTES.
    """
    *earlier, last = end_reads(size)
    for start in earlier:
        end = judge_end(await read(start), start, last_read=False)
        if end is not None:
            return end
    return judge_end(await read(last), last, last_read=True)


def lines_end(read: Callable[[int], bytes], size: int) -> JournalEnd:
    """:func:`journal_end` for ``size`` bytes of whole lines (they end in a newline, or are none),
    read with a blocking ``read(start)``: where the last line that is not blank ends them, or
    starts what is set aside if it is not a record."""
    *earlier, last = end_reads(size)
    for start in earlier:
        end = judge_end(read(start), start, last_read=False)
        if end is not None:
            return end
    end = judge_end(read(last), last, last_read=True)
    assert end is not None  # the block ends in a newline
    return end


def end_reads(size: int) -> list[int]:
    """Where :func:`judge_end` reads from, in turn: the last KiB first (a whole last line, for most
    journals: one small request), then :func:`tail_reads`."""
    first = max(0, size - FIRST_READ)
    return [first, *(start for start in tail_reads(size) if start < first)]


def judge_end(block: bytes, start: int, *, last_read: bool) -> JournalEnd | None:
    """:func:`journal_end` for a journal whose last bytes, from ``start``, are ``block``; None if the
    lines to judge may begin before it and this is not the ``last_read``."""
    size = start + len(block)
    cut = block.rfind(b"\n") + 1
    if not cut and start:
        return None  # the last line is longer than the block (MAX_LINE_BYTES, at the last read)
    tail = block[cut:]
    if not _blank(tail):
        if is_record_tail(tail.decode("utf-8", "surrogateescape")):
            return JournalEnd(size, b"\n", False)
        keep, between = start + cut, b""  # a torn tail: set aside
    else:
        keep, between = size, b"\n" if tail else b""
    end = cut
    while end > 0:
        line_start = block.rfind(b"\n", 0, end - 1) + 1
        if end - line_start > JUDGED_LINE:
            break
        if not line_start and start:
            if last_read:
                break  # out of reach: left for replay
            return None  # the line may begin before the block
        line = block[line_start:end]
        if _blank(line):
            end = line_start
            continue
        header = start + line_start == 0 and line.startswith(HEADER_START.encode())
        if header or is_record_tail(line.decode("utf-8", "surrogateescape")):
            break
        return JournalEnd(start + line_start, b"", True)
    return JournalEnd(keep, between, False)


def _blank(line: bytes) -> bool:
    """Whether replay passes over ``line`` as blank (Unicode spaces too)."""
    return not line.decode("utf-8", "surrogateescape").strip()


async def without_torn_tail(blocks: AsyncGenerator[str, None], describe: str) -> AsyncGenerator[str, None]:
    """Pass on the blocks of ``whole_lines(..., keep_tail=True)``, leaving out a last line without a
    newline that is not a record, with a WARNING: for a remote journal that staged records follow,
    where it would read as a corrupt line (the next upload sets it aside)."""
    async with contextlib.aclosing(blocks):
        async for block in blocks:
            if block.endswith("\n") or is_record_tail(block):
                yield block
                continue
            logger.warning(
                "%s ends in %d bytes without a newline that are not a JSON object; staged records "
                "follow them, so they are not part of the journal (the next upload sets them aside)",
                describe,
                utf8_len(block),
            )
            left_out_by_storage(utf8_len(block))
