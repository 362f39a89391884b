"""layout="object": the journal is one plain JSONL object, rewritten or extended by each flush.

A flush onto a missing object is a ``PutObject`` with ``If-None-Match: *``; onto an object under
S3's part minimum, the object is read and rewritten with ``If-Match`` on its ETag; onto a larger
one, a multipart upload copies the object inside S3 (``UploadPartCopy``) and adds the new data as
its last part. The object's metadata records which writers uploaded and their last batches.

A compaction (:meth:`ObjectLayout.replace`) writes the new journal over the object in one
conditional request, ``If-Match`` on the ETag this writer last saw: a multipart upload completed
(or one ``PutObject``), so the object is the old one whole until S3 takes the new one whole.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from yoink._exceptions import ConcurrentWriterError, StorageError
from yoink._lines import journal_end, without_torn_tail
from yoink._records import MAX_LINE_BYTES
from yoink.storage._files import TORN_SUFFIX
from yoink.storage._s3_client import Conflict, Missing
from yoink.storage._s3_layout import ATTEMPTS, REMEMBERED_WRITERS, Layout, Segment, prepend, staged_chunks
from yoink.storage._stage import Batch

__all__ = ["ObjectLayout"]

logger = logging.getLogger(__name__)


@dataclass
class _Object:
    """What this writer knows of the object."""

    etag: str | None = None  # None: there is no object
    size: int = 0
    writers: dict[str, int] = field(default_factory=dict)  # writer id -> last batch; newest last
    clean: bool = False  # known to end in a newline: this writer's upload made it

    @property
    def last_writer(self) -> str | None:
        return next(reversed(self.writers), None)


class ObjectLayout(Layout):
    """The journal as the one object its URI names."""

    _known: _Object | None = None  # this writer's view of the object, from its first look

    async def open_remote(
        self, writer: str | None, staged: bool, *, remember: bool
    ) -> tuple[int, AsyncGenerator[str, None]]:
        response = await self._get_object()
        known = _Object()
        if response is not None:
            known = _Object(response["ETag"], response["ContentLength"], _decode_writers(response))
        if self._known is None and remember:
            self._known = known
        landed = known.writers.get(writer, 0) if writer else 0
        if response is None:
            return landed, _nothing()
        if staged:  # a torn last line must not read as a corrupt one before the staged records
            return landed, without_torn_tail(self._stream(response), self._uri)
        return landed, self._stream(response)

    async def exists(self) -> bool:
        try:
            await self._client.call("head_object", Key=self._key)
        except Missing:
            await self._client.check_bucket()
            return False
        return True

    async def upload(self, batches: list[Batch]) -> None:
        writer = self._stage.writer
        for _ in range(ATTEMPTS):
            known = self._known or await self._head()
            batches = await self._drop_landed(batches, known.writers.get(writer, 0))
            if not batches:
                return
            try:
                self._known = await self._append(known, batches)
            except Conflict:
                now = await self._head()
                if now.last_writer != writer:
                    self._known = known  # and so the next flush fails the same way
                    self._raise_conflict(f"its ETag changed from {known.etag} to {now.etag}", batches)
                self._known = now  # an earlier attempt of ours went through: upload what it lacks
                continue
            await self._stage.discard(batches[-1].seq)
            return
        self._give_up(batches)

    async def replace(self, data: AsyncIterator[bytes]) -> None:
        """Write ``data`` over the object, if it is still the one this writer last saw.

        The condition is that of an upload: ``If-Match`` on the ETag this writer knows (``If-None-Match:
        *`` if it knew of no object), on the one request that makes the object the new journal. A
        writer elsewhere that changed the object meanwhile makes it fail, and the replace raises
        :class:`~yoink.ConcurrentWriterError` with the object as that writer left it. The metadata
        keeps every writer's last batch, so a stage left elsewhere before the compaction uploads only
        what the old journal did not hold, after the new one.
        """
        writer = self._stage.writer
        now = await self._head()
        known = self._known = self._known or now
        if now.etag != known.etag:  # the condition would fail: say so before the upload
            raise self._replace_refused(known, now.etag)
        writers = dict(known.writers)
        writers[writer] = writers.pop(writer, 0)  # this writer last, as after its uploads
        writers = dict(list(writers.items())[-REMEMBERED_WRITERS:])
        token = secrets.token_hex(8)  # tells this replace's own retry from another writer's change
        metadata = {
            "yoink-batches": ",".join(f"{w}={seq}" for w, seq in writers.items()),
            "yoink-replace": token,
        }
        condition = {"IfMatch": known.etag} if known.etag is not None else {"IfNoneMatch": "*"}
        await self._abort_uploads(self._key, exact=True)
        try:
            etag, size, clean = await self._put_stream(self._key, data, metadata, condition)
        except (Conflict, Missing):
            head = await self._head_metadata(self._key)
            if head is None or head[0].get("yoink-replace") != token:  # not an earlier attempt of ours
                raise self._replace_refused(known, head[2] if head is not None else None) from None
            etag, size, clean = head[2], head[1], False  # ours: its reply was lost; its end is read once
        self._known = _Object(etag, size, writers, clean=clean)

    def _replace_refused(self, known: _Object, etag: str | None) -> ConcurrentWriterError:
        return ConcurrentWriterError(
            f"{self._uri} was changed by another writer (its ETag went from {known.etag} to {etag}) while "
            "this one compacted it; yoink allows one writer at a time. The compaction was not applied: "
            "the journal is as the other writer left it"
        )

    async def _append(self, known: _Object, batches: list[Batch]) -> _Object:
        writers = dict(known.writers)
        writers.pop(self._stage.writer, None)
        writers[self._stage.writer] = batches[-1].seq
        writers = dict(list(writers.items())[-REMEMBERED_WRITERS:])
        metadata = {"yoink-batches": ",".join(f"{w}={seq}" for w, seq in writers.items())}
        size = sum(batch.size for batch in batches)
        staged = staged_chunks(batches)
        if known.etag is None:
            etag = await self._put(self._key, staged, size, metadata, {"IfNoneMatch": "*"})
            return _Object(etag, size, writers, clean=True)
        if known.size < self._min_part_size:
            old = await self._get_small(known.etag)
            keep, between = await self._clean_end(known, old)
            head = old[:keep] + between
            etag = await self._put(
                self._key, prepend(head, staged), len(head) + size, metadata, {"IfMatch": known.etag}
            )
            return _Object(etag, len(head) + size, writers, clean=True)
        keep, between = await self._clean_end(known)
        if keep < self._min_part_size:  # what stays is too small to copy as a part: send it again
            head = (await self._get_range(known.etag, 0, keep))[:keep] + between
            etag = await self._put(
                self._key, prepend(head, staged), len(head) + size, metadata, {"IfMatch": known.etag}
            )
            return _Object(etag, len(head) + size, writers, clean=True)
        copy = [Segment(self._key, 0, 0, keep, known.etag)]
        body = prepend(between, staged)
        etag = await self._put(
            self._key, body, len(between) + size, metadata, {"IfMatch": known.etag}, copy=copy
        )
        return _Object(etag, keep + len(between) + size, writers, clean=True)

    async def _clean_end(self, known: _Object, old: bytes | None = None) -> tuple[int, bytes]:
        """How many of the object's bytes to keep, and what goes between them and the new data.

        yoink's uploads end in a newline, so an object that does not end in one, or whose last line
        that is not blank is not a record, was written by another tool: its end is judged by
        :func:`~yoink._lines.journal_end`, read back from the object's end as far as needed, and
        what is not kept is set aside in ``<key>.torn`` and cut off, so the object stays JSONL.
        ``old`` is the whole object, if it was read already.
        """
        if known.clean or not known.size:
            return known.size, b""

        async def read(start: int) -> bytes:
            if old is not None:
                return old[start:]
            return await self._get_range(known.etag, start, known.size)

        end = await journal_end(read, known.size)
        if end is None:
            raise StorageError(
                f"{self._uri} ends in a line longer than {MAX_LINE_BYTES:,} bytes without a newline, "
                "which yoink never writes and does not read; nothing was uploaded, and the staged "
                "records stay staged. Remove that line (or move the object) and flush again"
            )
        if end.keep < known.size:
            await self._set_aside(await read(end.keep), end.keep, end.bad_line)
        return end.keep, end.between

    async def _set_aside(self, moved: bytes, offset: int, bad_line: bool) -> None:
        """Add ``moved`` to ``<key>.torn`` (with a newline), as LocalFileStorage does."""
        key = self._key + TORN_SUFFIX
        try:
            kept = await self._body(await self._client.call("get_object", Key=key))
        except Missing:
            kept = b""
        if not kept.endswith(moved + b"\n"):  # else an earlier attempt set it aside already
            await self._client.call("put_object", Key=key, Body=kept + moved + b"\n")
        logger.warning(
            "%s ends in %s, written by another tool (yoink's uploads end in a newline): moved its last "
            "%d bytes, from byte offset %d, to s3://%s/%s, and the journal goes on from that offset",
            self._uri,
            "a whole last line that is not a JSON object"
            if bad_line
            else "bytes without a newline that are not a JSON object",
            len(moved),
            offset,
            self._client.bucket,
            key,
        )

    async def _get_object(self) -> dict[str, Any] | None:
        try:
            return await self._client.call("get_object", Key=self._key)  # type: ignore[no-any-return]
        except Missing:
            return None

    async def _head(self) -> _Object:
        try:
            response = await self._client.call("head_object", Key=self._key)
        except Missing:
            return _Object()  # a missing bucket: the upload that follows says so
        return _Object(response["ETag"], response["ContentLength"], _decode_writers(response))

    async def _get_small(self, etag: str) -> bytes:
        try:
            response = await self._client.call("get_object", Key=self._key, IfMatch=etag)
        except Missing:
            raise Conflict from None
        return await self._body(response)

    async def _get_range(self, etag: str | None, start: int, end: int) -> bytes:
        """Bytes ``start`` to ``end`` (exclusive) of the object, if its ETag is still ``etag``."""
        if start >= end:
            return b""
        try:
            response = await self._client.call(
                "get_object", Key=self._key, IfMatch=etag, Range=f"bytes={start}-{end - 1}"
            )
        except Missing:
            raise Conflict from None
        return await self._body(response)


def _decode_writers(response: dict[str, Any]) -> dict[str, int]:
    writers = {}
    for pair in response.get("Metadata", {}).get("yoink-batches", "").split(","):
        writer, _, seq = pair.partition("=")
        if writer and seq.isdigit():
            writers[writer] = int(seq)
    return writers


async def _nothing() -> AsyncGenerator[str, None]:
    return
    yield
