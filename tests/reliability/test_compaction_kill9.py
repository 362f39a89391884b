"""kill -9 a writer that compacts as it appends, on every backend: one journal whole, nothing flushed lost."""

from __future__ import annotations

import asyncio
import itertools
import random
from pathlib import Path

from tests.helpers import random_seed
from tests.reliability.killing import Journal, acknowledged_in, kills, run_writer_and_kill
from yoink import CheckpointManager

WRITER = Path(__file__).with_name("compacting_writer.py")
KEYS = 50  # compacting_writer.KEYS
MORE_KILLS = 6  # at most, when none of the planned ones came after a compaction
# the journals whose flushes go on during a compaction (by key)
CARRIES = {"local", "redis", "s3-object", "s3-segments"}


def test_kill_9_during_compactions_leaves_the_old_journal_or_the_snapshot_and_what_followed(
    journal: Journal,
) -> None:
    rng = random.Random(random_seed())
    acknowledged: set[int] = set()
    compactions = flushed_during = 0
    planned = kills(8 if journal.name == "local" else 4)
    # On a loaded machine (or under mutation testing's tracing) a writer may not get as far as a
    # compaction (or a flush during one) before its kill: more kills follow, each writer living
    # longer, until one has.
    for kill in itertools.count():
        proved = bool(compactions and acknowledged and (flushed_during or journal.name not in CARRIES))
        if kill >= planned + (0 if proved else MORE_KILLS):
            break
        seed, after = rng.randrange(1 << 30), rng.uniform(0.05, journal.pause * 2)
        if kill >= planned:
            after = journal.pause * 2 * (kill - planned + 1)
        _, lines = run_writer_and_kill(WRITER, journal, seed, after)
        acknowledged |= acknowledged_in(lines)
        compactions += lines.count("compacted")
        flushed_during += lines.count("flushed during a compaction")
        numbers = _replayed(journal)
        assert numbers == sorted(set(numbers)), f"kill {kill}: records repeated or out of order (a mix?)"
        latest = {}
        for n in numbers:
            latest[n % KEYS] = n
        lost = sorted(n for n in acknowledged if latest.get(n % KEYS, -1) < n)
        assert not lost, (
            f"kill {kill}: flushed records lost, neither there nor replaced by a later one: {lost[:5]}"
        )
    assert acknowledged, "no writer lived long enough to flush: the test proved nothing"
    assert compactions, "no compaction returned before a kill: the test proved nothing"
    if journal.name in CARRIES:  # it writes on during a compaction, carried into the new journal
        assert flushed_during, "no flush returned during a compaction: what is carried was never killed"
    else:  # its flushes wait for the compaction's swap
        assert not flushed_during, "a flush returned during a compaction on a storage that holds writes"


def _replayed(journal: Journal) -> list[int]:
    async def replay() -> list[int]:
        async with CheckpointManager.from_uri(journal.uri, read_only=True, **journal.options) as reader:
            return [record["n"] async for record in reader.replay()]  # raises on corruption

    return asyncio.run(replay())
