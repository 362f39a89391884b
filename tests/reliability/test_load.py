"""Load: ten thousand tasks appending to one manager whose storage is slow."""

from __future__ import annotations

import anyio
import orjson

from tests.helpers import RecordingStorage
from tests.reliability.killing import LONG
from yoink import CheckpointManager

TASKS = 10_000
PER_TASK = 100 if LONG else 20


async def test_ten_thousand_tasks_on_a_slow_storage_keep_memory_bounded_and_lose_nothing() -> None:
    storage = RecordingStorage(delay=0.005)  # each write and flush takes 5 ms
    batch_bytes = 64 << 10
    peak = 0
    async with CheckpointManager(storage, batch_bytes=batch_bytes, flush_interval=0.05) as manager:

        async def task(t: int) -> None:
            nonlocal peak
            for i in range(PER_TASK):
                await manager.append({"t": t, "i": i, "pad": "p" * 40})
                peak = max(peak, len(manager._buffer))
                if i % 5 == 4:
                    await manager.flush()

        async with anyio.create_task_group() as tg:
            for t in range(TASKS):
                tg.start_soon(task, t)
    written = "".join(storage.writes)
    records = [orjson.loads(line) for line in written.splitlines()]
    assert len(records) == TASKS * PER_TASK, "records lost or repeated"
    by_task: dict[int, list[int]] = {}
    for record in records:
        by_task.setdefault(record["t"], []).append(record["i"])
    assert all(numbers == list(range(PER_TASK)) for numbers in by_task.values()), "a task's records reordered"
    # Appending waits while a full batch is written, so the buffer holds a batch and at most one
    # record from each task that was appending meanwhile, however many records there are in all.
    record_size = len(orjson.dumps({"t": TASKS, "i": PER_TASK, "pad": "p" * 40})) + 1
    assert peak <= batch_bytes + TASKS * record_size
    assert peak < len(written) / 10, f"the buffer reached {peak:,} bytes of {len(written):,}"
    # Tasks that waited for a full batch to be written do not each write the few records left.
    assert len(storage.writes) <= 2 * len(written) // batch_bytes + storage.flushes + 1, len(storage.writes)
