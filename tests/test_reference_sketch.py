"""The custom backend sketched on the reference page plugs in unchanged, against a real Redis."""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as redis

from tests.reference_sketch import RedisListSketch
from yoink import CheckpointManager, CorruptCheckpointError


@pytest.fixture
async def lists(redis_url: str):  # type: ignore[no-untyped-def]
    """Fill a Redis list with raw items, as another program might have; returns its key."""
    client = redis.from_url(redis_url)

    async def fill(*items: bytes) -> str:
        key = f"sketch-{uuid.uuid4().hex[:8]}"
        await client.rpush(key, *items)
        return key

    yield fill
    await client.aclose()


async def test_the_sketch_round_trips_through_the_manager(redis_url: str) -> None:
    key = f"yoink:crawl-{uuid.uuid4().hex[:8]}"
    storage = RedisListSketch(redis_url, key)
    checkpoint = CheckpointManager(storage=storage, batch_bytes=100)
    assert not await checkpoint.exists()
    for n in range(50):
        await checkpoint.append({"url": f"https://example.com/{n}", "depth": n % 3})
    await checkpoint.close()
    resumed = CheckpointManager(storage=RedisListSketch(redis_url, key))
    assert await resumed.exists()
    assert len(await resumed.storage.client.lrange(key, 0, -1)) > 1  # type: ignore[attr-defined]
    assert [r["url"] async for r in resumed.replay()] == [f"https://example.com/{n}" for n in range(50)]
    await resumed.close()


async def test_items_without_newlines_and_items_of_several_lines_are_both_read(redis_url: str, lists) -> None:  # type: ignore[no-untyped-def]
    key = await lists(b'{"n":1}', b'{"n":2}\n', b'{"n":3}\n{"n":4}\n', b'{"n":5}\n{"n":6}', b"", b'{"n":7}')
    async with CheckpointManager(storage=RedisListSketch(redis_url, key)) as checkpoint:
        assert [r["n"] async for r in checkpoint.replay()] == [1, 2, 3, 4, 5, 6, 7]


async def test_a_corrupt_item_in_the_middle_is_found_by_line(redis_url: str, lists) -> None:  # type: ignore[no-untyped-def]
    key = await lists(b'{"n":1}', b'{"n":\n{"n":3}\n', b'{"n":4}')
    async with CheckpointManager(storage=RedisListSketch(redis_url, key)) as checkpoint:
        with pytest.raises(CorruptCheckpointError, match="line 2 \\(byte offset 8\\)"):
            _ = [r async for r in checkpoint.replay()]
