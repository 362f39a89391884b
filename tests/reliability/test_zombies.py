"""Zombie writers: a writer paused past its lease, or past another machine's writes and merges.

Writer A appends and flushes; it is paused with SIGSTOP (a long GC, a frozen VM), and writer B, on
"another machine" (another stage directory, another connection), takes the journal over, writes and
closes. Then A is let go with SIGCONT. A must be refused (and keep its records); nothing either
writer flushed may be lost, replayed twice, or found out of order (none of A's records after B's).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.helpers import random_seed
from tests.reliability.killing import LONG, Journal, take_over_from_a_paused_writer

ROUNDS = 10 if LONG else 1


@pytest.fixture(params=["redis", "s3-object", "s3-segments", "fsspec"])
def journals(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Journal, dict[str, Any]]]:
    """The journal as writer A opens it, and the options writer B opens it with elsewhere."""
    if request.param == "redis":
        url, key = request.getfixturevalue("redis_url"), f"zombie-{tmp_path.name}"
        with redis.Redis.from_url(url) as client:

            def lease_gone() -> None:
                while client.exists(f"{{{key}}}:lease"):
                    time.sleep(0.05)

            options = {"lease_ttl": 1.0}
            yield Journal("redis", f"{url}?key={key}", options, pause=0.3, before_start=lease_gone), options
    elif request.param == "fsspec":
        uri = f"fsspec+file://{tmp_path}/zombie.jsonl"
        yield (
            Journal("fsspec", uri, {"stage_dir": str(tmp_path / "stage-a")}, pause=0.3),
            {"stage_dir": str(tmp_path / "stage-b")},
        )
    else:
        bucket = request.getfixturevalue("bucket")
        monkeypatch.setenv("AWS_ENDPOINT_URL", request.getfixturevalue("moto").url)
        layout = request.param.removeprefix("s3-")
        uri = f"s3://{bucket}/zombie?layout={layout}"
        merges = {"merge_after": 2} if layout == "segments" else {}  # B merges while A sleeps
        yield (
            Journal(request.param, uri, {"stage_dir": str(tmp_path / "stage-a"), **merges}, pause=0.3),
            {"stage_dir": str(tmp_path / "stage-b"), **merges},
        )


def test_a_paused_writer_that_another_replaced_is_refused_and_nothing_is_lost(
    journals: tuple[Journal, dict[str, Any]],
) -> None:
    journal, elsewhere = journals
    rng = random.Random(random_seed())
    for round_ in range(ROUNDS):
        outcome = take_over_from_a_paused_writer(journal, elsewhere, rng, stopped=2.0, records=300)
        context = f"{journal.name}, round {round_}"
        assert not outcome.lost, f"{context}: flushed records lost: {sorted(outcome.lost)[:5]}"
        assert not outcome.duplicated, f"{context}: replayed twice: {sorted(outcome.duplicated)[:5]}"
        assert not outcome.reordered, f"{context}: the paused writer's records follow the new writer's"
        assert outcome.zombie_refused, f"{context}: the paused writer was not refused"
