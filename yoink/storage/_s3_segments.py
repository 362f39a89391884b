"""layout="segments": the journal is a prefix, and each flush writes one new object under it.

::

    <prefix>/segments/000000000042.jsonl            one flush's batches; If-None-Match: *
    <prefix>/merged/000000000000-000000000063.jsonl  segments 0-63, merged once they piled up

A merged segment is emptied, never deleted, so a writer behind the times that asks for its number
finds it taken. Readers list ``merged/``, then the segments after the last merged one.

A compaction (:meth:`SegmentsLayout.replace`) claims the next segment number n (an empty
``segments/n``, ``If-None-Match: *``) where the old journal ends, before it reads the new
journal's text, then writes the new journal as ``merged/000000000000-<n>.jsonl``
(``If-None-Match: *``): from the moment that object exists, readers take it as the journal's
base, as they take any merge from segment 0, and read the segments after n. So this writer
flushes on while the snapshot is written (``writes_during_replace``): its segments n+1, n+2, ...
follow the old journal until the snapshot exists (the claim is a segment without records), and
the snapshot then, as they are, with nothing to copy. A crash, or a snapshot that fails, leaves
the claim without records and those segments after it. Merges meanwhile take only segments after
n: the claim and what it is to replace stay as they are until the snapshot has landed.

A writer that finds a claim without its snapshot and writes after it puts an empty
``merged/000000000000-<n>.jsonl`` there first (``yoink-void``): a compaction paused between its
claim and its snapshot, by a writer taken over, can then never apply it. The writer whose
compaction is under way passes over its own claim (it knows the claim's token). What a snapshot
replaced stays ``keep_replaced`` seconds for readers under way, then a writer empties the old
segments (keeping their keys, as a merge does) and deletes the old merged objects.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread

from yoink._exceptions import ConcurrentWriterError, StorageError
from yoink.storage._s3_client import Conflict, Missing, S3Client
from yoink.storage._s3_layout import ATTEMPTS, Segment, staged_chunks
from yoink.storage._s3_listing import VOID, SegmentListing, Segments
from yoink.storage._stage import Batch, Stage

if TYPE_CHECKING:
    from yoink.storage._s3_layout import S3Options

__all__ = ["SegmentsLayout"]

logger = logging.getLogger(__name__)

_BASE_METADATA = ("yoink-base", "yoink-retired")  # a snapshot's, and a merge's that holds one


class SegmentsLayout(SegmentListing):
    """The journal as segments under the prefix its URI names, merged as they pile up."""

    def __init__(
        self, client: S3Client, stage: Stage, *, uri: str, key: str, options: S3Options, min_part_size: int
    ) -> None:
        super().__init__(client, stage, uri=uri, key=key, options=options, min_part_size=min_part_size)
        self._merge_after = options.merge_after
        self._merge_target = options.merge_target
        self._claimed: tuple[int, str] | None = None  # a compaction's claim and token, until its snapshot
        self._changing = anyio.Lock()  # a merge, or a snapshot's swap: one changes the view at a time
        self._unknown: str | None = None  # why this writer cannot tell what the journal is, if so

    async def open_remote(
        self, writer: str | None, staged: bool, *, remember: bool
    ) -> tuple[int, AsyncGenerator[str, None]]:
        state = await self._list_segments(writer if staged else None, remember=remember)
        return state.landed, self._read_segments(state.live)

    async def exists(self) -> bool:
        response = await self._client.call("list_objects_v2", Prefix=self._key + "/", MaxKeys=1)
        return bool(response.get("KeyCount"))

    async def upload(self, batches: list[Batch]) -> None:
        writer = self._stage.writer
        self._check_known(batches)
        for _ in range(ATTEMPTS):
            state = self._view or await self._list_segments(writer)
            self._view = state
            batches = await self._drop_landed(batches, state.landed)
            if not batches:
                return
            await self._rule_out_claims(state, functools.partial(self._conflict, batches=batches))
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
                etag = await self._put(key, staged_chunks(batches), size, metadata, {"IfNoneMatch": "*"})
            except Conflict:
                batch, size, etag = await self._taken_segment(number, batches)
                state.live.append(Segment(key, number, number, size, etag, batch=batch))
                state.landed = batch  # an earlier attempt of ours went through
                continue
            state.live.append(Segment(key, number, number, size, etag, batch=batches[-1].seq))
            state.landed = batches[-1].seq
            await self._stage.discard(state.landed)
            async with self._changing:  # a snapshot's swap waits for it, and it for a swap
                await self._merge_if_due(state)
            return
        self._give_up(batches)

    async def replace(self, data: AsyncIterator[bytes]) -> None:
        """Write ``data`` as a snapshot that readers take as the journal's base (module docstring):
        :meth:`claim`, then the snapshot it returns, with no upload between."""
        snapshot = await self.claim()
        await snapshot(data)

    async def claim(self) -> Callable[[AsyncIterator[bytes]], Awaitable[None]]:
        """Claim the next segment number n, where the old journal ends; return what writes the
        snapshot, ``merged/000000000000-<n>.jsonl``, from the new journal's text.

        Called with no upload under way and nothing staged. Uploads may go on once it has returned,
        while the snapshot is written: they write segments n+1, n+2, ..., which follow the snapshot
        as they are, since readers take it as segments 0 to n. Until the snapshot exists, the claim
        is a segment without records, so those uploads follow the old journal: a crash, or a
        snapshot that fails, leaves them there. Merges meanwhile take only segments after n.

        The fence is the claim's condition, as a flush's is its segment's: a writer elsewhere that
        wrote since this one last looked holds that number, and the compaction is refused with
        :class:`~yoink.ConcurrentWriterError` before anything is visible. The snapshot's own
        condition refuses it if a writer went on after the claim meanwhile: it ruled the snapshot
        out (``yoink-void``) before its first segment, or merged the claim.
        """
        writer = self._stage.writer
        self._check_known([])
        now = await self._list_segments(writer, remember=False)  # also what a crash left to clear
        state = self._view = self._view or now
        if now.next != state.next:  # the claim would be refused: say so before the upload
            raise self._compaction_refused(f"segment {state.next}, the next it knew of, is another writer's")
        seen = {piece.key for piece in [*state.hidden, *state.unburied]}
        state.hidden += [piece for piece in now.hidden if piece.key not in seen]
        state.unburied += [piece for piece in now.unburied if piece.key not in seen]
        await self._rule_out_claims(state, self._compaction_refused)  # a compaction paused elsewhere
        for prefix in (f"{self._key}/segments/", f"{self._key}/merged/"):  # not another journal's under it
            await self._abort_uploads(prefix)
        number = state.next
        claim_key, key = self._segment_key(number), self._merged_key(0, number)
        replaced = [piece for piece in state.live if piece.merged or piece.size]
        holding = [piece.start for piece in [*replaced, *state.unburied] if not piece.merged]
        token = secrets.token_hex(8)  # tells this replace's own objects from another writer's
        owner = {"yoink-writer": writer, "yoink-batch": str(state.landed), "yoink-claim": token}
        metadata = {**owner, "yoink-base": str(number), "yoink-retired": str(min(holding, default=number))}
        try:
            response = await self._client.call(
                "put_object", Key=claim_key, Body=b"", Metadata=owner, IfNoneMatch="*"
            )
            etag = str(response["ETag"])
        except Conflict:
            head = await self._head_metadata(claim_key)
            if head is None or head[0].get("yoink-claim") != token:
                raise self._compaction_refused(
                    f"segment {number}, the one it claims, is another writer's"
                ) from None
            etag = head[2]  # this claim's, whose reply was lost
        except StorageError as exc:  # every reply lost: did it land?
            head = await self._went_through(claim_key, token, exc, f"its claim of segment {number}")
            if head is None:
                raise
            etag = head[2]
        state.live.append(Segment(claim_key, number, number, 0, etag, batch=state.landed))
        self._claimed = (number, token)

        async def snapshot(data: AsyncIterator[bytes]) -> None:
            try:
                etag, size = await self._put_snapshot(key, data, metadata, number, token)
            finally:
                self._claimed = None  # the claim is over: a snapshot, or a segment without records
            # The swap, in this writer's view: the snapshot, then what was uploaded after the claim
            # (a merge under way, of segments after the claim, ends first: it changes the view too).
            async with self._changing:
                state.hidden += [piece for piece in replaced if piece.merged]
                state.unburied += [piece for piece in replaced if not piece.merged]
                after = [piece for piece in state.live if piece.start > number]
                state.live = [Segment(key, 0, number, size, etag, merged=True), *after]
                state.keep_until = time.monotonic() + self._keep_replaced
                await self._tidy(state)  # at once if keep_replaced is 0, else at a flush once it has passed

        return snapshot

    async def _put_snapshot(
        self, key: str, data: AsyncIterator[bytes], metadata: dict[str, str], number: int, token: str
    ) -> tuple[str, int]:
        """Write the snapshot of claim ``number``; return its ETag and size."""
        try:
            etag, size, _ = await self._put_stream(key, data, metadata, {"IfNoneMatch": "*"})
        except Conflict:
            head = await self._head_metadata(key)
            if head is not None and VOID in head[0]:
                raise self._compaction_refused(
                    f"it wrote after segment {number}, which this compaction had claimed, and so "
                    "ruled its snapshot out"
                ) from None
            if head is None or head[0].get("yoink-claim") != token:
                raise self._compaction_refused(
                    f"it wrote after segment {number}, which this compaction claimed, and merged it"
                ) from None
            etag, size = head[2], head[1]  # this snapshot's, whose reply was lost
        except StorageError as exc:  # every reply lost, or the text failed: did it land?
            landed = await self._went_through(key, token, exc, f"its snapshot {key}")
            if landed is None:
                raise
            etag, size = landed[2], landed[1]
        return etag, size

    async def _went_through(
        self, key: str, token: str, error: StorageError, what: str
    ) -> tuple[dict[str, str], int, str] | None:
        """After a request of compaction ``token`` failed with ``error``: the head of ``key`` if the
        request went through all the same, None if it did not. If S3 cannot say, this writer can no
        longer tell what the journal is: it uploads nothing more (see :meth:`_check_known`)."""
        try:
            head = await self._head_metadata(key)
        except StorageError:
            self._unknown = f"it could not learn whether {what} went through ({error})"
            raise StorageError(
                f"{self._uri}: {self._unknown}; the journal is the old one, or the new one and what "
                "was uploaded after its claim, and a new writer's replay shows which"
            ) from error
        return head if head is not None and head[0].get("yoink-claim") == token else None

    def _check_known(self, batches: list[Batch]) -> None:
        if self._unknown is not None:
            raise StorageError(
                f"{self._uri}: this writer uploads nothing more: {self._unknown}. The "
                f"{sum(b.size for b in batches)} bytes not uploaded stay staged in {self._stage.directory}, "
                "and a new storage for this URI uploads them after what the journal holds"
            )

    async def _rule_out_claims(self, state: Segments, refused: Callable[[str], Exception]) -> None:
        """Rule out the snapshot of each claim this writer listed and is to write after (a segment,
        or a claim of its own): a compaction paused between its claim and its snapshot (a writer
        taken over) or dead there must never swap its snapshot in under this writer's segments. A
        snapshot already there was written after this writer read the journal: ``refused(what)``
        is raised."""
        for number in state.claims:
            if self._claimed is not None and number == self._claimed[0]:
                head = await self._head_metadata(self._segment_key(number))
                if head is not None and head[0].get("yoink-claim") == self._claimed[1]:
                    continue  # this writer's own compaction, under way: its snapshot is to come
            key = self._merged_key(0, number)
            try:
                metadata = {VOID: str(number), "yoink-writer": self._stage.writer}
                await self._client.call("put_object", Key=key, Body=b"", Metadata=metadata, IfNoneMatch="*")
            except Conflict:
                if not await self._is_void(key):
                    raise refused(f"it compacted the journal, to segment {number}") from None
        state.claims.clear()

    def _compaction_refused(self, what: str) -> ConcurrentWriterError:
        return ConcurrentWriterError(
            f"{self._uri} was changed by another writer ({what}) while this one compacted it; yoink "
            "allows one writer at a time. The compaction was not applied: the journal is as the other "
            "writer left it"
        )

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

    async def _merge_if_due(self, state: Segments) -> None:
        await self._tidy(state)
        # A run of small segments, after the last big one. Only its first may be over S3's part
        # minimum: that one is copied inside S3, the rest (each under it) are downloaded and
        # uploaded again, so a merge moves a bounded amount however long the journal.
        start = 0
        for index, segment in enumerate(state.live[:-1]):
            if segment.size >= self._merge_target:
                start = index + 1
            elif segment.size >= self._min_part_size:
                start = index
        if self._claimed is not None:  # a compaction's snapshot is to replace segments 0 to its claim
            claimed = self._claimed[0]
            start = max([start, *(i + 1 for i, piece in enumerate(state.live) if piece.start <= claimed)])
        run = state.live[start:-1]  # the newest segment stays
        if len(run) < self._merge_after:
            return
        key = self._merged_key(run[0].start, run[-1].end)
        copy = run[:1] if run[0].size >= self._min_part_size else []
        rest = run[len(copy) :]
        after_merged = [segment for segment in run if segment.merged][-1:]
        first = after_merged[0].end + 1 if after_merged else run[0].start
        metadata = {"yoink-from": str(first)}  # the segments it empties: where to look after a crash
        if run[0].merged and run[0].start == 0:  # a snapshot's base goes on in the merge that holds it
            head = await self._head_metadata(run[0].key)
            metadata |= {k: v for k, v in (head[0] if head else {}).items() if k in _BASE_METADATA}
        try:
            size = sum(segment.size for segment in rest)
            body = self._objects_chunks(rest)
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
        state.live[start:-1] = [Segment(key, run[0].start, run[-1].end, sum(s.size for s in run), etag, True)]
        try:
            await self._bury([segment for segment in run if not segment.merged], key)
            await self._delete([segment for segment in run if segment.merged])
        except StorageError as exc:
            logger.warning(
                "%s: could not clear what %s holds; the next writer clears it: %s", self._uri, key, exc
            )

    async def _tidy(self, state: Segments) -> None:
        """Clear what an interrupted merge left, or a compaction replaced: merged objects a bigger
        one holds, and segments a merged object holds that still hold their data. What a
        compaction replaced stays until ``keep_replaced`` has passed, for readers under way."""
        if time.monotonic() < state.keep_until:
            return
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

    async def _bury(self, segments: Sequence[Segment], into: str) -> None:
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

    async def _delete(self, segments: Sequence[Segment]) -> None:
        for first in range(0, len(segments), 1000):
            objects = [{"Key": segment.key} for segment in segments[first : first + 1000]]
            await self._client.call("delete_objects", Delete={"Objects": objects, "Quiet": True})

    async def _objects_chunks(self, segments: Sequence[Segment]) -> AsyncIterator[bytes]:
        for segment in segments:
            response = await self._client.call(
                "get_object", Key=segment.key, IfMatch=segment.etag, **segment.byte_range()
            )
            async for chunk in self._body_chunks(response):
                yield chunk

    # -- reading --------------------------------------------------------------------------------

    async def _check_base(self, piece: Segment, base: str) -> None:
        """Raise StorageError if ``piece``, an object from segment 0 that a reader found when it
        listed again, is not the journal it began to read but a compaction's (or a merge of one);
        raise Conflict if it is gone or changed since that listing."""
        head = await self._head_metadata(piece.key)
        if head is None or head[2] != piece.etag:
            raise Conflict
        if head[0].get("yoink-base", "") != base:
            raise StorageError(
                f"{self._uri} was compacted while it was being read, and the objects the read had "
                "listed are gone (a writer deletes them keep_replaced seconds after a compaction); "
                "what was yielded is the start of the journal as it was before. Read again"
            )

    async def _read_segments(self, listed: list[Segment]) -> AsyncGenerator[str, None]:
        """Read the segments of ``listed`` (pieces holding segments 0 to the last, in order).

        A merge may empty or delete a piece before it is read (If-Match refuses it). The reader
        then lists again and goes on from the first segment it has not yielded, in the object that
        holds it now, skipping the bytes of the segments before it: nothing twice, nothing skipped,
        and nothing after the last segment of ``listed``.
        """
        if not listed:
            return
        starts: dict[int, int] = {}  # segment number -> bytes of ``listed`` before it
        ends: dict[int, int] = {}  # segment number -> bytes of ``listed`` through it

        def measure(pieces: list[Segment]) -> int:
            """Learn the sizes of ``pieces``, the journal to read; return its last segment."""
            starts.clear()
            ends.clear()
            total = 0
            for listed_piece in pieces:
                starts[listed_piece.start] = total
                total += listed_piece.size
                ends[listed_piece.end] = total
            return pieces[-1].end

        last = measure(listed)

        async def size_of(first: int, through: int) -> int:
            if first > through:
                return 0
            if first in starts and through in ends:
                return ends[through] - starts[first]
            return await self._segments_size(first, through)

        pieces, done, refused = listed, -1, 0
        base: str | None = None  # the snapshot under the journal as listed ("" if none)
        while done < last:
            piece = next((p for p in pieces if p.start <= done + 1 <= p.end), None)
            if piece is None:
                raise StorageError(f"{self._uri}: no object holds segment {done + 1}; read again")
            through = min(piece.end, last)
            try:
                if piece.start == 0 and base is not None and piece not in listed:
                    await self._check_base(piece, base)  # a merge from 0 that came since: of this journal?
                skip = await size_of(piece.start, done)
                length = await size_of(done + 1, through)
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
                if done < 0 and pieces:  # nothing yielded yet: read the journal as it is now
                    listed, last = pieces, measure(pieces)
                continue
            refused = 0
            if base is None:  # the first piece, from segment 0: the only kind that may be a snapshot
                base = response.get("Metadata", {}).get("yoink-base", "")
            async for block in self._stream(response):
                yield block
            done = through
