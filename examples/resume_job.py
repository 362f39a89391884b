"""Run a batch of async jobs that picks up where it stopped.

    python examples/resume_job.py [CHECKPOINT] [--jobs N] [--concurrency N]

Kill it at any moment (Ctrl-C, kill -9, a deploy) and run it again: jobs the checkpoint holds are
skipped, and the rest run. Each job's result is appended and flushed as it finishes; tasks that
flush at the same moment share one fsync, so this costs little.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import anyio

from yoink import CheckpointManager


async def run_job(n: int, work_log: int | None) -> dict[str, int]:
    await anyio.sleep(random.uniform(0.01, 0.05))  # stands in for an API call or a query
    if work_log is not None:  # what an outside system would see: one line per job run
        os.write(work_log, f"{n}\n".encode())
    return {"job": n, "result": n * n}


async def main(checkpoint_uri: str, jobs: int, concurrency: int, work_log_path: str | None) -> None:
    work_log = os.open(work_log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT) if work_log_path else None
    async with CheckpointManager.from_uri(checkpoint_uri) as checkpoint:
        started = time.perf_counter()
        done = {record["job"] async for record in checkpoint.replay()}
        replay_ms = (time.perf_counter() - started) * 1000
        print(
            f"resumed: {len(done)} of {jobs} jobs already done (replayed in {replay_ms:.0f} ms)", flush=True
        )

        finished = len(done)
        limiter = anyio.CapacityLimiter(concurrency)

        async def job(n: int) -> None:
            nonlocal finished
            async with limiter:
                result = await run_job(n, work_log)
            await checkpoint.append(result)
            await checkpoint.flush()  # durable before we count it as done
            finished += 1
            if finished % 250 == 0:
                print(f"progress: {finished} of {jobs} jobs done", flush=True)

        async with anyio.create_task_group() as tg:
            for n in range(jobs):
                if n not in done:
                    tg.start_soon(job, n)
    print(f"finished: all {jobs} jobs done", flush=True)


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
