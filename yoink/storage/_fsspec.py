"""FsspecStorage: a journal on any filesystem fsspec reaches (GCS, Azure, HDFS, SFTP, ...).

Like S3Storage, it stages writes in a local directory that survives a crash and uploads them at
:meth:`flush`. fsspec has no conditional writes and no object metadata, so the guarantees rest on
what every store has: an object's size. See the class docstring for what that can and cannot do.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import fsspec

from yoink._exceptions import ConcurrentWriterError, MissingDependencyError, StorageError
from yoink._records import whole_lines
from yoink.storage._stage import Batch
from yoink.storage._staged import StagedStorage

__all__ = ["FsspecStorage"]

logger = logging.getLogger("yoink")

READ_CHUNK = 1 << 20
PREFIX = "fsspec+"  # fsspec+memory://..., for protocols whose plain scheme yoink uses itself
T = TypeVar("T")


class FsspecStorage(StagedStorage):
    """A journal in one file of an fsspec filesystem, staged locally between flushes.

    ``FsspecStorage("gs://bucket/crawl.jsonl")``; through the factory for ``gs://``, ``gcs://``,
    ``az://``, ``abfs://``, ``abfss://``, ``adl://``, ``hdfs://``, ``webhdfs://``, ``sftp://`` and
    ``ftp://`` URIs, and for any protocol as ``fsspec+<protocol>://...`` (``fsspec+memory://``).
    ``storage_options`` go to the filesystem (credentials, project, account name).

    What it promises, as S3Storage does:

    - :meth:`write` appends to a local stage (``stage_dir``, by default under the user's cache
      directory) that survives a crash; the next storage for the URI replays what a crashed one
      staged and uploads it. The stage is locked while a storage writes: a second writer on this
      machine gets :class:`~yoink.CheckpointLockedError`.
    - :meth:`flush` uploads the staged batches; once it returns, they are in the store.
    - Exactly once: before an upload the stage records the file's size and the size the upload
      will give it; a storage that finds that record after a crash checks the size to tell whether
      the upload happened, and does not make it twice.
    - Another writer: if the file's size is not what this storage last saw (at its first
      :meth:`read` or flush), a flush raises :class:`~yoink.ConcurrentWriterError` and the staged
      data stays staged.

    What it cannot promise:

    - Cost: on stores that can append (local files, memory, HDFS, Azure Data Lake), a flush sends
      only the new data. On object stores without append or server-side copy through fsspec (GCS,
      Azure Blob), **each flush downloads and re-uploads the whole file**, so flushes grow slower
      as the journal grows. For S3, use ``s3://`` (S3Storage), which does not.
    - Detection of another writer rests on sizes alone: two writers whose changes leave the same
      size at the same moment are not told apart. A rewrite of the whole file by another writer
      between this storage's read and write is lost to it; a store with conditional writes is
      needed to prevent that.
    """

    def __init__(
        self,
        uri: str,
        *,
        stage_dir: str | os.PathLike[str] | None = None,
        storage_options: dict[str, Any] | None = None,
        append: bool | None = None,
    ) -> None:
        uri = uri.removeprefix(PREFIX)
        try:
            self._fs, self._path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        except ImportError as exc:  # the protocol's own package: gcsfs, adlfs, ...
            raise MissingDependencyError(f"{uri} needs fsspec's driver for it: {exc}") from exc
        except ValueError as exc:
            raise StorageError(f"fsspec cannot open {uri}: {exc}") from exc
        self._append = append  # None: try appending, and fall back to rewriting the file
        protocol = self._fs.protocol if isinstance(self._fs.protocol, str) else self._fs.protocol[0]
        options = {"stage_dir": stage_dir, "storage_options": storage_options, "append": append}
        super().__init__(uri, options, stage_dir, identity=f"fsspec|{protocol}|{self._path}")
        self._known_size: int | None = None  # the file's size as this writer last saw or left it

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._uri!r})"

    async def _open_remote(self, writer: str | None, staged: bool) -> tuple[int, AsyncGenerator[str, None]]:
        size = await self._size()
        if self._known_size is None and not self._closed:
            self._known_size = size  # this writer's view of the file starts here
        return self._landed(size), whole_lines(self._chunks(size), describe=self._uri, keep_tail=True)

    async def _remote_exists(self) -> bool:
        return await self._run(self._fs.exists, self._path)

    async def _upload(self, batches: list[Batch]) -> None:
        size = await self._size()
        landed = self._landed(size)
        if landed:
            logger.info(
                "%s: staged batches up to %d are already uploaded; not uploading them again",
                self._uri,
                landed,
            )
            self._known_size = size
            self._stage.clear_intent()
            await self._stage.discard(landed)
            batches = [batch for batch in batches if batch.seq > landed]
            if not batches:
                return
        if self._known_size is None:
            self._known_size = size
        elif size != self._known_size:
            raise ConcurrentWriterError(
                f"{self._uri} was changed by another writer (its size went from {self._known_size} to "
                f"{size} bytes); yoink allows one writer at a time. Nothing was lost: the "
                f"{sum(b.size for b in batches)} bytes not uploaded stay staged in {self._stage.directory}"
            )
        after = size + sum(batch.size for batch in batches)
        self._stage.write_intent({"through": batches[-1].seq, "before": size, "after": after})
        await self._run(self._write_file, batches, size)
        self._known_size = after
        self._stage.clear_intent()
        await self._stage.discard(batches[-1].seq)

    def _landed(self, size: int) -> int:
        """The last staged batch that an interrupted upload put in the file, or 0."""
        intent = self._stage.read_intent()
        if intent is not None and size == intent["after"] != intent["before"]:
            return int(intent["through"])
        return 0

    def _write_file(self, batches: list[Batch], size: int) -> None:
        """Append the batches to the file: by appending where the store can, else by rewriting it."""
        if self._append is not False:
            try:
                with self._fs.open(self._path, "ab") as file:
                    _copy_batches(batches, file.write)
                self._append = True
                return
            except (NotImplementedError, ValueError, OSError) as exc:
                if self._append:
                    raise StorageError(f"appending to {self._uri} failed: {exc}") from exc
                logger.info("%s: the store cannot append (%s); each flush rewrites the file", self._uri, exc)
                self._append = False
        old = self._fs.cat_file(self._path) if size else b""
        chunks: list[bytes] = [old]
        _copy_batches(batches, chunks.append)
        self._fs.pipe_file(self._path, b"".join(chunks))

    async def _size(self) -> int:
        try:
            info = await self._run(self._fs.info, self._path)
        except FileNotFoundError:
            return 0
        return int(info.get("size") or 0)

    async def _chunks(self, size: int) -> AsyncIterator[bytes]:
        if not size:
            return
        file = await self._run(self._fs.open, self._path, "rb")
        try:
            while size > 0:
                chunk = await self._run(file.read, min(READ_CHUNK, size))
                if not chunk:
                    return
                size -= len(chunk)
                yield chunk
        finally:
            await self._run(file.close)

    async def _run(self, call: Callable[..., T], *args: Any) -> T:
        try:
            return await anyio.to_thread.run_sync(call, *args)
        except FileNotFoundError:
            raise
        except (OSError, ValueError, NotImplementedError) as exc:
            raise StorageError(f"{self._uri}: {type(exc).__name__}: {exc}") from exc


def _copy_batches(batches: list[Batch], write: Callable[[bytes], Any]) -> None:
    for batch in batches:
        with open(batch.path, "rb") as staged:
            while chunk := staged.read(READ_CHUNK):
                write(chunk)
