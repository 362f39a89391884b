"""The segments of layout="segments", as a listing finds them: through merges, overlaps and crashes.

A reader lists ``merged/``, then the segments after the last merged one; a writer also finds what
an interrupted merge left to clear, what a compaction replaced (kept ``keep_replaced`` seconds for
readers under way), and the last of its own batches in S3.

A compaction's snapshot is a merged object from segment 0, ``merged/000000000000-<n>.jsonl``, that
holds the new journal instead of segments 0 to n; its metadata says so (``yoink-base: n``). Segment
n is claimed first (an empty object, ``yoink-claim``): until the snapshot exists, the claim is a
segment without records; once it does, everything up to n is the snapshot's. The segments after n
(the compacting writer's flushes meanwhile) are read after the old journal, then after the
snapshot, unchanged. A writer that writes
after a claim whose snapshot does not exist rules the snapshot out first, by writing an empty
``merged/000000000000-<n>.jsonl`` (``yoink-void``) in its place: the compaction, paused there or
dead, can then never swap its snapshot in under that writer's records. Readers pass it over.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

from yoink._exceptions import StorageError
from yoink.storage._s3_client import Missing, S3Client
from yoink.storage._s3_layout import ATTEMPTS, REMEMBERED_WRITERS, Layout, Segment
from yoink.storage._stage import Stage

if TYPE_CHECKING:
    from yoink.storage._s3_layout import S3Options

__all__ = ["VOID", "ListingChanged", "SegmentListing", "Segments"]

_SEGMENT = re.compile(r"(\d{12})\.jsonl")  # under <prefix>/segments/
_MERGED = re.compile(r"(\d{12})-(\d{12})\.jsonl")  # under <prefix>/merged/
VOID = "yoink-void"  # the metadata of an empty merged/0-n: claim n's snapshot, ruled out


@dataclass
class Segments:
    """What this writer knows of the segments."""

    live: list[Segment]
    hidden: list[Segment] = field(default_factory=list)  # merged objects a bigger one covers
    unburied: list[Segment] = field(default_factory=list)  # merged segments a crash left holding data
    landed: int = 0  # the last of this writer's batches that a segment holds
    keep_until: float = 0.0  # time.monotonic() before which hidden and unburied stay: a snapshot's
    claims: list[int] = field(default_factory=list)  # pending claims: compactions under way, or dead

    @property
    def next(self) -> int:
        return self.live[-1].end + 1 if self.live else 0


class ListingChanged(Exception):
    """A merge ran while the segments were being listed: list them again."""


class SegmentListing(Layout):
    """A layout of segments, up to what it finds in a listing; :class:`SegmentsLayout` goes on."""

    def __init__(
        self, client: S3Client, stage: Stage, *, uri: str, key: str, options: S3Options, min_part_size: int
    ) -> None:
        super().__init__(client, stage, uri=uri, key=key, options=options, min_part_size=min_part_size)
        self._view: Segments | None = None  # this writer's view of the segments, from its first look
        self._keep_replaced = options.keep_replaced

    def _segment_key(self, number: int) -> str:
        return f"{self._key}/segments/{number:012d}.jsonl"

    def _merged_key(self, start: int, end: int) -> str:
        return f"{self._key}/merged/{start:012d}-{end:012d}.jsonl"

    async def _list_segments(self, writer: str | None, *, remember: bool = True) -> Segments:
        """List the live segments, and find the last batch of ``writer`` that they hold."""
        for _ in range(ATTEMPTS):
            try:
                state = await self._try_listing(tidy=writer is not None)
                break
            except ListingChanged:
                continue
        else:
            raise StorageError(
                f"{self._uri}: another writer kept merging segments while they were listed; try again"
            )
        if writer:
            state.landed = await self._landed(writer, state)
        if self._view is None and remember:
            self._view = state
        return state

    async def _listing(self) -> Segments:
        """The live segments, listed again (a reader's, after a merge took what it was to read)."""
        for _ in range(ATTEMPTS):
            with contextlib.suppress(ListingChanged):
                return await self._try_listing(tidy=False)
        raise StorageError(
            f"{self._uri}: another writer kept merging segments while they were listed; read again"
        )

    async def _landed(self, writer: str, state: Segments) -> int:
        """The last of ``writer``'s batches in S3: the stage names the segment of its last upload,
        and that key keeps its writer and batch even once a merge has emptied it."""
        intent = self._stage.read_intent()
        if intent is None:  # a stage of a yoink before these records: look in the last segments
            return await self._landed_in(writer, state)
        number = intent.get("s3_segment")
        if intent.get("writer") != writer or not isinstance(number, int):
            return 0  # this writer has not uploaded yet
        if number >= state.next:  # uploaded after this listing (a flush beside a read): not in it
            return await self._landed_in(writer, state)
        head = await self._head_metadata(self._segment_key(number))
        if head is None or head[0].get("yoink-writer") != writer:
            return 0  # the upload did not land
        return int(head[0]["yoink-batch"])

    async def _landed_in(self, writer: str, state: Segments) -> int:
        """The last of ``writer``'s batches among the last segments that ``state`` lists."""
        for segment in reversed(state.live[-REMEMBERED_WRITERS:]):
            head = None if segment.merged else await self._head_metadata(segment.key)
            if head and head[0].get("yoink-writer") == writer:
                return int(head[0]["yoink-batch"])
        return 0

    async def _try_listing(self, *, tidy: bool) -> Segments:
        """One listing: merged objects first, then the segments after them (not the emptied ones
        before). With ``tidy``, also find what an interrupted merge left for the next to clear."""
        state = Segments([])
        merged = []
        for name, size, etag in await self._list(f"{self._key}/merged/"):
            if match := _MERGED.fullmatch(name):
                key = f"{self._key}/merged/{name}"
                if not size and await self._is_void(key):
                    continue  # a claim's snapshot that a writer taking over ruled out: no journal
                merged.append(Segment(key, int(match[1]), int(match[2]), size, etag, merged=True))
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
        base = None
        if tidy and state.live:
            head = None
            if state.live[-1].merged:
                head = await self._head_metadata(state.live[-1].key)
                first = int(head[0].get("yoink-from", after + 1)) if head else after + 1
                after = min(after, first - 1)  # the newest merge's segments: emptied, unless it was cut short
            if state.live[0].merged and state.live[0].start == 0:
                if state.live[0] is not state.live[-1]:
                    head = await self._head_metadata(state.live[0].key)
                if head and head[0].get("yoink-base", "").isdigit():
                    base = int(head[0]["yoink-base"])  # a snapshot: what it replaced may still hold data
                    retired = head[0].get("yoink-retired", "")
                    after = min(after, (int(retired) if retired.isdigit() else 0) - 1)
        start_after = {"StartAfter": self._segment_key(after)} if after >= 0 else {}
        for name, size, etag in await self._list(f"{self._key}/segments/", **start_after):
            if not (match := _SEGMENT.fullmatch(name)):
                continue
            number = int(match[1])
            segment = Segment(f"{self._key}/segments/{name}", number, number, size, etag)
            if number <= covered:
                if size:
                    state.unburied.append(segment)
            elif not size and not await self._pending_claim(number):
                raise ListingChanged  # emptied by a merge that the merged listing did not show
            else:
                state.live.append(segment)
                if not size:
                    state.claims.append(number)
        if base is not None and (state.hidden or state.unburied):
            state.keep_until = await self._keep_until(base)
        return state

    async def _pending_claim(self, number: int) -> bool:
        """Whether empty segment ``number`` is a compaction's claim whose snapshot does not exist
        (not yet, or never: a compaction that failed or crashed, or was ruled out), so a segment
        without records."""
        head = await self._head_metadata(self._segment_key(number))
        if head is None or head[1] or "yoink-claim" not in head[0] or "yoink-merged-into" in head[0]:
            return False
        snapshot = await self._head_metadata(self._merged_key(0, number))
        return snapshot is None or (not snapshot[1] and VOID in snapshot[0])

    async def _is_void(self, key: str) -> bool:
        head = await self._head_metadata(key)
        return head is not None and not head[1] and VOID in head[0]

    async def _keep_until(self, base: int) -> float:
        """When what the snapshot claimed as segment ``base`` replaced may go: ``keep_replaced``
        seconds after the claim, which came just before the snapshot, by S3's clock."""
        try:
            response = await self._client.call("head_object", Key=self._segment_key(base))
        except Missing:
            return 0.0
        date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = parsedate_to_datetime(date) if date else datetime.now(timezone.utc)
        made: datetime = response["LastModified"]
        age = (now - made).total_seconds()
        return time.monotonic() + max(0.0, self._keep_replaced - age)

    async def _after_overlap(self, segment: Segment, before: Segment) -> Segment:
        """The part of merged ``segment`` after ``before``, the merged object that overlaps it.

        Both hold the same bytes for the segments they share, so the overlap is skipped by size:
        each segment's own (an emptied one keeps it in its metadata)."""
        skip = await self._segments_size(segment.start, before.end, overlap=(before, segment))
        return replace(segment, start=before.end + 1, offset=segment.offset + skip, size=segment.size - skip)

    async def _segments_size(
        self, first: int, last: int, *, overlap: tuple[Segment, Segment] | None = None
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

    async def _segment(self, number: int) -> Segment:
        key = self._segment_key(number)
        head = await self._head_metadata(key)
        if head is None:
            raise StorageError(
                f"{self._uri}: segment {key} is missing; something other than yoink deleted it"
            )
        if not head[1] and not await self._pending_claim(number):
            raise ListingChanged
        return Segment(key, number, number, head[1], head[2])

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
