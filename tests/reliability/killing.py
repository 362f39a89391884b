"""The kill -9 loop, shared by the reliability tests and scripts/reliability-report.

A writer process (writer.py) resumes a journal, then appends and flushes until it is killed with
SIGKILL at a random moment; it prints each flush that returned. After every kill the journal is
replayed: every acknowledged record must be there exactly once, and nothing corrupt may be.
"""

from __future__ import annotations

import asyncio
import itertools
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
    resumed, lines = run_writer_and_kill(WRITER, journal, seed, rng.uniform(0.0, journal.pause))
    return resumed, acknowledged_in(lines)


def run_writer_and_kill(writer: Path, journal: Journal, seed: int, after: float) -> tuple[int, list[str]]:
    """Start ``writer`` on the journal, kill -9 it ``after`` seconds past its resuming; return
    (records it resumed, the lines it printed)."""
    journal.before_start()
    proc = subprocess.Popen(
        [sys.executable, str(writer), journal.uri, str(seed), json.dumps(journal.options)],
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
    time.sleep(after)
    proc.kill()
    proc.wait()
    lines = proc.stdout.read().splitlines()
    proc.stdout.close()
    proc.stderr.close()
    return int(first.split()[1]), lines


def run_writer_to_the_end(writer: Path, journal: Journal, seed: int, timeout: float) -> list[str]:
    """Start ``writer`` on the journal and let it stop by itself; return the lines it printed."""
    journal.before_start()
    ended = subprocess.run(
        [sys.executable, str(writer), journal.uri, str(seed), json.dumps(journal.options)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert ended.returncode == 0, f"the writer failed ({ended.returncode}): {ended.stderr[-3000:]}"
    return ended.stdout.splitlines()


def acknowledged_in(lines: list[str]) -> set[int]:
    """The records a killed writer's whole ``acked n n ...`` lines name."""
    acknowledged = set()
    for line in lines:
        if line.startswith("acked ") and line.endswith(tuple("0123456789")):  # a whole line
            acknowledged.update(int(n) for n in line.split()[1:])
    return acknowledged


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


@dataclass
class Takeover:
    """A zombie round: writer A is paused (SIGSTOP), B takes the journal over from "another machine"
    (another stage, another connection) and writes, then A is let go (SIGCONT) and tries to flush."""

    zombie_refused: str = ""  # the error A died of
    taken_over: int = 0  # records B wrote and flushed while A was paused
    lost: set[tuple[str, int]] = field(default_factory=set)
    duplicated: set[tuple[str, int]] = field(default_factory=set)
    reordered: bool = False  # a record of A's after one of B's


_machines = itertools.count()


class _Lines:
    """A writer's stdout, read by a thread so that a paused writer does not block the test."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        import threading

        self.lines: list[str] = []
        assert proc.stdout is not None
        self._stdout = proc.stdout
        self._thread = threading.Thread(target=lambda: self.lines.extend(proc.stdout or []), daemon=True)
        self._thread.start()

    def join(self) -> None:
        self._thread.join(10)
        if not self._thread.is_alive():
            self._stdout.close()  # else a ResourceWarning fails the test

    def acked(self) -> set[int]:
        numbers: set[int] = set()
        for line in self.lines:
            if line.startswith("acked ") and line.rstrip().endswith(tuple("0123456789")):
                numbers.update(int(n) for n in line.split()[1:])
        return numbers

    def wait_for(self, prefix: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(line.startswith(prefix) for line in self.lines):
            if time.monotonic() > deadline:
                raise AssertionError(f"no {prefix!r} line within {timeout} s: {self.lines[-3:]}")
            time.sleep(0.01)


def _writer(uri: str, options: dict[str, Any], seed: int, name: str, limit: int = 0) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WRITER), uri, str(seed), json.dumps(options), name, str(limit)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def take_over_from_a_paused_writer(
    journal: Journal, elsewhere: dict[str, Any], rng: random.Random, *, stopped: float, records: int
) -> Takeover:
    """Pause writer A for ``stopped`` seconds while B (with ``elsewhere`` options) writes ``records``."""
    import signal

    options = journal.options
    if "stage_dir" in options:  # a machine of its own: an earlier zombie's refused records stay staged
        options = {**options, "stage_dir": f"{options['stage_dir']}-{next(_machines)}"}
    journal.before_start()
    zombie = _writer(journal.uri, options, rng.randrange(1 << 30), "A")
    zombie_out = _Lines(zombie)
    try:
        zombie_out.wait_for("acked", 30)
        time.sleep(rng.uniform(0, journal.pause))
        zombie.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        journal.before_start()  # e.g. the paused writer's lease runs out
        other = _writer(journal.uri, elsewhere, rng.randrange(1 << 30), "B", limit=records)
        other_out = _Lines(other)
        other.wait(timeout=120)
        assert other.stderr is not None
        other_err = other.stderr.read()
        other.stderr.close()
        assert other.returncode == 0, f"the second writer failed: {other_err[-2000:]}"
        time.sleep(max(0.0, stopped - (time.monotonic() - started)))
        zombie.send_signal(signal.SIGCONT)
        try:
            zombie.wait(timeout=10)
        except subprocess.TimeoutExpired:
            zombie.kill()
            zombie.wait()
    finally:
        if zombie.poll() is None:
            zombie.send_signal(signal.SIGCONT)
            zombie.kill()
            zombie.wait()
    zombie_out.join()
    other_out.join()
    assert zombie.stderr is not None
    error = zombie.stderr.read()
    zombie.stderr.close()
    outcome = Takeover(
        zombie_refused=next(
            (name for name in ("ConcurrentWriterError", "CheckpointLockedError") if name in error), ""
        )
    )
    outcome.taken_over = len(other_out.acked())
    acked = {("A", n) for n in zombie_out.acked()} | {("B", n) for n in other_out.acked()}

    async def replay() -> list[tuple[str, int]]:
        async with CheckpointManager.from_uri(journal.uri, **elsewhere) as manager:
            return [(record.get("w", "?"), record["n"]) async for record in manager.replay()]

    found = asyncio.run(replay())
    outcome.duplicated = {key for key, times in Counter(found).items() if times > 1}
    outcome.lost = acked - set(found)
    earlier = next(int(line.split()[1]) for line in zombie_out.lines if line.startswith("resumed "))
    writers = [w for w, _ in found[earlier:] if w in ("A", "B")]  # this round's, not earlier rounds'
    outcome.reordered = "B" in writers and "A" in writers[writers.index("B") :]
    return outcome
