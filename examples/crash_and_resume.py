"""Watch a job die from kill -9 and resume: what scripts/demo runs.

    python examples/crash_and_resume.py [--jobs N] [--kill-at FRACTION] [--dir DIR]

Starts examples/resume_job.py, kills it with SIGKILL part-way through, starts it again, and reports
what its ledger kept, and which jobs ran twice: only those the resumed ledger listed as interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from yoink import CheckpointManager

JOB = Path(__file__).with_name("resume_job.py")


def start(journal: Path, work_log: Path, jobs: int) -> subprocess.Popen[str]:
    command = [sys.executable, str(JOB), str(journal), "--jobs", str(jobs), "--work-log", str(work_log)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def relay(line: str) -> None:
    line = line.rstrip()
    print(f"    | {line if len(line) <= 100 else line[:96] + ' ...'}", flush=True)


async def journal_jobs(journal: Path) -> list[int]:
    """The jobs of the journal's "done" records, one per record: read as plain records, not through
    a ledger, so that a job recorded done twice would show."""
    jobs: list[int] = []
    async with CheckpointManager.from_uri(journal, read_only=True) as checkpoint:
        async for record in checkpoint.replay():
            if record.get("$ledger") == "done":  # {"key": n}, or {"keys": [...]} once compacted
                jobs.extend(record.get("keys", [record.get("key")]))
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--kill-at", type=float, default=0.4, help="kill when this fraction of jobs is done")
    parser.add_argument("--dir", default="demo-run", help="where the journal goes (default ./demo-run)")
    args = parser.parse_args()

    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    journal, work_log = directory / "jobs.jsonl", directory / "work.log"
    for stale in (journal, work_log, Path(f"{journal}.torn")):
        stale.unlink(missing_ok=True)

    print(f"1. Running {args.jobs} jobs with their checkpoint in {journal}; kill -9 at {args.kill_at:.0%}")
    first = start(journal, work_log, args.jobs)
    assert first.stdout is not None
    for line in first.stdout:
        relay(line)
        if line.startswith("progress:") and int(line.split()[1]) >= args.kill_at * args.jobs:
            first.send_signal(signal.SIGKILL)
            break
    first.wait()
    first.stdout.close()
    before = len(asyncio.run(journal_jobs(journal)))
    print(f"   killed with SIGKILL (exit status {first.returncode}); the journal holds {before} jobs")

    print("2. Starting it again")
    started = time.perf_counter()
    second = start(journal, work_log, args.jobs)
    assert second.stdout is not None
    resume_line, interrupted = "", set()
    for line in second.stdout:
        relay(line)
        if line.startswith("resumed:"):
            resume_line = line
        if line.startswith("interrupted:"):
            interrupted = {int(n) for n in line.split()[1:] if n != "none"}
    second.wait()
    second.stdout.close()
    elapsed = time.perf_counter() - started
    if second.returncode != 0:
        sys.exit(f"the resumed job failed with exit status {second.returncode}")

    recorded = asyncio.run(journal_jobs(journal))
    runs = collections.Counter(int(n) for n in work_log.read_text().split())
    run_again = {n for n, count in runs.items() if count > 1}
    recorded_twice = sum(1 for count in collections.Counter(recorded).values() if count > 1)
    print("3. What the ledger kept")
    print(f"   jobs done before the kill:     {before}")
    print(f"   jobs done after the resume:    {len(recorded) - before}")
    print(f"   jobs recorded twice:           {recorded_twice}")
    print(f"   jobs missing:                  {args.jobs - len(set(recorded))}")
    print(f"   jobs run again after the kill: {len(run_again)}"
          "  (running at the kill, their claim not ended)")  # fmt: skip
    print(f"   of them listed as interrupted: {len(run_again & interrupted)}"
          f"  (the resumed ledger listed {len(interrupted)})")  # fmt: skip
    print(f"   resume: {resume_line.split('(')[-1].strip().rstrip(')')}, whole second run {elapsed:.1f} s")
    if recorded_twice or len(set(recorded)) != args.jobs:
        sys.exit("the ledger lost or duplicated work")
    if not run_again <= interrupted:
        sys.exit(f"jobs run again but not listed as interrupted: {sorted(run_again - interrupted)}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
