"""kill -9 a writer that compacts as it appends, on every backend: one journal whole, nothing flushed lost."""

from __future__ import annotations

import asyncio
import itertools
import random
from pathlib import Path

import pytest

from tests.helpers import random_seed
from tests.reliability import compacting_writer
from tests.reliability.killing import Journal, acknowledged_in, kills, run_writer_and_kill
from tests.servers.s3 import MotoServer
from yoink import CheckpointManager

WRITER = Path(__file__).with_name("compacting_writer.py")
KEYS = 50  # compacting_writer.KEYS
SMALL_PART = 4 << 10  # S3's part minimum, lowered (in moto and in the writers) to put snapshots in parts
MORE_KILLS = 10  # at most, when none of the planned ones came after a compaction (or a flush during one)
# the journals whose flushes go on during a compaction (by key)
CARRIES = {"local", "redis", "s3-object", "s3-segments", "fsspec"}


def test_kill_9_during_compactions_leaves_the_old_journal_or_the_snapshot_and_what_followed(
    journal: Journal,
) -> None:
    _kill_loop(journal)


def test_kill_9_during_compactions_of_an_s3_object_in_parts_leaves_one_journal_and_every_flush(
    bucket: str, moto: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """s3-object with parts of 4 KiB: the snapshot is a multipart upload, and so is a flush onto the
    object, so that kills land while the snapshot's parts go up and while its last parts carry what
    was flushed meanwhile."""
    from moto.s3 import models as moto_models

    from yoink.storage import S3Storage

    monkeypatch.setattr(moto_models, "S3_UPLOAD_PART_MIN_SIZE", SMALL_PART)
    monkeypatch.setattr(S3Storage, "min_part_size", SMALL_PART)  # here, for the replays
    monkeypatch.setenv(compacting_writer.MIN_PART_SIZE, str(SMALL_PART))  # and in the writers
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.url)
    options = {"stage_dir": str(tmp_path / "stage"), "part_size": SMALL_PART}
    _kill_loop(Journal("s3-object", f"s3://{bucket}/crash?layout=object", options, pause=0.6))


def _kill_loop(journal: Journal) -> None:
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
