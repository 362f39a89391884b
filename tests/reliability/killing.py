"""The kill -9 loop, shared by the reliability tests and scripts/reliability-report.

A writer process (writer.py) resumes a journal, then appends and flushes until it is killed with
SIGKILL at a random moment; it prints each flush that returned. After every kill the journal is
replayed: every acknowledged record must be there exactly once, and nothing corrupt may be.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yoink import CheckpointManager, CorruptCheckpointError

WRITER = Path(__file__).with_name("writer.py")
LONG = os.environ.get("YOINK_RELIABILITY") == "long"


def kills(quick: int) -> int:
    """How many kills a test makes: ``quick`` in the quick setting, 200 in the long one."""
    return int(os.environ.get("YOINK_TEST_KILLS", 200 if LONG else quick))


@dataclass
class Journal:
    name: str
    uri: str
    options: dict[str, Any]  # for the manager, in this process and in the writers
    pause: float  # the longest a writer lives after resuming
    before_start: Callable[[], None] = lambda: None  # e.g. wait for a killed writer's lease to expire


@dataclass
class Outcome:
    kills: int = 0
    acknowledged: set[int] = field(default_factory=set)
    lost: set[int] = field(default_factory=set)
    duplicated: set[int] = field(default_factory=set)
    corrupt: int = 0  # replays that met a corrupt line
    failures: list[str] = field(default_factory=list)


def replayed(journal: Journal) -> list[int]:
    async def replay() -> list[int]:
        async with CheckpointManager.from_uri(
            journal.uri, **journal.options
        ) as manager:  # raises on corruption
            return [record["n"] async for record in manager.replay()]

    return asyncio.run(replay())


def run_and_kill(journal: Journal, seed: int, rng: random.Random) -> tuple[int, set[int]]:
    """Start a writer, kill -9 it after a random time; return (records it resumed, records acknowledged)."""
    journal.before_start()
    proc = subprocess.Popen(
        [sys.executable, str(WRITER), journal.uri, str(seed), json.dumps(journal.options)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    first = proc.stdout.readline()
    if not first.startswith("resumed "):
        proc.kill()
        proc.wait()
        raise AssertionError(f"the writer did not resume: {proc.stderr.read() or first}")
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


def kill_loop(journal: Journal, count: int, rng: random.Random) -> Outcome:
    """Kill ``count`` writers in turn, checking the journal after each."""
    outcome = Outcome()
    for kill in range(count):
        resumed, acked = run_and_kill(journal, seed=rng.randrange(1 << 30), rng=rng)
        outcome.kills += 1
        if resumed < len(outcome.acknowledged):
            outcome.failures.append(
                f"kill {kill}: resumed {resumed} records, {len(outcome.acknowledged)} were flushed"
            )
        outcome.acknowledged |= acked
        try:
            numbers = replayed(journal)
        except CorruptCheckpointError as exc:
            outcome.corrupt += 1
            outcome.failures.append(f"kill {kill}: {exc}")
            continue
        outcome.duplicated |= {n for n, times in Counter(numbers).items() if times > 1}
        outcome.lost |= outcome.acknowledged - set(numbers)
    return outcome
