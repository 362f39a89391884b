"""What the backends that read local files share: how much to read at once, and reading in chunks.

Local journals, staged batches and the bodies of remote objects are all read ``READ_CHUNK`` bytes
at a time, so that a replay's memory is bounded by a chunk, not by the journal.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import BinaryIO

import anyio
import anyio.to_thread

from yoink._exceptions import StorageError

__all__ = ["READ_CHUNK", "file_chunks", "path_chunks"]

READ_CHUNK = 1 << 20


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


async def path_chunks(path: str, size: int) -> AsyncIterator[bytes]:
    """Yield the first ``size`` bytes of the file at ``path``, as :func:`file_chunks` does."""
    try:
        file = await anyio.to_thread.run_sync(open, path, "rb")
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        async for chunk in file_chunks(file, size, describe=path):
            yield chunk
    finally:
        file.close()
