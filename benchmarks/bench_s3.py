"""S3-backend figures against moto's server, beside the reference page's design in the same run.

    .venv/bin/python benchmarks/bench_s3.py           # the issue's workloads (64 MiB objects, 1 GB replay)
    .venv/bin/python benchmarks/bench_s3.py --quick   # smaller ones, for a smoke run

moto runs in its own process (``python -m moto.server``), so the server does not share the client's
interpreter. Bytes on the wire are counted by a proxy between the client and moto (tests/servers/proxy.py).
The reference design is the reference page's S3Storage taken literally: on every flush, download
the whole object, append the buffer, upload it again with PutObject.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.servers import free_port
from tests.servers.proxy import Proxy
from yoink import CheckpointManager
from yoink.storage import S3Storage

MiB = 1 << 20


def record(i: int, pad: int = 0) -> dict[str, Any]:
    return {"url": f"https://example.com/page/{i}", "status": 200, "depth": 3, "pad": "p" * pad}


def lines(first: int, count: int, pad: int = 0) -> str:
    return "".join(orjson.dumps(record(i, pad)).decode() + "\n" for i in range(first, first + count))


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server in a process of its own; its URL. Sets the (fake) credentials it takes."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            with contextlib.suppress(OSError):
                urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
                break
            time.sleep(0.05)
        yield url
    finally:
        server.terminate()
        server.wait()


def new_bucket(endpoint: str) -> str:
    name = f"bench-{os.urandom(4).hex()}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


async def fill(uri: str, stage: str, endpoint: str, size: int, flushes: int = 1, **options: Any) -> int:
    """Make a journal of about ``size`` bytes in ``flushes`` flushes; return the records written."""
    per_flush = max(1, size // flushes // len(lines(10**6, 1, pad=40)))
    n = 0
    async with S3Storage(uri, stage_dir=stage, endpoint_url=endpoint, **options) as storage:
        for _ in range(flushes):
            await storage.write(lines(n, per_flush, pad=40))
            await storage.flush()
            n += per_flush
    return n


# -- measurements, each in its own process ---------------------------------------------------


async def object_flush_bytes(endpoint: str, object_mib: float) -> dict[str, float]:
    """Bytes on the wire for a 1,000-record flush onto an object of ``object_mib``: yoink and reference."""
    bucket, stage = new_bucket(endpoint), tempfile.mkdtemp()
    uri = f"s3://{bucket}/crawl.jsonl"
    n = await fill(uri, stage, endpoint, int(object_mib * MiB))
    new = lines(n, 1000, pad=40)
    proxy = Proxy(int(endpoint.rsplit(":", 1)[1]))
    try:
        async with S3Storage(uri, stage_dir=stage, endpoint_url=proxy.url) as storage:
            await storage.write(new)
            proxy.reset_traffic()
            start = time.perf_counter()
            await storage.flush()
            yoink_seconds = time.perf_counter() - start
        yoink_traffic = proxy.reset_traffic()

        client = boto3.client("s3", endpoint_url=proxy.url, region_name="us-east-1")
        start = time.perf_counter()
        body = client.get_object(Bucket=bucket, Key="crawl.jsonl")["Body"].read()
        client.put_object(Bucket=bucket, Key="crawl.jsonl", Body=body + new.encode())
        reference_seconds = time.perf_counter() - start
        reference_traffic = proxy.reset_traffic()
    finally:
        proxy.stop()
    return {
        "new_bytes": len(new.encode()),
        "yoink_bytes": yoink_traffic.sent + yoink_traffic.received,
        "reference_bytes": reference_traffic.sent + reference_traffic.received,
        "yoink_seconds": yoink_seconds,
        "reference_seconds": reference_seconds,
    }


async def segments_flush_seconds(endpoint: str, journal_mib: float) -> dict[str, float]:
    """Median time of a 1,000-record flush onto a segments journal of ``journal_mib``."""
    bucket, stage = new_bucket(endpoint), tempfile.mkdtemp()
    uri = f"s3://{bucket}/crawl?layout=segments"
    n = await fill(uri, stage, endpoint, int(journal_mib * MiB), flushes=max(1, int(journal_mib)))
    times = []
    async with S3Storage(uri, stage_dir=stage, endpoint_url=endpoint) as storage:
        await storage.flush()  # the first flush lists the segments; later ones do not
        for round_ in range(30):
            await storage.write(lines(n + round_ * 1000, 1000, pad=40))
            start = time.perf_counter()
            await storage.flush()
            times.append(time.perf_counter() - start)
    return {"median_seconds": statistics.median(times)}


async def manager_append(endpoint: str, n: int, target: str) -> dict[str, float]:
    """Records/s through CheckpointManager.append, to S3 (staged locally) or to a local file."""
    directory = tempfile.mkdtemp()
    if target == "s3":
        uri = f"s3://{new_bucket(endpoint)}/append.jsonl"
        options: dict[str, Any] = {"stage_dir": directory, "endpoint_url": endpoint}
    else:
        uri, options = os.path.join(directory, "append.jsonl"), {}
    records = [record(i) for i in range(n)]
    async with CheckpointManager.from_uri(uri, flush_interval=None, **options) as manager:
        start = time.perf_counter()
        for r in records:
            await manager.append(r)
        appended = time.perf_counter() - start
        await manager.flush()
        flushed = time.perf_counter() - start
    return {"append_per_second": n / appended, "with_final_flush_per_second": n / flushed}


async def make_journal(endpoint: str, gigabytes: float, layout: str) -> dict[str, str]:
    """A journal of ``gigabytes`` in 64 MiB flushes, for replay_memory to read in a fresh process."""
    bucket, stage = new_bucket(endpoint), tempfile.mkdtemp()
    uri = f"s3://{bucket}/replay?layout={layout}"
    size = int(gigabytes * (1 << 30))
    await fill(uri, stage, endpoint, size, flushes=max(1, size // (64 * MiB)), merge_after=1 << 30)
    return {"uri": uri}


async def replay_memory(endpoint: str, uri: str) -> dict[str, float]:
    """Peak memory growth while replaying a journal from S3."""
    async with CheckpointManager.from_uri(
        uri, stage_dir=tempfile.mkdtemp(), endpoint_url=endpoint
    ) as manager:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        count = 0
        start = time.perf_counter()
        async for _ in manager.replay():
            count += 1
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"growth_bytes": peak - before, "records": count, "records_per_second": count / seconds}


MEASUREMENTS: dict[str, Any] = {
    "object_flush_bytes": object_flush_bytes,
    "segments_flush_seconds": segments_flush_seconds,
    "manager_append": manager_append,
    "make_journal": make_journal,
    "replay_memory": replay_memory,
}


def measure(endpoint: str, name: str, *args: object) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--one", endpoint, name, json.dumps(args)],
        capture_output=True,
        text=True,
    )
    if out.returncode:
        sys.exit(f"{name}{args} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller workloads, for a smoke run")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        endpoint, name, rest = args.one
        print(json.dumps(asyncio.run(MEASUREMENTS[name](endpoint, *json.loads(rest)))))
        return

    big = 16 if args.quick else 64
    n = 200_000 if args.quick else 1_000_000
    gigabytes = 0.1 if args.quick else 1.0
    with moto_server() as endpoint:
        flush = measure(endpoint, "object_flush_bytes", big)
        small_journal = measure(endpoint, "segments_flush_seconds", 1)
        big_journal = measure(endpoint, "segments_flush_seconds", big)
        local = measure(endpoint, "manager_append", n, "local")
        s3 = measure(endpoint, "manager_append", n, "s3")
        memory = {}
        for layout in ("object", "segments"):
            journal = measure(endpoint, "make_journal", gigabytes, layout)
            memory[layout] = measure(endpoint, "replay_memory", journal["uri"])

    beyond = flush["yoink_bytes"] - flush["new_bytes"]
    ratio = big_journal["median_seconds"] / small_journal["median_seconds"]
    append_ratio = local["append_per_second"] / s3["append_per_second"]
    rows = [
        (
            f"object layout, 1,000-record flush onto a {big} MiB object: bytes beyond the new data",
            beyond < MiB,
            f"{beyond / 1024:,.0f} KiB (new data {flush['new_bytes'] / 1024:,.0f} KiB; "
            f"the reference design moved {flush['reference_bytes'] / MiB:,.1f} MiB); "
            f"{flush['yoink_seconds'] * 1000:,.0f} ms vs {flush['reference_seconds'] * 1000:,.0f} ms",
        ),
        (
            f"segments layout, 1,000-record flush onto {big} MiB vs onto 1 MiB: at most 1.5x",
            ratio <= 1.5,
            f"{ratio:.2f}x ({big_journal['median_seconds'] * 1000:.1f} ms vs "
            f"{small_journal['median_seconds'] * 1000:.1f} ms, medians of 30)",
        ),
        (
            "manager append, S3 (staged) vs local file: within 2x",
            append_ratio <= 2,
            f"{s3['append_per_second']:,.0f}/s vs {local['append_per_second']:,.0f}/s "
            f"({append_ratio:.2f}x); with the final flush {s3['with_final_flush_per_second']:,.0f}/s "
            f"vs {local['with_final_flush_per_second']:,.0f}/s",
        ),
    ]
    for layout, figures in memory.items():
        rows.append(
            (
                f"replay of a {gigabytes:g} GB journal, layout={layout}: peak memory growth < 64 MiB",
                figures["growth_bytes"] < 64 * MiB,
                f"{figures['growth_bytes'] / MiB:.1f} MiB, {figures['records']:,.0f} records "
                f"at {figures['records_per_second']:,.0f}/s",
            )
        )
    print(f"yoink S3 benchmark against moto's server{' (--quick)' if args.quick else ''}")
    for title, ok, note in rows:
        print(f"  {'PASS' if ok else 'FAIL'}  {title}: {note}")


if __name__ == "__main__":
    main()
