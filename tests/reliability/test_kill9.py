"""kill -9 a writer at random moments, on every backend: what a returned flush promised is there."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.helpers import random_seed
from tests.reliability.killing import Journal, kill_loop, kills, replayed
from yoink import CheckpointManager


@pytest.fixture(params=["local", "s3-object", "s3-segments", "redis", "fsspec"])
def journal(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Journal]:
    if request.param == "local":
        yield Journal("local", str(tmp_path / "crash.jsonl"), {}, pause=0.15)
    elif request.param == "redis":
        url, key = request.getfixturevalue("redis_url"), f"crash-{tmp_path.name}"
        with redis.Redis.from_url(url) as client:

            def lease_gone() -> None:  # a killed writer's lease lasts its lease_ttl
                while client.exists(f"{{{key}}}:lease"):
                    time.sleep(0.05)

            yield Journal("redis", f"{url}?key={key}", {"lease_ttl": 1.0}, pause=0.3, before_start=lease_gone)
    elif request.param == "fsspec":  # a local file through fsspec: kills land in uploads, which append
        uri = f"fsspec+file://{tmp_path}/crash.jsonl"
        yield Journal("fsspec", uri, {"stage_dir": str(tmp_path / "stage")}, pause=0.3)
    else:
        bucket = request.getfixturevalue("bucket")
        monkeypatch.setenv("AWS_ENDPOINT_URL", request.getfixturevalue("moto").url)  # the writers inherit it
        options: dict[str, Any] = {"stage_dir": str(tmp_path / "stage")}
        if request.param == "s3-segments":
            options["merge_after"] = 4  # merges are killed too
        layout = request.param.removeprefix("s3-")
        yield Journal(request.param, f"s3://{bucket}/crash?layout={layout}", options, pause=0.6)


def test_kill_9_never_loses_a_flushed_record_nor_replays_one_twice_or_corrupt(journal: Journal) -> None:
    rng = random.Random(random_seed())
    outcome = kill_loop(journal, kills(20 if journal.name == "local" else 10), rng)
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
