"""kill -9 a ledger's job at random moments, on every backend, and resume it until it is finished.

The job (ledger_writer.py) prints what the outside world sees: each attempt's body as it begins
(``ran``), each claim that exited, and, as it resumes, what the ledger knows and reports
interrupted. Across all its runs: every item's body ran; no item whose claim exited done ran
again; every item that ran again either failed (as the job makes some do) or was in flight at a
kill and is listed in the next run's ``interrupted``, which lists nothing else; no resumed run
knows fewer items, or fewer done, than claims that exited had begun, found or done; the finished
ledger has every item done once (its journal holds one completion per item: the attempt whose
body ran last), and those that always fail given up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tests.helpers import random_seed
from tests.reliability import ledger_writer as job
from tests.reliability.killing import Journal, kills, run_writer_and_kill, run_writer_to_the_end
from yoink import CheckpointManager, Ledger, Progress

WRITER = Path(__file__).with_name("ledger_writer.py")
# The items a second a job aims at on each backend: about what it keeps up with on a loaded machine.
RATE = {"local": 400, "redis": 300, "fsspec": 200, "s3-object": 20, "s3-segments": 8}


@dataclass
class Run:
    """What one run of the job printed."""

    seed: int
    killed: bool
    resumed: int = -1
    known: int = -1
    interrupted: set[int] = field(default_factory=set)
    events: list[tuple[str, int, int, str]] = field(default_factory=list)  # (what, key, attempt, verdict)
    compactions: int = 0
    finished: bool = False

    @classmethod
    def parse(cls, seed: int, lines: list[str], *, killed: bool) -> Run:
        """``lines``: all the run printed, or all after its ``resumed`` line (run_writer_and_kill's)."""
        run = cls(seed, killed)
        for line in lines:
            what, *words = line.split()
            if what == "resumed":
                run.resumed = int(words[0])
            elif what == "known":
                run.known = int(words[0])
            elif what == "interrupted":
                run.interrupted = {int(key) for key in words}
            elif what == "claiming":
                run.events.append((what, int(words[0]), 0, ""))
            elif what == "ran":
                run.events.append((what, int(words[0]), int(words[1]), ""))
            elif what == "exited":
                run.events.append((what, int(words[0]), int(words[1]), words[2]))
            elif what == "compacted":
                run.compactions += 1
            elif what == "finished":
                run.finished = True
            else:
                raise AssertionError(f"run {seed}: the job printed {line!r}")
        assert run.resumed >= 0, f"run {seed}: no resumed line"
        assert run.known >= 0, f"run {seed}: no known line"
        return run


@dataclass
class Check:
    """The rules, checked run by run as the job's lines come in."""

    items: int
    problems: list[str] = field(default_factory=list)
    ran: dict[int, list[tuple[int, int]]] = field(default_factory=lambda: defaultdict(list))  # seed, attempt
    exited_done: dict[int, tuple[int, int]] = field(default_factory=dict)
    added: set[int] = field(default_factory=set)  # begun, or found by a claim that exited: in the journal
    done_unseen: dict[int, tuple[int, int]] = field(default_factory=dict)  # in flight at a kill, unreported
    repeats: int = 0  # bodies that ran again after a kill, each reported interrupted
    in_flight_at_kills: int = 0
    compactions: int = 0
    last_seed: int = -1
    _ran_in_flight: set[tuple[int, int]] = field(default_factory=set)  # key, attempt: not exited at the kill
    _claimed_in_flight: set[int] = field(default_factory=set)
    _still_interrupted: set[int] = field(default_factory=set)  # reported by the last run, not claimed in it

    def problem(self, run: Run, text: str) -> None:
        self.problems.append(f"run {run.seed}: {text}")

    def add(self, run: Run) -> None:
        self.compactions += run.compactions
        if run.resumed < len(self.exited_done):
            exited = len(self.exited_done)
            self.problem(run, f"resumed with {run.resumed} items done, {exited} claims had exited done")
        if run.known < len(self.added):
            added = len(self.added)
            self.problem(run, f"resumed knowing {run.known} items; claims that exited began or found {added}")
        if stray := run.interrupted - self._still_interrupted - self._claimed_in_flight:
            self.problem(run, f"reports interrupted items that were not in flight: {sorted(stray)[:10]}")
        if done := run.interrupted & self.exited_done.keys():
            self.problem(run, f"reports interrupted items whose claim exited done: {sorted(done)[:10]}")
        for key, attempt in self._ran_in_flight:
            if key not in run.interrupted and not job.fails(key, attempt):
                self.done_unseen[key] = (self.last_seed, attempt)  # its "done" must be durable then
        # A failed attempt is offered again as its fail record is appended: the next one may begin
        # before the failed claim's flush has returned, so what runs is counted by key and attempt.
        running: set[tuple[int, int]] = set()
        claimed: Counter[int] = Counter()
        for what, key, attempt, verdict in run.events:
            if what == "claiming":
                claimed[key] += 1
            elif what == "ran":
                self._ran(run, key, attempt)
                self.added.add(key)  # its "start" was durable before its body ran
                running.add((key, attempt))
            else:
                claimed[key] -= 1
                if (key, attempt) not in running:
                    self.problem(run, f"{key} exited attempt {attempt}, which was not running")
                running.discard((key, attempt))
                expected = "failed" if job.fails(key, attempt) else "done"
                if verdict != expected:
                    self.problem(run, f"{key}'s attempt {attempt} {verdict}, not {expected}")
                if verdict == "done":
                    self.exited_done[key] = (run.seed, attempt)
                self.added.update(job.children(key, self.items))  # the body added them before its verdict
        if run.finished and running:
            self.problem(run, f"finished with bodies that never exited: {sorted(running)[:10]}")
        self.in_flight_at_kills += len(running) if run.killed else 0
        self._ran_in_flight, self._claimed_in_flight = running, {key for key, n in claimed.items() if n > 0}
        claimed_at_all = {key for what, key, _, _ in run.events if what == "claiming"}
        self._still_interrupted = run.interrupted - claimed_at_all
        self.last_seed = run.seed

    def _ran(self, run: Run, key: int, attempt: int) -> None:
        if not 0 <= key < self.items:
            self.problem(run, f"ran {key}, which is not one of the job's items")
        if key in self.exited_done:
            exited = self.exited_done[key]
            self.problem(run, f"ran {key} again (attempt {attempt}): its claim exited done, {exited}")
        if key in self.done_unseen:
            self.problem(
                run,
                f"ran {key} again (attempt {attempt}): in flight at a kill, {self.done_unseen[key]}, "
                f"it was not reported interrupted by the next run",
            )
        earlier = self.ran[key]
        if earlier:
            seed, previous = earlier[-1]
            if attempt <= previous:
                self.problem(run, f"ran {key}'s attempt {attempt} after its attempt {previous} (run {seed})")
            if not job.fails(key, previous):
                self.repeats += 1  # an attempt cut by a kill: _ran_in_flight and add() checked its report
        elif attempt < 1:
            self.problem(run, f"ran {key}'s attempt {attempt}: attempts count from 1")
        earlier.append((run.seed, attempt))


def test_a_job_killed_at_random_and_resumed_does_every_item_and_again_only_those_in_flight(
    journal: Journal, tmp_path: Path
) -> None:
    rng = random.Random(random_seed())
    log = tmp_path / "runs.log"  # every line each run printed, for a failure's post-mortem
    count = kills(8 if journal.name == "local" else 4)
    rate = RATE[journal.name]
    items = max(50, round(count * rate * (0.05 + journal.pause * 2) / 2))  # about the work of the killed runs
    work = min(journal.pause / 4, 4 / rate)  # an item's work: a few in flight at a time, most end in a run
    job_options = {"items": items, "rate": rate, "work": work}
    writing = dataclasses.replace(journal, options={**journal.options, **job_options})
    check = Check(items)
    seeds: set[int] = set()
    made = 0
    while made < count and not check.problems:
        seed, after = _new_seed(rng, seeds), rng.uniform(0.05, journal.pause * 2)
        resumed, lines = run_writer_and_kill(WRITER, writing, seed, after)
        made += 1
        lines = [f"resumed {resumed}", *lines]
        _log(log, seed, lines, f"killed {after:.3f} s after it resumed")
        run = Run.parse(seed, lines, killed=True)
        check.add(run)
        if run.finished:
            break
    seed = _new_seed(rng, seeds)
    lines = run_writer_to_the_end(WRITER, writing, seed, timeout=900)
    _log(log, seed, lines, "not killed")
    last = Run.parse(seed, lines, killed=False)
    check.add(last)
    assert not check.problems, (
        f"{len(check.problems)} problems after {made} kills (the runs' lines: {log}): {check.problems[:10]}"
    )
    assert last.finished
    print(
        f"{journal.name}: {items} items at {rate}/s, {made} kills, {check.in_flight_at_kills} bodies in "
        f"flight at them, {check.repeats} done again, {check.compactions} compactions"
    )
    assert check.in_flight_at_kills, "no kill found a body in flight: the test proved nothing"

    ran = check.ran
    never = sorted(set(range(items)) - ran.keys())
    assert not never, f"{len(never)} items never ran, e.g. {never[:10]}"
    completions = _completions(journal, tmp_path / "replayed.jsonl")
    given_up = {key for key in range(items) if job.always_fails(key)}
    twice = {key: results for key, results in completions.items() if len(results) > 1}
    assert not twice, f"items done twice in the journal: {dict(list(twice.items())[:5])}"
    missing = sorted(set(range(items)) - given_up - completions.keys())
    assert not missing, f"items with no done record in the journal: {missing[:20]} (see {log.parent})"
    assert not completions.keys() & given_up
    wrong = {
        key: (results[0], ran[key][-1])
        for key, results in completions.items()
        if (results[0]["run"], results[0]["attempt"]) != ran[key][-1]
    }
    assert not wrong, f"done by an attempt that is not the last that ran (result, last ran): {wrong}"
    assert all(check.exited_done[key] == ran[key][-1] for key in check.exited_done)

    async def finished_ledger() -> tuple[Progress, int, set[Any], set[Any]]:
        async with Ledger.open(
            journal.uri,
            fingerprint=job.fingerprint(items),
            max_attempts=job.MAX_ATTEMPTS,
            compact=False,
            **journal.options,
        ) as ledger:
            assert not [key async for key in ledger.pending()]
            return ledger.progress, len(ledger), set(ledger.given_up), set(ledger.interrupted)

    journal.before_start()
    progress, known, failed, interrupted = asyncio.run(finished_ledger())
    expected = (items - len(given_up), len(given_up), 0, 0, items)
    found = (progress.done, progress.failed, progress.pending, progress.running, known)
    assert found == expected, f"the finished ledger: {progress}, {known} items (see {log.parent})"
    assert failed == given_up
    assert not interrupted  # the last run ended every claim it began
    for key in given_up:  # MAX_ATTEMPTS failures, and at most one attempt cut by each kill
        assert job.MAX_ATTEMPTS <= len(ran[key]) <= job.MAX_ATTEMPTS + made


def _log(log: Path, seed: int, lines: list[str], how: str) -> None:
    with log.open("a") as file:
        file.write(f"--- run {seed}, {how}\n")
        file.writelines(f"{line}\n" for line in lines)


def _new_seed(rng: random.Random, seeds: set[int]) -> int:
    """A seed no other run of this test had: a done item's result names its run by it."""
    while (seed := rng.randrange(1 << 30)) in seeds:
        pass
    seeds.add(seed)
    return seed


def _completions(journal: Journal, copy: Path) -> dict[int, list[dict[str, Any]]]:
    """Each item's distinct results in the journal's "done" records (a compaction's snapshot may
    repeat a "done" appended after its cut, with the same result). The records are copied to
    ``copy``, for a failure's post-mortem."""

    async def replay() -> list[dict[str, Any]]:
        async with CheckpointManager.from_uri(journal.uri, read_only=True, **journal.options) as reader:
            return [record async for record in reader.replay()]

    records = asyncio.run(replay())
    copy.write_bytes(b"".join(orjson.dumps(record) + b"\n" for record in records))
    results: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        if record.get("$ledger") == "done":
            assert "key" in record, f"a done record without its result: {record}"
            if record["result"] not in results[record["key"]]:
                results[record["key"]].append(record["result"])
    return results
