"""Redis-backend throughput and memory, beside the reference page's sketch in the same run.

    .venv/bin/python benchmarks/bench_redis.py           # the issue's workload: 300,000 records
    .venv/bin/python benchmarks/bench_redis.py --quick   # 50,000, for a smoke run

A redis-server is started on a free port for the run. Every figure is the best of --repeat fresh
processes. The sketch (tests/reference_sketch.py) is the page's backend taken literally: one RPUSH
per record written, one LRANGE 0 -1 to read the whole list.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.reference_sketch import RedisListSketch as Sketch
from tests.servers.redis import RedisServer
from yoink import CheckpointManager


def record(i: int) -> dict[str, Any]:
    return {"url": f"https://example.com/page/{i}", "status": 200, "depth": 3}


async def sketch_append(url: str, n: int) -> dict[str, float]:
    records = [record(i) for i in range(n)]
    storage = Sketch(url, f"sketch-{uuid.uuid4().hex}")
    start = time.perf_counter()
    for r in records:
        await storage.write(orjson.dumps(r).decode() + "\n")
    await storage.flush()
    elapsed = time.perf_counter() - start
    await storage.close()
    return {"per_second": n / elapsed}


async def yoink_append(url: str, n: int) -> dict[str, float]:
    records = [record(i) for i in range(n)]
    async with CheckpointManager.from_uri(
        f"{url}?key=yoink-{uuid.uuid4().hex}", flush_interval=None
    ) as manager:
        start = time.perf_counter()
        for r in records:
            await manager.append(r)
        await manager.flush()
        elapsed = time.perf_counter() - start
    return {"per_second": n / elapsed}


async def make_journals(url: str, n: int) -> dict[str, str]:
    """The same records as a list the sketch wrote (an item a record) and as a yoink stream."""
    sketch_key, yoink_key = f"sketch-{uuid.uuid4().hex}", f"yoink-{uuid.uuid4().hex}"
    sketch = Sketch(url, sketch_key)
    lines = [orjson.dumps(record(i)).decode() + "\n" for i in range(n)]
    for first in range(0, n, 10_000):
        await sketch.client.rpush(sketch_key, *lines[first : first + 10_000])
    await sketch.close()
    async with CheckpointManager.from_uri(f"{url}?key={yoink_key}", flush_interval=None) as manager:
        await manager.append_many(record(i) for i in range(n))
    return {"sketch": sketch_key, "yoink": yoink_key}


async def replay(url: str, which: str, key: str) -> dict[str, float]:
    storage = Sketch(url, key) if which == "sketch" else None
    manager = (
        CheckpointManager(storage=storage) if storage else CheckpointManager.from_uri(f"{url}?key={key}")
    )
    async with manager:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        start = time.perf_counter()
        count = 0
        async for _ in manager.replay():
            count += 1
        elapsed = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"per_second": count / elapsed, "growth_bytes": peak - before, "records": count}


MEASUREMENTS: dict[str, Any] = {
    "sketch_append": sketch_append,
    "yoink_append": yoink_append,
    "make_journals": make_journals,
    "replay": replay,
}


def measure(url: str, name: str, *args: object, repeat: int = 1) -> dict[str, float]:
    results = []
    for _ in range(repeat):
        out = subprocess.run(
            [sys.executable, __file__, "--one", url, name, json.dumps(args)], capture_output=True, text=True
        )
        if out.returncode:
            sys.exit(f"{name}{args} failed:\n{out.stderr}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return max(results, key=lambda r: r.get("per_second", 0))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smaller workload, for a smoke run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; the best is kept")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        url, name, rest = args.one
        print(json.dumps(asyncio.run(MEASUREMENTS[name](url, *json.loads(rest)))))
        return

    n = 50_000 if args.quick else 300_000
    with tempfile.TemporaryDirectory() as directory:
        server = RedisServer(Path(directory))
        try:
            r = args.repeat
            base_append = measure(server.url, "sketch_append", n, repeat=r)
            append = measure(server.url, "yoink_append", n, repeat=r)
            keys = measure(server.url, "make_journals", n)
            base_replay = measure(server.url, "replay", "sketch", keys["sketch"], repeat=r)
            replayed = measure(server.url, "replay", "yoink", keys["yoink"], repeat=r)
        finally:
            server.stop()

    rows = [
        (
            "append, records/s",
            append["per_second"],
            f">= 500,000 and >= 20 x the sketch ({base_append['per_second']:,.0f}/s)",
            append["per_second"] >= 500_000 and append["per_second"] >= 20 * base_append["per_second"],
            f"{append['per_second'] / base_append['per_second']:.0f} x the sketch",
        ),
        (
            "replay, records/s",
            replayed["per_second"],
            f">= 1,000,000 and >= 3 x the sketch's LRANGE ({base_replay['per_second']:,.0f}/s)",
            replayed["per_second"] >= 1_000_000 and replayed["per_second"] >= 3 * base_replay["per_second"],
            f"{replayed['per_second'] / base_replay['per_second']:.1f} x the sketch",
        ),
        (
            "replay, peak memory growth, MiB",
            replayed["growth_bytes"] / (1 << 20),
            f"bounded by a page (the sketch's whole list: {base_replay['growth_bytes'] / (1 << 20):.1f} MiB)",
            replayed["growth_bytes"] < base_replay["growth_bytes"],
            "",
        ),
    ]
    print(f"yoink Redis benchmark: {n:,} records, best of {args.repeat} fresh processes, local redis-server")
    for title, value, target, ok, note in rows:
        print(f"  {'PASS' if ok else 'FAIL'}  {title}: {value:,.1f}  (target {target}) {note}")


if __name__ == "__main__":
    main()
