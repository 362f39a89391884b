"""Cancellation at random moments, by every means asyncio and anyio have, on every backend.

Each round, writer tasks append records and flush while each of their operations (and, now and
then, the manager's close) is cancelled at a random moment by a mechanism drawn at random: no
cancellation at all, ``asyncio.wait_for``, ``asyncio.timeout``, ``task.cancel()``, a failing
sibling in an ``asyncio.TaskGroup``, ``anyio.move_on_after``, or an ``anyio.CancelScope``
cancelled from another task. Delays are zero (before the operation starts, or after its first
step) or comparable to one write, measured as the round goes. Sometimes the manager is closed
while the writers still run; they must then get StorageClosedError and nothing else.

After each round, a new manager on the same journal replays it, and:

- every record covered by a flush that returned (its append returned before that flush began)
  is replayed exactly once;
- every record whose append returned is replayed exactly once as well, since close() flushes
  everything appended before it, even when close() itself is cancelled;
- no record is replayed twice, and none that no append was called with;
- each writer's records come back in the order it appended them;
- nothing is corrupt, and yoink logs no warning or error;
- the journal stays appendable: the new manager appends a record, flushes, and replays it.

The choices each writer makes come from ``random.Random`` seeded from the test's seed, printed
in every failure (set ``YOINK_TEST_SEED`` to repeat them; the timing of the event loop and of the
storage still varies). ``YOINK_TEST_ROUNDS`` overrides the number of rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.conftest import OpenStorage
from tests.helpers import random_seed
from tests.reliability.killing import LONG
from yoink import CheckpointManager, CorruptCheckpointError, StorageClosedError
from yoink.storage import FsspecStorage

if sys.version_info >= (3, 11):
    MECHANISMS = ("wait_for", "timeout", "task.cancel", "TaskGroup", "move_on_after", "CancelScope.cancel")
else:  # asyncio.timeout() and asyncio.TaskGroup came with Python 3.11
    from exceptiongroup import BaseExceptionGroup  # anyio's dependency there

    MECHANISMS = ("wait_for", "task.cancel", "move_on_after", "CancelScope.cancel")
BATCH_BYTES = (4096, 16384, 65536)
FLUSH_INTERVALS = (None, None, 0.002, 0.02)
PADDING = (0, 0, 20, 200, 1000, 3000)  # extra characters in a record, so that batches fill up

Operation = Callable[[], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class Setting:
    rounds: int
    writers: int
    operations: int  # per writer and round


# S3 runs on moto, which takes tens of milliseconds a request: fewer, shorter rounds.
QUICK = {
    "s3": Setting(rounds=3, writers=4, operations=20),
    "other": Setting(rounds=15, writers=6, operations=50),
}
RELEASE = {
    "s3": Setting(rounds=25, writers=4, operations=40),
    "other": Setting(rounds=150, writers=8, operations=80),
}


def setting(backend: str) -> Setting:
    chosen = (RELEASE if LONG else QUICK)["s3" if backend.startswith("s3") else "other"]
    rounds = int(os.environ.get("YOINK_TEST_ROUNDS", chosen.rounds))
    return Setting(rounds=rounds, writers=chosen.writers, operations=chosen.operations)


class SiblingFailed(Exception):
    """Raised by a task in a TaskGroup to make the group cancel the operation beside it."""


@dataclass
class Ledger:
    """What the writers did, over all rounds on one journal, and what replay must therefore show."""

    seed: int
    backend: str
    attempted: set[int] = field(default_factory=set)  # records an append was called with (or about to be)
    flushed: set[int] = field(default_factory=set)  # covered by a flush that returned
    closed: set[int] = field(default_factory=set)  # append returned, and then the manager was closed
    how: dict[int, str] = field(default_factory=dict)  # how each append ended, for failure messages
    outcomes: Counter[str] = field(default_factory=Counter)  # (operation, mechanism, outcome) tallies
    next_id: int = 0
    scale: float = 0.001  # about how long one write and flush take on this storage, in seconds

    def context(self, round_: int) -> str:
        return f"seed {self.seed}, backend {self.backend}, round {round_}"


@dataclass
class Round:
    """One round: one manager, its writers, its close."""

    number: int
    appended: list[int] = field(default_factory=list)  # records whose append returned, in that order
    flushed_upto: int = 0  # appended[:flushed_upto] is covered by a flush that returned
    closing: bool = False  # close() has been called
    done_operations: int = 0
    close_now: asyncio.Event = field(default_factory=asyncio.Event)
    close_after: int | None = None  # close while the writers run, after this many operations


def draw_delay(rng: random.Random, scale: float) -> float:
    """Zero now and then; mostly within one write; sometimes a few writes long."""
    draw = rng.random()
    if draw < 0.15:
        return 0.0
    if draw < 0.75:
        return rng.uniform(0, scale)
    return rng.uniform(scale, 4 * scale)


async def run_cancelled(operation: Operation, mechanism: str, delay: float) -> None:
    """Run ``operation()``, cancelling it by ``mechanism`` if it has not returned after ``delay`` s.

    The cancellation is absorbed here; any other exception of the operation propagates.
    """
    if mechanism == "none":
        await operation()
    elif mechanism == "wait_for":
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(operation(), delay)
    elif mechanism == "timeout":
        with contextlib.suppress(asyncio.TimeoutError):
            async with asyncio.timeout(delay):
                await operation()
    elif mechanism == "task.cancel":
        task = asyncio.create_task(operation())
        if delay > 0:  # at zero, cancelled before its first step
            await asyncio.wait([task], timeout=delay)
        task.cancel()
        await asyncio.wait([task])
        if not task.cancelled():
            task.result()
    elif mechanism == "TaskGroup":

        async def fail_unless_done(work: asyncio.Task[None]) -> None:
            if delay > 0:  # at zero, fails right after the operation's first step
                await asyncio.wait([work], timeout=delay)
            if not work.done():
                raise SiblingFailed

        try:
            async with asyncio.TaskGroup() as group:
                work = group.create_task(operation())
                group.create_task(fail_unless_done(work))
        except BaseExceptionGroup as group_error:
            if group_error.split(SiblingFailed)[1] is not None:
                raise
    elif mechanism == "move_on_after":
        with anyio.move_on_after(delay):
            await operation()
    elif mechanism == "CancelScope.cancel":
        scope = anyio.CancelScope()

        async def cancel_later() -> None:
            await asyncio.sleep(delay)
            scope.cancel()

        canceller = asyncio.create_task(cancel_later())
        try:
            with scope:
                await operation()
        finally:
            canceller.cancel()
            await asyncio.wait([canceller])
    else:
        raise AssertionError(f"unknown mechanism {mechanism!r}")


def draw_mechanism(rng: random.Random) -> str:
    return "none" if rng.random() < 0.3 else rng.choice(MECHANISMS)


@dataclass
class Result:
    returned: bool = False
    refused: bool = False  # StorageClosedError, the manager being closed

    def outcome(self) -> str:
        return "refused" if self.refused else "returned" if self.returned else "cancelled"


async def append(manager: CheckpointManager, round_: Round, record: dict[str, Any], result: Result) -> None:
    try:
        await manager.append(record)
    except StorageClosedError:
        if not round_.closing:
            raise
        result.refused = True
        return
    round_.appended.append(record["id"])
    result.returned = True


async def flush(
    manager: CheckpointManager, ledger: Ledger, round_: Round, result: Result, timed: bool
) -> None:
    covered = len(round_.appended)  # every append that returned before this flush began
    started = time.perf_counter()
    try:
        await manager.flush()
    except StorageClosedError:
        if not round_.closing:
            raise
        result.refused = True
        return
    round_.flushed_upto = max(round_.flushed_upto, covered)
    result.returned = True
    if timed:  # a flush nobody cut short: about how long the storage takes to write and flush
        ledger.scale = 0.8 * ledger.scale + 0.2 * (time.perf_counter() - started)


async def write(
    manager: CheckpointManager, ledger: Ledger, round_: Round, writer: int, operations: int
) -> None:
    """One writer: appends and flushes, each under a mechanism that may cancel it."""
    rng = random.Random(f"{ledger.seed}:{round_.number}:{writer}")
    for i in range(operations):
        if round_.closing:
            break
        mechanism, delay = draw_mechanism(rng), draw_delay(rng, ledger.scale)
        result = Result()
        if rng.random() < 0.2:
            kind = "flush"
            operation = functools.partial(flush, manager, ledger, round_, result, mechanism == "none")
        else:
            kind = "append"
            record: dict[str, Any] = {
                "w": writer,
                "i": i,
                "id": ledger.next_id,
                "r": round_.number,
                "pad": "p" * rng.choice(PADDING),
            }
            ledger.next_id += 1
            ledger.attempted.add(record["id"])
            operation = functools.partial(append, manager, round_, record, result)
        await run_cancelled(operation, mechanism, delay)
        ledger.outcomes[f"{kind} {mechanism} {result.outcome()}"] += 1
        if kind == "append":
            ledger.how[record["id"]] = (
                f"append under {mechanism} after {delay * 1000:.2f} ms: {result.outcome()}"
            )
        if result.refused:
            break
        round_.done_operations += 1
        if round_.close_after is not None and round_.done_operations >= round_.close_after:
            round_.close_now.set()


async def close(manager: CheckpointManager, ledger: Ledger, round_: Round, rng: random.Random) -> None:
    """Close the manager, under a mechanism that may cancel the close; it must finish all the same."""
    mechanism = "none" if rng.random() < 0.5 else rng.choice(MECHANISMS)
    delay = draw_delay(rng, ledger.scale)

    async def operation() -> None:
        round_.closing = True
        await manager.close()

    await run_cancelled(operation, mechanism, delay)
    ledger.outcomes[f"close {mechanism} {'called' if round_.closing else 'never started'}"] += 1
    if not round_.closing:  # cancelled before its first step, so never called
        await operation()


async def replay(manager: CheckpointManager, context: str) -> list[dict[str, Any]]:
    try:
        return [record async for record in manager.replay()]
    except CorruptCheckpointError as exc:
        pytest.fail(f"{context}: replay met a corrupt journal: {exc}")


def check(records: list[dict[str, Any]], ledger: Ledger, context: str) -> None:
    counts = Counter(record["id"] for record in records)
    repeated = sorted(n for n, count in counts.items() if count > 1)
    unknown = sorted(counts.keys() - ledger.attempted)
    lost_flushed = sorted(ledger.flushed - counts.keys())
    lost_closed = sorted(ledger.closed - counts.keys())

    def show(numbers: list[int]) -> str:
        return "; ".join(f"{n} ({ledger.how.get(n, 'probe')})" for n in numbers[:5])

    assert not repeated, f"{context}: {len(repeated)} records replayed twice or more: {show(repeated)}"
    assert not unknown, f"{context}: records no append was called with: {unknown[:5]}"
    assert not lost_flushed, (
        f"{context}: {len(lost_flushed)} records covered by a returned flush are lost: {show(lost_flushed)}"
    )
    assert not lost_closed, (
        f"{context}: {len(lost_closed)} records appended before close() are lost: {show(lost_closed)}"
    )
    by_writer: dict[tuple[int, int], list[int]] = defaultdict(list)
    for record in records:
        by_writer[record["r"], record["w"]].append(record["i"])
    for (round_, writer), numbers in by_writer.items():
        assert numbers == sorted(numbers), (
            f"{context}: writer {writer} of round {round_} reordered: {numbers}"
        )


def check_logs(caplog: pytest.LogCaptureFixture, context: str) -> None:
    problems = [r for r in caplog.records if r.name.startswith("yoink") and r.levelno >= logging.WARNING]
    assert not problems, f"{context}: yoink logged {[r.getMessage() for r in problems[:3]]}"


async def check_journal(open_storage: OpenStorage, ledger: Ledger, context: str) -> None:
    """Replay in a new manager and check; then append, flush and replay again."""
    async with CheckpointManager(open_storage(), batch_bytes=1 << 16, flush_interval=None) as manager:
        records = await replay(manager, context)
        check(records, ledger, context)
        probe = ledger.next_id
        ledger.next_id += 1
        ledger.attempted.add(probe)
        await manager.append({"w": -1, "i": probe, "id": probe, "r": -1})
        await manager.flush()
        ledger.flushed.add(probe)
        again = await replay(manager, context)
        assert again == [*records, {"w": -1, "i": probe, "id": probe, "r": -1}], (
            f"{context}: appending after the replay did not add exactly the new record"
        )


async def fuzz_round(open_storage: OpenStorage, ledger: Ledger, chosen: Setting, number: int) -> None:
    """One manager: writers and a close, cancelled at random; then the journal is checked."""
    rng = random.Random(f"{ledger.seed}:{number}")
    round_ = Round(number)
    if rng.random() < 0.4:  # close while the writers run
        round_.close_after = rng.randrange(chosen.writers * chosen.operations)
    manager = CheckpointManager(
        open_storage(), batch_bytes=rng.choice(BATCH_BYTES), flush_interval=rng.choice(FLUSH_INTERVALS)
    )
    async with manager:  # starts the periodic flusher, if any; closing again on the way out does nothing
        writers = [
            asyncio.create_task(write(manager, ledger, round_, w, chosen.operations))
            for w in range(chosen.writers)
        ]
        everyone: asyncio.Future[Any] = asyncio.gather(*writers)
        if round_.close_after is not None:
            signal: asyncio.Future[Any] = asyncio.create_task(round_.close_now.wait())
            await asyncio.wait([everyone, signal], return_when=asyncio.FIRST_COMPLETED)
            signal.cancel()
        else:
            await asyncio.wait([everyone])
        await close(manager, ledger, round_, rng)
        await everyone
        ledger.flushed.update(round_.appended[: round_.flushed_upto])
        ledger.closed.update(round_.appended)
        # Still inside the block, so that a storage the close left open would show as locked.
        await check_journal(open_storage, ledger, ledger.context(number))


async def fuzz(open_storage: OpenStorage, backend: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="yoink")
    seed = random_seed()
    ledger = Ledger(seed=seed, backend=backend)
    chosen = setting(backend)
    for number in range(chosen.rounds):
        context = ledger.context(number)
        try:
            await fuzz_round(open_storage, ledger, chosen, number)
        except AssertionError:
            raise
        except (Exception, asyncio.CancelledError) as exc:  # a cancellation escaping is a failure too
            raise AssertionError(f"{context}: {type(exc).__name__}: {exc}") from exc
        check_logs(caplog, context)
    outcomes = ledger.outcomes
    print(f"seed {seed}, backend {backend}: {ledger.next_id} records, {dict(sorted(outcomes.items()))}")
    cancelled = {
        kind: sum(n for key, n in outcomes.items() if key.startswith(kind) and "cancelled" in key)
        for kind in ("append", "flush")
    }
    assert all(cancelled.values()), f"seed {seed}: no operation of some kind was cancelled: {cancelled}"


async def test_cancelling_appends_flushes_and_close_at_random_loses_and_repeats_nothing(
    open_storage: OpenStorage, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    await fuzz(open_storage, request.node.callspec.params["open_storage"], caplog)


async def test_cancelling_at_random_on_an_fsspec_journal_loses_and_repeats_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def open_storage() -> FsspecStorage:
        return FsspecStorage(f"fsspec+file://{tmp_path}/j.jsonl", stage_dir=tmp_path / "stage")

    await fuzz(open_storage, "fsspec", caplog)
