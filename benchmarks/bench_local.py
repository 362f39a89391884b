"""Local-backend throughput and memory, against baselines measured in the same run.

    .venv/bin/python benchmarks/bench_local.py            # the issue's workload: 1,000,000 records
    .venv/bin/python benchmarks/bench_local.py --quick    # a smaller one, for a smoke run
    .venv/bin/python benchmarks/bench_local.py --against a8d5b35   # and yoink at that commit, alike

Every figure is taken in a fresh process, best of --repeat runs; the append figures and the
encode-only loop they are compared with are taken in turn. Workload: records
{"url": "https://example.com/page/<i>", "status": 200, "depth": 3} from one task, written to a
local file with fsync on flush.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import aiofiles
import anyio
import orjson

from yoink import CheckpointManager
from yoink.storage import CheckpointStorage


def record(i: int) -> dict[str, Any]:
    return {"url": f"https://example.com/page/{i}", "status": 200, "depth": 3}


def fresh_path(directory: str) -> str:
    path = os.path.join(directory, "bench.jsonl")
    if os.path.exists(path):
        os.unlink(path)
    return path


# Each measurement returns records per second (or bytes, for memory) and runs in its own process.


async def baseline_append(directory: str, n: int) -> float:
    """The reference page's design taken literally: await one aiofiles write per record."""
    records = [record(i) for i in range(n)]
    path = fresh_path(directory)
    start = time.perf_counter()
    async with aiofiles.open(path, "a") as f:
        for r in records:
            await f.write(orjson.dumps(r).decode() + "\n")
        await f.flush()
        os.fsync(f.fileno())
    return n / (time.perf_counter() - start)


async def encode_only(directory: str, n: int) -> float:
    """Encode with orjson, joined every 64 lines, nothing written: the ceiling for append."""
    records = [record(i) for i in range(n)]
    start = time.perf_counter()
    chunks, lines = [], []
    for r in records:
        lines.append(orjson.dumps(r))
        if len(lines) == 64:
            chunks.append(b"\n".join(lines))
            lines = []
    return n / (time.perf_counter() - start)


async def yoink_append(directory: str, n: int) -> float:
    records = [record(i) for i in range(n)]
    path = fresh_path(directory)
    start = time.perf_counter()
    async with CheckpointManager.from_uri(path, flush_interval=None) as manager:
        for r in records:
            await manager.append(r)
        await manager.flush()
        elapsed = time.perf_counter() - start
    return n / elapsed


class Discard(CheckpointStorage):
    """A storage that keeps nothing: what append costs in the manager alone, without I/O."""

    async def write(self, data: str) -> None:
        pass

    async def read(self) -> AsyncIterator[str]:
        return
        yield

    async def exists(self) -> bool:
        return False

    async def flush(self) -> None:
        pass

    async def close(self) -> None:
        pass


async def yoink_append_no_io(directory: str, n: int) -> float:
    """As yoink_append, to a storage that discards the batches."""
    records = [record(i) for i in range(n)]
    start = time.perf_counter()
    async with CheckpointManager(Discard(), flush_interval=None) as manager:
        for r in records:
            await manager.append(r)
        await manager.flush()
        elapsed = time.perf_counter() - start
    return n / elapsed


def write_journal(path: str, n: int) -> None:
    with open(path, "wb") as f:
        for start in range(0, n, 10_000):
            f.write(b"".join(orjson.dumps(record(i)) + b"\n" for i in range(start, min(n, start + 10_000))))


async def baseline_replay(directory: str, n: int) -> float:
    """Line by line through aiofiles, each line decoded with orjson."""
    path = fresh_path(directory)
    write_journal(path, n)
    start = time.perf_counter()
    count = 0
    async with aiofiles.open(path) as f:
        async for line in f:
            orjson.loads(line)
            count += 1
    assert count == n
    return n / (time.perf_counter() - start)


async def yoink_replay(directory: str, n: int) -> float:
    path = fresh_path(directory)
    write_journal(path, n)
    return await replay_rate(path, n)


async def replay_rate(path: str, n: int) -> float:
    start = time.perf_counter()
    count = 0
    async with CheckpointManager.from_uri(path) as manager:
        async for _ in manager.replay():
            count += 1
    assert count == n
    return n / (time.perf_counter() - start)


def write_long_number_journal(path: str, n: int) -> None:
    with open(path, "wb") as f:
        # orjson cannot write such an integer: the line is put together by hand
        f.write(b"".join(orjson.dumps(record(i))[:-1] + b',"id":%d}\n' % (10**20 + i) for i in range(n)))


async def yoink_replay_long_numbers(directory: str, n: int) -> float:
    """As yoink_replay, each record holding an integer beyond 64 bits: such lines are read again by json."""
    path = fresh_path(directory)
    write_long_number_journal(path, n)
    return await replay_rate(path, n)


async def concurrent_flushes(directory: str, seconds: int) -> float:
    """64 tasks, each appending one record and awaiting flush() in a loop: durable records/s."""
    path = fresh_path(directory)
    done = 0
    async with CheckpointManager.from_uri(path, flush_interval=None) as manager:
        deadline = time.perf_counter() + seconds

        async def task(t: int) -> None:
            nonlocal done
            i = 0
            while time.perf_counter() < deadline:
                await manager.append(record(t * 10_000_000 + i))
                await manager.flush()
                done += 1
                i += 1

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for t in range(64):
                tg.start_soon(task, t)
        elapsed = time.perf_counter() - start
    return done / elapsed


def write_padded_journal(path: str, gigabytes: float) -> int:
    pad = "p" * 200
    with open(path, "wb") as f:
        i = 0
        while f.tell() < gigabytes * (1 << 30):
            f.write(b"".join(orjson.dumps({**record(j), "pad": pad}) + b"\n" for j in range(i, i + 10_000)))
            i += 10_000
        return f.tell()


async def replay_memory(directory: str, gigabytes: float) -> float:
    """Peak memory growth (bytes) while replaying a journal of this size."""
    path = fresh_path(directory)
    size = write_padded_journal(path, gigabytes)
    async with CheckpointManager.from_uri(path) as manager:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        count = 0
        async for _ in manager.replay():
            count += 1
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"journal_bytes": size, "records": count}), file=sys.stderr)
    return peak - before


MEASUREMENTS: dict[str, Callable[[str, Any], Coroutine[Any, Any, float]]] = {
    "baseline_append": baseline_append,
    "encode_only": encode_only,
    "yoink_append": yoink_append,
    "yoink_append_no_io": yoink_append_no_io,
    "baseline_replay": baseline_replay,
    "yoink_replay": yoink_replay,
    "yoink_replay_long_numbers": yoink_replay_long_numbers,
    "concurrent_flushes": concurrent_flushes,
    "replay_memory": replay_memory,
}


def measure(
    name: str,
    size: float,
    repeat: int,
    directory: str,
    best: Callable[[list[float]], float] = max,
    yoink_at: str | None = None,
) -> float:
    """Best of ``repeat`` fresh processes; ``yoink_at`` is a checkout whose yoink they import."""
    env = dict(os.environ, PYTHONPATH=yoink_at) if yoink_at else None
    results = []
    for _ in range(repeat):
        out = subprocess.run(
            [sys.executable, __file__, "--one", name, str(size), directory],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        results.append(float(out.stdout.strip()))
    return best(results)


def alternating(names: list[str], size: float, repeat: int, directory: str) -> list[float]:
    """The best of ``repeat`` runs of each measurement, taken in turn, for figures compared as a ratio.

    The machine's speed drifts from minute to minute; alternating lets the drift fall on each alike.
    """
    runs: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeat):
        for name in names:
            runs[name].append(measure(name, size, 1, directory))
    return [max(runs[name]) for name in names]


def compare(revision: str, n: int, repeat: int, directory: str, quick: bool) -> None:
    """yoink at ``revision`` against this checkout, each figure taken in turn, in this one run."""
    checkout = os.path.join(directory, "at-revision")
    git = ["git", "-C", os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    subprocess.run([*git, "worktree", "add", "--detach", checkout, revision], check=True, capture_output=True)
    try:
        print(f"yoink at {revision} (before) against this checkout (after): {n:,} records")
        for name, size in [
            ("yoink_append", n),
            ("yoink_replay", n),
            ("concurrent_flushes", 2 if quick else 5),
        ]:
            before, after = [], []
            for _ in range(repeat):  # alternate, so that the machine's drift falls on both alike
                before.append(measure(name, size, 1, directory, yoink_at=checkout))
                after.append(measure(name, size, 1, directory))
            print(
                f"  {name}: before {max(before):,.0f}/s, after {max(after):,.0f}/s "
                f"({max(after) / max(before):.2f} x; runs before {sorted(before)}, after {sorted(after)})"
            )
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", checkout], check=False, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller workloads, for a smoke run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; the best is kept")
    parser.add_argument(
        "--dir", default=None, help="where to write journals (default: a temporary directory)"
    )
    parser.add_argument(
        "--against",
        metavar="REVISION",
        help="compare append, replay and flushes with yoink at a git revision",
    )
    parser.add_argument("--one", nargs=3, metavar=("NAME", "SIZE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        name, size, directory = args.one
        print(asyncio.run(MEASUREMENTS[name](directory, float(size) if "." in size else int(size))))
        return

    n = 100_000 if args.quick else 1_000_000
    if args.against:
        with tempfile.TemporaryDirectory(dir=args.dir) as directory:
            compare(args.against, n, args.repeat, directory, args.quick)
        return
    baseline_n = 20_000 if args.quick else 50_000  # the baselines are slow; their rate does not depend on n
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        r = args.repeat
        base_append = measure("baseline_append", baseline_n, r, directory)
        encode, append, append_no_io = alternating(
            ["encode_only", "yoink_append", "yoink_append_no_io"], n, r, directory
        )
        base_replay = measure("baseline_replay", baseline_n, r, directory)
        replay = measure("yoink_replay", n, r, directory)
        replay_long = measure("yoink_replay_long_numbers", n, r, directory)
        flushes = measure("concurrent_flushes", 2 if args.quick else 5, r, directory)
        memory = measure("replay_memory", 0.1 if args.quick else 1.0, 1, directory, best=min)

    ratio_base, ratio_encode = append / base_append, append / encode
    rows = [
        (
            "append, records/s",
            append,
            f">= 100 x baseline ({base_append:,.0f}/s), >= 0.5 x encode-only ({encode:,.0f}/s)",
            ratio_base >= 100 and ratio_encode >= 0.5,
            f"{ratio_base:.0f} x baseline, {ratio_encode:.2f} x encode-only",
        ),
        (
            "append to a storage that discards (the manager alone, no I/O), records/s",
            append_no_io,
            "none: it shows what append costs without the write to the file",
            True,
            f"{append_no_io / encode:.2f} x encode-only",
        ),
        (
            "replay, records/s",
            replay,
            f">= 100 x baseline ({base_replay:,.0f}/s)",
            replay >= 100 * base_replay,
            f"{replay / base_replay:.0f} x baseline",
        ),
        (
            "replay of records each holding an integer beyond 64 bits, records/s",
            replay_long,
            "none: such a line is read again by the json module, for its exact integers",
            True,
            f"{replay_long / replay:.2f} x replay",
        ),
        ("64 tasks append+flush, durable records/s", flushes, ">= 100,000", flushes >= 100_000, ""),
        (
            "replay of a 1 GB journal, peak memory growth, bytes",
            memory,
            "< 64 MiB",
            memory < 64 << 20,
            f"{memory / (1 << 20):.1f} MiB",
        ),
    ]
    print(f"yoink local-backend benchmark: {n:,} records, best of {args.repeat} fresh processes")
    if args.quick:
        print("  (--quick: fixed costs weigh more at this size; the targets are set for the full run)")
    for title, value, target, ok, note in rows:
        print(f"  {'PASS' if ok else 'FAIL'}  {title}: {value:,.0f}  (target {target}) {note}")


if __name__ == "__main__":
    main()
