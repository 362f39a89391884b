"""The journals the kill -9 loops run on: one per backend, each with the options its writers need."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.killing import Journal


@pytest.fixture(params=["local", "s3-object", "s3-segments", "redis", "fsspec"])
def journal(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Journal]:
    if request.param == "local":
        yield Journal("local", str(tmp_path / "crash.jsonl"), {}, pause=0.15)
    elif request.param == "redis":
        import redis  # an optional extra, imported only where it is needed

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
