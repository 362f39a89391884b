"""Helpers for tests: storages that show or slow down what the manager does, an fsync spy, seeds,
a Python child."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Callable, Iterator

import anyio
import pytest

import yoink.storage._local as local_storage
from yoink import StorageError
from yoink.storage import MemoryStorage

SEED_VARIABLE = "YOINK_TEST_SEED"


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (dedented) in a Python process of its own, with ``args``; its output as text."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def random_seed() -> int:
    """The seed for a randomized test: ``$YOINK_TEST_SEED`` when set, else a new one.

    It is printed, so the captured output of a failing test says how to run it again.
    """
    given = os.environ.get(SEED_VARIABLE)
    seed = int(given) if given else secrets.randbits(32)
    print(f"random seed {seed}: rerun with {SEED_VARIABLE}={seed}")
    return seed


class RecordingStorage(MemoryStorage):
    """A MemoryStorage that records each write and flush, and can be slow or fail on demand."""

    def __init__(self, name: str | None = None, *, delay: float = 0.0) -> None:
        super().__init__(name)
        self.delay = delay
        self.writes: list[str] = []
        self.flushes = 0
        self.durable = ""  # the text as of the last flush
        self.fail_writes = 0  # how many of the next writes fail, leaving the journal unchanged
        self.handed = 0  # bytes passed to write(), a write under way included, a failed one not
        self.writing = 0  # writes under way
        self.write_began: anyio.Event | None = None  # set when a write begins, if a test gives one
        self.before_write_ends: Callable[[], None] | None = None  # called as each write ends

    async def write(self, data: str) -> None:
        self.handed += len(data.encode())
        self.writing += 1
        if self.write_began is not None:
            self.write_began.set()
        try:
            if self.delay:
                await anyio.sleep(self.delay)
            if self.before_write_ends is not None:
                self.before_write_ends()
            if self.fail_writes:
                self.fail_writes -= 1
                self.handed -= len(data.encode())
                raise StorageError("injected write failure")
            await super().write(data)
            self.writes.append(data)
        finally:
            self.writing -= 1

    async def flush(self) -> None:
        if self.delay:
            await anyio.sleep(self.delay)
        await super().flush()
        self.flushes += 1
        self.durable = "".join(self.writes)


class ClosingStorage(MemoryStorage):
    """A MemoryStorage whose read() says whether it was closed, and when its cleanup ran."""

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self.reads_open = 0
        self.reads_closed = 0

    async def read(self) -> AsyncIterator[str]:
        self.reads_open += 1
        try:
            async with contextlib.aclosing(super().read()) as items:
                async for item in items:
                    yield item
        finally:
            self.reads_open -= 1
            self.reads_closed += 1


@dataclasses.dataclass(frozen=True)
class Fsync:
    """One ``os.fsync``: what its descriptor named, whether a directory, and the size then."""

    path: str
    directory: bool
    size: int


class FsyncSpy:
    """The fsyncs the local backend made, in order, from whichever thread made them."""

    def __init__(self) -> None:
        self.calls: list[Fsync] = []
        self._lock = threading.Lock()

    def record(self, fd: int) -> None:
        info = os.fstat(fd)
        path = os.readlink(f"/proc/self/fd/{fd}")
        with self._lock:
            self.calls.append(Fsync(path, stat.S_ISDIR(info.st_mode), info.st_size))

    def sizes(self, path: str | os.PathLike[str]) -> list[int]:
        """The size of the file at ``path`` at each of its fsyncs."""
        wanted = os.path.realpath(path)
        return [call.size for call in self.calls if call.path == wanted and not call.directory]

    def directories(self) -> list[str]:
        return [call.path for call in self.calls if call.directory]


@contextlib.contextmanager
def spy_on_fsync(monkeypatch: pytest.MonkeyPatch) -> Iterator[FsyncSpy]:
    """Record every fsync that yoink.storage._local makes (it calls ``os.fsync``), then make it."""
    spy = FsyncSpy()
    fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        spy.record(fd)
        fsync(fd)

    with monkeypatch.context() as patch:
        patch.setattr(local_storage.os, "fsync", recording_fsync)
        yield spy
