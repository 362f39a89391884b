"""S3Storage.replace() (compaction) over HTTP against moto: both layouts, a writer on another
machine, readers under way, uploads that fail part-way, and crashes between the steps.

The contract's replace() promises run against S3 in test_storage_contract.py.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from tests.servers.proxy import Fault, Proxy
from tests.servers.s3 import MotoServer
from tests.test_s3 import _Crash, crash_after_the_upload, numbers, records, s3_client, sizes
from yoink import ConcurrentWriterError, StorageError
from yoink.storage import S3Storage

LAYOUTS = ["object", "segments"]

OpenS3 = Callable[..., S3Storage]


@pytest.fixture
def open_s3(bucket: str, moto: MotoServer, tmp_path: Path) -> OpenS3:
    """S3Storage on this test's bucket, on "machine" ``stage`` (its own stage directory)."""

    def open_(layout: str, stage: str = "a", **options: Any) -> S3Storage:
        options.setdefault("endpoint_url", moto.url)
        key = "run.jsonl" if layout == "object" else "run"
        return S3Storage(f"s3://{bucket}/{key}", layout=layout, stage_dir=tmp_path / stage, **options)  # type: ignore[arg-type]

    return open_


async def snapshot(
    first: int, count: int, pad: int = 0, during: Callable[[], Awaitable[None]] | None = None
) -> AsyncIterator[str]:
    """``records(first, count, pad)`` in two chunks, as replace() takes it; ``during`` runs between."""
    yield records(first, count // 2, pad)
    if during is not None:
        await during()
    yield records(first + count // 2, count - count // 2, pad)


def uploads_left(moto: MotoServer, bucket: str) -> list[str]:
    listing = s3_client(moto).list_multipart_uploads(Bucket=bucket)  # type: ignore[attr-defined]
    return [upload["Key"] for upload in listing.get("Uploads", [])]


def parsed(blocks: list[str]) -> list[int]:
    text = "".join(block if block.endswith("\n") else block + "\n" for block in blocks)
    return [orjson.loads(line)["n"] for line in text.splitlines()]


async def died(storage: S3Storage) -> None:
    """Let ``storage`` go as a killed process would: its stage is released, nothing is uploaded."""
    storage._closed = True
    await storage._stage.close()
    await storage._release()


# -- what a compaction leaves ------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_the_managers_compaction_by_key_is_what_a_restart_on_another_machine_replays(
    bucket: str, moto: MotoServer, tmp_path: Path, layout: str
) -> None:
    from yoink import CheckpointManager

    uri = f"s3://{bucket}/crawl?layout={layout}&merge_after=4"
    options = {"endpoint_url": moto.url, "flush_interval": None}
    async with CheckpointManager.from_uri(uri, stage_dir=tmp_path / "a", **options) as checkpoint:
        for n in range(300):
            await checkpoint.append({"url": f"u{n % 7}", "n": n})
            if n % 50 == 49:
                await checkpoint.flush()
        await checkpoint.compact(key="url")
        await checkpoint.append({"url": "u0", "n": 300})
    async with CheckpointManager.from_uri(uri, stage_dir=tmp_path / "b", **options) as restarted:
        replayed = [record["n"] async for record in restarted.replay()]
    assert replayed == [*range(293, 300), 300]  # the last record of each of the 7 urls, then the new one


@pytest.mark.parametrize("size", ["one request", "multipart"])
@pytest.mark.parametrize("layout", LAYOUTS)
async def test_a_compaction_replaces_the_journal_and_later_appends_follow_it_for_every_reader(
    open_s3: OpenS3, moto: MotoServer, bucket: str, small_parts: int, layout: str, size: str
) -> None:
    pad = 2000 if size == "multipart" else 0  # 600 records of 2 KB: three parts of 256 KiB and more
    async with open_s3(layout, merge_after=4, part_size=small_parts) as writer:
        for n in range(0, 60, 10):  # six flushes: the segments are merged on the way
            await writer.write(records(n, 10))
            await writer.flush()
        await writer.replace(snapshot(1000, 600, pad))
        assert await numbers(writer) == list(range(1000, 1600))
        await writer.write(records(60, 1))
    async with open_s3(layout, "reader") as reader:
        assert await numbers(reader) == [*range(1000, 1600), 60]
    assert uploads_left(moto, bucket) == []
    if layout == "object":  # still one plain JSONL object
        body = s3_client(moto).get_object(Bucket=bucket, Key="run.jsonl")["Body"].read()  # type: ignore[attr-defined]
        assert body.decode() == records(1000, 600, pad) + records(60, 1)
    else:  # the snapshot is a merge from segment 0 through the claimed segment 6
        assert "run/merged/000000000000-000000000006.jsonl" in sizes(moto, bucket)


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_multipart_uploads_an_interrupted_writer_left_are_aborted_by_a_compaction(
    open_s3: OpenS3, moto: MotoServer, bucket: str, layout: str
) -> None:
    key = "run.jsonl" if layout == "object" else "run/merged/000000000000-000000000001.jsonl"
    s3_client(moto).create_multipart_upload(Bucket=bucket, Key=key)  # type: ignore[attr-defined]
    for elsewhere in ("elsewhere.jsonl", "run/deeper.jsonl", "run.jsonl.torn"):  # other journals' keys
        s3_client(moto).create_multipart_upload(Bucket=bucket, Key=elsewhere)  # type: ignore[attr-defined]
    async with open_s3(layout) as writer:
        await writer.write(records(0, 3))
        await writer.flush()
        assert sorted(uploads_left(moto, bucket)) == sorted(
            [key, "elsewhere.jsonl", "run/deeper.jsonl", "run.jsonl.torn"]
        )
        await writer.replace(snapshot(10, 2))
    assert sorted(uploads_left(moto, bucket)) == ["elsewhere.jsonl", "run.jsonl.torn", "run/deeper.jsonl"]


# -- another writer ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["one request", "multipart"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.usefixtures("completes_are_conditional")
async def test_a_writer_on_another_machine_that_flushes_during_a_compaction_is_detected_and_nothing_is_lost(
    open_s3: OpenS3, small_parts: int, layout: str, size: str
) -> None:
    compactor = open_s3(layout, "a", part_size=small_parts)
    await compactor.write(records(0, 5))
    await compactor.flush()
    other = open_s3(layout, "b")

    async def other_writes() -> None:  # it looked at the journal only now, so it cannot tell
        await other.write(records(100, 1))
        await other.flush()

    pad = 2000 if size == "multipart" else 0
    with pytest.raises(ConcurrentWriterError, match="compaction was not applied"):
        await compactor.replace(snapshot(1000, 600, pad, during=other_writes))
    await other.close()
    async with open_s3(layout, "reader") as reader:
        assert await numbers(reader) == [0, 1, 2, 3, 4, 100]  # the other writer's record, not overwritten
    await compactor.write(records(5, 1))
    with pytest.raises(ConcurrentWriterError):  # and it stays refused: its view is behind
        await compactor.flush()
    with pytest.raises(ConcurrentWriterError):
        await compactor.close()
    async with open_s3(layout, "a") as recovered:  # its refused record waited in its stage
        await recovered.flush()
    async with open_s3(layout, "reader") as reader:
        assert await numbers(reader) == [0, 1, 2, 3, 4, 100, 5]


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_a_compactor_already_behind_another_writer_is_refused_before_it_uploads_anything(
    open_s3: OpenS3, layout: str
) -> None:
    compactor = open_s3(layout, "a")
    await compactor.write(records(0, 2))
    await compactor.flush()
    async with open_s3(layout, "b") as other:
        assert await numbers(other) == [0, 1]
        await other.write(records(100, 1))
    taken: list[str] = []

    async def watched() -> AsyncIterator[str]:
        taken.append("the snapshot was read")
        yield records(10, 1)

    with pytest.raises(ConcurrentWriterError, match="compaction was not applied"):
        await compactor.replace(watched())
    assert taken == []
    await died(compactor)  # nothing of its own is staged: closing it would only be refused again
    async with open_s3(layout, "reader") as reader:
        assert await numbers(reader) == [0, 1, 100]


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_a_compaction_whose_reply_was_lost_is_recognised_as_its_own(
    open_s3: OpenS3, proxy: Proxy, layout: str
) -> None:
    target = "/run.jsonl" if layout == "object" else "/run/merged/"
    async with open_s3(layout, endpoint_url=proxy.url) as writer:
        await writer.write(records(0, 3))
        await writer.flush()
        proxy.faults.append(
            Fault(
                500,
                "InternalError",
                after=True,
                match=lambda method, path: method == "PUT" and target in path,
            )
        )
        await writer.replace(snapshot(10, 4))  # S3 applied it; the retry finds it changed: by this writer
        assert proxy.faults[0].times == 0, "the fault was not used"
        await writer.write(records(3, 1))
    async with open_s3(layout, "reader") as reader:
        assert await numbers(reader) == [10, 11, 12, 13, 3]


# -- readers under way -------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_a_reader_on_another_machine_in_the_middle_of_a_compaction_reads_the_old_journal_whole(
    open_s3: OpenS3, layout: str
) -> None:
    old = list(range(800))
    async with open_s3(layout) as writer:
        for n in range(0, 800, 100):  # eight segments
            await writer.write(records(n, 100, pad=300))
            await writer.flush()
        reader = open_s3(layout, "reader")
        blocks = reader.read()
        got = [await anext(blocks)]
        await writer.replace(snapshot(1000, 10))
        await writer.write(records(2000, 1))
        await writer.flush()
        got += [block async for block in blocks]
        await reader.close()
        assert parsed(got) == old, "promise broken: a read under way yields the old journal whole"
    async with open_s3(layout, "reader") as again:
        assert await numbers(again) == [*range(1000, 1010), 2000]


async def test_a_reader_slower_than_keep_replaced_is_told_to_read_again_and_never_sees_a_mix(
    open_s3: OpenS3,
) -> None:
    async with open_s3("segments", keep_replaced=0) as writer:
        for n in range(0, 400, 100):
            await writer.write(records(n, 100, pad=300))
            await writer.flush()
        reader = open_s3("segments", "reader")
        blocks = reader.read()
        got = [await anext(blocks)]
        await writer.replace(snapshot(1000, 10))  # keep_replaced=0: the old segments are emptied at once
        with pytest.raises(StorageError, match="compacted while it was being read.*Read again"):
            async for block in blocks:
                got.append(block)
        await reader.close()
    assert parsed(got) == list(range(len(parsed(got)))), "what was yielded is the old journal's start"
    async with open_s3("segments", "reader") as again:
        assert await numbers(again) == list(range(1000, 1010))


@pytest.mark.parametrize("then", ["it goes on", "it dies"])
async def test_between_the_claim_and_the_snapshot_readers_see_the_old_journal_and_a_crash_there_leaves_it(
    open_s3: OpenS3, monkeypatch: pytest.MonkeyPatch, then: str
) -> None:
    compactor = open_s3("segments")
    for n in range(3):
        await compactor.write(records(n, 1))
        await compactor.flush()
    seen: list[list[int]] = []
    call = compactor._client.call

    async def snapshot_put(operation: str, **params: Any) -> Any:
        if "/merged/" in params.get("Key", "") and operation == "put_object":
            async with open_s3("segments", "reader") as reader:  # segment 3 is claimed: an empty object
                seen.append(await numbers(reader))
            if then == "it dies":
                raise _Crash
        return await call(operation, **params)

    monkeypatch.setattr(compactor._client, "call", snapshot_put)
    if then == "it dies":
        with pytest.raises(_Crash):
            await compactor.replace(snapshot(10, 2))
        await died(compactor)
    else:
        await compactor.replace(snapshot(10, 2))
        await compactor.close()
    assert seen == [[0, 1, 2]]
    expected = [0, 1, 2] if then == "it dies" else [10, 11]
    async with open_s3("segments", "b") as next_writer:  # a writer elsewhere, after the crash
        assert await numbers(next_writer) == expected
        await next_writer.write(records(50, 1))
        await next_writer.flush()  # segment 4, after the claim
        assert await numbers(next_writer) == [*expected, 50]
        await next_writer.replace(snapshot(20, 2))  # and a compaction goes over the dead claim
    async with open_s3("segments", "reader") as reader:
        assert await numbers(reader) == [20, 21]


@pytest.mark.parametrize("first", ["the other writer writes", "the paused compaction goes on"])
async def test_a_compaction_paused_after_its_claim_never_swaps_its_snapshot_in_under_a_writer_that_took_over(
    open_s3: OpenS3, monkeypatch: pytest.MonkeyPatch, first: str
) -> None:
    """Attack B2: a writer paused between its claim and its snapshot (a GC pause, a frozen VM) while
    a writer on another machine opens, reads the journal and writes after the claim. Whichever
    goes on first, one of them is refused and the journal is never the paused snapshot with the
    other's records after it (a prefix the other never read)."""
    compactor = open_s3("segments", "a")
    for n in range(3):
        await compactor.write(records(n, 1))
        await compactor.flush()
    other = open_s3("segments", "b")
    call = compactor._client.call

    async def paused_snapshot(operation: str, **params: Any) -> Any:
        if "/merged/" in params.get("Key", "") and operation == "put_object":  # claim 3 is taken
            assert await numbers(other) == [0, 1, 2]  # the other writer reads the journal now
            await other.write(records(50, 1))
            if first == "the other writer writes":
                await other.flush()  # segment 4, after the claim: the claim's snapshot is ruled out
        return await call(operation, **params)

    monkeypatch.setattr(compactor._client, "call", paused_snapshot)
    if first == "the other writer writes":
        with pytest.raises(ConcurrentWriterError, match="ruled its snapshot out"):
            await compactor.replace(snapshot(10, 2))
        await died(compactor)
        await other.close()
        expected = [0, 1, 2, 50]
    else:
        await compactor.replace(snapshot(10, 2))  # before the other writer's first upload
        await compactor.close()
        with pytest.raises(ConcurrentWriterError, match="it compacted the journal, to segment 3"):
            await other.flush()  # it read the journal the snapshot replaced
        await died(other)
        expected = [10, 11]
    async with open_s3("segments", "reader") as reader:
        assert await numbers(reader) == expected
    async with open_s3("segments", "c") as writer:  # and the journal goes on
        await writer.write(records(60, 1))
    async with open_s3("segments", "reader") as reader:
        assert await numbers(reader) == [*expected, 60]


# -- writes during a compaction (segments) ------------------------------------------------------


class PausedSnapshot:
    """Holds a storage's snapshot upload (the PutObject of ``merged/000000000000-<n>``) until
    ``go`` is set: a compaction under way, its claim made. ``fault``, if set, is raised then.
    Once ``go`` is set, later snapshots pass."""

    def __init__(self, storage: S3Storage, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reached, self.go = anyio.Event(), anyio.Event()
        self.fault: Exception | None = None
        call = storage._client.call

        async def paused(operation: str, **params: Any) -> Any:
            metadata = params.get("Metadata", {})
            if operation == "put_object" and "yoink-base" in metadata and not self.go.is_set():
                self.reached.set()
                with anyio.fail_after(20):  # a test that fails before go must not hang its close()
                    await self.go.wait()
                if self.fault is not None:
                    raise self.fault
            return await call(operation, **params)

        monkeypatch.setattr(storage._client, "call", paused)


async def replayed(storage: S3Storage) -> list[Any]:
    """The ``n`` of each record a reader replays from ``storage`` (which it closes)."""
    from yoink import CheckpointManager

    async with CheckpointManager(storage, read_only=True) as reader:
        return [record["n"] async for record in reader.replay()]


async def test_a_flush_during_a_compaction_returns_at_once_and_its_records_follow_the_snapshot(
    open_s3: OpenS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    from yoink import CheckpointManager

    storage = open_s3("segments")
    paused = PausedSnapshot(storage, monkeypatch)
    async with CheckpointManager(storage, flush_interval=None) as checkpoint:
        for n in range(30):
            await checkpoint.append({"k": n % 5, "n": n})
        await checkpoint.flush()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(functools.partial(checkpoint.compact, key="k"))
            with anyio.fail_after(10):
                await paused.reached.wait()  # segment 1 is claimed; the snapshot waits
            for n in range(30, 35):
                await checkpoint.append({"k": "during", "n": n})
            with anyio.fail_after(5):
                await checkpoint.flush()  # at once, while the snapshot is not there yet
            # until the snapshot is there, the journal is the old one and what followed it
            assert await replayed(open_s3("segments", "reader")) == list(range(35))
            paused.go.set()
        await checkpoint.append({"k": "after", "n": 35})
    assert await replayed(open_s3("segments", "reader")) == [*range(25, 30), *range(30, 36)]


async def test_a_writer_elsewhere_that_takes_over_during_a_compaction_makes_it_fail_and_nothing_is_lost(
    open_s3: OpenS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    from yoink import CheckpointManager

    storage = open_s3("segments", "a")
    paused = PausedSnapshot(storage, monkeypatch)
    checkpoint = CheckpointManager(storage, flush_interval=None)
    for n in range(30):
        await checkpoint.append({"k": n % 5, "n": n})
    await checkpoint.flush()

    async def compact() -> None:
        with pytest.raises(ConcurrentWriterError, match="ruled its snapshot out"):
            await checkpoint.compact(key="k")

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(compact)
        with anyio.fail_after(10):
            await paused.reached.wait()
        for n in range(30, 35):
            await checkpoint.append({"k": "during", "n": n})
        with anyio.fail_after(5):
            await checkpoint.flush()  # segment 2, after the claim
        async with CheckpointManager(open_s3("segments", "b"), flush_interval=None) as other:
            assert [record["n"] async for record in other.replay()] == list(range(35))
            await other.append({"k": "other", "n": 100})
            await other.flush()  # rules the claim's snapshot out, then writes segment 3
        paused.go.set()  # the paused compaction goes on: its snapshot is refused
    assert await replayed(open_s3("segments", "reader")) == [*range(35), 100]
    await checkpoint.append({"k": "late", "n": 35})
    with pytest.raises(ConcurrentWriterError):  # its view is behind the other writer's segment
        await checkpoint.flush()
    with pytest.raises(ConcurrentWriterError):
        await checkpoint.close()
    async with open_s3("segments", "a") as recovered:  # its refused record waited in its stage
        await recovered.flush()
    assert await replayed(open_s3("segments", "reader")) == [*range(35), 100, 35]


async def test_a_compaction_that_fails_after_flushes_went_on_keeps_them_and_the_next_one_works(
    open_s3: OpenS3, monkeypatch: pytest.MonkeyPatch, moto: MotoServer, bucket: str
) -> None:
    from yoink import CheckpointManager

    storage = open_s3("segments")
    paused = PausedSnapshot(storage, monkeypatch)
    paused.fault = StorageError("the snapshot's upload failed")
    async with CheckpointManager(storage, flush_interval=None) as checkpoint:
        for n in range(30):
            await checkpoint.append({"k": n % 5, "n": n})
        await checkpoint.flush()

        async def compact() -> None:
            with pytest.raises(StorageError, match="the snapshot's upload failed"):
                await checkpoint.compact(key="k")

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(compact)
            with anyio.fail_after(10):
                await paused.reached.wait()
            for n in range(30, 35):
                await checkpoint.append({"k": "during", "n": n})
            with anyio.fail_after(5):
                await checkpoint.flush()
            paused.go.set()
        # the claim stays, a segment without records: what was flushed after it follows the old journal
        assert sizes(moto, bucket)["run/segments/000000000001.jsonl"] == 0
        assert await replayed(open_s3("segments", "reader")) == list(range(35))
        await checkpoint.append({"k": "after", "n": 35})
        await checkpoint.flush()
        assert await replayed(open_s3("segments", "reader")) == list(range(36))
        await checkpoint.compact(key="k")  # claims segment 4, over the one left without a snapshot
        await checkpoint.append({"k": "last", "n": 36})
    assert await replayed(open_s3("segments", "reader")) == [*range(25, 30), 34, 35, 36]
    assert "run/merged/000000000000-000000000004.jsonl" in sizes(moto, bucket)


async def test_a_reader_during_a_compaction_that_takes_writes_reads_one_journal_whole(
    open_s3: OpenS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    from yoink import CheckpointManager

    storage = open_s3("segments")
    paused = PausedSnapshot(storage, monkeypatch)
    pad = "p" * 300
    async with CheckpointManager(storage, flush_interval=None) as checkpoint:
        for n in range(800):  # eight segments of 100 records: several blocks to read
            await checkpoint.append({"k": n % 10, "n": n, "pad": pad})
            if n % 100 == 99:
                await checkpoint.flush()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(functools.partial(checkpoint.compact, key="k"))
            with anyio.fail_after(10):
                await paused.reached.wait()
            for n in range(800, 810):
                await checkpoint.append({"k": "during", "n": n})
            await checkpoint.flush()
            reader = open_s3("segments", "reader")
            blocks = reader.read()
            got = [await anext(blocks)]  # it listed the old journal, the claim and segment 9
            paused.go.set()
        await checkpoint.append({"k": "after", "n": 810})
        await checkpoint.flush()  # segment 10, after the snapshot
        got += [block async for block in blocks]
        await reader.close()
    text = "".join(block if block.endswith("\n") else block + "\n" for block in got)
    assert [orjson.loads(line)["n"] for line in text.splitlines()] == list(range(810)), (
        "a read under way yields the old journal and what followed it when it began, whole"
    )
    assert await replayed(open_s3("segments", "reader")) == [*range(790, 800), *range(800, 811)]


async def test_merges_during_a_compaction_take_only_segments_after_its_claim(
    open_s3: OpenS3, monkeypatch: pytest.MonkeyPatch, moto: MotoServer, bucket: str
) -> None:
    storage = open_s3("segments", merge_after=4)
    paused = PausedSnapshot(storage, monkeypatch)
    async with storage:
        for n in range(3):  # segments 0-2
            await storage.write(records(n, 1))
            await storage.flush()

        async def during() -> None:
            for n in range(10, 20):  # segments 4-13, merged on the way
                await storage.write(records(n, 1))
                await storage.flush()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(storage.replace, snapshot(100, 2))  # claims segment 3
            with anyio.fail_after(10):
                await paused.reached.wait()
            with anyio.fail_after(10):
                await during()
            merged = [key for key in sizes(moto, bucket) if key.startswith("run/merged/")]
            assert merged, "no merge ran during the compaction"
            assert all(int(key[11:23]) > 3 for key in merged), f"a merge took the claim or more: {merged}"
            paused.go.set()
        assert await numbers(storage) == [100, 101, *range(10, 20)]
        await storage.write(records(20, 1))
    async with open_s3("segments", "reader") as reader:
        assert await numbers(reader) == [100, 101, *range(10, 21)]


async def test_a_writer_never_rules_out_the_claim_of_its_own_compaction_under_way(
    open_s3: OpenS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = open_s3("segments")
    paused = PausedSnapshot(storage, monkeypatch)
    async with storage:
        await storage.write(records(0, 2))
        await storage.flush()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(storage.replace, snapshot(100, 2))  # claims segment 1
            with anyio.fail_after(10):
                await paused.reached.wait()
            view = storage._layout._view
            assert view is not None
            view.claims.append(1)  # as a listing made now would find it: a claim without its snapshot
            await storage.write(records(2, 1))
            await storage.flush()  # segment 2: another writer's claims are ruled out first, not this one
            paused.go.set()
        assert await numbers(storage) == [100, 101, 2]
    async with open_s3("segments", "reader") as reader:
        assert await numbers(reader) == [100, 101, 2]


async def test_a_read_yields_nothing_written_after_its_first_item_staged_batches_included(
    open_s3: OpenS3,
) -> None:
    """What a fold reads while flushes go on: the segments listed, then the staged batches, each
    as it was when the read began, however the stage and the segments change meanwhile."""
    async with open_s3("segments", merge_after=4) as storage:
        for n in range(0, 300, 100):
            await storage.write(records(n, 100, pad=300))
            await storage.flush()
        await storage.write(records(300, 5))  # staged: the batch being written
        blocks = storage.read()
        got = [await anext(blocks)]
        await storage.write(records(305, 5))  # into the same staged batch, after the read began
        for n in range(310, 330, 5):  # uploaded, that batch with them, and merged
            await storage.write(records(n, 5))
            await storage.flush()
        got += [block async for block in blocks]
        assert parsed(got) == list(range(305))
        assert await numbers(storage) == list(range(330))


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_close_during_a_compaction_waits_for_its_swap_then_uploads_what_was_written(
    open_s3: OpenS3, small_parts: int, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    if layout == "segments":
        storage = open_s3(layout)
        paused: PausedSnapshot | PausedObjectSnapshot = PausedSnapshot(storage, monkeypatch)
        text, snapshot_records = snapshot(100, 2), [100, 101]
    else:
        storage = open_s3(layout, part_size=small_parts)
        paused = PausedObjectSnapshot(storage, monkeypatch)
        text, snapshot_records = snapshot(1000, 600, pad=2000), list(range(1000, 1600))  # several parts
    await storage.write(records(0, 2))
    await storage.flush()
    ended: list[str] = []

    async def replace() -> None:
        await storage.replace(text)
        ended.append("replace")

    async def close() -> None:
        await storage.close()
        ended.append("close")

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(replace)
        with anyio.fail_after(10):
            await paused.reached.wait()
        await storage.write(records(2, 1))  # staged: close() uploads it, after the swap
        tasks.start_soon(close)
        await anyio.sleep(0.2)
        assert ended == [], "close() released the client and the stage under a compaction under way"
        paused.go.set()
    assert ended == ["replace", "close"]
    async with open_s3(layout, "reader") as reader:
        assert await numbers(reader) == [*snapshot_records, 2]


# -- what a compaction replaced ----------------------------------------------------------------


def replaced_pieces(moto: MotoServer, bucket: str, snapshot_key: str) -> dict[str, int]:
    """The old journal's objects still holding data: merged objects but the snapshot, and the
    segments it covers that are not empty."""
    base = int(snapshot_key.rsplit("-", 1)[1].removesuffix(".jsonl"))
    return {
        key: size
        for key, size in sizes(moto, bucket).items()
        if (key.startswith("run/merged/") and key != snapshot_key)
        or (key.startswith("run/segments/") and int(key[13:25]) < base and size)
    }


async def test_what_a_compaction_replaced_stays_for_keep_replaced_then_the_next_writer_deletes_it(
    open_s3: OpenS3, moto: MotoServer, bucket: str
) -> None:
    async with open_s3("segments", merge_after=4) as compactor:
        for n in range(6):  # segments 0-5: 0-3 merged, 4 and 5 hold data
            await compactor.write(records(n, 1))
            await compactor.flush()
        await compactor.replace(snapshot(10, 3))  # claims segment 6
    key = "run/merged/000000000000-000000000006.jsonl"
    kept = replaced_pieces(moto, bucket, key)
    assert sorted(kept) == [
        "run/merged/000000000000-000000000003.jsonl",
        "run/segments/000000000004.jsonl",
        "run/segments/000000000005.jsonl",
    ], "kept for readers under way"
    async with open_s3("segments", "b") as patient:  # keep_replaced (600 s) has not passed
        await patient.write(records(20, 1))
        await patient.flush()
    assert replaced_pieces(moto, bucket, key) == kept
    async with open_s3("segments", "c", keep_replaced=0) as hasty:  # as if it had: it tidies
        await hasty.write(records(21, 1))
        await hasty.flush()
        assert replaced_pieces(moto, bucket, key) == {}
        assert await numbers(hasty) == [10, 11, 12, 20, 21]
    emptied = {k: v for k, v in sizes(moto, bucket).items() if k.startswith("run/segments/")}
    assert sorted(emptied)[:7] == [f"run/segments/{n:012d}.jsonl" for n in range(7)], "keys stay, as fences"


async def test_a_writer_left_behind_by_a_compaction_is_refused_however_far_behind(
    open_s3: OpenS3, tmp_path: Path
) -> None:
    behind = open_s3("segments", "behind")
    await behind.write(records(0, 1))
    await behind.flush()  # segment 0: its view ends there
    async with open_s3("segments", "b", keep_replaced=0) as compactor:
        await compactor.write(records(1, 1))
        await compactor.flush()
        await compactor.replace(snapshot(10, 2))  # segments 0 and 1 emptied at once, their keys kept
    await behind.write(records(2, 1))
    with pytest.raises(ConcurrentWriterError):
        await behind.flush()
    with pytest.raises(ConcurrentWriterError):
        await behind.close()
    async with open_s3("segments", "reader") as reader:
        assert await numbers(reader) == [10, 11]


# -- the stage ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_a_stage_left_by_a_crash_before_a_compaction_elsewhere_is_never_uploaded_on_top_of_it(
    open_s3: OpenS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    crashed = open_s3(layout, "a")
    await crashed.write(records(0, 5))
    await crash_after_the_upload(crashed, monkeypatch)  # uploaded, and still staged
    async with open_s3(layout, "b", keep_replaced=0) as compactor:
        assert await numbers(compactor) == [0, 1, 2, 3, 4]
        await compactor.replace(snapshot(10, 2))
    async with open_s3(layout, "a") as again:  # the stage's batch is known to be in the old journal
        assert await numbers(again) == [10, 11]
        await again.write(records(5, 1))
        await again.flush()
    assert not list((tmp_path / "a").glob("*/*.jsonl"))
    async with open_s3(layout, "reader") as reader:
        assert await numbers(reader) == [10, 11, 5]


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_a_crashed_writers_stage_on_this_machine_is_uploaded_before_the_snapshot_never_after(
    open_s3: OpenS3, tmp_path: Path, layout: str
) -> None:
    crashed = open_s3(layout)
    await crashed.write(records(0, 2))
    await crashed.flush()
    await crashed.write(records(2, 2))  # staged, never uploaded
    await died(crashed)
    async with open_s3(layout) as compactor:  # the same stage: it takes the batches over
        assert await numbers(compactor) == [0, 1, 2, 3]
        await compactor.replace(snapshot(10, 2))
        assert await numbers(compactor) == [10, 11]
    assert not list((tmp_path / "a").glob("*/*.jsonl"))
    async with open_s3(layout) as again:
        await again.flush()
        assert await numbers(again) == [10, 11]


# -- failures ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_a_compaction_whose_upload_fails_part_way_leaves_the_old_journal_and_a_usable_writer(
    open_s3: OpenS3, moto: MotoServer, bucket: str, proxy: Proxy, small_parts: int, layout: str
) -> None:
    async with open_s3(layout, endpoint_url=proxy.url, part_size=small_parts, max_attempts=2) as writer:
        await writer.write(records(0, 5))
        await writer.flush()
        proxy.faults.append(
            Fault(500, "InternalError", times=10, match=lambda method, path: "partNumber=2" in path)
        )
        with pytest.raises(StorageError, match="InternalError"):
            await writer.replace(snapshot(1000, 600, pad=2000))  # three parts and more
        assert proxy.faults[0].times < 10, "the fault was not used"
        assert uploads_left(moto, bucket) == []  # aborted
        assert await numbers(writer) == [0, 1, 2, 3, 4]
        await writer.write(records(5, 1))
        await writer.flush()
        assert await numbers(writer) == [0, 1, 2, 3, 4, 5]
    async with open_s3(layout, "reader") as reader:
        assert await numbers(reader) == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_a_snapshot_whose_source_fails_uploads_nothing_but_an_empty_claim(
    open_s3: OpenS3, moto: MotoServer, bucket: str, layout: str
) -> None:
    class SourceFailed(Exception):
        pass

    async def failing() -> AsyncIterator[str]:
        yield records(100, 10)
        raise SourceFailed

    async with open_s3(layout) as writer:
        await writer.write(records(0, 2))
        await writer.flush()
        before = sizes(moto, bucket)
        with pytest.raises(SourceFailed):
            await writer.replace(failing())
        # segments: the claim, made before the text is read, stays as a segment without records
        claim = {"run/segments/000000000001.jsonl": 0} if layout == "segments" else {}
        assert sizes(moto, bucket) == before | claim
        await writer.write(records(2, 1))
    async with open_s3(layout, "reader") as reader:
        assert await numbers(reader) == [0, 1, 2]


def test_keep_replaced_must_be_a_number_of_seconds(bucket: str) -> None:
    with pytest.raises(ValueError, match="keep_replaced"):
        S3Storage(f"s3://{bucket}/run.jsonl", keep_replaced=-1)
    assert S3Storage(f"s3://{bucket}/run?layout=segments&keep_replaced=0")._options.keep_replaced == 0


async def test_a_merge_under_way_as_the_snapshot_lands_ends_first_and_merges_go_on_after(
    open_s3: OpenS3, moto: MotoServer, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    storage = open_s3("segments", merge_after=2, keep_replaced=0)
    async with storage:
        for n in range(3):  # merged/0-1, segment 2
            await storage.write(records(n, 1))
            await storage.flush()
        merging, go_merge, go_snapshot = anyio.Event(), anyio.Event(), anyio.Event()
        call = storage._client.call

        async def pausing(operation: str, **params: Any) -> Any:
            if operation == "put_object" and "/merged/000000000004-" in params.get("Key", ""):
                merging.set()
                await go_merge.wait()  # the merge of segments 4 and 5, under way
            return await call(operation, **params)

        storage._client.call = pausing  # type: ignore[method-assign]

        async def text() -> AsyncIterator[str]:
            await go_snapshot.wait()
            yield records(100, 1)

        swapped = anyio.Event()

        async def compact() -> None:
            await storage.replace(text())  # claims segment 3
            swapped.set()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(compact)
            await anyio.sleep(0.2)
            for n in (4, 5):
                await storage.write(records(n, 1))
                await storage.flush()
            await storage.write(records(6, 1))
            tasks.start_soon(storage.flush)  # segment 6, then the merge of 4-5
            with anyio.fail_after(10):
                await merging.wait()
            go_snapshot.set()
            await anyio.sleep(0.3)
            swapped_under_the_merge = swapped.is_set()
            go_merge.set()
        assert not swapped_under_the_merge, "the snapshot was swapped into the view under a merge"
        with caplog.at_level("WARNING", logger="yoink"):
            for n in range(7, 17):
                await storage.write(records(n, 1))
                await storage.flush()
        assert "merging" not in caplog.text, caplog.text
    holding = [key for key, size in sizes(moto, bucket).items() if size and key.startswith("run/segments/")]
    assert len(holding) < 4, f"merges stopped after the compaction: {holding}"
    async with open_s3("segments", "reader") as reader:
        assert await numbers(reader) == [100, *range(4, 17)]


async def test_a_compaction_paused_after_its_claim_is_ruled_out_by_a_writer_that_takes_over_by_compacting(
    open_s3: OpenS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer on another machine takes over with a compaction, not a flush: its own claim
    comes after the paused one, whose snapshot it rules out first, so the paused compaction
    fails and the one that took over goes on writing."""
    compactor = open_s3("segments", "a")
    for n in range(3):
        await compactor.write(records(n, 1))
        await compactor.flush()
    paused = PausedSnapshot(compactor, monkeypatch)
    other = open_s3("segments", "b")
    errors: list[Exception] = []

    async def compact() -> None:
        try:
            await compactor.replace(snapshot(10, 2))  # claims segment 3
        except ConcurrentWriterError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(compact)
        with anyio.fail_after(10):
            await paused.reached.wait()
        await other.replace(snapshot(20, 2))  # claims segment 4, after ruling out 3's snapshot
        paused.go.set()
    assert [str(error) for error in errors] == [
        f"{compactor.uri} was changed by another writer (it wrote after segment 3, which this "
        "compaction had claimed, and so ruled its snapshot out) while this one compacted it; yoink "
        "allows one writer at a time. The compaction was not applied: the journal is as the other "
        "writer left it"
    ]
    await died(compactor)
    await other.write(records(30, 1))
    await other.close()  # its flush is not refused
    async with open_s3("segments", "reader") as reader:
        assert await numbers(reader) == [20, 21, 30]


@pytest.mark.parametrize("lost", ["the claim", "the snapshot"])
async def test_a_compaction_whose_every_reply_was_lost_is_known_by_what_s3_holds(
    open_s3: OpenS3, proxy: Proxy, lost: str
) -> None:
    """S3 applies the claim (or the snapshot), and every retry of it gets an error: a HEAD tells
    this writer that it went through, so the compaction goes on (or is done), the writer's view
    is the journal's, and its flushes and compactions after it work."""
    target = "/run/segments/000000000003" if lost == "the claim" else "/run/merged/000000000000-"
    async with open_s3("segments", endpoint_url=proxy.url, max_attempts=2) as writer:
        for n in range(3):
            await writer.write(records(n, 1))
            await writer.flush()
        proxy.faults.append(
            Fault(
                500,
                "InternalError",
                times=10,
                after=True,
                match=lambda method, path: method == "PUT" and target in path,
            )
        )
        await writer.replace(snapshot(10, 2))
        assert proxy.faults[0].times < 9, "the fault was not used on every attempt"
        proxy.faults.clear()
        await writer.write(records(20, 1))
        await writer.flush()
        await writer.replace(snapshot(30, 2))
        await writer.write(records(40, 1))
    async with open_s3("segments", "reader") as reader:
        assert await numbers(reader) == [30, 31, 40]


async def test_a_writer_that_cannot_learn_whether_its_snapshot_went_in_uploads_nothing_more(
    open_s3: OpenS3, proxy: Proxy
) -> None:
    async with open_s3("segments", endpoint_url=proxy.url, max_attempts=1) as writer:
        await writer.write(records(0, 1))
        await writer.flush()
        proxy.faults.append(  # the snapshot lands, every answer is lost, and S3 is then out of reach
            Fault(
                500, "InternalError", times=10, after=True, match=lambda method, path: "/run/merged/" in path
            )
        )
        proxy.faults.append(
            Fault(500, "InternalError", times=10, match=lambda method, path: method == "HEAD")
        )
        proxy.faults[0].match = lambda method, path: method == "PUT" and "/run/merged/" in path
        proxy.faults[1].match = lambda method, path: method == "HEAD" and "/run/merged/" in path
        with pytest.raises(StorageError, match="could not learn whether its snapshot .* went through"):
            await writer.replace(snapshot(10, 2))
        proxy.faults.clear()
        await writer.write(records(20, 1))
        with pytest.raises(StorageError, match="this writer uploads nothing more"):
            await writer.flush()
        await died(writer)
    async with open_s3("segments", "a", endpoint_url=proxy.url) as again:  # a new storage on its stage
        await again.flush()  # it uploads what was staged after what the journal holds
    async with open_s3("segments", "reader") as reader:
        assert await numbers(reader) == [10, 11, 20]


async def test_a_reader_whose_first_get_comes_after_the_swap_reads_the_new_journal_whole(
    open_s3: OpenS3,
) -> None:
    """It listed the old segments during a compaction; they are emptied (keep_replaced=0) before
    its first GET: it has yielded nothing, so it reads the journal as it is then, not the
    snapshot cut to the old segments' sizes."""
    old = [f'{{"n":{n}}}' for n in range(3)]
    new = ['{"n":100,"header":"longer than the old journal ........................"}', *old]
    writer = open_s3("segments", keep_replaced=0)
    async with writer:
        for line in old:  # segments 0, 1, 2
            await writer.write(line + "\n")
            await writer.flush()
        go_snapshot, listed, go_reader = anyio.Event(), anyio.Event(), anyio.Event()

        async def text() -> AsyncIterator[str]:
            await go_snapshot.wait()
            yield "".join(line + "\n" for line in new)

        reader = open_s3("segments", "reader")
        call = reader._client.call

        async def late_first_get(operation: str, **params: Any) -> Any:
            if operation == "get_object" and not go_reader.is_set():
                listed.set()
                await go_reader.wait()
            return await call(operation, **params)

        reader._client.call = late_first_get  # type: ignore[method-assign]
        got: list[str] = []

        async def read() -> None:
            got.extend([block async for block in reader.read()])

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(writer.replace, text())  # claims segment 3
            await anyio.sleep(0.2)
            tasks.start_soon(read)
            with anyio.fail_after(10):
                await listed.wait()
            go_snapshot.set()
            await anyio.sleep(0.5)  # the snapshot lands, the old segments are emptied
            go_reader.set()
        await reader.close()
    assert "".join(got).splitlines() == new


# -- writes during a compaction (objects) -------------------------------------------------------

SIZES = ["one request", "multipart"]


def padding(size: str) -> int:
    """The pad of ``snapshot(1000, 600, pad)`` for a snapshot of one part, or of several (small_parts)."""
    return 2000 if size == "multipart" else 0


async def flush_at_once(storage: S3Storage, first: int, count: int, pad: int = 0) -> None:
    await storage.write(records(first, count, pad))
    with anyio.fail_after(5):  # it does not wait for the compaction's swap
        await storage.flush()


class PausedObjectSnapshot:
    """Holds an object-layout compaction's multipart upload (its first ``upload_part``) until
    ``go`` is set: the cut made, flushes free to go on."""

    def __init__(self, storage: S3Storage, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reached, self.go = anyio.Event(), anyio.Event()
        call = storage._client.call
        uploads: set[str] = set()

        async def paused(operation: str, **params: Any) -> Any:
            response = await call(operation, **params)
            if operation == "create_multipart_upload" and "yoink-replace" in params.get("Metadata", {}):
                uploads.add(response["UploadId"])
            return response

        async def paused_part(operation: str, **params: Any) -> Any:
            if operation == "upload_part" and params.get("UploadId") in uploads and not self.go.is_set():
                self.reached.set()
                with anyio.fail_after(20):  # a test that fails before go must not hang its close()
                    await self.go.wait()
            return await paused(operation, **params)

        monkeypatch.setattr(storage._client, "call", paused_part)


@pytest.mark.parametrize("size", SIZES)
async def test_object_a_flush_during_a_compaction_returns_at_once_and_its_records_follow_the_snapshot(
    open_s3: OpenS3, small_parts: int, moto: MotoServer, bucket: str, size: str
) -> None:
    pad = padding(size)
    async with open_s3("object", part_size=small_parts) as writer:
        await writer.write(records(0, 5))
        await writer.flush()

        async def during() -> None:
            await flush_at_once(writer, 5, 3)
            await flush_at_once(writer, 8, 2)
            async with open_s3("object", "reader") as reader:  # until the swap: the old journal, then them
                assert await numbers(reader) == list(range(10))

        await writer.replace(snapshot(1000, 600, pad, during=during))
        assert uploads_left(moto, bucket) == []
        assert await numbers(writer) == [*range(1000, 1600), *range(5, 10)]
        await writer.write(records(10, 1))
    async with open_s3("object", "reader") as reader:
        assert await numbers(reader) == [*range(1000, 1600), *range(5, 11)]


async def test_object_a_managers_flush_during_a_compaction_by_key_returns_at_once(
    open_s3: OpenS3, small_parts: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from yoink import CheckpointManager

    storage = open_s3("object", part_size=small_parts)
    paused = PausedObjectSnapshot(storage, monkeypatch)
    pad = "p" * 2000
    async with CheckpointManager(storage, flush_interval=None) as checkpoint:
        for n in range(300):  # 150 records of 2 KiB kept: a snapshot of two parts
            await checkpoint.append({"k": n % 150, "n": n, "pad": pad})
        await checkpoint.flush()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(functools.partial(checkpoint.compact, key="k"))
            with anyio.fail_after(10):
                await paused.reached.wait()  # the cut is made; the snapshot's upload waits
            for n in range(300, 305):
                await checkpoint.append({"k": "during", "n": n})
            with anyio.fail_after(5):
                await checkpoint.flush()  # at once, while the snapshot is not there yet
            assert await replayed(open_s3("object", "reader")) == list(range(305))
            paused.go.set()
        await checkpoint.append({"k": "after", "n": 305})
    assert await replayed(open_s3("object", "reader")) == [*range(150, 306)]


@pytest.mark.parametrize("size", SIZES)
async def test_object_carried_bytes_larger_than_a_part_follow_the_snapshot_whole(
    open_s3: OpenS3, small_parts: int, moto: MotoServer, bucket: str, size: str
) -> None:
    async with open_s3("object", part_size=small_parts) as writer:
        await writer.write(records(0, 5))
        await writer.flush()

        async def during() -> None:
            for first in range(100, 400, 100):  # three flushes of about 200 KiB: 600 KiB carried
                await flush_at_once(writer, first, 100, pad=2000)

        await writer.replace(snapshot(1000, 600, padding(size), during=during))
        assert uploads_left(moto, bucket) == []
        expected = [*range(1000, 1600), *range(100, 400)]
        assert await numbers(writer) == expected
        await writer.write(records(5, 1))
    async with open_s3("object", "reader") as reader:
        assert await numbers(reader) == [*expected, 5]
    text = records(1000, 600, padding(size)) + records(100, 300, 2000) + records(5, 1)
    assert sizes(moto, bucket)["run.jsonl"] == len(text)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.usefixtures("completes_are_conditional")
async def test_object_a_writer_elsewhere_that_writes_during_a_compaction_makes_it_fail_and_nothing_is_lost(
    open_s3: OpenS3, small_parts: int, moto: MotoServer, bucket: str, size: str
) -> None:
    compactor = open_s3("object", "a", part_size=small_parts)
    await compactor.write(records(0, 5))
    await compactor.flush()
    other = open_s3("object", "b")  # another machine

    async def during() -> None:
        await flush_at_once(compactor, 5, 2)
        assert await numbers(other) == list(range(7))  # it looks only now, after the compactor's flush
        await other.write(records(100, 1))
        await other.flush()

    with pytest.raises(ConcurrentWriterError, match="compaction was not applied"):
        await compactor.replace(snapshot(1000, 600, padding(size), during=during))
    assert uploads_left(moto, bucket) == []
    await other.close()
    async with open_s3("object", "reader") as reader:
        assert await numbers(reader) == [*range(7), 100]  # as the other writer left it
    await compactor.write(records(7, 1))
    with pytest.raises(ConcurrentWriterError):  # and it stays refused: its view is behind
        await compactor.flush()
    with pytest.raises(ConcurrentWriterError):
        await compactor.close()
    async with open_s3("object", "a") as recovered:  # its refused record waited in its stage
        await recovered.flush()
    async with open_s3("object", "reader") as reader:
        assert await numbers(reader) == [*range(7), 100, 7]


@pytest.mark.parametrize("where", ["the snapshot's text", "the last request"])
@pytest.mark.parametrize("size", SIZES)
async def test_object_a_compaction_that_fails_after_flushes_went_on_keeps_them_and_the_next_one_works(
    open_s3: OpenS3,
    small_parts: int,
    moto: MotoServer,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    size: str,
    where: str,
) -> None:
    class Failed(Exception):
        pass

    pad = padding(size)
    async with open_s3("object", part_size=small_parts) as writer:
        await writer.write(records(0, 5))
        await writer.flush()
        call = writer._client.call

        async def failing(operation: str, **params: Any) -> Any:
            last = operation == "complete_multipart_upload" or (
                operation == "put_object" and "yoink-replace" in params.get("Metadata", {})
            )
            if last and where == "the last request":
                raise StorageError("the swap's request failed")
            return await call(operation, **params)

        monkeypatch.setattr(writer._client, "call", failing)

        async def text() -> AsyncIterator[str]:
            yield records(1000, 300, pad)
            await flush_at_once(writer, 5, 3)
            yield records(1300, 300, pad)
            if where == "the snapshot's text":
                raise Failed

        with pytest.raises(Failed if where == "the snapshot's text" else StorageError):
            await writer.replace(text())
        monkeypatch.setattr(writer._client, "call", call)
        assert uploads_left(moto, bucket) == []  # aborted
        assert await numbers(writer) == list(range(8))
        await flush_at_once(writer, 8, 1)
        async with open_s3("object", "reader") as reader:
            assert await numbers(reader) == list(range(9))

        async def during() -> None:
            await flush_at_once(writer, 9, 1)

        await writer.replace(snapshot(2000, 600, pad, during=during))
        await writer.write(records(10, 1))
    async with open_s3("object", "reader") as reader:
        assert await numbers(reader) == [*range(2000, 2600), 9, 10]


@pytest.mark.parametrize("size", SIZES)
async def test_object_a_reader_during_a_compaction_that_takes_writes_reads_one_journal_whole(
    open_s3: OpenS3, small_parts: int, size: str
) -> None:
    pad = 300
    async with open_s3("object", part_size=small_parts) as writer:
        await writer.write(records(0, 800, pad))  # about 250 KiB: several blocks to read
        await writer.flush()
        reader = open_s3("object", "reader")
        blocks = reader.read()
        got: list[str] = []

        async def during() -> None:
            await flush_at_once(writer, 800, 10, pad)
            got.append(await anext(blocks))  # it opened the object with the flush in it

        await writer.replace(snapshot(1000, 600, padding(size), during=during))
        await flush_at_once(writer, 810, 1)
        got += [block async for block in blocks]
        await reader.close()
    assert parsed(got) == list(range(810)), (
        "a read under way yields the old journal and what followed it when it began, whole"
    )
    async with open_s3("object", "reader") as reader:
        assert await numbers(reader) == [*range(1000, 1600), *range(800, 811)]


async def test_object_a_stage_left_after_a_compaction_that_carried_its_flushes_uploads_nothing_twice(
    open_s3: OpenS3, small_parts: int
) -> None:
    writer = open_s3("object", "a", part_size=small_parts)
    await writer.write(records(0, 5))
    await writer.flush()

    async def during() -> None:
        await flush_at_once(writer, 5, 2)
        await writer.write(records(7, 1))  # staged during the snapshot, not flushed

    await writer.replace(snapshot(1000, 600, pad=2000, during=during))  # several parts
    await writer.write(records(8, 1))
    # a read by the writer itself counts what its stage holds once
    assert await numbers(writer) == [*range(1000, 1600), 5, 6, 7, 8]
    await died(writer)  # killed before it flushed again
    async with open_s3("object", "a", part_size=small_parts) as recovered:
        await recovered.flush()
    async with open_s3("object", "reader") as reader:
        assert await numbers(reader) == [*range(1000, 1600), 5, 6, 7, 8]


async def test_object_a_read_begun_before_a_compaction_that_carried_its_staged_batch_yields_it_once(
    open_s3: OpenS3, small_parts: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_s3("object", part_size=small_parts) as writer:
        await writer.write(records(0, 5))
        await writer.flush()
        call = writer._client.call
        opening, opened = anyio.Event(), anyio.Event()

        async def slow_open(operation: str, **params: Any) -> Any:
            if operation == "get_object" and "IfMatch" not in params and not opened.is_set():  # a read
                opening.set()
                with anyio.fail_after(20):
                    await opened.wait()
            return await call(operation, **params)

        got: list[int] = []

        async def read() -> None:
            got.extend(await numbers(writer))

        async with anyio.create_task_group() as tasks:

            async def during() -> None:
                await writer.write(records(5, 2))  # staged
                monkeypatch.setattr(writer._client, "call", slow_open)
                tasks.start_soon(read)  # it takes the stage's batch, then waits to open the object
                with anyio.fail_after(5):
                    await opening.wait()
                await flush_at_once(writer, 7, 1)  # the batch it took is uploaded, then carried

            await writer.replace(snapshot(1000, 600, pad=2000, during=during))  # several parts
            opened.set()  # the read opens the new object
        assert got == [*range(1000, 1600), *range(5, 8)], "the read yields the carried batch once"


@pytest.mark.parametrize(
    "end", [b'{"n":-1,"cut', b'{"n":-1}'], ids=["a torn line", "a record without a newline"]
)
async def test_object_another_tools_last_line_cut_off_by_a_flush_during_a_compaction_is_not_carried(
    open_s3: OpenS3, moto: MotoServer, bucket: str, end: bytes
) -> None:
    s3_client(moto).put_object(Bucket=bucket, Key="run.jsonl", Body=records(0, 5).encode() + end)  # type: ignore[attr-defined]
    async with open_s3("object") as writer:
        # the flush sets a torn tail aside (or ends the record with a newline): the cut moves with it
        await writer.replace(snapshot(1000, 10, during=functools.partial(flush_at_once, writer, 5, 2)))
        assert await numbers(writer) == [*range(1000, 1010), 5, 6]
        await writer.write(records(7, 1))
    async with open_s3("object", "reader") as reader:
        assert await numbers(reader) == [*range(1000, 1010), 5, 6, 7]


@pytest.mark.parametrize("size", SIZES)
async def test_object_a_compaction_of_no_object_carries_the_flushes_that_made_it(
    open_s3: OpenS3, small_parts: int, moto: MotoServer, bucket: str, size: str
) -> None:
    async with open_s3("object", part_size=small_parts) as writer:
        assert await numbers(writer) == []  # it looked: there is no object

        async def during() -> None:
            await flush_at_once(writer, 0, 2)  # makes the object (If-None-Match: *)
            await flush_at_once(writer, 2, 1)

        await writer.replace(snapshot(1000, 600, padding(size), during=during))
        assert uploads_left(moto, bucket) == []
        await writer.write(records(3, 1))
    async with open_s3("object", "reader") as reader:
        assert await numbers(reader) == [*range(1000, 1600), 0, 1, 2, 3]


def put_another_tools_object(moto: MotoServer, bucket: str, body: bytes) -> None:
    s3_client(moto).put_object(Bucket=bucket, Key="run.jsonl", Body=body)  # type: ignore[attr-defined]


def object_records(moto: MotoServer, bucket: str) -> list[Any]:
    body = s3_client(moto).get_object(Bucket=bucket, Key="run.jsonl")["Body"].read()  # type: ignore[attr-defined]
    return [orjson.loads(line)["n"] for line in body.splitlines() if line.strip()]


async def test_a_flush_during_an_object_compaction_that_sets_another_tools_line_aside_moves_the_cut(
    open_s3: OpenS3, moto: MotoServer, bucket: str, small_parts: int
) -> None:
    """The object is over the part minimum, what stays once the torn line is set aside is under
    it (the append sends that again): the cut moves all the same, so the flushed records are
    carried, not the bytes before them."""
    good = b"".join(orjson.dumps({"n": n, "pad": "x" * 60}) + b"\n" for n in range(3000))
    torn = b"garbage-from-another-tool " * 4000  # no newline: a torn last line
    assert len(good) < small_parts <= len(good) + len(torn)
    put_another_tools_object(moto, bucket, good + torn)
    storage = open_s3("object", part_size=small_parts)

    async def text() -> AsyncIterator[str]:
        yield '{"n":"snapshot"}\n'
        for n in range(1000, 1005):  # flushed during the compaction: durable
            await storage.write(records(n, 1))
        await storage.flush()
        yield '{"n":"snapshot-end"}\n'

    async with storage:
        await storage.replace(text())
    assert object_records(moto, bucket) == ["snapshot", "snapshot-end", *range(1000, 1005)]


async def test_a_flush_during_an_object_compaction_that_fails_moves_no_cut(
    open_s3: OpenS3, moto: MotoServer, bucket: str, proxy: Proxy
) -> None:
    """It would have set another tool's torn line aside, and S3 refused it: the object still holds
    that line, so the swap carries nothing of it, and the flush retried after it lands whole."""
    good = b"".join(orjson.dumps({"n": n}) + b"\n" for n in range(20))
    put_another_tools_object(moto, bucket, good + b"torn-garbage-from-another-tool")
    storage = open_s3("object", endpoint_url=proxy.url, max_attempts=1)

    async def text() -> AsyncIterator[str]:
        yield '{"n":"snapshot"}\n'
        await storage.write(records(100, 1))
        proxy.faults.append(  # the append's PutObject, not that of the torn line set aside before it
            Fault(
                500,
                "InternalError",
                times=20,
                match=lambda method, path: method == "PUT" and path.split("?")[0].endswith("/run.jsonl"),
            )
        )
        with pytest.raises(StorageError):
            await storage.flush()
        proxy.faults.clear()

    async with storage:
        await storage.replace(text())
        await storage.write(records(101, 1))
        await storage.flush()
    assert object_records(moto, bucket) == ["snapshot", 100, 101]


async def test_an_object_swap_whose_every_answer_was_lost_is_known_by_what_s3_holds(
    open_s3: OpenS3, moto: MotoServer, bucket: str, proxy: Proxy
) -> None:
    async with open_s3("object", endpoint_url=proxy.url, max_attempts=2) as storage:
        await storage.write(records(0, 3))
        await storage.flush()
        proxy.faults.append(
            Fault(
                500,
                "InternalError",
                times=10,
                after=True,
                match=lambda method, path: method == "PUT" and path.split("?")[0].endswith("/run.jsonl"),
            )
        )
        await storage.replace(snapshot(10, 2))  # S3 took it: the compaction is done, not failed
        assert proxy.faults[0].times < 9, "the fault was not used on every attempt"
        proxy.faults.clear()
        await storage.write(records(20, 1))
    assert object_records(moto, bucket) == [10, 11, 20]
