"""kill -9 a writer at random moments: what a returned flush promised is always there."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from yoink import CheckpointManager

WRITER = Path(__file__).with_name("crash_writer.py")
KILLS = int(os.environ.get("YOINK_TEST_KILLS", "20"))


def replayed_numbers(path: Path) -> list[int]:
    async def replay() -> list[int]:
        async with CheckpointManager.from_uri(path) as manager:  # on_corrupt="raise": nothing corrupt
            return [record["n"] async for record in manager.replay()]

    return asyncio.run(replay())


def run_and_kill(path: Path, seed: int, rng: random.Random) -> tuple[int, set[int]]:
    """Start a writer, kill -9 it after a random time; return (records it resumed, records acknowledged)."""
    proc = subprocess.Popen(
        [sys.executable, str(WRITER), str(path), str(seed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    first = proc.stdout.readline()
    assert first.startswith("resumed "), proc.stderr.read() or first
    time.sleep(rng.uniform(0.0, 0.15))
    proc.kill()
    proc.wait()
    acknowledged = set()
    for line in proc.stdout.read().splitlines():
        if line.startswith("acked ") and line.endswith(tuple("0123456789")):  # a whole line
            acknowledged.update(int(n) for n in line.split()[1:])
    proc.stdout.close()
    proc.stderr.close()
    return int(first.split()[1]), acknowledged


def test_kill_9_never_loses_a_flushed_record_nor_replays_a_corrupt_one(tmp_path: Path) -> None:
    path = tmp_path / "crash.jsonl"
    rng = random.Random(os.environ.get("YOINK_TEST_SEED", time.time_ns()))
    acknowledged: set[int] = set()
    for kill in range(KILLS):
        resumed, acked = run_and_kill(path, seed=rng.randrange(1 << 30), rng=rng)
        assert resumed >= len(acknowledged), (
            f"kill {kill}: resumed {resumed} records, {len(acknowledged)} were flushed"
        )
        acknowledged |= acked
        numbers = replayed_numbers(path)
        assert len(numbers) == len(set(numbers)), f"kill {kill}: a record was replayed twice"
        lost = acknowledged - set(numbers)
        assert not lost, f"kill {kill}: {len(lost)} flushed records lost, e.g. {sorted(lost)[:5]}"
    assert acknowledged, "no writer lived long enough to flush: the test proved nothing"

    async def append_after_the_last_kill(n: int) -> None:
        async with CheckpointManager.from_uri(path) as manager:
            await manager.append({"n": n})

    before = replayed_numbers(path)
    asyncio.run(append_after_the_last_kill(max(before) + 1))
    assert replayed_numbers(path) == [*before, max(before) + 1]
