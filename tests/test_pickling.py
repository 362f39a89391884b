"""Storages and managers pickle as their URI and options, so they can be sent to another process."""

from __future__ import annotations

import multiprocessing
import pickle
import uuid
from pathlib import Path

import anyio
import pytest

from tests.servers.s3 import MotoServer
from yoink import CheckpointManager
from yoink.storage import StorageFactory


def append_in_child(manager: CheckpointManager, first: int) -> None:
    async def append() -> None:
        async with manager:
            await manager.append_many({"n": n} for n in range(first, first + 3))

    anyio.run(append)


@pytest.fixture(params=["local", "s3", "redis"])
def uri_and_options(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, object]]:
    if request.param == "local":
        return str(tmp_path / "journal.jsonl"), {"fsync": False}
    if request.param == "s3":
        bucket, moto = request.getfixturevalue("bucket"), request.getfixturevalue("moto")
        assert isinstance(moto, MotoServer)
        return f"s3://{bucket}/j.jsonl", {"endpoint_url": moto.url, "stage_dir": str(tmp_path / "stage")}
    return f"{request.getfixturevalue('redis_url')}?key=pickle-{uuid.uuid4().hex}", {"lease_ttl": 5.0}


async def test_a_manager_sent_to_another_process_appends_there(
    uri_and_options: tuple[str, dict[str, object]],
) -> None:
    uri, options = uri_and_options
    async with CheckpointManager.from_uri(uri, flush_interval=None, batch_bytes=4096, **options) as manager:
        await manager.append_many({"n": n} for n in range(3))
        await manager.flush()
        payload = pickle.dumps(manager)
        assert b'"n":2' not in payload  # no records, no clients, no file handles
    child = multiprocessing.get_context("spawn").Process(
        target=append_in_child, args=(pickle.loads(payload), 3)
    )
    child.start()
    await anyio.to_thread.run_sync(child.join, 60)
    assert child.exitcode == 0
    async with CheckpointManager.from_uri(uri, **options) as manager:
        assert [record["n"] async for record in manager.replay()] == list(range(6))
    copy = pickle.loads(payload)
    assert copy._batch_bytes == 4096
    assert copy._flush_interval is None
    assert repr(copy.storage) == repr(StorageFactory.from_uri(uri, **options))


async def test_pickling_a_manager_with_unflushed_records_says_to_flush_first(tmp_path: Path) -> None:
    async with CheckpointManager.from_uri(tmp_path / "j.jsonl", flush_interval=None) as manager:
        await manager.append({"n": 0})
        with pytest.raises(TypeError) as refused:
            pickle.dumps(manager)
        assert str(refused.value).endswith(
            "has records that are not flushed; await flush() before pickling it (a pickled manager "
            "carries no records, so they would be lost to the copy)"
        )
        await manager.flush()
        pickle.dumps(manager)
