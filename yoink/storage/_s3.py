"""S3Storage: the journal in Amazon S3 or an S3-compatible store (MinIO, R2, Ceph).

Writes go to a local :class:`~yoink.storage._stage.Stage` that survives the process; a flush
uploads the staged batches with conditional requests, so a second writer is refused instead of
overwritten, and a retried or recovered upload is recognised instead of duplicated.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal, NoReturn

import anyio

from yoink._exceptions import ConcurrentWriterError, StorageError
from yoink._records import MAX_LINE_BYTES, is_record_tail, tail_reads, whole_lines, without_torn_tail
from yoink._tasks import asyncio_loop_of
from yoink.storage._files import READ_CHUNK, path_chunks
from yoink.storage._s3_client import Conflict, Missing, S3Client
from yoink.storage._stage import Batch
from yoink.storage._staged import StagedStorage
from yoink.storage._uri import redact, take_uri_options

__all__ = ["S3Storage"]

logger = logging.getLogger(__name__)

Layout = Literal["object", "segments"]

MIN_PART_SIZE = 5 << 20  # S3's smallest part, but for the last one
MAX_PART_SIZE = 5 << 30
ATTEMPTS = 4  # conditional uploads per flush: after a lost reply, the first retry finds it landed
REMEMBERED_WRITERS = 16  # the (writer, last batch) pairs an object's metadata keeps
_SEGMENT = re.compile(r"(\d{12})\.jsonl")  # under <prefix>/segments/
_MERGED = re.compile(r"(\d{12})-(\d{12})\.jsonl")  # under <prefix>/merged/


@dataclass
class _Object:
    """What this writer knows of the object (layout="object")."""

    etag: str | None = None  # None: there is no object
    size: int = 0
    writers: dict[str, int] = field(default_factory=dict)  # writer id -> last batch; newest last
    clean: bool = False  # known to end in a newline: this writer's upload made it

    @property
    def last_writer(self) -> str | None:
        return next(reversed(self.writers), None)


@dataclass(frozen=True)
class _Segment:
    """One object of layout="segments": segment ``start``, or a merge of ``start``..``end``."""

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


@dataclass
class _Segments:
    """What this writer knows of the segments (layout="segments")."""

    live: list[_Segment]
    hidden: list[_Segment] = field(default_factory=list)  # merged objects a bigger one covers
    unburied: list[_Segment] = field(default_factory=list)  # merged segments a crash left holding data
    landed: int = 0  # the last of this writer's batches that a segment holds

    @property
    def next(self) -> int:
        return self.live[-1].end + 1 if self.live else 0


class _ListingChanged(Exception):
    """A merge ran while the segments were being listed: list them again."""


class S3Storage(StagedStorage):
    """A journal in S3, staged locally between flushes.

    ``S3Storage("s3://bucket/crawls/site-a.jsonl")``, or through ``StorageFactory.from_uri``.

    - :meth:`write` appends to a local stage in ``stage_dir`` (by default under the user's cache
      directory) and makes no network call. The stage survives a crash: the next storage for the
      same URI finds what was staged, uploads what S3 does not already hold, and logs it. While a
      storage writes, its stage is locked: a second writer on this machine gets
      :class:`~yoink.CheckpointLockedError`.
    - :meth:`flush` uploads the staged batches; once it returns, they are in S3.
    - ``layout="object"`` (the default): the URI names one plain JSONL object that any tool can
      read. A flush onto a missing object is a ``PutObject`` with ``If-None-Match: *``; onto an
      object under 5 MiB, the object is read and rewritten with ``If-Match`` on its ETag; onto a
      larger one, a multipart upload copies the object inside S3 (``UploadPartCopy``) and adds the
      new data as its last part, so only the new data crosses the network. S3 still copies the whole
      object on its side, so flushes slow down as the object grows: for long jobs, use segments.
    - ``layout="segments"``: the URI names a prefix, and each flush writes one new object,
      ``<prefix>/segments/000000000042.jsonl``, with ``If-None-Match: *``. A flush costs the same
      however long the journal is. When more than ``merge_after`` small segments pile up, they are
      merged into one (``<prefix>/merged/000000000000-000000000063.jsonl``), then emptied: a merged
      segment's key stays, as an empty object that keeps its size. Readers list ``merged/``, then
      the segments after the last merged one; a crash at any point of a merge loses and repeats
      nothing. A reader whose listed segments are merged before it reads them lists again and goes
      on in the merged object, from the byte after the segments it has yielded. Two merges that
      overlap (a paused writer's and another's, or writers with different merge settings) are read
      as one: the second is read from the end of the segments the first holds, and a later merge
      takes it in.
    - Another writer (fencing): a writer that saw the journal (its first :meth:`read` or
      :meth:`flush`) and was then overtaken (paused, frozen, cut off) is refused by the condition
      of its own upload, so a pause between any check and the upload changes nothing. Objects:
      ``If-Match`` on the ETag it last saw (``If-None-Match: *`` if it saw none). Segments: the
      number it writes next is taken, since a segment key, once written, is never deleted (a merge
      empties it); ``If-None-Match: *`` fails. The refused flush, and every later one, raises
      :class:`~yoink.ConcurrentWriterError`; the staged data stays staged, and a new storage on that
      stage uploads it after the other writer's records. Only a writer that had seen nothing
      before the other wrote cannot tell: its records follow the other's.
    - Another tool's last line (object layout): yoink's uploads always end in a newline, so a last
      line without one was written whole by another tool. It is judged as replay judges a last line:
      a JSON object (or blank) is a record, replayed, and ended with a newline before yoink appends
      (in either upload path); anything else is a torn tail, left out of replay (with a WARNING)
      and, before the next upload, moved to ``<key>.torn`` (one fragment a line) and cut off. The
      object stays valid JSONL. A writer checks this once, reading the object's last byte, until
      its own upload ends the object.
    - Exactly once: each upload records in S3 which writer made it and the last staged batch it
      holds, so a batch is never uploaded twice, after a retry or after a crash. With segments, the
      stage also records, before each upload, the segment it writes: after a crash, the next
      storage on that stage asks that one key (which keeps writer and batch once merged) whether
      the batches landed, however many segments or merges came since.
    - Credentials come from the standard AWS chain (environment, profile, IAM role).
      ``endpoint_url`` (or ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``) reaches MinIO, R2 and
      other S3-compatible stores. Failed requests are retried by botocore (``retry_mode``,
      ``max_attempts``). The client is opened on first use and closed by :meth:`close`.
    - S3 is reached through aiobotocore, so this backend runs on asyncio (not trio).

    Every option may also be given in the URI's query, as text converted to its type:
    ``s3://bucket/runs/42?layout=segments&part_size=33554432``. The key is taken as written, as
    the AWS CLI does (no percent-decoding).
    """

    # S3's multipart minimum. A store with a lower one (moto, in tests) may lower it.
    min_part_size: ClassVar[int] = MIN_PART_SIZE

    def __init__(
        self,
        uri: str,
        *,
        layout: Layout = "object",
        stage_dir: str | os.PathLike[str] | None = None,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        profile_name: str | None = None,
        retry_mode: Literal["standard", "adaptive", "legacy"] = "standard",
        max_attempts: int = 5,
        part_size: int = 16 << 20,
        merge_after: int = 64,
        merge_target: int = 64 << 20,
        timeout: float = 60.0,
    ) -> None:
        options = {k: v for k, v in locals().items() if k not in ("self", "uri", "__class__")}
        self._bucket, self._key, query = _parse_uri(uri)
        for name, value in query.items():
            if options[name] != _DEFAULTS[name]:
                raise ValueError(f"{name} is given both in the URI and as an option; give it once")
            options[name] = value
        layout, stage_dir, retry_mode, max_attempts, part_size, merge_after, merge_target, timeout = (
            options[name]
            for name in (
                "layout",
                "stage_dir",
                "retry_mode",
                "max_attempts",
                "part_size",
                "merge_after",
                "merge_target",
                "timeout",
            )
        )
        if layout not in ("object", "segments"):
            raise ValueError(f"layout must be 'object' or 'segments', got {layout!r}")
        if layout == "segments":
            self._key = self._key.rstrip("/")
        elif self._key.endswith("/"):
            raise ValueError(
                f"{uri!r} names a prefix; layout='object' needs an object key, as in s3://bucket/run.jsonl"
            )
        if not self.min_part_size <= part_size <= MAX_PART_SIZE:
            raise ValueError(f"part_size must be between {self.min_part_size} and {MAX_PART_SIZE} bytes")
        if merge_after < 2:
            raise ValueError("merge_after must be at least 2")
        self._layout: Layout = layout
        environ = os.environ
        self._endpoint: str | None = (
            options["endpoint_url"] or environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")
        )
        self._part_size = part_size
        self._merge_after = merge_after
        self._merge_target = merge_target
        super().__init__(
            f"s3://{self._bucket}/{self._key}",
            stage_dir,
            identity=f"s3|{self._endpoint or 'aws'}|{layout}|{self._bucket}|{self._key}",
        )
        self._options = {k: v for k, v in options.items() if v != _DEFAULTS[k]}  # what pickling keeps
        self._journal_id = ("s3", self._endpoint or "aws", layout, self._bucket, self._key)
        self._client = S3Client(
            self._bucket,
            journal=self._uri,
            endpoint=self._endpoint,
            region=options["region_name"],
            profile=options["profile_name"],
            retries={"mode": retry_mode, "max_attempts": max_attempts},
            timeout=timeout,
        )
        self._object: _Object | None = None
        self._segments: _Segments | None = None

    def __repr__(self) -> str:
        layout = f", layout={self._layout!r}" if self._layout != "object" else ""
        return f"{type(self).__name__}({self._uri!r}{layout})"

    def _constructor_arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (self._uri,), dict(self._options)

    # -- what StagedStorage asks of a backend ------------------------------------------------

    async def _open_remote(self, writer: str | None, staged: bool) -> tuple[int, AsyncGenerator[str, None]]:
        if self._layout == "segments":
            state = await self._list_segments(writer if staged else None)
            return state.landed, self._read_segments(state.live)
        response = await self._get_object()
        known = _Object()
        if response is not None:
            known = _Object(response["ETag"], response["ContentLength"], _decode_writers(response))
        if self._object is None and not self._closed:
            self._object = known  # this writer's view of the object starts here
        landed = known.writers.get(writer, 0) if writer else 0
        if response is None:
            return landed, _nothing()
        if staged:  # a torn last line must not read as a corrupt one before the staged records
            return landed, without_torn_tail(self._stream(response), self._uri)
        return landed, self._stream(response)

    async def _remote_exists(self) -> bool:
        if self._layout == "segments":
            response = await self._client.call("list_objects_v2", Prefix=self._key + "/", MaxKeys=1)
            return bool(response.get("KeyCount"))
        try:
            await self._client.call("head_object", Key=self._key)
        except Missing:
            await self._client.check_bucket()
            return False
        return True

    async def _upload(self, batches: list[Batch]) -> None:
        if self._layout == "object":
            await self._flush_object(batches)
        else:
            await self._flush_segments(batches)

    async def _release(self) -> None:
        await self._client.close()

    async def _open_stage(self) -> None:
        asyncio_loop_of(self, None)  # refuse trio at the first write, not at the first upload
        await super()._open_stage()

    def _drop_clients_after_fork(self) -> None:
        self._client.forget()

    # -- uploads -------------------------------------------------------------------------------

    async def _flush_object(self, batches: list[Batch]) -> None:
        writer = self._stage.writer
        for _ in range(ATTEMPTS):
            known = self._object or await self._head()
            batches = await self._drop_landed(batches, known.writers.get(writer, 0))
            if not batches:
                return
            try:
                self._object = await self._append_to_object(known, batches)
            except Conflict:
                now = await self._head()
                if now.last_writer != writer:
                    self._object = known  # and so the next flush fails the same way
                    self._raise_conflict(f"its ETag changed from {known.etag} to {now.etag}", batches)
                self._object = now  # an earlier attempt of ours went through: upload what it lacks
                continue
            await self._stage.discard(batches[-1].seq)
            return
        self._give_up(batches)

    async def _append_to_object(self, known: _Object, batches: list[Batch]) -> _Object:
        writers = dict(known.writers)
        writers.pop(self._stage.writer, None)
        writers[self._stage.writer] = batches[-1].seq
        writers = dict(list(writers.items())[-REMEMBERED_WRITERS:])
        metadata = {"yoink-batches": ",".join(f"{w}={seq}" for w, seq in writers.items())}
        size = sum(batch.size for batch in batches)
        staged = _staged_chunks(batches)
        if known.etag is None:
            etag = await self._put(self._key, staged, size, metadata, {"IfNoneMatch": "*"})
            return _Object(etag, size, writers, clean=True)
        if known.size < self.min_part_size:
            old = await self._get_small(known.etag)
            keep, between = await self._clean_end(known, old)
            head = old[:keep] + between
            etag = await self._put(
                self._key, _prepend(head, staged), len(head) + size, metadata, {"IfMatch": known.etag}
            )
            return _Object(etag, len(head) + size, writers, clean=True)
        keep, between = await self._clean_end(known)
        if keep < self.min_part_size:  # what stays is too small to copy as a part: send it again
            head = (await self._get_range(known.etag, 0, keep))[:keep] + between
            etag = await self._put(
                self._key, _prepend(head, staged), len(head) + size, metadata, {"IfMatch": known.etag}
            )
            return _Object(etag, len(head) + size, writers, clean=True)
        copy = [_Segment(self._key, 0, 0, keep, known.etag)]
        body = _prepend(between, staged)
        etag = await self._put(
            self._key, body, len(between) + size, metadata, {"IfMatch": known.etag}, copy=copy
        )
        return _Object(etag, keep + len(between) + size, writers, clean=True)

    async def _clean_end(self, known: _Object, old: bytes | None = None) -> tuple[int, bytes]:
        """How many of the object's bytes to keep, and what goes between them and the new data.

        yoink's uploads end in a newline, so a last line without one was written, whole, by another
        tool. Judged as replay judges it: blank or a JSON object, it is kept and gets its newline;
        anything else is a torn tail, set aside in ``<key>.torn`` and cut off, so the object stays
        JSONL. ``old`` is the whole object, if it was read already.
        """
        if known.clean or not known.size:
            return known.size, b""
        tail = old[old.rfind(b"\n") + 1 :] if old is not None else await self._tail(known)
        if not tail:
            return known.size, b""
        if is_record_tail(tail.decode("utf-8", "surrogateescape")):
            return known.size, b"\n"
        await self._set_aside(tail, known.size - len(tail))
        return known.size - len(tail), b""

    async def _tail(self, known: _Object) -> bytes:
        """The bytes after the object's last newline, read from its end: one byte, then more."""
        for start in tail_reads(known.size):
            block = await self._get_range(known.etag, start, known.size)
            cut = block.rfind(b"\n") + 1
            if cut or start == 0:
                return block[cut:]
        raise StorageError(
            f"{self._uri} ends in a line longer than {MAX_LINE_BYTES:,} bytes without a newline, "
            "which yoink never writes and does not read; nothing was uploaded, and the staged "
            "records stay staged. Remove that line (or move the object) and flush again"
        )

    async def _set_aside(self, tail: bytes, offset: int) -> None:
        """Add ``tail`` to ``<key>.torn`` (one fragment a line), as LocalFileStorage does."""
        key = self._key + ".torn"
        try:
            response = await self._client.call("get_object", Key=key)
            kept = b"".join([chunk async for chunk in self._body_chunks(response)])
        except Missing:
            kept = b""
        if not kept.endswith(tail + b"\n"):  # else an earlier attempt set it aside already
            await self._client.call("put_object", Key=key, Body=kept + tail + b"\n")
        logger.warning(
            "%s ends in %d bytes without a newline that are not a JSON object (another tool wrote "
            "them: yoink's uploads end in a newline); moved them to s3://%s/%s, and the journal goes "
            "on from byte offset %d",
            self._uri,
            len(tail),
            self._bucket,
            key,
            offset,
            extra={"yoink_torn_tail": len(tail)},
        )

    async def _flush_segments(self, batches: list[Batch]) -> None:
        writer = self._stage.writer
        for _ in range(ATTEMPTS):
            state = self._segments or await self._list_segments(writer)
            self._segments = state
            batches = await self._drop_landed(batches, state.landed)
            if not batches:
                return
            # The fence is this PutObject's condition. A segment key, once written, exists for
            # good (a merge empties it, never deletes it), so a writer whose view is stale, by a
            # moment or a day, asks for a number that is taken, and S3 refuses it.
            number = state.next
            key = self._segment_key(number)
            metadata = {"yoink-writer": writer, "yoink-batch": str(batches[-1].seq)}
            size = sum(batch.size for batch in batches)
            # After a crash between this upload and the discard, the next storage on this stage
            # asks that one key whether the batches landed, however far the journal moved on.
            intent: dict[str, int | str] = {"writer": writer, "s3_segment": number, "batch": batches[-1].seq}
            await anyio.to_thread.run_sync(self._stage.write_intent, intent)
            try:
                etag = await self._put(key, _staged_chunks(batches), size, metadata, {"IfNoneMatch": "*"})
            except Conflict:
                batch, size, etag = await self._taken_segment(number, batches)
                state.live.append(_Segment(key, number, number, size, etag, batch=batch))
                state.landed = batch  # an earlier attempt of ours went through
                continue
            state.live.append(_Segment(key, number, number, size, etag, batch=batches[-1].seq))
            state.landed = batches[-1].seq
            await self._stage.discard(state.landed)
            await self._merge_if_due(state)
            return
        self._give_up(batches)

    async def _taken_segment(self, number: int, batches: list[Batch]) -> tuple[int, int, str]:
        """Segment ``number`` exists: return its batch, size and ETag if an earlier attempt of this
        writer wrote it, else raise :class:`ConcurrentWriterError`."""
        head = await self._head_metadata(self._segment_key(number))
        if head is None or head[0].get("yoink-writer") != self._stage.writer:
            self._raise_conflict(
                f"segment {number}, the next one it would write, is another writer's", batches
            )
        metadata, size, etag = head
        batch = int(metadata["yoink-batch"])
        if not size:  # ours, and merged since by a writer that went on after it
            batches = await self._drop_landed(batches, batch)
            self._raise_conflict(f"it merged segment {number} and wrote after it", batches)
        return batch, size, etag

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
        raise ConcurrentWriterError(
            f"{self._uri} was changed by another writer ({what}); yoink allows one writer at a time. "
            f"Nothing was lost: the {sum(b.size for b in batches)} bytes not uploaded stay staged in "
            f"{self._stage.directory}, and a new storage for this URI uploads them once the other "
            "writer has stopped"
        )

    async def _put(
        self,
        key: str,
        body: AsyncIterator[bytes],
        size: int,
        metadata: dict[str, str],
        condition: dict[str, str],
        *,
        copy: Sequence[_Segment] = (),
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
                        CopySource={"Bucket": self._bucket, "Key": source.key},
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

    # -- segments: listing and merging ----------------------------------------------------------

    def _segment_key(self, number: int) -> str:
        return f"{self._key}/segments/{number:012d}.jsonl"

    def _merged_key(self, start: int, end: int) -> str:
        return f"{self._key}/merged/{start:012d}-{end:012d}.jsonl"

    async def _list_segments(self, writer: str | None) -> _Segments:
        """List the live segments, and find the last batch of ``writer`` that they hold."""
        for _ in range(ATTEMPTS):
            try:
                state = await self._try_listing(tidy=writer is not None)
                break
            except _ListingChanged:
                continue
        else:
            raise StorageError(
                f"{self._uri}: another writer kept merging segments while they were listed; try again"
            )
        if writer:
            state.landed = await self._landed(writer, state)
        if self._segments is None and not self._closed:
            self._segments = state
        return state

    async def _listing(self) -> _Segments:
        """The live segments, listed again (a reader's, after a merge took what it was to read)."""
        for _ in range(ATTEMPTS):
            with contextlib.suppress(_ListingChanged):
                return await self._try_listing(tidy=False)
        raise StorageError(
            f"{self._uri}: another writer kept merging segments while they were listed; read again"
        )

    async def _landed(self, writer: str, state: _Segments) -> int:
        """The last of ``writer``'s batches in S3: the stage names the segment of its last upload,
        and that key keeps its writer and batch even once a merge has emptied it."""
        intent = self._stage.read_intent()
        if intent is None:  # a stage of a yoink before these records: look in the last segments
            for segment in reversed(state.live[-REMEMBERED_WRITERS:]):
                head = None if segment.merged else await self._head_metadata(segment.key)
                if head and head[0].get("yoink-writer") == writer:
                    return int(head[0]["yoink-batch"])
            return 0
        number = intent.get("s3_segment")
        if intent.get("writer") != writer or not isinstance(number, int):
            return 0  # this writer has not uploaded yet
        head = await self._head_metadata(self._segment_key(number))
        if head is None or head[0].get("yoink-writer") != writer:
            return 0  # the upload did not land
        return int(head[0]["yoink-batch"])

    async def _try_listing(self, *, tidy: bool) -> _Segments:
        """One listing: merged objects first, then the segments after them (not the emptied ones
        before). With ``tidy``, also find what an interrupted merge left for the next to clear."""
        state = _Segments([])
        merged = []
        for name, size, etag in await self._list(f"{self._key}/merged/"):
            if match := _MERGED.fullmatch(name):
                key = f"{self._key}/merged/{name}"
                merged.append(_Segment(key, int(match[1]), int(match[2]), size, etag, merged=True))
        for segment in sorted(merged, key=lambda s: (s.start, -s.end)):
            if segment.end < state.next:
                state.hidden.append(segment)  # a bigger merge holds it; a crash kept it from deletion
                continue
            if segment.start < state.next:  # two merges at once (a paused writer's, another's)
                segment = await self._after_overlap(segment, state.live[-1])
            for number in range(state.next, segment.start):  # a segment big enough to stay unmerged
                state.live.append(await self._segment(number))
            state.live.append(segment)
        covered = state.next - 1
        after = covered
        if tidy and state.live and state.live[-1].merged:
            head = await self._head_metadata(state.live[-1].key)
            first = int(head[0].get("yoink-from", after + 1)) if head else after + 1
            after = min(after, first - 1)  # the newest merge's segments: emptied, unless it was cut short
        start_after = {"StartAfter": self._segment_key(after)} if after >= 0 else {}
        for name, size, etag in await self._list(f"{self._key}/segments/", **start_after):
            if not (match := _SEGMENT.fullmatch(name)):
                continue
            number = int(match[1])
            segment = _Segment(f"{self._key}/segments/{name}", number, number, size, etag)
            if number <= covered:
                if size:
                    state.unburied.append(segment)
            elif not size:
                raise _ListingChanged  # emptied by a merge that the merged listing did not show
            else:
                state.live.append(segment)
        return state

    async def _after_overlap(self, segment: _Segment, before: _Segment) -> _Segment:
        """The part of merged ``segment`` after ``before``, the merged object that overlaps it.

        Both hold the same bytes for the segments they share, so the overlap is skipped by size:
        each segment's own (an emptied one keeps it in its metadata)."""
        skip = await self._segments_size(segment.start, before.end, overlap=(before, segment))
        return replace(segment, start=before.end + 1, offset=segment.offset + skip, size=segment.size - skip)

    async def _segments_size(
        self, first: int, last: int, *, overlap: tuple[_Segment, _Segment] | None = None
    ) -> int:
        """The bytes of segments ``first`` to ``last``, from each segment's key."""
        total = 0
        for number in range(first, last + 1):
            key = self._segment_key(number)
            head = await self._head_metadata(key)
            if head is None:
                raise StorageError(
                    f"{self._uri}: segment {key} is missing; something other than yoink deleted it"
                )
            size = head[1] or head[0].get("yoink-size")
            if (size is None or not str(size).isdigit()) and overlap is None:
                raise StorageError(
                    f"{self._uri}: segment {key} was merged while it was being read, and was emptied "
                    "by an older yoink, which does not record a segment's size, so the reader cannot "
                    "find where to go on in the merged object; nothing was changed. Read again"
                )
            if size is None or not str(size).isdigit():
                assert overlap is not None
                earlier, later = overlap
                raise StorageError(
                    f"{self._uri}: the merged objects {earlier.key} and {later.key} overlap (two writers "
                    f"merged at once), and segment {key}, emptied by an older yoink, does not record its "
                    "size, so the overlap cannot be skipped; nothing was changed. Replace "
                    f"{later.key} with its bytes after those of segments {later.start}-{earlier.end} "
                    f"(which {earlier.key} holds), and read again"
                )
            total += int(size)
        return total

    async def _segment(self, number: int) -> _Segment:
        key = self._segment_key(number)
        head = await self._head_metadata(key)
        if head is None:
            raise StorageError(
                f"{self._uri}: segment {key} is missing; something other than yoink deleted it"
            )
        if not head[1]:
            raise _ListingChanged
        return _Segment(key, number, number, head[1], head[2])

    async def _list(self, prefix: str, **params: Any) -> list[tuple[str, int, str]]:
        """The names (after ``prefix``), sizes and ETags of the objects under ``prefix``."""
        found = []
        params["Prefix"] = prefix
        while True:
            response = await self._client.call("list_objects_v2", **params)
            for item in response.get("Contents", []):
                found.append((item["Key"][len(prefix) :], item["Size"], item["ETag"]))
            if not response.get("IsTruncated"):
                return found
            params["ContinuationToken"] = response["NextContinuationToken"]

    async def _merge_if_due(self, state: _Segments) -> None:
        await self._tidy(state)
        # A run of small segments, after the last big one. Only its first may be over S3's part
        # minimum: that one is copied inside S3, the rest (each under it) are downloaded and
        # uploaded again, so a merge moves a bounded amount however long the journal.
        start = 0
        for index, segment in enumerate(state.live[:-1]):
            if segment.size >= self._merge_target:
                start = index + 1
            elif segment.size >= self.min_part_size:
                start = index
        run = state.live[start:-1]  # the newest segment stays
        if len(run) < self._merge_after:
            return
        key = self._merged_key(run[0].start, run[-1].end)
        copy = run[:1] if run[0].size >= self.min_part_size else []
        rest = run[len(copy) :]
        after_merged = [segment for segment in run if segment.merged][-1:]
        first = after_merged[0].end + 1 if after_merged else run[0].start
        try:
            size = sum(segment.size for segment in rest)
            body = self._objects_chunks(rest)
            metadata = {"yoink-from": str(first)}  # the segments it empties: where to look after a crash
            etag = await self._put(key, body, size, metadata, {"IfNoneMatch": "*"}, copy=copy)
        except (StorageError, Conflict, Missing) as exc:
            # This writer's view stays as it was: its next segment number does not depend on merges.
            logger.warning(
                "%s: merging %d segments into %s failed; a later flush tries again: %s",
                self._uri,
                len(run),
                key,
                exc,
            )
            return
        state.live[start:-1] = [
            _Segment(key, run[0].start, run[-1].end, sum(s.size for s in run), etag, True)
        ]
        try:
            await self._bury([segment for segment in run if not segment.merged], key)
            await self._delete([segment for segment in run if segment.merged])
        except StorageError as exc:
            logger.warning(
                "%s: could not clear what %s holds; the next writer clears it: %s", self._uri, key, exc
            )

    async def _tidy(self, state: _Segments) -> None:
        """Clear what an interrupted merge left: merged objects a bigger one holds, and segments a
        merged object holds that still hold their data."""
        hidden, unburied = state.hidden, state.unburied
        state.hidden, state.unburied = [], []
        if not hidden and not unburied:
            return
        logger.info(
            "%s: clearing %d objects left by an interrupted merge", self._uri, len(hidden) + len(unburied)
        )
        try:
            await self._bury(unburied, "")
            await self._delete(hidden)
        except StorageError as exc:
            logger.warning("%s: could not clear what an interrupted merge left: %s", self._uri, exc)

    async def _bury(self, segments: Sequence[_Segment], into: str) -> None:
        """Empty merged segments, keeping their keys: a writer behind the times who asks for one of
        their numbers must find it taken. Each keeps its writer and batch, for that writer's retries,
        and its size."""
        for segment in segments:
            if segment.batch:
                metadata = {"yoink-writer": self._stage.writer, "yoink-batch": str(segment.batch)}
            else:
                head = await self._head_metadata(segment.key)
                kept = head[0] if head and head[1] else {}
                metadata = {k: v for k, v in kept.items() if k in ("yoink-writer", "yoink-batch")}
            metadata["yoink-size"] = str(segment.size)  # a reader skipping an overlap of merges needs it
            if into:
                metadata["yoink-merged-into"] = into.rsplit("/", 1)[-1]
            with contextlib.suppress(Conflict, Missing):  # emptied already, by another merge
                await self._client.call(
                    "put_object", Key=segment.key, Body=b"", Metadata=metadata, IfMatch=segment.etag
                )

    async def _delete(self, segments: Sequence[_Segment]) -> None:
        for first in range(0, len(segments), 1000):
            objects = [{"Key": segment.key} for segment in segments[first : first + 1000]]
            await self._client.call("delete_objects", Delete={"Objects": objects, "Quiet": True})

    async def _objects_chunks(self, segments: Sequence[_Segment]) -> AsyncIterator[bytes]:
        for segment in segments:
            response = await self._client.call(
                "get_object", Key=segment.key, IfMatch=segment.etag, **segment.byte_range()
            )
            async for chunk in self._body_chunks(response):
                yield chunk

    # -- reading --------------------------------------------------------------------------------

    async def _get_object(self) -> dict[str, Any] | None:
        try:
            return await self._client.call("get_object", Key=self._key)  # type: ignore[no-any-return]
        except Missing:
            return None

    async def _read_segments(self, listed: list[_Segment]) -> AsyncGenerator[str, None]:
        """Read the segments of ``listed`` (pieces holding segments 0 to the last, in order).

        A merge may empty or delete a piece before it is read (If-Match refuses it). The reader
        then lists again and goes on from the first segment it has not yielded, in the object that
        holds it now, skipping the bytes of the segments before it: nothing twice, nothing skipped,
        and nothing after the last segment of ``listed``.
        """
        if not listed:
            return
        last = listed[-1].end
        starts: dict[int, int] = {}  # segment number -> bytes of ``listed`` before it
        ends: dict[int, int] = {}  # segment number -> bytes of ``listed`` through it
        total = 0
        for listed_piece in listed:
            starts[listed_piece.start] = total
            total += listed_piece.size
            ends[listed_piece.end] = total

        async def size_of(first: int, through: int) -> int:
            if first > through:
                return 0
            if first in starts and through in ends:
                return ends[through] - starts[first]
            return await self._segments_size(first, through)

        pieces, done, refused = listed, -1, 0
        while done < last:
            piece = next((p for p in pieces if p.start <= done + 1 <= p.end), None)
            if piece is None:
                raise StorageError(f"{self._uri}: no object holds segment {done + 1}; read again")
            through = min(piece.end, last)
            skip = await size_of(piece.start, done)
            length = await size_of(done + 1, through)
            try:
                response = await self._client.call(
                    "get_object", Key=piece.key, IfMatch=piece.etag, **piece.byte_range(skip, length)
                )
            except (Missing, Conflict):  # merged since it was listed
                refused += 1
                if refused > ATTEMPTS:
                    raise StorageError(
                        f"{self._uri}: another writer kept merging segments while they were read; read again"
                    ) from None
                pieces = (await self._listing()).live
                continue
            refused = 0
            async for block in self._stream(response):
                yield block
            done = through

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

    async def _head(self) -> _Object:
        try:
            response = await self._client.call("head_object", Key=self._key)
        except Missing:
            return _Object()  # a missing bucket: the upload that follows says so
        return _Object(response["ETag"], response["ContentLength"], _decode_writers(response))

    async def _head_metadata(self, key: str) -> tuple[dict[str, str], int, str] | None:
        try:
            response = await self._client.call("head_object", Key=key)
        except Missing:
            return None
        return response.get("Metadata", {}), response["ContentLength"], response["ETag"]

    async def _get_small(self, etag: str) -> bytes:
        try:
            response = await self._client.call("get_object", Key=self._key, IfMatch=etag)
        except Missing:
            raise Conflict from None
        return b"".join([chunk async for chunk in self._body_chunks(response)])

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
        return b"".join([chunk async for chunk in self._body_chunks(response)])


_DEFAULTS: dict[str, Any] = {
    "layout": "object",
    "stage_dir": None,
    "endpoint_url": None,
    "region_name": None,
    "profile_name": None,
    "retry_mode": "standard",
    "max_attempts": 5,
    "part_size": 16 << 20,
    "merge_after": 64,
    "merge_target": 64 << 20,
    "timeout": 60.0,
}


def _parse_uri(uri: str) -> tuple[str, str, dict[str, Any]]:
    """The bucket, the key and the options in the query (converted to their types)."""
    head, sep, rest = uri.partition("://")
    if head.lower() != "s3" or not sep:
        raise ValueError(f"an S3 URI looks like s3://bucket/key.jsonl; got {redact(uri)!r}")
    location, options = take_uri_options(S3Storage, rest, shown=uri)  # the key as written
    bucket, _, key = location.partition("/")
    if not bucket or not key.strip("/"):
        raise ValueError(
            f"an S3 URI names a bucket and a key, as in s3://bucket/runs/a.jsonl; got {redact(uri)!r}"
        )
    return bucket, key, options


def _decode_writers(response: dict[str, Any]) -> dict[str, int]:
    writers = {}
    for pair in response.get("Metadata", {}).get("yoink-batches", "").split(","):
        writer, _, seq = pair.partition("=")
        if writer and seq.isdigit():
            writers[writer] = int(seq)
    return writers


def _copy_ranges(size: int) -> Iterator[tuple[int, int]]:
    """Split ``size`` bytes into near-equal inclusive ranges of at most 5 GiB each."""
    count = -(-size // MAX_PART_SIZE)
    step = -(-size // count)
    for first in range(0, size, step):
        yield first, min(first + step, size) - 1


async def _nothing() -> AsyncGenerator[str, None]:
    return
    yield


async def _staged_chunks(batches: Sequence[Batch]) -> AsyncIterator[bytes]:
    for batch in batches:
        async for chunk in path_chunks(batch.path, batch.size):
            yield chunk


async def _prepend(head: bytes, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
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
