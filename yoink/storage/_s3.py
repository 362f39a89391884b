"""S3Storage: the journal in Amazon S3 or an S3-compatible store (MinIO, R2, Ceph).

Writes go to a local :class:`~yoink.storage._stage.Stage` that survives the process; a flush
uploads the staged batches with conditional requests, so a second writer is refused instead of
overwritten, and a retried or recovered upload is recognised instead of duplicated.

This module is the front: the options, the client and the stage. Where the bytes go is the
layout's, one of two strategies over the same client: ``_s3_object.py`` and ``_s3_segments.py``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar

from yoink._tasks import asyncio_loop_of
from yoink.storage._s3_client import S3Client
from yoink.storage._s3_layout import MAX_PART_SIZE, LayoutName, RetryMode, S3Options
from yoink.storage._s3_object import ObjectLayout
from yoink.storage._s3_segments import SegmentsLayout
from yoink.storage._stage import Batch
from yoink.storage._staged import StagedStorage
from yoink.storage._uri import redact, take_uri_options

__all__ = ["S3Options", "S3Storage"]

MIN_PART_SIZE = 5 << 20  # S3's smallest part, but for the last one


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
    - Compaction (:meth:`replace`, which ``CheckpointManager.compact`` calls) first uploads what is
      staged (it belongs to the old journal), so no batch from before the swap can be uploaded
      after it, by this storage or by the next one on its stage after a crash. Then, in one step
      S3 makes atomic, with the condition of an upload (another writer that wrote since this one
      last looked makes it fail with :class:`~yoink.ConcurrentWriterError`, nothing changed; so
      does one that changes the object, or takes over during a segments compaction and writes
      after its claim, while the snapshot is written). In both layouts flushes go on meanwhile
      (``writes_during_replace`` is True):

      - objects: the compaction notes the object's size and ETag (the cut); flushes then append
        to it as usual. The new journal is written over the object, ``If-Match`` on the ETag this
        writer knows at the end: a ``PutObject`` up to ``part_size``, else a multipart upload
        whose last part is held back and whose completion carries the condition. That last step
        holds flushes, and adds after the snapshot the object's bytes from the cut to its end
        (ranged ``GetObject`` requests of ``part_size``). Until then the object is the old one
        whole, with every flush (a crash part-way leaves only an unfinished upload, which the
        next compaction aborts), and a reader under way, one ``GetObject``, reads the object it
        opened whole. The metadata keeps every writer's last batch, so a stage that another
        machine left is still recognised as uploaded (a multipart upload's is fixed when it
        begins: this writer's batches flushed meanwhile are gone from its stage by the swap).
        Later appends continue from the new object. It costs one upload of the snapshot and a
        download of what was flushed meanwhile.
      - segments: the next segment number n is claimed (an empty segment) where the old journal
        ends, then the new journal is written as ``<prefix>/merged/000000000000-<n>.jsonl``, which
        readers take as the base: they read the old journal until it exists (the claim holds no
        records), then it and the segments after it. Flushes meanwhile write segments n+1, n+2,
        ..., which follow the old journal until the snapshot exists and the snapshot once it does,
        with nothing copied; a snapshot that fails, or a crash, leaves them after the old journal
        and the claim, a segment without records. What it replaced stays ``keep_replaced`` seconds
        (600) for readers under way; a reader that takes longer is told to read again
        (:class:`~yoink.StorageError`), never shown a mix. Then a writer (this one at a later
        flush, or the next to list the journal, after a crash too) empties the old segments,
        keeping their keys as a merge does, and deletes the old merged objects.

      Aborting unfinished uploads needs ``s3:ListBucketMultipartUploads`` and is best effort; a
      bucket lifecycle rule that aborts incomplete multipart uploads does it too. A store that
      ignores ``If-Match`` on ``CompleteMultipartUpload`` (AWS honours it; moto does not) does
      not fence a snapshot, or an object-layout append, larger than ``part_size``.
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

    writes_during_replace = True
    """True in both layouts: a flush during a compaction uploads segments after the claim, or
    appends to the object, whose bytes after the cut the swap carries into the new one."""

    def __init__(
        self,
        uri: str,
        *,
        layout: LayoutName = "object",
        stage_dir: str | os.PathLike[str] | None = None,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        profile_name: str | None = None,
        retry_mode: RetryMode = "standard",
        max_attempts: int = 5,
        part_size: int = 16 << 20,
        merge_after: int = 64,
        merge_target: int = 64 << 20,
        timeout: float = 60.0,
        keep_replaced: float = 600.0,
    ) -> None:
        given = S3Options(
            layout=layout,
            stage_dir=stage_dir,
            endpoint_url=endpoint_url,
            region_name=region_name,
            profile_name=profile_name,
            retry_mode=retry_mode,
            max_attempts=max_attempts,
            part_size=part_size,
            merge_after=merge_after,
            merge_target=merge_target,
            timeout=timeout,
            keep_replaced=keep_replaced,
        )
        bucket, key, from_uri = _parse_uri(uri)
        self._options = options = given.merge(from_uri)
        key = self._checked_key(options, uri, key)
        environ = os.environ
        self._endpoint: str | None = (
            options.endpoint_url or environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")
        )
        where = self._endpoint or "aws"
        super().__init__(
            f"s3://{bucket}/{key}", options.stage_dir, identity=f"s3|{where}|{options.layout}|{bucket}|{key}"
        )
        self._journal_id = ("s3", where, options.layout, bucket, key)
        self._client = S3Client(
            bucket,
            journal=self._uri,
            endpoint=self._endpoint,
            region=options.region_name,
            profile=options.profile_name,
            retries={"mode": options.retry_mode, "max_attempts": options.max_attempts},
            timeout=options.timeout,
        )
        strategy = SegmentsLayout if options.layout == "segments" else ObjectLayout
        self._layout = strategy(
            self._client,
            self._stage,
            uri=self._uri,
            key=key,
            options=options,
            min_part_size=self.min_part_size,
        )

    def _checked_key(self, options: S3Options, uri: str, key: str) -> str:
        """Refuse options that cannot work; return the key as the layout uses it."""
        if options.layout not in ("object", "segments"):
            raise ValueError(f"layout must be 'object' or 'segments', got {options.layout!r}")
        if options.layout == "segments":
            key = key.rstrip("/")
        elif key.endswith("/"):
            raise ValueError(
                f"{uri!r} names a prefix; layout='object' needs an object key, as in s3://bucket/run.jsonl"
            )
        if not self.min_part_size <= options.part_size <= MAX_PART_SIZE:
            raise ValueError(f"part_size must be between {self.min_part_size} and {MAX_PART_SIZE} bytes")
        if options.merge_after < 2:
            raise ValueError("merge_after must be at least 2")
        if not options.keep_replaced >= 0:
            raise ValueError("keep_replaced must be a number of seconds, 0 or more")
        return key

    def __repr__(self) -> str:
        layout = f", layout={self._options.layout!r}" if self._options.layout != "object" else ""
        return f"{type(self).__name__}({self._uri!r}{layout})"

    def _constructor_arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (self._uri,), self._options.changed()

    # -- what StagedStorage asks of a backend: the layout's, but for the client -------------------

    async def _open_remote(self, writer: str | None, staged: bool) -> tuple[int, AsyncGenerator[str, None]]:
        return await self._layout.open_remote(writer, staged, remember=not self._closed)

    async def _remote_exists(self) -> bool:
        return await self._layout.exists()

    async def _upload(self, batches: list[Batch]) -> None:
        await self._layout.upload(batches)

    async def _swap(self, data: AsyncIterator[bytes]) -> None:
        await self._layout.replace(data)

    async def _cut(self) -> Callable[[AsyncIterator[bytes]], Awaitable[None]]:
        if isinstance(self._layout, SegmentsLayout):
            return await self._layout.claim()
        assert isinstance(self._layout, ObjectLayout)
        return await self._layout.cut(self._flush_lock)  # its last step holds uploads

    async def _release(self) -> None:
        await self._client.close()

    async def _open_stage(self) -> None:
        asyncio_loop_of(self, None)  # refuse trio at the first write, not at the first upload
        await super()._open_stage()

    def _drop_clients_after_fork(self) -> None:
        self._client.forget()


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
