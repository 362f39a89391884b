"""What the backends that read local files share: how much to read at once, and reading in chunks.

Local journals, staged batches and the bodies of remote objects are all read ``READ_CHUNK`` bytes
at a time, so that a replay's memory is bounded by a chunk, not by the journal. A local journal is
read by :func:`open_journal` and :func:`journal_lines`: by its storage's ``read()``, and by a
compaction's worker process (:mod:`yoink._fold`), which reads it the same way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator
from functools import partial
from typing import BinaryIO

import anyio
import anyio.to_thread

from yoink._exceptions import StorageError
from yoink._lines import lines_end, whole_lines

__all__ = [
    "READ_CHUNK",
    "TORN_SUFFIX",
    "file_chunks",
    "journal_lines",
    "open_journal",
    "path_chunks",
    "set_aside_torn_tail",
]

logger = logging.getLogger(__name__)

READ_CHUNK = 1 << 20
TORN_SUFFIX = ".torn"  # a torn tail set aside goes to the journal's name with this suffix


async def file_chunks(file: BinaryIO, size: int, *, describe: str) -> AsyncIterator[bytes]:
    """Yield the next ``size`` bytes of ``file`` (fewer if it ends first), read in a worker thread.

    An ``OSError`` becomes a :class:`~yoink.StorageError` that names ``describe``, the file's path.
    """
    while size > 0:
        try:
            chunk = await anyio.to_thread.run_sync(file.read, min(READ_CHUNK, size))
        except OSError as exc:
            raise StorageError(f"cannot read {describe}: {exc.strerror}") from exc
        if not chunk:
            return
        size -= len(chunk)
        yield chunk


def open_journal(path: str) -> tuple[BinaryIO, int] | None:
    """Open the journal at ``path`` for reading, with its size now; None if there is none.

    What a read reads is that size: a batch appended meanwhile is not half-seen. Call it in the
    event loop's thread, not in a worker thread, so that a cancelled caller cannot drop an open file.
    """
    try:
        file = open(path, "rb")  # noqa: SIM115 (the caller closes it)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        return file, os.fstat(file.fileno()).st_size
    except OSError as exc:
        file.close()
        raise StorageError(f"cannot read {path}: {exc.strerror}") from exc


def journal_lines(file: BinaryIO, size: int, describe: str) -> AsyncGenerator[str, None]:
    """The first ``size`` bytes of a journal ``file`` as blocks of whole lines, a torn tail left out."""
    return whole_lines(file_chunks(file, size, describe=describe), describe=describe)


async def path_chunks(path: str, size: int) -> AsyncIterator[bytes]:
    """Yield the first ``size`` bytes of the file at ``path``, as :func:`file_chunks` does."""
    try:  # opened here, not in a thread, so that a cancelled caller cannot drop an open file
        file = open(path, "rb")  # noqa: SIM115, ASYNC230 (closed below, at once)
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        async for chunk in file_chunks(file, size, describe=path):
            yield chunk
    finally:
        file.close()


def set_aside_torn_tail(path: str, fd: int, *, fsync: bool = True) -> int:
    """Move the bytes after the last newline of the file open as ``fd`` to ``path + ".torn"``, with
    the last line before them if it is not a record either (replay skips it as it skips them), as
    :func:`~yoink._lines.lines_end` judges it for every backend.

    Return the size of what is left: whole lines, the last of them a record (or the header of a
    compacted journal). The moved bytes are appended to the sidecar with a newline, fsynced with
    ``fsync``, before the file is cut; the WARNING names the offset. For a local journal before
    its writer appends (what it appends would make a skipped last line a corrupt one in the
    middle), and for a staged batch a crash left.
    """
    size = os.fstat(fd).st_size
    with open(path, "rb") as journal:
        whole = _after_last_newline(journal, size)
        end = lines_end(partial(_read_between, journal, end=whole), whole)
        clean, bad_line = end.keep, end.bad_line
        if clean == size:
            return size
        sidecar = path + TORN_SUFFIX
        journal.seek(clean)
        with open(sidecar, "ab") as side:
            while block := journal.read(READ_CHUNK):
                side.write(block)
            side.write(b"\n")
            side.flush()
            if fsync:
                os.fsync(side.fileno())
    os.ftruncate(fd, clean)
    if fsync:
        os.fsync(fd)
    logger.warning(
        "%s ended in a torn write%s: moved its last %d bytes (from offset %d) to %s",
        path,
        " (its last line is not a record)" if bad_line else "",
        size - clean,
        clean,
        sidecar,
    )
    return clean


def _read_between(journal: BinaryIO, start: int, *, end: int) -> bytes:
    journal.seek(start)
    return journal.read(end - start)


def _after_last_newline(journal: BinaryIO, end: int) -> int:
    """The offset just after the last newline before ``end`` (0 if there is none)."""
    while end > 0:
        start = max(0, end - 65536)
        journal.seek(start)
        newline = journal.read(end - start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0
