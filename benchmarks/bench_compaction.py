"""Compaction: restart before and after, the compaction's own cost and memory, and the background policy.

    .venv/bin/python benchmarks/bench_compaction.py                      # local, 10,000,000 records
    .venv/bin/python benchmarks/bench_compaction.py --backend redis      # a redis-server on a free port
    .venv/bin/python benchmarks/bench_compaction.py --backend s3-segments  # moto's server, its own process
    .venv/bin/python benchmarks/bench_compaction.py --records 1000000 --keys 10000   # smaller
    .venv/bin/python benchmarks/bench_compaction.py --only policy --against main    # the policy, before/after

Workload: records {"url": "https://example.com/page/<i % keys>", "status": 200, "n": i}, appended
in order, so a compaction by "url" keeps the last ``keys`` of them. Every figure is taken in a
fresh process:

- restart: open a manager and replay the whole journal, before and after ``compact(key="url")``;
- the compaction (the ``compact()`` call, on a manager already open), against a full replay plus
  writing the snapshot (the same records appended to a new journal and flushed), both measured in
  this run;
- its peak memory, against 64 MiB plus the distinct records (the kept records as Python dicts,
  measured with tracemalloc in a process of their own): what the process's peak grew by during
  the call, and the peak of its worker and the worker's keeper together, if the fold ran in one
  (the whole processes, their interpreters included; by proportional set size, which counts the
  pages they share once, and by resident size, which counts them in each);
- the policy: append throughput with ``CompactionPolicy(key="url")`` against runs without it,
  ``--policy-rounds`` of each in turn (the median of each round's ratio), three ways. "Appending":
  the appends and the final flush's writing and fsync, leaving out only the flush's wait for the
  compaction under way at the end (how much the policy slows the appends themselves; every record
  is written within it, those held during a compaction too). "To close": to the end of
  ``close()``, every wait included. "Per CPU second": records per second of the CPU time the
  appending process used to the end of ``close()`` (its threads' included, a worker process's
  not): what the policy costs the process that appends, whatever else keeps the machine busy.
  ``--against REVISION`` takes the same figures with yoink at that git revision (from
  ``git archive``) in turn with these, in the same run: before and after, under the same load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# A phase imports this checkout's yoink, or (--against) the one in $YOINK_BENCH_TREE.
sys.path.insert(0, os.environ.get("YOINK_BENCH_TREE") or str(Path(__file__).resolve().parent.parent))

from yoink import CheckpointManager
from yoink._compaction import CompactionPolicy

ROOT = Path(__file__).resolve().parent.parent
TREE = "YOINK_BENCH_TREE"


def record(i: int, keys: int) -> dict[str, Any]:
    return {"url": f"https://example.com/page/{i % keys}", "status": 200, "n": i}


def rss(who: int = resource.RUSAGE_SELF) -> int:
    return resource.getrusage(who).ru_maxrss * 1024


def cpu_seconds() -> float:
    """The CPU time this process has used, its threads' included, its children's (a worker) not."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


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
    # The call alone: the backend's imports and its connection are the open's, not the compaction's.
    async with CheckpointManager.from_uri(uri, flush_interval=None, **options) as manager:
        base = rss()
        with Descendants() as descendants:
            start = time.perf_counter()
            result = await manager.compact(key="url")
            seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "peak_bytes": rss() - base,
        # its worker's and the worker's keeper's, together at their largest (both processes whole)
        "worker_peak_bytes": descendants.pss,
        "worker_peak_rss": max(descendants.rss, rss(resource.RUSAGE_CHILDREN)),
        "records_before": result.records_before or 0,
        "records": result.records or 0,
    }


class Descendants:
    """The largest memory that this process's descendants had together, sampled every 5 ms in a
    thread while the block runs: a child's own peak (``RUSAGE_CHILDREN``) is one process's, and a
    worker and its keeper are two. Both sums are kept: of their resident memory (``rss``), which
    counts the pages they share (the interpreter's libraries) in each; and of their proportional
    set size (``pss``), which counts a shared page once, split among those who share it."""

    def __init__(self) -> None:
        self.rss = self.pss = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> Descendants:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._done.wait(0.005):
            parents: dict[int, int] = {}
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    with contextlib.suppress(OSError, IndexError, ValueError):
                        stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                        parents[int(entry)] = int(stat[1])
            mine = {os.getpid()}
            grown = True  # children, then their children
            while grown:
                found = {pid for pid, parent in parents.items() if parent in mine} - mine
                grown = bool(found)
                mine |= found
            mine.discard(os.getpid())
            rss = pss = 0
            for pid in mine:
                with contextlib.suppress(OSError, ValueError):
                    sizes = dict(
                        line.split(":", 1)
                        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
                    )
                    rss += int(sizes["Rss"].split()[0]) << 10
                    pss += int(sizes["Pss"].split()[0]) << 10
            self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)


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


class Compactions(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += record.getMessage().startswith("compacted")


async def append_rate(uri: str, options: dict[str, Any], n: int, keys: int) -> dict[str, float]:
    policy = options.pop("policy", None)
    if policy:
        options["compact"] = CompactionPolicy(key="url", **policy)
    compactions = Compactions()
    logging.getLogger("yoink").addHandler(compactions)
    logging.getLogger("yoink").setLevel(logging.INFO)
    cpu = cpu_seconds()
    start = time.perf_counter()
    async with CheckpointManager.from_uri(uri, flush_interval=None, **options) as manager:
        for i in range(n):
            await manager.append(record(i, keys))
        appended = time.perf_counter()
        await manager._compactions_done()  # what flush() would wait for first: the compaction under way
        waited = time.perf_counter()
        await manager.flush()  # the records appended since, written and fsynced
        flushed = time.perf_counter()
    closed = time.perf_counter()
    return {
        "appending": n / (appended - start + flushed - waited),
        "to_close": n / (closed - start),
        "per_cpu_second": n / (cpu_seconds() - cpu),
        "compactions": compactions.count,
        "peak_bytes": rss(),
    }


PHASES = {f.__name__: f for f in (build, restart, compact, write_snapshot, distinct_records, append_rate)}


def measure(
    phase: str, uri: str, options: dict[str, Any], n: int, keys: int, tree: str | None = None
) -> dict[str, float]:
    """Run one phase in a fresh process, with this checkout's yoink or ``tree``'s."""
    out = subprocess.run(
        [sys.executable, __file__, "--phase", phase, uri, json.dumps(options), str(n), str(keys)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, TREE: tree} if tree else None,
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


def checkout(revision: str, directory: str) -> str:
    """yoink's files at a git revision, unpacked under ``directory`` (the repository is only read)."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", revision], capture_output=True, check=True
    ).stdout
    tree = os.path.join(directory, f"yoink-{revision}")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tree, filter="data")
    return tree


POLICY = {"growth": 4.0, "min_bytes": 16 << 20}


def policy_rounds(
    uri_of: Any, options: dict[str, Any], n: int, keys: int, rounds: int, trees: dict[str, str | None]
) -> dict[str, list[dict[str, float]]]:
    """For each tree, ``rounds`` pairs of runs without and with the policy, all taken in turn."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for r in range(rounds):
        for name, tree in trees.items():
            plain = measure("append_rate", uri_of(f"plain-{name}-{r}"), options, n, keys, tree)
            policy = {**options, "policy": POLICY}
            with_policy = measure("append_rate", uri_of(f"policy-{name}-{r}"), policy, n, keys, tree)
            runs[name].append({"plain": plain, "policy": with_policy})  # type: ignore[dict-item]
    return runs


def policy_rows(label: str, runs: list[dict[str, Any]], n: int) -> list[tuple[str, str]]:
    rows = []
    for figure, what in [
        ("appending", "appending"),
        ("to_close", "to close"),
        ("per_cpu_second", "per CPU second"),
    ]:
        ratios = [run["policy"][figure] / run["plain"][figure] for run in runs]
        plain = statistics.median(run["plain"][figure] for run in runs)
        policy = statistics.median(run["policy"][figure] for run in runs)
        rows.append(
            (
                f"{label}, {what}",
                f"{statistics.median(ratios):.0%} (rounds: {', '.join(f'{r:.0%}' for r in ratios)}); "
                f"medians {policy:,.0f}/s with the policy, {plain:,.0f}/s without",
            )
        )
    compactions = [int(run["policy"]["compactions"]) for run in runs]
    peak = max(run["policy"]["peak_bytes"] for run in runs) / (1 << 20)
    plain_peak = max(run["plain"]["peak_bytes"] for run in runs) / (1 << 20)
    rows.append(
        (
            f"{label}, the policy's runs",
            f"{compactions} compactions; peak memory {peak:,.0f} MiB (without it: {plain_peak:,.0f} MiB)",
        )
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="local", choices=["local", "redis", "s3-segments"])
    parser.add_argument("--records", type=int, default=10_000_000)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--policy-records", type=int, default=2_000_000)
    parser.add_argument("--policy-rounds", type=int, default=3)
    parser.add_argument("--only", choices=["policy"], help="take the policy's figures alone")
    parser.add_argument("--against", metavar="REVISION", help="and the policy's with yoink at REVISION")
    parser.add_argument("--phase", nargs=5, metavar=("PHASE", "URI", "OPTIONS", "N", "KEYS"))
    args = parser.parse_args()
    if args.phase:
        phase, uri, options, n, keys = args.phase
        print(json.dumps(asyncio.run(PHASES[phase](uri, json.loads(options), int(n), int(keys)))))
        return
    n, keys = args.records, args.keys
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as directory, backend(args.backend, directory) as (uri_of, options):
        if args.only != "policy":
            rows += compaction_rows(uri_of, options, n, keys)
        trees: dict[str, str | None] = {"after": None}
        if args.against:
            trees = {f"before ({args.against})": checkout(args.against, directory), "after": None}
        runs = policy_rounds(uri_of, options, args.policy_records, keys, args.policy_rounds, trees)
    for name, tree_runs in runs.items():
        label = f"policy {name}" if args.against else "policy"
        rows += policy_rows(label, tree_runs, args.policy_records)
    print(
        f"yoink compaction benchmark: {args.backend}, {n:,} records over {keys:,} keys; the policy "
        f"{POLICY} on {args.policy_records:,} records, {args.policy_rounds} rounds, target 80%"
    )
    for name, figure in rows:
        print(f"  {name:<44} {figure}")


def compaction_rows(uri_of: Any, options: dict[str, Any], n: int, keys: int) -> list[tuple[str, str]]:
    uri = uri_of("journal")
    built = measure("build", uri, options, n, keys)
    before = measure("restart", uri, options, n, keys)
    snapshot = measure("write_snapshot", uri_of("snapshot"), options, n, keys)
    compacted = measure("compact", uri, options, n, keys)
    after = measure("restart", uri, options, n, keys)
    distinct = measure("distinct_records", uri, options, n, keys)
    one = uri_of("one")
    measure("build", one, options, 1, 1)
    fixed = measure("restart", one, options, 1, 1)  # what any open costs, before its records
    assert before["records"] == n, before
    assert after["records"] == keys, after
    budget = 1.5 * (before["seconds"] + snapshot["seconds"])
    memory_budget = (64 << 20) + distinct["bytes"]
    mib = 1 << 20
    peak, worker_peak = compacted["peak_bytes"], compacted["worker_peak_bytes"]
    return [
        ("journal written", f"{built['seconds']:.2f} s"),
        ("restart before compaction", f"{before['seconds']:.2f} s ({n / before['seconds']:,.0f} records/s)"),
        (
            "restart after compaction",
            f"{after['seconds']:.3f} s: {before['seconds'] / after['seconds']:.0f}x faster (target 50x)",
        ),
        ("restart of a one-record journal", f"{fixed['seconds']:.3f} s (the open's fixed cost)"),
        (
            "compact(key='url')",
            f"{compacted['seconds']:.2f} s: {compacted['seconds'] / budget:.0%} of 1.5 x (replay "
            f"{before['seconds']:.2f} s + snapshot write {snapshot['seconds']:.2f} s) = {budget:.2f} s",
        ),
        (
            "its peak memory",
            f"{peak / mib:.1f} MiB here + {worker_peak / mib:.1f} MiB its worker and keeper's = "
            f"{(peak + worker_peak) / mib:.1f} MiB, of 64 MiB + the distinct records "
            f"({distinct['bytes'] / mib:.1f} MiB) = {memory_budget / mib:.1f} MiB (the worker and "
            f"keeper's by their proportional set size; resident, their shared pages counted in each: "
            f"{compacted['worker_peak_rss'] / mib:.1f} MiB)",
        ),
    ]


if __name__ == "__main__":
    main()
