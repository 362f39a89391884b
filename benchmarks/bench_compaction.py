"""Compaction: restart before and after, the compaction's own cost and memory, and the background policy.

    .venv/bin/python benchmarks/bench_compaction.py                      # local, 10,000,000 records
    .venv/bin/python benchmarks/bench_compaction.py --backend redis      # a redis-server on a free port
    .venv/bin/python benchmarks/bench_compaction.py --backend s3-segments  # moto's server, its own process
    .venv/bin/python benchmarks/bench_compaction.py --records 1000000 --keys 10000   # smaller

Workload: records {"url": "https://example.com/page/<i % keys>", "status": 200, "n": i}, appended
in order, so a compaction by "url" keeps the last ``keys`` of them. Every figure is taken in a
fresh process (peak memory is that process's, less what it held once yoink was imported):

- restart: open a manager and replay the whole journal, before and after ``compact(key="url")``;
- the compaction, against a full replay plus writing the snapshot (the same records appended to a
  new journal and flushed), both measured in this run;
- its peak memory, against 64 MiB plus the distinct records (the kept records as Python dicts,
  measured with tracemalloc in a process of their own);
- the policy: append throughput with ``CompactionPolicy(key="url")`` against the same run without.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from yoink import CheckpointManager
from yoink._compaction import CompactionPolicy


def record(i: int, keys: int) -> dict[str, Any]:
    return {"url": f"https://example.com/page/{i % keys}", "status": 200, "n": i}


def rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# Each phase runs in its own process, gets (uri, options, records, keys) and returns a dict.


async def build(uri: str, options: dict[str, Any], n: int, keys: int) -> dict[str, float]:
    start = time.perf_counter()
    async with CheckpointManager.from_uri(uri, flush_interval=None, **options) as manager:
        for i in range(n):
            await manager.append(record(i, keys))
        await manager.flush()
    return {"seconds": time.perf_counter() - start}


async def restart(uri: str, options: dict[str, Any], n: int, keys: int) -> dict[str, float]:
    manager = CheckpointManager.from_uri(uri, read_only=True, **options)  # the backend's imports: not timed
    start = time.perf_counter()
    async with manager:
        count = 0
        async for _ in manager.replay():
            count += 1
    return {"seconds": time.perf_counter() - start, "records": count}


async def compact(uri: str, options: dict[str, Any], n: int, keys: int) -> dict[str, float]:
    base = rss()
    start = time.perf_counter()
    async with CheckpointManager.from_uri(uri, flush_interval=None, **options) as manager:
        result = await manager.compact(key="url")
    return {
        "seconds": time.perf_counter() - start,
        "peak_bytes": rss() - base,
        "records_before": result.records_before or 0,
        "records": result.records or 0,
    }


async def write_snapshot(uri: str, options: dict[str, Any], n: int, keys: int) -> dict[str, float]:
    """The snapshot's writing alone: the kept records appended to a new journal and flushed."""
    kept = [record(i, keys) for i in range(n - keys, n)]
    start = time.perf_counter()
    async with CheckpointManager.from_uri(uri, flush_interval=None, **options) as manager:
        for r in kept:
            await manager.append(r)
        await manager.flush()
    return {"seconds": time.perf_counter() - start}


async def distinct_records(uri: str, options: dict[str, Any], n: int, keys: int) -> dict[str, float]:
    """What the kept records take in memory as dicts, as the fold holds them (tracemalloc)."""
    tracemalloc.start()
    held = {r["url"]: r for r in (json.loads(json.dumps(record(i, keys))) for i in range(n - keys, n))}
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(held) == keys
    return {"bytes": size}


async def append_rate(uri: str, options: dict[str, Any], n: int, keys: int) -> dict[str, float]:
    policy = options.pop("policy", None)
    if policy:
        options["compact"] = CompactionPolicy(key="url", **policy)
    start = time.perf_counter()
    async with CheckpointManager.from_uri(uri, flush_interval=None, **options) as manager:
        for i in range(n):
            await manager.append(record(i, keys))
        await manager.flush()
    return {"per_second": n / (time.perf_counter() - start)}


PHASES = {f.__name__: f for f in (build, restart, compact, write_snapshot, distinct_records, append_rate)}


def measure(phase: str, uri: str, options: dict[str, Any], n: int, keys: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--phase", phase, uri, json.dumps(options), str(n), str(keys)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise SystemExit(f"{phase} failed:\n{out.stderr}")
    result: dict[str, float] = json.loads(out.stdout.splitlines()[-1])
    return result


@contextlib.contextmanager
def backend(name: str, directory: str) -> Iterator[tuple[Any, dict[str, Any]]]:
    """(a function of a journal's name to its URI, the storage options) for the backend."""
    if name == "local":
        yield (lambda journal: os.path.join(directory, f"{journal}.jsonl")), {}
    elif name == "redis":
        from tests.servers.redis import RedisServer

        server = RedisServer(Path(directory))
        try:
            yield (lambda journal: f"{server.url}?key={journal}-{uuid.uuid4().hex}"), {}
        finally:
            server.stop()
    elif name == "s3-segments":
        from benchmarks.bench_s3 import moto_server, new_bucket

        with moto_server() as endpoint:
            os.environ["AWS_ENDPOINT_URL"] = endpoint
            bucket = new_bucket(endpoint)
            options = {"stage_dir": os.path.join(directory, "stage")}
            yield (lambda journal: f"s3://{bucket}/{journal}?layout=segments"), options
    else:
        raise SystemExit(f"unknown backend {name!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="local", choices=["local", "redis", "s3-segments"])
    parser.add_argument("--records", type=int, default=10_000_000)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--policy-records", type=int, default=2_000_000)
    parser.add_argument("--phase", nargs=5, metavar=("PHASE", "URI", "OPTIONS", "N", "KEYS"))
    args = parser.parse_args()
    if args.phase:
        phase, uri, options, n, keys = args.phase
        print(json.dumps(asyncio.run(PHASES[phase](uri, json.loads(options), int(n), int(keys)))))
        return
    n, keys = args.records, args.keys
    with tempfile.TemporaryDirectory() as directory, backend(args.backend, directory) as (uri_of, options):
        uri = uri_of("journal")
        built = measure("build", uri, options, n, keys)
        before = measure("restart", uri, options, n, keys)
        snapshot = measure("write_snapshot", uri_of("snapshot"), options, n, keys)
        compacted = measure("compact", uri, options, n, keys)
        after = measure("restart", uri, options, n, keys)
        distinct = measure("distinct_records", uri, options, n, keys)
        plain = measure("append_rate", uri_of("plain"), options, args.policy_records, keys)
        policy = {"growth": 4.0, "min_bytes": 16 << 20}
        with_policy = measure(
            "append_rate", uri_of("policy"), {**options, "policy": policy}, args.policy_records, keys
        )
    assert before["records"] == n, before
    assert after["records"] == keys, after
    budget = 1.5 * (before["seconds"] + snapshot["seconds"])
    memory_budget = (64 << 20) + distinct["bytes"]
    mib = 1 << 20
    rows = [
        ("journal written", f"{built['seconds']:.2f} s"),
        ("restart before compaction", f"{before['seconds']:.2f} s ({n / before['seconds']:,.0f} records/s)"),
        (
            "restart after compaction",
            f"{after['seconds']:.3f} s: {before['seconds'] / after['seconds']:.0f}x faster (target 50x)",
        ),
        (
            "compact(key='url')",
            f"{compacted['seconds']:.2f} s: {compacted['seconds'] / budget:.0%} of 1.5 x (replay "
            f"{before['seconds']:.2f} s + snapshot write {snapshot['seconds']:.2f} s) = {budget:.2f} s",
        ),
        (
            "its peak memory",
            f"{compacted['peak_bytes'] / mib:.1f} MiB, of 64 MiB + the distinct records "
            f"({distinct['bytes'] / mib:.1f} MiB) = {memory_budget / mib:.1f} MiB",
        ),
        ("append, no policy", f"{plain['per_second']:,.0f} records/s ({args.policy_records:,} records)"),
        (
            f"append, policy {policy}",
            f"{with_policy['per_second']:,.0f} records/s: "
            f"{with_policy['per_second'] / plain['per_second']:.0%} of it (target 80%)",
        ),
    ]
    print(f"yoink compaction benchmark: {args.backend}, {n:,} records over {keys:,} keys")
    for name, figure in rows:
        print(f"  {name:<28} {figure}")


if __name__ == "__main__":
    main()
