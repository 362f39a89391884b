"""The work ledger: durable claims from many tasks, and a resume of a million finished items.

    .venv/bin/python benchmarks/bench_ledger.py                  # 200,000 claims, 1,000,000 to resume
    .venv/bin/python benchmarks/bench_ledger.py --items 50000 --resume-items 100000   # smaller

Local journal with fsync, each figure in a fresh process:

- claims: 64 tasks take items from ``pending()`` and claim each (start durable before the body,
  done durable when the ``async with`` exits), against the baseline of the same tasks writing the
  bookkeeping by hand, one record per item and a flush (``append`` + ``flush``), in the same run;
- resume: open a ledger of a million done items (one "add", "start" and "done" each, the journal
  a ledger writes) and rebuild its state: records per second, against the journal's replay alone
  in the same run, and the memory it holds per item without results (``keep_results=False``; the
  process's peak RSS less what it held before).
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from yoink import CheckpointManager, Ledger

TASKS = 64


def key(i: int) -> str:
    return f"item-{i:07d}"


async def claims(path: str, n: int) -> dict[str, Any]:
    durable = os.environ.get("BENCH_DURABLE", "1") == "1"
    async with Ledger.open(path, fingerprint="bench", compact=False, durable=durable) as ledger:
        await ledger.add(key(i) for i in range(n))
        started = time.perf_counter()

        async def worker() -> None:
            async for item_key in ledger.pending():
                async with ledger.claim(item_key) as item:
                    item.result = 1

        async with asyncio.TaskGroup() as group:
            for _ in range(TASKS):
                group.create_task(worker())
        elapsed = time.perf_counter() - started
        assert ledger.progress.done == n
    return {"items_per_s": n / elapsed}


async def by_hand(path: str, n: int) -> dict[str, Any]:
    async with CheckpointManager.from_uri(path) as manager:
        queue = [key(i) for i in range(n)]
        queue.reverse()
        started = time.perf_counter()

        async def worker() -> None:
            while queue:
                item_key = queue.pop()
                await manager.append({"key": item_key, "result": 1})
                await manager.flush()

        async with asyncio.TaskGroup() as group:
            for _ in range(TASKS):
                group.create_task(worker())
        elapsed = time.perf_counter() - started
    return {"items_per_s": n / elapsed}


def write_finished(path: str, n: int) -> None:
    """The journal a ledger writes for n items added, then each started and done."""
    with open(path, "wb") as out:
        out.write(b'{"$ledger":"open","v":1,"fingerprint":"bench"}\n')
        for start in range(0, n, 1000):
            keys = [key(i) for i in range(start, min(n, start + 1000))]
            out.write(json.dumps({"$ledger": "add", "keys": keys}, separators=(",", ":")).encode() + b"\n")
        for i in range(n):
            out.write(b'{"$ledger":"start","key":"%s","attempt":1}\n' % key(i).encode())
            out.write(b'{"$ledger":"done","key":"%s","result":1}\n' % key(i).encode())


async def resume(path: str, n: int) -> dict[str, Any]:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    async with Ledger.open(path, fingerprint="bench", keep_results=False, compact=False) as ledger:
        elapsed = time.perf_counter() - started
        records = ledger._state.records
        assert ledger.progress.done == n
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"records_per_s": records / elapsed, "seconds": elapsed, "bytes_per_item": (peak - before) / n}


async def replay_only(path: str, n: int) -> dict[str, Any]:
    started = time.perf_counter()
    records = 0
    async with CheckpointManager.from_uri(path, read_only=True) as manager:
        async for batch in manager.replay_batches():
            records += len(batch)
    return {"records_per_s": records / (time.perf_counter() - started)}


PHASES = {"claims": claims, "by_hand": by_hand, "resume": resume, "replay_only": replay_only}


def measure(phase: str, path: str, n: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--phase", phase, path, str(n)]
    return dict(json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--resume-items", type=int, default=1_000_000)
    parser.add_argument("--phase", nargs=3, metavar=("PHASE", "PATH", "N"))
    args = parser.parse_args()
    if args.phase:
        phase, path, n = args.phase
        print(json.dumps(asyncio.run(PHASES[phase](path, int(n)))))
        return
    with tempfile.TemporaryDirectory() as directory:
        hand = measure("by_hand", f"{directory}/hand.jsonl", args.items)
        ledger = measure("claims", f"{directory}/ledger.jsonl", args.items)
        print(f"{TASKS} tasks, {args.items:,} items, local journal with fsync")
        print(f"  by hand (append + flush per item): {hand['items_per_s']:>10,.0f} items/s")
        print(
            f"  ledger (claim: start and done durable): {ledger['items_per_s']:>10,.0f} items/s "
            f"({ledger['items_per_s'] / hand['items_per_s']:.0%} of by hand; target >= 50,000)"
        )
        journal = f"{directory}/finished.jsonl"
        write_finished(journal, args.resume_items)
        baseline = measure("replay_only", journal, args.resume_items)
        result = measure("resume", journal, args.resume_items)
        print(f"resume of {args.resume_items:,} done items ({2 * args.resume_items:,}+ records)")
        print(f"  the journal's replay alone: {baseline['records_per_s']:,.0f} records/s")
        print(
            f"  the ledger's open: {result['seconds']:.2f} s, {result['records_per_s']:,.0f} records/s "
            f"({result['records_per_s'] / baseline['records_per_s']:.0%} of the replay alone; target >= "
            f"1,000,000), {result['bytes_per_item']:.0f} bytes per item (target < 200)"
        )


if __name__ == "__main__":
    main()
