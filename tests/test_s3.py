"""S3Storage over HTTP against moto's server: layouts, conflicts, crashes, faults and errors.

The storage contract itself runs against S3 in test_storage_contract.py.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.servers.proxy import Fault, Proxy
from tests.servers.s3 import MotoServer
from yoink import CheckpointLockedError, CheckpointManager, ConcurrentWriterError, StorageError
from yoink.storage import S3Storage
from yoink.testing._contract import _text as read_text

CHILD = Path(__file__).with_name("s3_child.py")
LAYOUTS = ["object", "segments"]

OpenS3 = Callable[..., S3Storage]


@pytest.fixture
def open_s3(bucket: str, moto: MotoServer, tmp_path: Path) -> OpenS3:
    """S3Storage on this test's bucket; keyword arguments override the defaults."""

    def open_(key: str = "run.jsonl", **options: object) -> S3Storage:
        options.setdefault("stage_dir", tmp_path / "stage")
        options.setdefault("endpoint_url", moto.url)
        return S3Storage(f"s3://{bucket}/{key}", **options)  # type: ignore[arg-type]

    return open_


def s3_client(moto: MotoServer) -> object:
    return boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1")


def records(first: int, count: int, pad: int = 0) -> str:
    return "".join(f'{{"n":{n},"pad":"{"p" * pad}"}}\n' for n in range(first, first + count))


async def numbers(storage: S3Storage) -> list[int]:
    import orjson

    return [orjson.loads(line)["n"] for line in (await read_text(storage)).splitlines()]


def keys(moto: MotoServer, bucket: str) -> list[str]:
    return list(sizes(moto, bucket))


def sizes(moto: MotoServer, bucket: str) -> dict[str, int]:
    listing = s3_client(moto).list_objects_v2(Bucket=bucket)  # type: ignore[attr-defined]
    return {item["Key"]: item["Size"] for item in listing.get("Contents", [])}


def merges_are_tidy(moto: MotoServer, bucket: str, prefix: str) -> None:
    """No merged object holds another's range, and every segment that one holds is emptied."""
    found = sizes(moto, bucket)
    ranges = sorted(
        tuple(int(n) for n in key.rsplit("/", 1)[1].removesuffix(".jsonl").split("-"))
        for key in found
        if key.startswith(f"{prefix}/merged/")
    )
    assert all(a[1] < b[0] for a, b in itertools.pairwise(ranges)), ranges
    for key, size in found.items():
        if key.startswith(f"{prefix}/segments/"):
            number = int(key.rsplit("/", 1)[1].removesuffix(".jsonl"))
            held = any(first <= number <= last for first, last in ranges)
            assert (size == 0) == held, (key, size, ranges)


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_manager_round_trip_with_unicode_across_read_chunks(
    bucket: str, moto: MotoServer, tmp_path: Path, layout: str
) -> None:
    uri = f"s3://{bucket}/crawl?layout={layout}"
    options = {"stage_dir": tmp_path / "stage", "endpoint_url": moto.url, "flush_interval": None}
    written = [{"n": n, "url": f"https://例え.jp/{n}", "pad": "ü" * (n % 997)} for n in range(6000)]
    async with CheckpointManager.from_uri(uri, **options) as manager:
        for start in range(0, 6000, 1500):  # several flushes, so several segments
            await manager.append_many(written[start : start + 1500])
            await manager.flush()
    async with CheckpointManager.from_uri(
        uri, stage_dir=tmp_path / "other-stage", endpoint_url=moto.url
    ) as again:
        assert [record async for record in again.replay()] == written


async def test_the_object_layout_is_one_plain_jsonl_object(
    open_s3: OpenS3, moto: MotoServer, bucket: str
) -> None:
    async with open_s3() as storage:
        await storage.write(records(0, 3))
        await storage.flush()
        await storage.write(records(3, 2))
    body = s3_client(moto).get_object(Bucket=bucket, Key="run.jsonl")["Body"].read()  # type: ignore[attr-defined]
    assert body.decode() == records(0, 5)


async def test_an_empty_flush_makes_no_request(open_s3: OpenS3, proxy: Proxy) -> None:
    async with open_s3(endpoint_url=proxy.url) as storage:
        await storage.flush()
        await storage.write("")
        await storage.flush()
        assert proxy.traffic.requests == []
        await storage.write(records(0, 1))
        await storage.flush()
        proxy.reset_traffic()
        await storage.flush()
        assert proxy.traffic.requests == []


async def test_writes_make_no_request_and_land_in_the_stage(open_s3: OpenS3, proxy: Proxy) -> None:
    async with open_s3(endpoint_url=proxy.url) as storage:
        for n in range(100):
            await storage.write(records(n, 1))
        assert proxy.traffic.requests == []
        staged = b"".join(p.read_bytes() for p in sorted(Path(storage.stage_directory).glob("*.jsonl")))
        assert staged.decode() == records(0, 100)
        assert await storage.exists()  # a stage is enough


# -- the object layout's three ways to append --------------------------------------------------


async def test_a_flush_onto_a_large_object_sends_only_the_new_data(open_s3: OpenS3, proxy: Proxy) -> None:
    # S3's real 5 MiB multipart minimum: the object is copied inside S3, the new data is the last part.
    async with open_s3(endpoint_url=proxy.url) as storage:
        await storage.write(records(0, 60_000, pad=90))  # 6.6 MiB
        await storage.flush()
        new = records(60_000, 1000, pad=90)
        proxy.reset_traffic()
        await storage.write(new)
        await storage.flush()
    traffic = proxy.reset_traffic()
    methods = [method for method, _ in traffic.requests]
    assert "GET" not in methods, traffic.requests
    assert sum("uploadId" in path for _, path in traffic.requests) == 3  # copy part, new part, complete
    assert traffic.sent + traffic.received < len(new) + (64 << 10), traffic
    async with open_s3(stage_dir=Path(storage.stage_directory).parent / "reader") as reader:
        assert await numbers(reader) == list(range(61_000))


async def test_small_objects_are_rewritten_and_big_batches_go_in_parts(
    open_s3: OpenS3, proxy: Proxy, small_parts: int
) -> None:
    async with open_s3(endpoint_url=proxy.url, part_size=small_parts) as storage:
        await storage.write(records(0, 10))  # new object: one PutObject
        await storage.flush()
        assert [m for m, _ in proxy.reset_traffic().requests] == ["HEAD", "PUT"]
        await storage.write(records(10, 10))  # small object: read it, put it back with If-Match
        await storage.flush()
        assert [m for m, _ in proxy.reset_traffic().requests] == ["GET", "PUT"]
        await storage.write(records(20, 8000, pad=100))  # 1 MiB more: multipart, four parts
        await storage.flush()
        parts = [path for _, path in proxy.reset_traffic().requests if "partNumber" in path]
        assert len(parts) == 4
        await storage.write(records(8020, 10))  # now a large object: copied inside S3
        await storage.flush()
        assert "GET" not in [m for m, _ in proxy.reset_traffic().requests]
        assert await numbers(storage) == list(range(8030))


async def test_an_object_without_a_final_newline_keeps_its_last_line(
    open_s3: OpenS3, moto: MotoServer, bucket: str
) -> None:
    s3_client(moto).put_object(Bucket=bucket, Key="run.jsonl", Body=b'{"n":0}')  # type: ignore[attr-defined]
    async with open_s3() as storage:
        await storage.write(records(1, 1))
        await storage.flush()
        assert await numbers(storage) == [0, 1]


def put_foreign(moto: MotoServer, bucket: str, body: bytes) -> None:
    s3_client(moto).put_object(Bucket=bucket, Key="run.jsonl", Body=body)  # type: ignore[attr-defined]


def get_body(moto: MotoServer, bucket: str, key: str) -> bytes:
    return s3_client(moto).get_object(Bucket=bucket, Key=key)["Body"].read()  # type: ignore[attr-defined,no-any-return]


FOREIGN_SIZES = ["a small object", "a multipart object", "a multipart object whose torn line is most of it"]


def foreign_body(size: str, part: int, last_line: bytes) -> bytes:
    """Another tool's JSONL object, ending in ``last_line`` (no newline), of the size named."""
    if size == "a small object":
        return records(0, 3).encode() + last_line
    if size == "a multipart object":
        return records(0, part // 100 + 10, pad=90).encode() + last_line  # over the part minimum
    return records(0, 3).encode() + last_line + b"x" * part  # what stays is under the part minimum


async def test_a_large_foreign_objects_last_line_without_a_newline_stays_a_record_when_appended_to(
    bucket: str, moto: MotoServer, tmp_path: Path, small_parts: int
) -> None:
    # The multipart path (the object copied inside S3) ends the line as the small path does.
    body = foreign_body("a multipart object", small_parts, b'{"n":-1}')
    put_foreign(moto, bucket, body)
    options = {"stage_dir": tmp_path / "stage", "endpoint_url": moto.url, "flush_interval": None}
    async with CheckpointManager.from_uri(f"s3://{bucket}/run.jsonl", **options) as manager:
        before = [record["n"] async for record in manager.replay()]
        assert before[-1] == -1
        await manager.append_many([{"n": n} for n in range(1000, 1003)])
        assert [record["n"] async for record in manager.replay()] == [*before, 1000, 1001, 1002]
        await manager.flush()
    options["stage_dir"] = tmp_path / "reader"
    async with CheckpointManager.from_uri(f"s3://{bucket}/run.jsonl", **options) as reader:
        assert [record["n"] async for record in reader.replay()] == [*before, 1000, 1001, 1002]
    assert get_body(moto, bucket, "run.jsonl").startswith(body + b"\n")


@pytest.mark.parametrize("size", FOREIGN_SIZES)
async def test_a_foreign_objects_torn_last_line_is_set_aside_in_a_torn_object_before_appending(
    bucket: str,
    moto: MotoServer,
    tmp_path: Path,
    small_parts: int,
    size: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    body = foreign_body(size, small_parts, b'{"n":-1,"cut')
    put_foreign(moto, bucket, body)
    torn = body[body.rfind(b"\n") + 1 :]
    options = {"stage_dir": tmp_path / "stage", "endpoint_url": moto.url, "flush_interval": None}
    async with CheckpointManager.from_uri(f"s3://{bucket}/run.jsonl", **options) as manager:
        before = [record["n"] async for record in manager.replay()]  # the torn line is left out
        await manager.append_many([{"n": n} for n in range(1000, 1003)])
        # read your writes agrees with what the upload does: no corrupt line before the staged records
        assert [record["n"] async for record in manager.replay()] == [*before, 1000, 1001, 1002]
        with caplog.at_level(logging.WARNING, logger="yoink"):
            await manager.flush()
    assert f"to s3://{bucket}/run.jsonl.torn" in caplog.text
    options["stage_dir"] = tmp_path / "reader"
    async with CheckpointManager.from_uri(f"s3://{bucket}/run.jsonl", **options) as reader:
        assert [record["n"] async for record in reader.replay()] == [*before, 1000, 1001, 1002]
    appended = b"".join(f'{{"n":{n}}}\n'.encode() for n in range(1000, 1003))
    assert get_body(moto, bucket, "run.jsonl") == body[: len(body) - len(torn)] + appended
    assert get_body(moto, bucket, "run.jsonl.torn") == torn + b"\n"


BAD_LAST_LINES = {
    "an array": b"[1,2]\n",
    "a torn line and a blank line": b'{"n": -1, "cut\n\n',
    "a torn line, blank lines and a blank tail": b'{"n": -1, "cut\n \n\t\n  ',
}


@pytest.mark.parametrize("size", FOREIGN_SIZES[:2])
@pytest.mark.parametrize("bad", BAD_LAST_LINES)
async def test_a_foreign_objects_whole_last_line_that_is_not_a_record_is_set_aside_before_appending(
    bucket: str,
    moto: MotoServer,
    tmp_path: Path,
    small_parts: int,
    size: str,
    bad: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Replay skips it as a torn last line; records appended after it would make it a corrupt one.
    body = foreign_body(size, small_parts, BAD_LAST_LINES[bad])
    put_foreign(moto, bucket, body)
    kept = len(body) - len(BAD_LAST_LINES[bad])
    options = {"stage_dir": tmp_path / "stage", "endpoint_url": moto.url, "flush_interval": None}
    async with CheckpointManager.from_uri(f"s3://{bucket}/run.jsonl", **options) as manager:
        before = [record["n"] async for record in manager.replay()]
        await manager.append_many([{"n": n} for n in range(1000, 1003)])
        with caplog.at_level(logging.WARNING, logger="yoink"):
            await manager.flush()
        assert [record["n"] async for record in manager.replay()] == [*before, 1000, 1001, 1002]
    assert f"from byte offset {kept}, to s3://{bucket}/run.jsonl.torn" in caplog.text
    options["stage_dir"] = tmp_path / "reader"
    async with CheckpointManager.from_uri(f"s3://{bucket}/run.jsonl", **options) as reader:
        assert [record["n"] async for record in reader.replay()] == [*before, 1000, 1001, 1002]
    appended = b"".join(f'{{"n":{n}}}\n'.encode() for n in range(1000, 1003))
    assert get_body(moto, bucket, "run.jsonl") == body[:kept] + appended
    assert get_body(moto, bucket, "run.jsonl.torn") == body[kept:] + b"\n"


async def test_a_writers_first_flush_onto_its_own_large_object_reads_only_its_last_kib(
    open_s3: OpenS3, proxy: Proxy, small_parts: int
) -> None:
    async with open_s3(endpoint_url=proxy.url) as storage:
        await storage.write(records(0, small_parts // 100 + 10, pad=90))
        await storage.flush()
    async with open_s3(endpoint_url=proxy.url) as storage:
        await storage.write(records(10_000, 1))
        proxy.reset_traffic()
        await storage.flush()
    traffic = proxy.reset_traffic()
    assert [m for m, _ in traffic.requests].count("GET") == 1  # its last line, a record
    assert traffic.received < 4096, traffic


# -- the segments layout -----------------------------------------------------------------------


async def test_segments_are_numbered_objects_and_merge_when_they_pile_up(
    open_s3: OpenS3, moto: MotoServer, bucket: str
) -> None:
    async with open_s3("job", layout="segments", merge_after=4) as storage:
        for n in range(3):
            await storage.write(records(n, 1))
            await storage.flush()
        assert keys(moto, bucket) == [f"job/segments/{n:012d}.jsonl" for n in range(3)]
        for n in range(3, 7):
            await storage.write(records(n, 1))
            await storage.flush()
        # Once four segments wait behind the newest, they are merged into one, and emptied: their
        # keys stay, so that no writer can write those numbers again.
        found = sizes(moto, bucket)
        assert list(found) == ["job/merged/000000000000-000000000003.jsonl"] + [
            f"job/segments/{n:012d}.jsonl" for n in range(7)
        ]
        assert [found[f"job/segments/{n:012d}.jsonl"] for n in range(4)] == [0, 0, 0, 0]
        assert all(found[f"job/segments/{n:012d}.jsonl"] for n in range(4, 7))
        assert await numbers(storage) == list(range(7))
    async with open_s3("job", layout="segments", stage_dir=storage.stage_directory + "-other") as reader:
        assert await numbers(reader) == list(range(7))


async def test_a_merge_copies_a_big_first_segment_inside_s3(
    open_s3: OpenS3, proxy: Proxy, small_parts: int, moto: MotoServer, bucket: str
) -> None:
    options = {"layout": "segments", "merge_after": 3, "part_size": small_parts, "endpoint_url": proxy.url}
    async with open_s3("big", **options) as storage:
        big = records(0, 4000, pad=100)  # over the (lowered) part minimum
        await storage.write(big)
        await storage.flush()
        for n in range(4000, 4002):
            await storage.write(records(n, 1))
            await storage.flush()
        proxy.reset_traffic()
        await storage.write(records(4002, 1))
        await storage.flush()  # segment 3, then the merge of 0-2
        traffic = proxy.reset_traffic()
        assert [key for key, size in sizes(moto, bucket).items() if size] == [
            "big/merged/000000000000-000000000002.jsonl",
            "big/segments/000000000003.jsonl",
        ]
        assert traffic.sent + traffic.received < len(big) // 4  # segment 0 did not cross the wire
        assert await numbers(storage) == list(range(4003))


async def test_a_segment_flush_costs_the_same_however_long_the_journal(open_s3: OpenS3, proxy: Proxy) -> None:
    async with open_s3("long", layout="segments", endpoint_url=proxy.url) as storage:
        costs = []
        for n in range(40):
            await storage.write(records(n * 100, 100, pad=200))
            proxy.reset_traffic()
            await storage.flush()
            costs.append(proxy.traffic.sent + proxy.traffic.received)
    assert max(costs[1:]) < 1.1 * min(costs[1:]), costs  # the first also lists the prefix


@pytest.mark.parametrize("point", ["die-after-merge-upload", "die-in-merge-upload"])
def test_a_merge_killed_part_way_loses_and_repeats_nothing(
    moto: MotoServer, bucket: str, tmp_path: Path, point: str
) -> None:
    uri = f"s3://{bucket}/merged?layout=segments"
    child = subprocess.run(
        [sys.executable, str(CHILD), point, uri, str(tmp_path / "stage"), moto.url, "10"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == -9, child.stderr
    stage = tmp_path / "stage"

    async def check() -> None:
        async with S3Storage(uri, stage_dir=tmp_path / "reader", endpoint_url=moto.url) as reader:
            assert await numbers(reader) == [0, 1, 2, 3]  # each flushed record, once
        async with S3Storage(uri, stage_dir=stage, endpoint_url=moto.url, merge_after=3) as writer:
            for n in range(4, 10):
                await writer.write(records(n, 1))
                await writer.flush()  # merges again, over what the killed merge left
            assert await numbers(writer) == list(range(10))

    import anyio

    anyio.run(check)
    merges_are_tidy(moto, bucket, "merged")


# -- two writers -------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
async def test_a_second_writer_gets_concurrent_writer_error_and_both_keep_their_records(
    open_s3: OpenS3, tmp_path: Path, layout: str
) -> None:
    first = open_s3(layout=layout, stage_dir=tmp_path / "machine-a")
    second = open_s3(layout=layout, stage_dir=tmp_path / "machine-b")
    assert await read_text(first) == await read_text(second) == ""  # both start from the same journal
    await first.write(records(0, 3))
    await first.flush()
    await second.write(records(100, 2))
    with pytest.raises(ConcurrentWriterError, match="another writer.*stay staged in .*machine-b"):
        await second.flush()
    with pytest.raises(ConcurrentWriterError):  # and it stays refused
        await second.close()
    await first.close()
    async with open_s3(layout=layout, stage_dir=tmp_path / "reader") as reader:
        assert await numbers(reader) == [0, 1, 2]
    staged = b"".join(p.read_bytes() for p in (tmp_path / "machine-b").glob("*/*.jsonl"))
    assert staged.decode() == records(100, 2)
    # Once the first writer is gone, a new storage on the second's stage uploads what it kept.
    async with open_s3(layout=layout, stage_dir=tmp_path / "machine-b") as recovered:
        await recovered.flush()
    async with open_s3(layout=layout, stage_dir=tmp_path / "reader") as reader:
        assert await numbers(reader) == [0, 1, 2, 100, 101]


async def test_a_segments_writer_left_behind_by_merges_is_refused_not_hidden(
    open_s3: OpenS3, tmp_path: Path
) -> None:
    # B last saw segment 0; A then writes more and merges, deleting segment numbers B thinks free.
    first = open_s3("job", layout="segments", stage_dir=tmp_path / "a", merge_after=2)
    second = open_s3("job", layout="segments", stage_dir=tmp_path / "b")
    await first.write(records(0, 1))
    await first.flush()
    assert await numbers(second) == [0]
    for n in range(1, 6):
        await first.write(records(n, 1))
        await first.flush()
    await second.write(records(100, 1))
    with pytest.raises(ConcurrentWriterError, match="segment 1, the next one it would write, is another"):
        await second.flush()
    with pytest.raises(ConcurrentWriterError):
        await second.close()
    await first.close()
    async with open_s3("job", layout="segments", stage_dir=tmp_path / "reader") as reader:
        assert await numbers(reader) == list(range(6))


def pause_before_put(
    storage: S3Storage, monkeypatch: pytest.MonkeyPatch, meanwhile: Callable[[], Any]
) -> None:
    """Stop ``storage`` just before its next PutObject, as a SIGSTOP would, and run ``meanwhile``."""
    call = storage._client.call
    armed = [True]

    async def paused(operation: str, **params: object) -> object:
        if operation == "put_object" and armed[0]:
            armed[0] = False
            await meanwhile()
        return await call(operation, **params)

    monkeypatch.setattr(storage._client, "call", paused)


async def test_a_writer_that_saw_an_empty_journal_is_refused_after_another_wrote_and_merged(
    open_s3: OpenS3, tmp_path: Path
) -> None:
    # Issue 12: A replays a new journal; B flushes enough to merge; A's three flushes used to return,
    # writing numbers the merge had deleted, which readers then skipped as merged.
    first = open_s3("job", layout="segments", stage_dir=tmp_path / "a")
    assert await numbers(first) == []
    async with open_s3("job", layout="segments", stage_dir=tmp_path / "b", merge_after=2) as second:
        for n in range(6):
            await second.write(records(n, 1))
            await second.flush()
    for n in range(100, 103):
        await first.write(records(n, 1))
        with pytest.raises(ConcurrentWriterError, match="segment 0, the next one it would write, is another"):
            await first.flush()
    with pytest.raises(ConcurrentWriterError):
        await first.close()
    async with open_s3("job", layout="segments", stage_dir=tmp_path / "reader") as reader:
        assert await numbers(reader) == list(range(6))
    async with open_s3("job", layout="segments", stage_dir=tmp_path / "a") as recovered:
        await recovered.flush()  # what A kept is uploaded once B is gone, after B's records
        assert await numbers(recovered) == [*range(6), 100, 101, 102]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("seen", ["empty", "written"])
async def test_a_writer_paused_just_before_its_upload_is_refused_by_the_upload_itself(
    open_s3: OpenS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str, seen: str
) -> None:
    # Whatever A checked before, B writes and merges between that check and A's PutObject: only
    # the PutObject's own condition can refuse A.
    first = open_s3("job", layout=layout, stage_dir=tmp_path / "a")
    if seen == "written":
        await first.write(records(0, 1))
        await first.flush()
    else:
        assert await numbers(first) == []
    start = 1 if seen == "written" else 0

    async def another_machine_takes_over() -> None:
        async with open_s3("job", layout=layout, stage_dir=tmp_path / "b", merge_after=2) as second:
            for n in range(start, start + 6):
                await second.write(records(n, 1))
                await second.flush()

    await first.write(records(100, 2))
    pause_before_put(first, monkeypatch, another_machine_takes_over)
    with pytest.raises(ConcurrentWriterError, match="another writer"):
        await first.flush()
    with pytest.raises(ConcurrentWriterError):
        await first.close()
    async with open_s3("job", layout=layout, stage_dir=tmp_path / "reader") as reader:
        assert await numbers(reader) == list(range(start + 6))
    staged = b"".join(p.read_bytes() for p in (tmp_path / "a").glob("*/*.jsonl"))
    assert staged.decode() == records(100, 2)


@pytest.mark.usefixtures("completes_are_conditional")
async def test_an_append_larger_than_a_part_by_a_writer_already_overtaken_is_refused_and_loses_nothing(
    open_s3: OpenS3, moto: MotoServer, bucket: str, tmp_path: Path, small_parts: int
) -> None:
    # A's object is past the part minimum and ends in A's own newline, so A's next flush reads
    # nothing: it copies the object inside S3 and sends its batch in parts. moto checks neither
    # UploadPartCopy's CopySourceIfMatch nor (without the fixture) the completion's If-Match; only
    # the completion can refuse A here, as it alone refuses a writer overtaken after its copy on S3.
    first = open_s3(stage_dir=tmp_path / "a", part_size=small_parts)
    await first.write(records(0, 2000, pad=200))  # 0.4 MiB, over the 256 KiB part minimum
    await first.flush()
    async with open_s3(stage_dir=tmp_path / "b") as second:
        assert len(await numbers(second)) == 2000
        await second.write(records(10_000, 3))
    big = records(2000, 3000, pad=100)
    assert len(big) > small_parts
    await first.write(big)
    with pytest.raises(ConcurrentWriterError, match="another writer.*stay staged in .*/a"):
        await first.flush()
    with pytest.raises(ConcurrentWriterError):
        await first.close()
    listing = s3_client(moto).list_multipart_uploads(Bucket=bucket)  # type: ignore[attr-defined]
    assert listing.get("Uploads", []) == [], "the refused multipart upload was left unfinished"
    async with open_s3(stage_dir=tmp_path / "reader") as reader:
        assert await numbers(reader) == [*range(2000), *range(10_000, 10_003)]
    async with open_s3(stage_dir=tmp_path / "a", part_size=small_parts) as recovered:
        await recovered.flush()  # what A kept staged follows the other writer's records
    async with open_s3(stage_dir=tmp_path / "reader") as reader:
        assert await numbers(reader) == [*range(2000), *range(10_000, 10_003), *range(2000, 5000)]


async def test_a_reader_that_lists_while_a_merge_empties_segments_lists_again(
    open_s3: OpenS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = open_s3("job", layout="segments", merge_after=3)
    for n in range(3):
        await writer.write(records(n, 1))
        await writer.flush()
    reader = open_s3("job", layout="segments", stage_dir=tmp_path / "reader")
    call = reader._client.call
    merged = [False]

    async def merge_between_the_two_listings(operation: str, **params: Any) -> Any:
        if operation == "list_objects_v2" and params["Prefix"].endswith("/segments/") and not merged[0]:
            merged[0] = True
            await writer.write(records(3, 1))
            await writer.flush()  # merges 0-2 and empties them
        return await call(operation, **params)

    monkeypatch.setattr(reader._client, "call", merge_between_the_two_listings)
    assert await numbers(reader) == [0, 1, 2, 3]
    assert merged[0]
    await writer.close()
    await reader.close()


async def test_a_lost_upload_that_another_writer_merged_is_not_uploaded_again(
    open_s3: OpenS3, proxy: Proxy, tmp_path: Path
) -> None:
    first = open_s3(
        "job", layout="segments", stage_dir=tmp_path / "a", endpoint_url=proxy.url, max_attempts=0
    )
    await first.write(records(0, 1))
    await first.flush()
    await first.write(records(1, 1))
    proxy.inject(Fault(500, "InternalError", after=True, match=lambda method, path: method == "PUT"))
    with pytest.raises(StorageError):
        await first.flush()  # it landed; the reply did not
    async with open_s3("job", layout="segments", stage_dir=tmp_path / "b", merge_after=2) as second:
        for n in range(2, 6):
            await second.write(records(n, 1))
            await second.flush()  # merges segment 1, A's lost upload, among others
    await first.write(records(100, 1))
    with pytest.raises(ConcurrentWriterError, match="it merged segment 1"):
        await first.flush()
    with pytest.raises(ConcurrentWriterError):
        await first.close()
    async with open_s3("job", layout="segments", stage_dir=tmp_path / "a", endpoint_url=proxy.url) as again:
        await again.flush()
        assert await numbers(again) == [*range(6), 100]  # record 1 once


async def test_a_read_beside_a_flush_of_the_same_storage_yields_each_record_once(
    open_s3: OpenS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    from yoink.storage._s3_listing import SegmentListing

    listing = SegmentListing._try_listing

    async def listing_then_a_flush(self: SegmentListing, *, tidy: bool) -> Any:
        state = await listing(self, tidy=tidy)
        monkeypatch.setattr(SegmentListing, "_try_listing", listing)
        await storage.flush()  # lands the staged record after the listing, before its batch is looked up
        return state

    async with open_s3("job", layout="segments") as storage:
        await storage.write(records(0, 1))
        await storage.flush()
        await storage.write(records(1, 1))
        monkeypatch.setattr(SegmentListing, "_try_listing", listing_then_a_flush)
        assert await numbers(storage) == [0, 1]  # from the stage: the listing did not hold it


async def test_a_reader_beside_a_live_writer_sees_only_what_the_writer_flushed(open_s3: OpenS3) -> None:
    async with open_s3() as writer:
        await writer.write(records(0, 2))
        await writer.flush()
        await writer.write(records(2, 1))  # staged by a live writer: not the reader's to see or upload
        async with open_s3() as reader:  # the same stage directory, as a `yoink cat` on this machine
            assert await numbers(reader) == [0, 1]
            await reader.flush()
        assert await numbers(writer) == [0, 1, 2]


class _Crash(Exception):
    """Stands for a kill -9 at the point where it is raised."""


async def crash_after_the_upload(storage: S3Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flush ``storage`` and let it die after the upload, before the stage is cleared."""

    async def die(through: int) -> None:
        raise _Crash

    monkeypatch.setattr(storage._stage, "discard", die)
    with pytest.raises(_Crash):
        await storage.flush()
    storage._closed = True  # as the process died: its stage is let go, nothing more is uploaded
    await storage._stage.close()
    await storage._release()


@pytest.mark.parametrize("then", ["seventeen more segments", "a merge of its segment"])
async def test_a_segment_that_landed_just_before_a_crash_is_not_uploaded_again_however_the_journal_moved_on(
    open_s3: OpenS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, then: str
) -> None:
    crashed = open_s3("job", layout="segments", stage_dir=tmp_path / "a")
    await crashed.write(records(0, 5))
    await crash_after_the_upload(crashed, monkeypatch)
    flushes, merge_after = (17, 64) if then == "seventeen more segments" else (4, 2)
    async with open_s3("job", layout="segments", stage_dir=tmp_path / "b", merge_after=merge_after) as other:
        for n in range(100, 100 + flushes):
            await other.write(records(n, 1))
            await other.flush()
    expected = [*range(5), *range(100, 100 + flushes)]
    async with open_s3("job", layout="segments", stage_dir=tmp_path / "a") as again:
        assert await numbers(again) == expected  # the staged batch is recognised as landed
        await again.flush()
    assert not list((tmp_path / "a").glob("*/*.jsonl"))
    async with open_s3("job", layout="segments", stage_dir=tmp_path / "reader") as reader:
        assert await numbers(reader) == expected


async def test_a_reader_goes_on_through_a_merge_of_the_segments_it_listed_and_yields_each_record_once(
    open_s3: OpenS3, tmp_path: Path
) -> None:
    async with open_s3("job", layout="segments", merge_after=4) as writer:
        for n in range(4):
            await writer.write(records(n, 1))
            await writer.flush()
        reader = open_s3("job", layout="segments", stage_dir=tmp_path / "reader")
        blocks = reader.read()
        got = [await anext(blocks)]  # segment 0 (the reader listed 0-3)
        await writer.write(records(4, 1))
        await writer.flush()  # merges 0-3 into one object and empties them
        got += [block async for block in blocks]
        await reader.close()
    assert "".join(got) == records(0, 4)  # 1-3 from the merged object, after segment 0's bytes


async def test_a_paused_writers_merge_that_overlaps_anothers_leaves_a_journal_that_reads_and_writes_on(
    open_s3: OpenS3, tmp_path: Path, moto: MotoServer, bucket: str
) -> None:
    import anyio

    zombie = open_s3("job", layout="segments", stage_dir=tmp_path / "a", merge_after=4)
    for n in range(4):  # segment 1 is big for the other writer's merge settings
        await zombie.write(records(n, 1, pad=150 if n == 1 else 0))
        await zombie.flush()
    paused, resume = anyio.Event(), anyio.Event()
    call = zombie._client.call

    async def pause_before_the_merged_upload(operation: str, **params: Any) -> Any:
        if operation == "put_object" and "/merged/" in params["Key"]:
            paused.set()
            await resume.wait()
        return await call(operation, **params)

    zombie._client.call = pause_before_the_merged_upload  # type: ignore[method-assign]
    await zombie.write(records(4, 1))
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(zombie.flush)  # segment 4, then a merge of 0-3 that pauses before its upload
        await paused.wait()
        other = open_s3("job", layout="segments", stage_dir=tmp_path / "b", merge_after=2, merge_target=100)
        async with other:
            assert await numbers(other) == list(range(5))
            await other.write(records(100, 1))
            await other.flush()  # merges 2-4
        resume.set()
    merged = [key for key in keys(moto, bucket) if "/merged/" in key]
    assert len(merged) == 2, merged  # the two merges overlap
    async with open_s3("job", layout="segments", stage_dir=tmp_path / "reader") as reader:
        assert await numbers(reader) == [*range(5), 100]
    async with open_s3(
        "job", layout="segments", stage_dir=tmp_path / "b", merge_after=2, merge_target=100
    ) as b:
        for n in range(101, 104):
            await b.write(records(n, 1))
            await b.flush()
        assert await numbers(b) == [*range(5), *range(100, 104)]
    async with open_s3("job", layout="segments", stage_dir=tmp_path / "reader") as reader:
        assert await numbers(reader) == [*range(5), *range(100, 104)]
    merges_are_tidy(moto, bucket, "job")  # the next merge took in what the overlapping one held past it
    await zombie.write(records(200, 1))
    with pytest.raises(ConcurrentWriterError):
        await zombie.flush()  # the paused writer is refused; its record stays staged
    with pytest.raises(ConcurrentWriterError):
        await zombie.close()


def test_a_second_process_on_the_same_stage_is_refused(moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    uri = f"s3://{bucket}/locked.jsonl"
    holder = subprocess.Popen(
        [sys.executable, str(CHILD), "stage", uri, str(tmp_path / "stage"), moto.url, "5"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "staged\n"

        async def second_writer() -> None:
            async with S3Storage(uri, stage_dir=tmp_path / "stage", endpoint_url=moto.url) as storage:
                with pytest.raises(CheckpointLockedError, match="one writer at a time"):
                    await storage.write(records(100, 1))

        import anyio

        anyio.run(second_writer)
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()


# -- crashes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kill_9_before_flush_loses_nothing_that_write_accepted(
    moto: MotoServer, bucket: str, tmp_path: Path, layout: str, caplog: pytest.LogCaptureFixture
) -> None:
    uri = f"s3://{bucket}/staged?layout={layout}"
    child = subprocess.Popen(
        [sys.executable, str(CHILD), "stage", uri, str(tmp_path / "stage"), moto.url, "500"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline() == "staged\n"
    child.kill()
    child.wait()
    child.stdout.close()

    async def recover() -> None:
        async with CheckpointManager.from_uri(
            uri, stage_dir=tmp_path / "stage", endpoint_url=moto.url
        ) as manager:
            assert [r["n"] async for r in manager.replay()] == list(range(500))  # before any upload
            await manager.flush()
        async with S3Storage(uri, stage_dir=tmp_path / "reader", endpoint_url=moto.url) as reader:
            assert await numbers(reader) == list(range(500))

    import anyio

    with caplog.at_level(logging.WARNING, logger="yoink"):
        anyio.run(recover)
    assert "left by an earlier process" in caplog.text


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kill_9_after_an_upload_and_before_the_stage_is_cleared_uploads_nothing_twice(
    moto: MotoServer, bucket: str, tmp_path: Path, layout: str
) -> None:
    uri = f"s3://{bucket}/twice?layout={layout}"
    child = subprocess.run(
        [sys.executable, str(CHILD), "die-before-discard", uri, str(tmp_path / "stage"), moto.url, "50"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == -9, child.stderr
    assert list((tmp_path / "stage").glob("*/*.jsonl")), "the stage should still hold the batch"

    async def recover() -> None:
        async with S3Storage(uri, stage_dir=tmp_path / "stage", endpoint_url=moto.url) as storage:
            assert await numbers(storage) == list(range(50))  # the staged copy is recognised
            await storage.write(records(50, 1))
            await storage.flush()
        async with S3Storage(uri, stage_dir=tmp_path / "reader", endpoint_url=moto.url) as reader:
            assert await numbers(reader) == list(range(51))

    import anyio

    anyio.run(recover)
    assert not list((tmp_path / "stage").glob("*/*.jsonl"))


# -- faults and errors -------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("status", "code"), [(500, "InternalError"), (503, "SlowDown")])
async def test_server_errors_are_retried(
    open_s3: OpenS3, proxy: Proxy, layout: str, status: int, code: str
) -> None:
    async with open_s3(layout=layout, endpoint_url=proxy.url) as storage:
        await storage.write(records(0, 5))
        proxy.inject(Fault(status, code, times=2, match=lambda method, path: method == "PUT"))
        await storage.flush()
        puts = [path for method, path in proxy.traffic.requests if method == "PUT"]
        assert len(puts) == 3
        assert await numbers(storage) == list(range(5))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("status", [500, 0], ids=["error-500", "connection-reset"])
async def test_an_upload_whose_reply_is_lost_is_recognised_not_repeated(
    open_s3: OpenS3, proxy: Proxy, layout: str, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_s3(layout=layout, endpoint_url=proxy.url) as storage:
        await storage.write(records(0, 5))
        await storage.flush()
        await storage.write(records(5, 5))
        # moto stores the upload, the client gets an error instead of its reply, and botocore retries.
        proxy.inject(Fault(status, "InternalError", after=True, match=lambda method, path: method == "PUT"))
        with caplog.at_level(logging.INFO, logger="yoink"):
            await storage.flush()
        assert "already in S3, from an upload whose reply was lost" in caplog.text
        await storage.write(records(10, 5))
        await storage.flush()
    async with open_s3(layout=layout, stage_dir=Path(storage.stage_directory).parent / "reader") as reader:
        assert await numbers(reader) == list(range(15))


async def test_a_missing_bucket_is_named(moto: MotoServer, aws_env: None, tmp_path: Path) -> None:
    storage = S3Storage("s3://no-such-bucket/run.jsonl", stage_dir=tmp_path, endpoint_url=moto.url)
    await storage.write(records(0, 1))
    with pytest.raises(StorageError, match="the bucket 'no-such-bucket' does not exist"):
        await storage.flush()
    with pytest.raises(StorageError, match="the bucket 'no-such-bucket' does not exist"):
        await read_text(storage)
    async with S3Storage(
        "s3://no-such-bucket/other.jsonl", stage_dir=tmp_path, endpoint_url=moto.url
    ) as fresh:
        with pytest.raises(StorageError, match="the bucket 'no-such-bucket' does not exist"):
            await fresh.exists()
    with pytest.raises(StorageError, match="does not exist"):
        await storage.close()  # which flushes, and releases the client all the same


async def test_missing_credentials_say_how_to_provide_them(
    open_s3: OpenS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    storage = open_s3()
    await storage.write(records(0, 1))
    with pytest.raises(StorageError, match="no AWS credentials found.*AWS_ACCESS_KEY_ID.*aws configure"):
        await storage.flush()
    with pytest.raises(StorageError):
        await storage.close()
    assert list(Path(storage.stage_directory).glob("*.jsonl")), "the record stays staged"


async def test_rejected_or_unauthorised_credentials_give_clear_errors_without_secrets(
    open_s3: OpenS3, moto: MotoServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from moto import settings

    iam = boto3.client("iam", endpoint_url=moto.url, region_name="us-east-1")
    iam.create_user(UserName="no-policies")
    key = iam.create_access_key(UserName="no-policies")["AccessKey"]
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto checks from now on

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    storage = open_s3()
    await storage.write(records(0, 1))
    with pytest.raises(StorageError, match="rejected the AWS credentials") as rejected:
        await storage.flush()
    with pytest.raises(StorageError):
        await storage.close()

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    storage = open_s3(stage_dir=Path(storage.stage_directory).parent / "other")
    await storage.write(records(0, 1))
    with pytest.raises(StorageError, match="S3 denied .* yoink needs s3:GetObject, s3:PutObject") as denied:
        await storage.flush()
    with pytest.raises(StorageError):
        await storage.close()
    for secret in ("wrong-secret-value", key["SecretAccessKey"]):
        assert secret not in str(rejected.value) + str(denied.value) + caplog.text + repr(storage)


# -- the URI, options and pickling -------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s3://bucket", "names a bucket and a key"),
        ("s3:///key.jsonl", "names a bucket and a key"),
        ("s3://bucket/dir/", "names a prefix; layout='object' needs an object key"),
        ("s3://bucket/k.jsonl?colour=red", "unknown option 'colour' in s3://bucket/k.jsonl\\?colour=red"),
        ("s3://bucket/k.jsonl?layout=tree", "layout='tree' is not one of 'object', 'segments'"),
    ],
)
def test_bad_uris_are_refused_clearly(uri: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        S3Storage(uri)


def test_an_option_given_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="region_name is given both in the URI and as an option"):
        S3Storage("s3://b/k.jsonl?region_name=eu-west-1", region_name="us-east-1")


async def test_a_pickled_storage_keeps_its_uri_and_options_not_its_client_or_stage(open_s3: OpenS3) -> None:
    storage = open_s3(layout="segments", part_size=32 << 20)
    await storage.write(records(0, 2))
    await storage.flush()
    await storage.write(records(2, 1))  # staged, not flushed
    copy = pickle.loads(pickle.dumps(storage))
    assert repr(copy) == repr(storage)
    assert copy.stage_directory == storage.stage_directory
    assert copy._options.part_size == 32 << 20
    assert copy._client._handle is None
    assert b'n\\":2' not in pickle.dumps(storage)
    await storage.close()
    async with copy:
        assert await numbers(copy) == [0, 1, 2]


def test_the_endpoint_comes_from_the_standard_variables(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:9000")
    assert S3Storage("s3://b/k.jsonl")._endpoint == "http://generic:9000"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://minio:9000")
    assert S3Storage("s3://b/k.jsonl")._endpoint == "http://minio:9000"
    assert S3Storage("s3://b/k.jsonl", endpoint_url="http://r2:1")._endpoint == "http://r2:1"
    # A journal's stage belongs to its endpoint: the same key elsewhere is another journal.
    assert (
        S3Storage("s3://b/k.jsonl").stage_directory
        != S3Storage("s3://b/k.jsonl", endpoint_url="http://r2:1").stage_directory
    )
    assert os.environ["AWS_ENDPOINT_URL"] not in repr(S3Storage("s3://b/k.jsonl"))


def test_an_unreachable_endpoint_is_named_without_its_password() -> None:
    from botocore.exceptions import EndpointConnectionError

    from yoink.storage._s3_client import S3Client

    endpoint = "http://me:hunter2@s3.example:9000"
    client = S3Client(
        "b", journal="s3://b/k.jsonl", endpoint=endpoint, region=None, profile=None, retries={}, timeout=1
    )
    with pytest.raises(StorageError) as caught, client.translated("get_object"):
        raise EndpointConnectionError(endpoint_url=endpoint)
    assert str(caught.value) == "cannot reach S3 at http://me:***@s3.example:9000 for s3://b/k.jsonl"
