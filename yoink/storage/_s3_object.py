"""layout="object": the journal is one plain JSONL object, rewritten or extended by each flush.

A flush onto a missing object is a ``PutObject`` with ``If-None-Match: *``; onto an object under
S3's part minimum, the object is read and rewritten with ``If-Match`` on its ETag; onto a larger
one, a multipart upload copies the object inside S3 (``UploadPartCopy``) and adds the new data as
its last part. The object's metadata records which writers uploaded and their last batches.

A compaction (:meth:`ObjectLayout.cut`, then what it returns) writes the new journal over the
object in one conditional request, ``If-Match`` on the ETag this writer knows: a multipart upload
completed (or one ``PutObject``), so the object is the old one whole until S3 takes the new one
whole. Flushes go on meanwhile, appending to the old object; the last step, with them held, adds
what they appended after the cut to the end of the new journal, which thus carries them.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from yoink._exceptions import ConcurrentWriterError, StorageError
from yoink._lines import journal_end, without_torn_tail
from yoink._records import MAX_LINE_BYTES
from yoink.storage._files import TORN_SUFFIX
from yoink.storage._s3_client import Conflict, Missing
from yoink.storage._s3_layout import (
    ATTEMPTS,
    REMEMBERED_WRITERS,
    Layout,
    Segment,
    _regroup,
    prepend,
    staged_chunks,
)
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


@dataclass
class _Carry:
    """Where a compaction cut the object: the bytes from ``start`` on follow its snapshot."""

    start: int
    cut: _Object  # this writer's view at the cut


def _joined(snapshot: bytes, carry: _Carry, current: _Object) -> bytes:
    """The snapshot's end, with a newline if bytes are carried after it and it lacks one."""
    if current.size > carry.start and snapshot and not snapshot.endswith(b"\n"):
        return snapshot + b"\n"
    return snapshot


class ObjectLayout(Layout):
    """The journal as the one object its URI names."""

    _known: _Object | None = None  # this writer's view of the object, from its first look
    _carry: _Carry | None = None  # a compaction's cut, while it writes its snapshot
    _cutting: tuple[int, bytes] = (-1, b"")  # the last append's end judged: bytes kept, bytes put after

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
        if writer and self._known is not None and self._known.etag == known.etag:
            # this writer's own view: after a compaction that carried its uploads, the metadata
            # (fixed when its multipart upload began) may name an earlier batch than the object holds
            landed = max(landed, self._known.writers.get(writer, 0))
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
                self._move_cut()  # and it cut off what it judged, if anything
                continue
            await self._stage.discard(batches[-1].seq)
            return
        self._give_up(batches)

    async def replace(self, data: AsyncIterator[bytes]) -> None:
        """Write ``data`` over the object, if it is still the one this writer last saw: :meth:`cut`,
        then what it returns, with no upload between (so nothing is carried)."""
        swap = await self.cut(contextlib.nullcontext())
        await swap(data)

    async def cut(
        self, held: contextlib.AbstractAsyncContextManager[Any]
    ) -> Callable[[AsyncIterator[bytes]], Awaitable[None]]:
        """Note where the old journal ends (the object's size and ETag as this writer knows them);
        return what writes ``data`` over the object, followed by what was appended after the cut.

        Called with no upload under way and nothing staged. Uploads may go on once it has returned,
        while the snapshot is written: each appends to the object as usual, conditional on its ETag,
        so a crash, or a snapshot that fails, leaves them in the old journal. The snapshot is
        streamed into a multipart upload, its last part held back (it may be under S3's part
        minimum). Then, inside ``held`` (uploads held), the final parts are that tail and the
        object's bytes from the cut to its end, read in ranges of ``part_size``, and the upload is
        completed with ``If-Match`` on the ETag this writer now knows; a snapshot of one part is
        one ``PutObject`` of snapshot and carried bytes, with the same condition. So the object is
        the old one whole, with every append, until S3 takes the new one whole, with them.

        The fence is that condition (``If-None-Match: *`` if there was no object): a writer
        elsewhere that changed the object since this one last looked, before the cut or during the
        snapshot, makes it fail with :class:`~yoink.ConcurrentWriterError` and the object as that
        writer left it. The metadata keeps every writer's last batch, so a stage left elsewhere
        before the compaction uploads only what the old journal did not hold, after the new one.
        """
        now = await self._head()
        known = self._known = self._known or now
        if now.etag != known.etag:  # the condition would fail: say so before the upload
            raise self._replace_refused(known, now.etag)
        await self._abort_uploads(self._key, exact=True)
        carry = self._carry = _Carry(known.size, known)
        token = secrets.token_hex(8)  # tells this replace's own retry from another writer's change

        async def swap(data: AsyncIterator[bytes]) -> None:
            try:
                await self._write_carrying(data, carry, token, held)
            finally:
                if self._carry is carry:
                    self._carry = None

        return swap

    async def _write_carrying(
        self,
        data: AsyncIterator[bytes],
        carry: _Carry,
        token: str,
        held: contextlib.AbstractAsyncContextManager[Any],
    ) -> None:
        buffer = bytearray()
        async for chunk in data:
            buffer += chunk
            if len(buffer) > self._part_size:
                break
        else:  # one part: written whole with uploads held, with what they carried
            async with held:
                await self._swap_small(bytes(buffer), carry, token)
            return
        # A multipart upload's metadata is fixed when it is created: this writer's last batch as of
        # the cut. The ones it uploads during the snapshot are in the object too, and discarded from
        # its stage before the swap (see _current), so no stage left can upload them again.
        metadata = self._metadata(self._writers(carry.cut.writers), token)
        created = await self._client.call("create_multipart_upload", Key=self._key, Metadata=metadata)
        upload = {"Key": self._key, "UploadId": created["UploadId"]}
        parts: list[dict[str, Any]] = []
        sent, last = 0, b""  # the bytes sent, and the last of them

        async def send(part: bytes) -> None:
            nonlocal sent, last
            response = await self._client.call("upload_part", Body=part, PartNumber=len(parts) + 1, **upload)
            parts.append({"PartNumber": len(parts) + 1, "ETag": response["ETag"]})
            sent, last = sent + len(part), part[-1:]

        async def send_whole_parts() -> None:  # the last one, perhaps under S3's minimum, is held back
            while len(buffer) > self._part_size:
                with memoryview(buffer) as view:  # one copy of the part, not two
                    part = bytes(view[: self._part_size])
                del buffer[: self._part_size]
                await send(part)
                del part  # not held while the next one fills

        try:
            await send_whole_parts()
            async for chunk in data:  # on from where the loop above stopped
                buffer += chunk
                await send_whole_parts()
            tail = bytes(buffer)
            buffer.clear()
            async with held:
                current = await self._current(carry)

                async def complete(condition: dict[str, str]) -> str:
                    carried = self._carried(current, carry.start)
                    async for part in _regroup(
                        prepend(_joined(tail, carry, current), carried), self._part_size
                    ):
                        await send(part)
                    response = await self._client.call(
                        "complete_multipart_upload", MultipartUpload={"Parts": parts}, **upload, **condition
                    )
                    return str(response["ETag"])

                etag, found = await self._conditional(current, token, complete)
                size = found if found is not None else sent
                self._known = _Object(
                    etag, size, self._writers(current.writers), clean=found is None and last == b"\n"
                )
        except BaseException:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self._client.call("abort_multipart_upload", **upload)
            raise

    async def _swap_small(self, snapshot: bytes, carry: _Carry, token: str) -> None:
        """The swap of a snapshot of one part, with uploads held."""
        current = await self._current(carry)
        head = _joined(snapshot, carry, current)
        size = len(head) + current.size - carry.start
        writers = self._writers(current.writers)
        metadata = self._metadata(writers, token)

        async def put(condition: dict[str, str]) -> str:
            body = prepend(head, self._carried(current, carry.start))
            return await self._put(self._key, body, size, metadata, condition)

        etag, found = await self._conditional(current, token, put)
        ends = (head[-1:] or b"\n") if current.size <= carry.start else b"\n"  # appends end in one
        self._known = _Object(
            etag, size if found is None else found, writers, clean=found is None and ends == b"\n"
        )

    async def _current(self, carry: _Carry) -> _Object:
        """With uploads held: this writer's view of the object now (its appends during the snapshot
        moved it on), if the object is still that; the stage keeps none of the batches it holds."""
        current = self._known or carry.cut
        now = await self._head()
        if now.etag != current.etag:  # the condition would fail: say so before the last upload
            raise self._replace_refused(current, now.etag)
        await self._stage.discard(current.writers.get(self._stage.writer, 0))  # an upload's, if it failed
        return current

    async def _conditional(
        self, current: _Object, token: str, request: Callable[[dict[str, str]], Awaitable[str]]
    ) -> tuple[str, int | None]:
        """Make the one request that swaps the object, conditional on ``current``; return the new
        ETag, and its size if it was found, from a retry whose first attempt's reply was lost."""
        condition = {"IfMatch": current.etag} if current.etag is not None else {"IfNoneMatch": "*"}
        try:
            return await request(condition), None
        except (Conflict, Missing):
            head = await self._head_metadata(self._key)
            if head is None or head[0].get("yoink-replace") != token:  # not an earlier attempt of ours
                raise self._replace_refused(current, head[2] if head is not None else None) from None
            return head[2], head[1]  # ours: its reply was lost; its end is read once
        except StorageError as exc:  # every answer lost, perhaps: did it go through?
            try:
                head = await self._head_metadata(self._key)
            except StorageError:
                raise StorageError(
                    f"{self._uri}: could not learn whether the compaction's swap went through ({exc}); "
                    "the journal is the old one or the new one, whole, and a new writer's replay "
                    "shows which"
                ) from exc
            if head is None or head[0].get("yoink-replace") != token:
                raise
            return head[2], head[1]

    async def _carried(self, current: _Object, start: int) -> AsyncIterator[bytes]:
        """The object's bytes from ``start`` to its end, a ranged GET of ``part_size`` at a time."""
        for first in range(start, current.size, self._part_size):
            yield await self._get_range(current.etag, first, min(first + self._part_size, current.size))

    def _writers(self, writers: dict[str, int]) -> dict[str, int]:
        writers = dict(writers)
        writer = self._stage.writer
        writers[writer] = writers.pop(writer, 0)  # this writer last, as after its uploads
        return dict(list(writers.items())[-REMEMBERED_WRITERS:])

    @staticmethod
    def _metadata(writers: dict[str, int], token: str) -> dict[str, str]:
        return {"yoink-batches": ",".join(f"{w}={seq}" for w, seq in writers.items()), "yoink-replace": token}

    def _replace_refused(self, known: _Object, etag: str | None) -> ConcurrentWriterError:
        return ConcurrentWriterError(
            f"{self._uri} was changed by another writer (its ETag went from {known.etag} to {etag}) while "
            "this one compacted it; yoink allows one writer at a time. The compaction was not applied: "
            "the journal is as the other writer left it"
        )

    async def _append(self, known: _Object, batches: list[Batch]) -> _Object:
        self._cutting = (-1, b"")  # set below if this append cuts the object's end
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
            keep, between = self._cutting = await self._clean_end(known, old)
            head = old[:keep] + between
            etag = await self._put(
                self._key, prepend(head, staged), len(head) + size, metadata, {"IfMatch": known.etag}
            )
            self._move_cut()
            return _Object(etag, len(head) + size, writers, clean=True)
        keep, between = self._cutting = await self._clean_end(known)
        if keep < self._min_part_size:  # what stays is too small to copy as a part: send it again
            head = (await self._get_range(known.etag, 0, keep))[:keep] + between
            etag = await self._put(
                self._key, prepend(head, staged), len(head) + size, metadata, {"IfMatch": known.etag}
            )
            self._move_cut()
            return _Object(etag, len(head) + size, writers, clean=True)
        copy = [Segment(self._key, 0, 0, keep, known.etag)]
        body = prepend(between, staged)
        etag = await self._put(
            self._key, body, len(between) + size, metadata, {"IfMatch": known.etag}, copy=copy
        )
        self._move_cut()
        return _Object(etag, keep + len(between) + size, writers, clean=True)

    def _move_cut(self) -> None:
        """Once an append has landed: if it cut off another tool's last line (or ended it with a
        newline) during a compaction, the cut moves, since the snapshot holds what the old journal
        ended in, and the carried bytes start after what the append put between. An append that
        failed moves nothing: the object is as it was."""
        (keep, between), self._cutting = self._cutting, (-1, b"")
        if self._carry is not None and 0 <= keep <= self._carry.start:
            self._carry.start = keep + len(between)

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
