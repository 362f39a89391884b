"""A writer for crash tests: resume a journal, then append and flush until killed.

Usage: python tests/reliability/writer.py URI SEED [OPTIONS_JSON [NAME [LIMIT]]]

Prints ``resumed N`` once the journal is replayed (N records), then, each time one of its tasks'
flushes returns, ``acked n n ...``: the numbers of that task's records the flush covered. Those
records are durable, and a ``kill -9`` must not lose any of them. Some runs use one task, some many,
so flushes are called while other tasks' batches are being written. Records carry the writer's
NAME (``"w"``) when one is given; with a LIMIT, the writer stops after about that many acknowledged
records and closes its manager.
"""

from __future__ import annotations

import itertools
import json
import random
import sys

import anyio

from yoink import CheckpointManager


async def main(uri: str, seed: int, options: dict[str, object], name: str, limit: int) -> None:
    rng = random.Random(seed)
    batch_bytes = rng.choice([256, 4096, 65536, 16 << 20])
    big_pad = 400 if batch_bytes < 1 << 20 else 4_000  # records past a 1 MiB batch, without a huge journal
    tasks = rng.choice([1, 8, 64])
    async with CheckpointManager.from_uri(
        uri, batch_bytes=batch_bytes, flush_interval=None, **options
    ) as manager:
        seen: set[int] = set()
        async for record in manager.replay():
            if record["n"] in seen:
                sys.exit(f"record {record['n']} replayed twice")
            seen.add(record["n"])
        print(f"resumed {len(seen)}", flush=True)
        numbers = itertools.count(max(seen, default=-1) + 1)

        acked = 0
        tag = {"w": name} if name else {}

        async def task(task_rng: random.Random) -> None:
            nonlocal acked
            while not limit or acked < limit:
                mine = []
                for _ in range(task_rng.randint(1, 200 // tasks + 1)):
                    n = next(numbers)
                    await manager.append({"n": n, **tag, "pad": "x" * task_rng.randint(0, big_pad)})
                    mine.append(n)
                await manager.flush()
                acked += len(mine)
                print("acked", *mine, flush=True)
                if tasks > 1:  # like real jobs, tasks finish at scattered moments
                    await anyio.sleep(task_rng.uniform(0, 0.005))

        async with anyio.create_task_group() as tg:
            for _ in range(tasks):
                tg.start_soon(task, random.Random(rng.random()))


if __name__ == "__main__":
    arguments = sys.argv[1:] + ["{}", "", "0"][len(sys.argv) - 3 :]  # the defaults of those not given
    anyio.run(
        main, arguments[0], int(arguments[1]), json.loads(arguments[2]), arguments[3], int(arguments[4])
    )
