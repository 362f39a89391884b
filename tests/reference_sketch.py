"""The Redis backend sketched on the reference page, method for method, with a real redis client.

It keeps a Redis list: one RPUSH per write(), one LRANGE 0 -1 to read everything. The tests plug
it in unchanged; benchmarks/bench_redis.py measures yoink's RedisStreamStorage beside it. The page
calls it ``RedisStreamStorage``; here it is ``RedisListSketch``, so that only yoink's own backend has
that name.
"""

from __future__ import annotations

import redis.asyncio as redis

from yoink.storage import CheckpointStorage


class RedisListSketch(CheckpointStorage):
    def __init__(self, url: str, key: str):
        self.client = redis.from_url(url)
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
