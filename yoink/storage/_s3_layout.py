"""What an S3 layout is to S3Storage, and what the two layouts share.

:class:`S3Storage` keeps the options, the client and the stage; a layout (``_s3_object.py``,
``_s3_segments.py``) decides where the journal's bytes go in the bucket. It answers the three
questions of :class:`~yoink.storage._staged.StagedStorage` (:meth:`Layout.open_remote`,
:meth:`Layout.exists`, :meth:`Layout.upload`, and :meth:`Layout.replace` to compact) and keeps this
writer's view of the journal between them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

import anyio

from yoink._exceptions import ConcurrentWriterError, StorageError
from yoink._lines import whole_lines
from yoink.storage._files import READ_CHUNK, path_chunks
from yoink.storage._s3_client import Missing, S3Client
from yoink.storage._stage import Batch, Stage
from yoink.storage._uri import Options

__all__ = [
    "ATTEMPTS",
    "MAX_PART_SIZE",
    "REMEMBERED_WRITERS",
    "Layout",
    "LayoutName",
    "RetryMode",
    "S3Options",
    "Segment",
    "prepend",
    "staged_chunks",
]

logger = logging.getLogger(__name__)

LayoutName = Literal["object", "segments"]
RetryMode = Literal["standard", "adaptive", "legacy"]


@dataclass(frozen=True)
class S3Options(Options):
    """The options of an :class:`S3Storage`, as given (keywords, then the URI's query)."""

    layout: LayoutName = "object"
    stage_dir: str | os.PathLike[str] | None = None
    endpoint_url: str | None = None
    region_name: str | None = None
    profile_name: str | None = None
    retry_mode: RetryMode = "standard"
    max_attempts: int = 5
    part_size: int = 16 << 20
    merge_after: int = 64
    merge_target: int = 64 << 20
    timeout: float = 60.0
    keep_replaced: float = 600.0


MAX_PART_SIZE = 5 << 30
ATTEMPTS = 4  # conditional uploads per flush: after a lost reply, the first retry finds it landed
REMEMBERED_WRITERS = 16  # the (writer, last batch) pairs an object's metadata keeps


@dataclass(frozen=True)
class Segment:
    """An object, or the part of one from ``offset``: segment ``start``, a merge of ``start``..``end``,
    or (to copy it inside S3) the bytes of the journal object to keep."""

    key: str
    start: int
    end: int
    size: int
    etag: str
    merged: bool = False  # an object of merged/, not a segment
    batch: int = 0  # for a segment this writer wrote: the last staged batch it holds
    offset: int = 0  # bytes of the object before segment ``start`` (another merge holds them)

    def byte_range(self, skip: int = 0, length: int | None = None) -> dict[str, str]:
        """The ``Range`` of a GetObject for ``length`` bytes from ``skip`` bytes into this piece."""
        length = self.size - skip if length is None else length
        if not self.offset and not skip and length == self.size:
            return {}
        return {"Range": f"bytes={self.offset + skip}-{self.offset + skip + length - 1}"}


class Layout(ABC):
    """Where one S3Storage's journal lives in its bucket, and this writer's view of it."""

    def __init__(
        self, client: S3Client, stage: Stage, *, uri: str, key: str, options: S3Options, min_part_size: int
    ) -> None:
        self._client = client
        self._stage = stage
        self._uri = uri
        self._key = key  # the object's, or the prefix of the segments'
        self._part_size = options.part_size
        self._min_part_size = min_part_size  # S3's multipart minimum (a test store's may be lower)

    @abstractmethod
    async def open_remote(
        self, writer: str | None, staged: bool, *, remember: bool
    ) -> tuple[int, AsyncGenerator[str, None]]:
        """Start reading the journal: return the last of ``writer``'s batches that it holds (0 if
        none, or if ``staged`` is false and it need not be looked up), and its text. With
        ``remember``, a writer that has not looked yet takes what it finds as its view."""

    @abstractmethod
    async def exists(self) -> bool: ...

    @abstractmethod
    async def upload(self, batches: list[Batch]) -> None:
        """Upload the sealed ``batches`` (oldest first), then discard them from the stage."""

    @abstractmethod
    async def replace(self, data: AsyncIterator[bytes]) -> None:
        """Make ``data`` the whole journal in one atomic step, conditional on the journal being what
        this writer last saw; later uploads follow it. Nothing is staged when it is called."""

    # -- what both layouts do ---------------------------------------------------------------------

    async def _put_stream(
        self,
        key: str,
        data: AsyncIterator[bytes],
        metadata: dict[str, str],
        condition: dict[str, str],
    ) -> tuple[str, int, bool]:
        """Write ``data``, of a size not known in advance, to ``key``; return its ETag, its size and
        whether it ends in a newline (or is empty).

        A part at a time is held in memory: up to ``part_size``, it is one ``PutObject``; beyond,
        a multipart upload, which S3 shows to nobody until it is completed and which is aborted if
        anything fails. ``condition`` goes on the one request that makes ``key`` hold ``data`` (the
        ``PutObject`` or the ``CompleteMultipartUpload``).
        """
        buffer = bytearray()
        more = False
        async for chunk in data:
            buffer += chunk
            if len(buffer) > self._part_size:
                more = True
                break
        if not more:
            body = bytes(buffer)
            response = await self._client.call(
                "put_object", Key=key, Body=body, Metadata=metadata, **condition
            )
            return str(response["ETag"]), len(body), not body or body.endswith(b"\n")
        created = await self._client.call("create_multipart_upload", Key=key, Metadata=metadata)
        upload = {"Key": key, "UploadId": created["UploadId"]}
        size, last = 0, b""
        try:
            parts: list[dict[str, Any]] = []

            async def send(part: bytes) -> None:
                response = await self._client.call(
                    "upload_part", Body=part, PartNumber=len(parts) + 1, **upload
                )
                parts.append({"PartNumber": len(parts) + 1, "ETag": response["ETag"]})

            async for chunk in data:  # on from where the loop above stopped
                buffer += chunk
                while len(buffer) >= self._part_size:
                    with memoryview(buffer) as view:  # one copy of the part, not two
                        part = bytes(view[: self._part_size])
                    del buffer[: self._part_size]
                    await send(part)
                    size, last = size + len(part), part[-1:]
                    del part  # not held while the next one fills: a part and the buffer at most
            if buffer:
                await send(bytes(buffer))
                size, last = size + len(buffer), bytes(buffer[-1:])
                buffer.clear()
            response = await self._client.call(
                "complete_multipart_upload", MultipartUpload={"Parts": parts}, **upload, **condition
            )
        except BaseException:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self._client.call("abort_multipart_upload", **upload)
            raise
        return str(response["ETag"]), size, last == b"\n"

    async def _abort_uploads(self, prefix: str, *, exact: bool = False) -> None:
        """Abort the multipart uploads left under ``prefix`` (or at that key, if ``exact``) by a
        writer that crashed in the middle of one: S3 bills their parts until they are aborted.

        One writer at a time holds the journal, and this one has no upload under way, so any upload
        there is a crashed writer's, or a rogue second writer's, whose completion then fails and
        loses nothing (its data stays staged). Best effort: without s3:ListBucketMultipartUploads,
        or on an error, it logs and goes on (a lifecycle rule that aborts incomplete multipart
        uploads does the same job).
        """
        try:
            params: dict[str, Any] = {"Prefix": prefix}
            found = []
            while True:
                response = await self._client.call("list_multipart_uploads", **params)
                found += [
                    {"Key": upload["Key"], "UploadId": upload["UploadId"]}
                    for upload in response.get("Uploads", [])
                    if not exact or upload["Key"] == prefix
                ]
                if not response.get("IsTruncated"):
                    break
                params.update(
                    KeyMarker=response["NextKeyMarker"], UploadIdMarker=response["NextUploadIdMarker"]
                )
        except StorageError as exc:
            logger.info(
                "%s: could not list the multipart uploads an interrupted writer left: %s", self._uri, exc
            )
            return
        aborted = 0
        for upload in found:
            try:
                await self._client.call("abort_multipart_upload", **upload)
                aborted += 1
            except (Missing, StorageError) as exc:  # completed or aborted meanwhile, or not allowed
                logger.info(
                    "%s: could not abort the multipart upload of %s: %s", self._uri, upload["Key"], exc
                )
        if aborted:
            logger.info(
                "%s: aborted %d multipart uploads that an interrupted writer left unfinished",
                self._uri,
                aborted,
            )

    async def _put(
        self,
        key: str,
        body: AsyncIterator[bytes],
        size: int,
        metadata: dict[str, str],
        condition: dict[str, str],
        *,
        copy: Sequence[Segment] = (),
    ) -> str:
        """Write ``copy`` (objects copied inside S3) then ``body`` to ``key``; return the ETag."""
        if not copy and size <= self._part_size:
            data = b"".join([chunk async for chunk in body])
            response = await self._client.call(
                "put_object", Key=key, Body=data, Metadata=metadata, **condition
            )
            return str(response["ETag"])
        created = await self._client.call("create_multipart_upload", Key=key, Metadata=metadata)
        upload = {"Key": key, "UploadId": created["UploadId"]}
        try:
            parts: list[dict[str, Any]] = []
            for source in copy:
                for first, last in _copy_ranges(source.size):
                    response = await self._client.call(
                        "upload_part_copy",
                        CopySource={"Bucket": self._client.bucket, "Key": source.key},
                        CopySourceRange=f"bytes={source.offset + first}-{source.offset + last}",
                        CopySourceIfMatch=source.etag,
                        PartNumber=len(parts) + 1,
                        **upload,
                    )
                    parts.append({"PartNumber": len(parts) + 1, "ETag": response["CopyPartResult"]["ETag"]})
            async for part in _regroup(body, self._part_size):
                response = await self._client.call(
                    "upload_part", Body=part, PartNumber=len(parts) + 1, **upload
                )
                parts.append({"PartNumber": len(parts) + 1, "ETag": response["ETag"]})
            response = await self._client.call(
                "complete_multipart_upload", MultipartUpload={"Parts": parts}, **upload, **condition
            )
        except BaseException:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self._client.call("abort_multipart_upload", **upload)
            raise
        return str(response["ETag"])

    async def _stream(self, response: dict[str, Any]) -> AsyncGenerator[str, None]:
        async for block in whole_lines(self._body_chunks(response), describe=self._uri, keep_tail=True):
            yield block

    async def _body_chunks(self, response: dict[str, Any]) -> AsyncIterator[bytes]:
        """Stream a GetObject response's body, a chunk at a time, and release its connection."""
        body = response["Body"]
        try:
            while True:
                with self._client.translated("get_object"):
                    chunk = await body.read(READ_CHUNK)
                if not chunk:
                    return
                yield chunk
        finally:
            body.close()

    async def _body(self, response: dict[str, Any]) -> bytes:
        return b"".join([chunk async for chunk in self._body_chunks(response)])

    async def _head_metadata(self, key: str) -> tuple[dict[str, str], int, str] | None:
        try:
            response = await self._client.call("head_object", Key=key)
        except Missing:
            return None
        return response.get("Metadata", {}), response["ContentLength"], response["ETag"]

    async def _drop_landed(self, batches: list[Batch], landed: int) -> list[Batch]:
        if batches and batches[0].seq <= landed:
            already = [batch for batch in batches if batch.seq <= landed]
            logger.info(
                "%s: %d staged batches (%d bytes) are already in S3, from an upload whose reply was "
                "lost; they are not uploaded again",
                self._uri,
                len(already),
                sum(batch.size for batch in already),
            )
            await self._stage.discard(landed)
        return [batch for batch in batches if batch.seq > landed]

    def _give_up(self, batches: list[Batch]) -> NoReturn:
        raise StorageError(
            f"{self._uri}: S3 kept refusing conditional uploads ({ATTEMPTS} attempts); the "
            f"{sum(b.size for b in batches)} bytes not uploaded stay staged for the next flush"
        )

    def _raise_conflict(self, what: str, batches: list[Batch]) -> NoReturn:
        raise self._conflict(what, batches)

    def _conflict(self, what: str, batches: list[Batch]) -> ConcurrentWriterError:
        return ConcurrentWriterError(
            f"{self._uri} was changed by another writer ({what}); yoink allows one writer at a time. "
            f"Nothing was lost: the {sum(b.size for b in batches)} bytes not uploaded stay staged in "
            f"{self._stage.directory}, and a new storage for this URI uploads them once the other "
            "writer has stopped"
        )


async def staged_chunks(batches: Sequence[Batch]) -> AsyncIterator[bytes]:
    for batch in batches:
        async for chunk in path_chunks(batch.path, batch.size):
            yield chunk


async def prepend(head: bytes, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if head:
        yield head
    async for chunk in chunks:
        yield chunk


async def _regroup(chunks: AsyncIterator[bytes], size: int) -> AsyncIterator[bytes]:
    """Yield ``size``-byte parts (the last one shorter) from ``chunks``."""
    buffer = bytearray()
    async for chunk in chunks:
        buffer += chunk
        while len(buffer) >= size:
            yield bytes(buffer[:size])
            del buffer[:size]
    if buffer:
        yield bytes(buffer)


def _copy_ranges(size: int) -> Iterator[tuple[int, int]]:
    """Split ``size`` bytes into near-equal inclusive ranges of at most 5 GiB each."""
    count = -(-size // MAX_PART_SIZE)
    step = -(-size // count)
    for first in range(0, size, step):
        yield first, min(first + step, size) - 1
