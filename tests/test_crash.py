"""kill -9 a writer at random moments: what a returned flush promised is always there."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from yoink import CheckpointManager

WRITER = Path(__file__).with_name("crash_writer.py")
KILLS = int(os.environ.get("YOINK_TEST_KILLS", "20"))


@dataclass
class Journal:
    uri: str
    options: dict[str, Any]  # for the manager, in this process and in the writers
    pause: float  # the longest a writer lives after resuming


@pytest.fixture(params=["local", "s3-object", "s3-segments"])
def journal(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Journal:
    if request.param == "local":
        return Journal(str(tmp_path / "crash.jsonl"), {}, pause=0.15)
    bucket = request.getfixturevalue("bucket")
    monkeypatch.setenv("AWS_ENDPOINT_URL", request.getfixturevalue("moto").url)  # the writers inherit it
    options: dict[str, Any] = {"stage_dir": str(tmp_path / "stage")}
    if request.param == "s3-segments":
        options["merge_after"] = 4  # merges are killed too
    layout = request.param.removeprefix("s3-")
    return Journal(f"s3://{bucket}/crash?layout={layout}", options, pause=0.6)


def replayed_numbers(journal: Journal) -> list[int]:
    async def replay() -> list[int]:
        # on_corrupt="raise": nothing corrupt is replayed
        async with CheckpointManager.from_uri(journal.uri, **journal.options) as manager:
            return [record["n"] async for record in manager.replay()]

    return asyncio.run(replay())


def run_and_kill(journal: Journal, seed: int, rng: random.Random) -> tuple[int, set[int]]:
    """Start a writer, kill -9 it after a random time; return (records it resumed, records acknowledged)."""
    proc = subprocess.Popen(
        [sys.executable, str(WRITER), journal.uri, str(seed), json.dumps(journal.options)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    first = proc.stdout.readline()
    assert first.startswith("resumed "), proc.stderr.read() or first
    time.sleep(rng.uniform(0.0, journal.pause))
    proc.kill()
    proc.wait()
    acknowledged = set()
    for line in proc.stdout.read().splitlines():
        if line.startswith("acked ") and line.endswith(tuple("0123456789")):  # a whole line
            acknowledged.update(int(n) for n in line.split()[1:])
    proc.stdout.close()
    proc.stderr.close()
    return int(first.split()[1]), acknowledged


def test_kill_9_never_loses_a_flushed_record_nor_replays_one_twice_or_corrupt(journal: Journal) -> None:
    rng = random.Random(os.environ.get("YOINK_TEST_SEED", time.time_ns()))
    kills = KILLS if journal.uri.startswith("/") else max(1, KILLS // 2)
    acknowledged: set[int] = set()
    for kill in range(kills):
        resumed, acked = run_and_kill(journal, seed=rng.randrange(1 << 30), rng=rng)
        assert resumed >= len(acknowledged), (
            f"kill {kill}: resumed {resumed} records, {len(acknowledged)} were flushed"
        )
        acknowledged |= acked
        numbers = replayed_numbers(journal)
        assert len(numbers) == len(set(numbers)), f"kill {kill}: a record was replayed twice"
        lost = acknowledged - set(numbers)
        assert not lost, f"kill {kill}: {len(lost)} flushed records lost, e.g. {sorted(lost)[:5]}"
    assert acknowledged, "no writer lived long enough to flush: the test proved nothing"

    async def append_after_the_last_kill(n: int) -> None:
        async with CheckpointManager.from_uri(journal.uri, **journal.options) as manager:
            await manager.append({"n": n})

    before = replayed_numbers(journal)
    asyncio.run(append_after_the_last_kill(max(before) + 1))
    assert replayed_numbers(journal) == [*before, max(before) + 1]
