"""Two writers on one journal, per backend: the second is refused, clearly; the first loses nothing."""

from __future__ import annotations

import json
import sys
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.servers.s3 import MotoServer
from yoink import CheckpointManager, ConcurrentWriterError

SECOND_WRITER = textwrap.dedent(
    """
    import json, sys, anyio
    from yoink import CheckpointManager

    async def main(uri, options):
        try:
            async with CheckpointManager.from_uri(uri, flush_interval=None, **options) as manager:
                await manager.append({"second": 1})
                await manager.flush()
        except Exception as exc:
            print(type(exc).__name__, exc)
        else:
            print("written")

    anyio.run(main, sys.argv[1], json.loads(sys.argv[2]))
    """
)


Journal = tuple[str, dict[str, Any], Callable[[], dict[str, Any]]]


def open_journal(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Journal:
    """(URI, options, options for a writer on another machine, or {} where there is no such thing)."""
    if kind == "local":
        return str(tmp_path / "j.jsonl"), {}, dict
    if kind == "redis":
        return (
            f"{request.getfixturevalue('redis_url')}?key=two-{uuid.uuid4().hex[:8]}",
            {"lease_ttl": 5.0},
            dict,
        )
    if kind == "fsspec":
        options = {"stage_dir": str(tmp_path / "stage")}
        return f"fsspec+file://{tmp_path}/f.jsonl", options, lambda: {"stage_dir": str(tmp_path / "other")}
    bucket, moto = request.getfixturevalue("bucket"), request.getfixturevalue("moto")
    assert isinstance(moto, MotoServer)
    base = {"endpoint_url": moto.url, "layout": kind.removeprefix("s3-")}
    return (
        f"s3://{bucket}/two",
        {**base, "stage_dir": str(tmp_path / "stage")},
        lambda: {**base, "stage_dir": str(tmp_path / "other")},
    )


@pytest.fixture(params=["local", "s3-object", "s3-segments", "redis", "fsspec"])
def journal(request: pytest.FixtureRequest, tmp_path: Path) -> Journal:
    return open_journal(request.param, request, tmp_path)


@pytest.fixture(params=["s3-object", "s3-segments", "fsspec"])
def remote_journal(request: pytest.FixtureRequest, tmp_path: Path) -> Journal:
    """Backends whose writers on two machines share no lock (local files and Redis leases do)."""
    return open_journal(request.param, request, tmp_path)


async def test_a_second_process_is_refused_and_the_first_loses_nothing(journal: Journal) -> None:
    uri, options, _ = journal
    async with CheckpointManager.from_uri(uri, flush_interval=None, **options) as first:
        await first.append({"first": 0})
        await first.flush()
        second = await anyio.run_process([sys.executable, "-c", SECOND_WRITER, uri, json.dumps(options)])
        said = second.stdout.decode()
        assert said.startswith("CheckpointLockedError "), said + second.stderr.decode()
        assert "one writer at a time, and nothing was written" in said
        await first.append({"first": 1})
    async with CheckpointManager.from_uri(uri, **options) as reader:
        assert [record async for record in reader.replay()] == [{"first": 0}, {"first": 1}]


async def test_a_second_writer_on_another_machine_is_refused_and_both_keep_their_records(
    remote_journal: Journal,
) -> None:
    uri, options, elsewhere = remote_journal
    second = CheckpointManager.from_uri(uri, flush_interval=None, **elsewhere())
    async with CheckpointManager.from_uri(uri, flush_interval=None, **options) as first:
        assert [r async for r in first.replay()] == [r async for r in second.replay()] == []
        await first.append({"first": 0})
        await first.flush()
        await second.append({"second": 0})
        with pytest.raises(ConcurrentWriterError, match="another writer.*Nothing was lost"):
            await second.flush()
        with pytest.raises(ConcurrentWriterError):
            await second.close()  # still refused; the record stays staged on its machine
        await first.append({"first": 1})
    async with CheckpointManager.from_uri(uri, **elsewhere()) as later:  # once the first has stopped
        await later.flush()
        assert [r async for r in later.replay()] == [{"first": 0}, {"first": 1}, {"second": 0}]
