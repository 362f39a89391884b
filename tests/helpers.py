"""Storages for tests that need to see or slow down what the manager does to a storage."""

from __future__ import annotations

import anyio

from yoink import StorageError
from yoink.storage import MemoryStorage


class RecordingStorage(MemoryStorage):
    """A MemoryStorage that records each write and flush, and can be slow or fail on demand."""

    def __init__(self, name: str | None = None, *, delay: float = 0.0) -> None:
        super().__init__(name)
        self.delay = delay
        self.writes: list[str] = []
        self.flushes = 0
        self.durable = ""  # the text as of the last flush
        self.fail_writes = 0  # how many of the next writes fail, leaving the journal unchanged

    async def write(self, data: str) -> None:
        if self.delay:
            await anyio.sleep(self.delay)
        if self.fail_writes:
            self.fail_writes -= 1
            raise StorageError("injected write failure")
        await super().write(data)
        self.writes.append(data)

    async def flush(self) -> None:
        if self.delay:
            await anyio.sleep(self.delay)
        await super().flush()
        self.flushes += 1
        self.durable = "".join(self.writes)
