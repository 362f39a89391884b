"""A writer for crash tests of compaction: append, flush and compact by key until killed.

Usage: python tests/reliability/compacting_writer.py URI SEED [OPTIONS_JSON]

Prints ``resumed N`` once the journal is replayed, then ``acked n n ...`` after each flush that
returned (those records are durable), ``flushed during a compaction`` after one that began and
returned while one compaction was under way, and ``compacted`` after each compaction that returned.
Records are ``{"n": n, "k": n % KEYS}``, numbered on from the journal's last: a compaction by
``"k"`` keeps the last of each key, so a sound journal holds its ``n`` in increasing order, and
for every acknowledged record either that record or a later one of its key. Half the writers fold
every journal in a worker process, however small, so that kills land in those compactions too.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys

import anyio

from yoink import CheckpointManager, _fold

KEYS = 50
MIN_PART_SIZE = "YOINK_TEST_S3_MIN_PART_SIZE"  # S3Storage.min_part_size, lowered as moto's is, if set


async def main(uri: str, seed: int, options: dict[str, object]) -> None:
    rng = random.Random(seed)
    if os.environ.get(MIN_PART_SIZE):
        from yoink.storage import S3Storage

        S3Storage.min_part_size = int(os.environ[MIN_PART_SIZE])
    batch_bytes = rng.choice([256, 4096, 65536])
    if rng.random() < 0.5:
        _fold.WORKER_FROM_BYTES = 0
    async with CheckpointManager.from_uri(
        uri, batch_bytes=batch_bytes, flush_interval=None, **options
    ) as manager:
        last = -1
        async for record in manager.replay():
            if record["n"] <= last:
                sys.exit(f"record {record['n']} replayed after {last}")
            last = record["n"]
        print(f"resumed {last + 1}", flush=True)
        numbers = itertools.count(last + 1)
        compactions = {"done": 0, "under way": False}

        async def append_and_flush() -> None:
            while True:
                mine = []
                for _ in range(rng.randint(1, 100)):
                    n = next(numbers)
                    await manager.append({"n": n, "k": n % KEYS, "pad": "x" * rng.randint(0, 300)})
                    mine.append(n)
                before = dict(compactions)
                await manager.flush()
                print("acked", *mine, flush=True)
                if before["under way"] and compactions == before:  # one compaction, from start to end
                    print("flushed during a compaction", flush=True)

        async def compact() -> None:
            while True:
                await anyio.sleep(rng.uniform(0, 0.03))
                compactions["under way"] = True
                await manager.compact(key="k")
                compactions["under way"] = False
                compactions["done"] += 1
                print("compacted", flush=True)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(append_and_flush)
            tasks.start_soon(compact)


if __name__ == "__main__":
    arguments = sys.argv[1:] + ["{}"][len(sys.argv) - 3 :]
    anyio.run(main, arguments[0], int(arguments[1]), json.loads(arguments[2]))
