"""A writer for crash tests: resume a journal, then append and flush until killed.

Usage: python tests/crash_writer.py URI SEED

Prints ``resumed N`` once the journal is replayed (N records), then ``flushed N`` each time a flush
returns: at that moment records 0..N-1 are durable, and a ``kill -9`` must not lose any of them.
"""

from __future__ import annotations

import asyncio
import random
import sys

from yoink import CheckpointManager


async def main(uri: str, seed: int) -> None:
    rng = random.Random(seed)
    batch_bytes = rng.choice([256, 4096, 65536, 16 << 20])
    async with CheckpointManager.from_uri(uri, batch_bytes=batch_bytes, flush_interval=None) as manager:
        n = 0
        async for record in manager.replay():
            if record["n"] != n:
                sys.exit(f"replayed record {record['n']} where {n} was expected")
            n += 1
        print(f"resumed {n}", flush=True)
        while True:
            for _ in range(rng.randint(1, 200)):
                await manager.append(
                    {"n": n, "pad": "x" * rng.randint(0, 400 if batch_bytes < 1 << 20 else 40_000)}
                )
                n += 1
            await manager.flush()
            print(f"flushed {n}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
