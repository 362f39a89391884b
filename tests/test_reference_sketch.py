"""The custom backend sketched on the reference page plugs in unchanged.

The sketch keeps a Redis list: one item per write(), LRANGE to read. Here the list is a Python list
so the test needs no server; the class is otherwise the page's, method for method.
"""

from __future__ import annotations

import pytest

from yoink import CheckpointManager, CorruptCheckpointError
from yoink.storage import CheckpointStorage

LISTS: dict[str, list[bytes]] = {}


class ListClient:
    """The four redis.asyncio calls the sketch makes, over a Python list."""

    async def rpush(self, key: str, data: str) -> None:
        LISTS.setdefault(key, []).append(data.encode("utf-8"))

    async def lrange(self, key: str, start: int, end: int) -> list[bytes]:
        return list(LISTS.get(key, []))

    async def exists(self, key: str) -> int:
        return int(key in LISTS)

    async def aclose(self) -> None:
        pass


class RedisStreamStorage(CheckpointStorage):
    def __init__(self, url: str, key: str):
        self.client = ListClient()
        self.key = key

    async def write(self, data: str) -> None:
        await self.client.rpush(self.key, data)

    async def read(self):  # type: ignore[no-untyped-def]
        for raw in await self.client.lrange(self.key, 0, -1):
            yield raw.decode("utf-8")

    async def exists(self) -> bool:
        return bool(await self.client.exists(self.key))

    async def flush(self) -> None:
        # Redis is auto-flushed
        pass

    async def close(self) -> None:
        await self.client.aclose()


async def test_the_sketch_round_trips_through_the_manager() -> None:
    storage = RedisStreamStorage("redis://localhost", "yoink:crawl-1")
    checkpoint = CheckpointManager(storage=storage, batch_bytes=100)
    assert not await checkpoint.exists()
    for n in range(50):
        await checkpoint.append({"url": f"https://example.com/{n}", "depth": n % 3})
    await checkpoint.close()
    assert len(LISTS["yoink:crawl-1"]) > 1  # several batches, each an item of several lines
    resumed = CheckpointManager(storage=RedisStreamStorage("redis://localhost", "yoink:crawl-1"))
    assert await resumed.exists()
    assert [r["url"] async for r in resumed.replay()] == [f"https://example.com/{n}" for n in range(50)]
    await resumed.close()


async def test_items_without_newlines_and_items_of_several_lines_are_both_read() -> None:
    LISTS["mixed"] = [b'{"n":1}', b'{"n":2}\n', b'{"n":3}\n{"n":4}\n', b'{"n":5}\n{"n":6}', b"", b'{"n":7}']
    async with CheckpointManager(storage=RedisStreamStorage("redis://localhost", "mixed")) as checkpoint:
        assert [r["n"] async for r in checkpoint.replay()] == [1, 2, 3, 4, 5, 6, 7]


async def test_a_corrupt_item_in_the_middle_is_found_by_line() -> None:
    LISTS["corrupt"] = [b'{"n":1}', b'{"n":\n{"n":3}\n', b'{"n":4}']
    async with CheckpointManager(storage=RedisStreamStorage("redis://localhost", "corrupt")) as checkpoint:
        with pytest.raises(CorruptCheckpointError, match="line 2 \\(byte offset 8\\)"):
            _ = [r async for r in checkpoint.replay()]
