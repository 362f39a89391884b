"""Run a batch of async jobs that picks up where it stopped, on a yoink work ledger.

    python examples/resume_job.py [CHECKPOINT] [--jobs N] [--concurrency N]

Kill it at any moment (Ctrl-C, kill -9, a deploy) and run it again: jobs the ledger holds as done
are skipped, and the rest run. A job's "done" is durable when its claim exits; claims that end
together share one fsync, so this costs little. The jobs that were running at the kill are run
again, and the ledger lists them (``interrupted``): a job with side effects would check them.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import anyio

from yoink import Ledger


async def run_job(n: int, work_log: int | None) -> int:
    await anyio.sleep(random.uniform(0.01, 0.05))  # stands in for an API call or a query
    if work_log is not None:  # what an outside system would see: one line per job run
        os.write(work_log, f"{n}\n".encode())
    return n * n


async def main(checkpoint_uri: str, jobs: int, concurrency: int, work_log_path: str | None) -> None:
    work_log = os.open(work_log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT) if work_log_path else None
    started = time.perf_counter()
    async with Ledger.open(checkpoint_uri, fingerprint={"job": "squares", "v": 1}) as ledger:
        await ledger.add(range(jobs))  # the jobs the ledger has already are ignored
        opened_ms = (time.perf_counter() - started) * 1000
        done = ledger.progress.done
        print(f"resumed: {done} of {jobs} jobs already done (opened in {opened_ms:.0f} ms)", flush=True)
        print(f"interrupted: {' '.join(map(str, ledger.interrupted)) or 'none'}", flush=True)

        async def worker() -> None:
            nonlocal done
            async for n in ledger.pending():
                async with ledger.claim(n) as job:
                    job.result = await run_job(n, work_log)
                if job.error is None:  # done, and durable: a failed job is tried again later
                    done += 1
                    if done % 250 == 0:
                        print(f"progress: {done} of {jobs} jobs done", flush=True)

        async with anyio.create_task_group() as group:
            for _ in range(concurrency):
                group.start_soon(worker)
        progress = ledger.progress
    print(f"finished: {progress.done} of {jobs} jobs done, {progress.failed} given up", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoint", nargs="?", default="./jobs.jsonl", help="a path or URI (default ./jobs.jsonl)"
    )
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--work-log", help="append each job run to this file, to count re-runs")
    args = parser.parse_args()
    try:
        anyio.run(main, args.checkpoint, args.jobs, args.concurrency, args.work_log)
    except KeyboardInterrupt:
        sys.exit(130)
