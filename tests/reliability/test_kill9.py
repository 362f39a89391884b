"""kill -9 a writer at random moments, on every backend: what a returned flush promised is there."""

from __future__ import annotations

import asyncio
import random

from tests.helpers import random_seed
from tests.reliability.killing import Journal, kill_loop, kills, replayed
from yoink import CheckpointManager


def test_kill_9_never_loses_a_flushed_record_nor_replays_one_twice_or_corrupt(journal: Journal) -> None:
    rng = random.Random(random_seed())
    outcome = kill_loop(journal, kills(20 if journal.name == "local" else 6), rng)
    assert not outcome.failures, outcome.failures[:5]
    assert not outcome.lost, f"{len(outcome.lost)} flushed records lost, e.g. {sorted(outcome.lost)[:5]}"
    assert not outcome.duplicated, f"replayed twice: {sorted(outcome.duplicated)[:5]}"
    assert outcome.acknowledged, "no writer lived long enough to flush: the test proved nothing"

    async def append_after_the_last_kill(n: int) -> None:
        async with CheckpointManager.from_uri(journal.uri, **journal.options) as manager:
            await manager.append({"n": n})

    before = replayed(journal)
    journal.before_start()
    asyncio.run(append_after_the_last_kill(max(before) + 1))
    assert replayed(journal) == [*before, max(before) + 1]  # the journal stays appendable
