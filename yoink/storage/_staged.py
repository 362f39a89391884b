"""StagedStorage: the part every remote backend shares, writing to a local stage and uploading it.

A subclass says where the journal lives: how to read what the remote side holds
(:meth:`_open_remote`), how to upload staged batches (:meth:`_upload`) and, to compact, how to
swap in a new journal (:meth:`_swap`, or :meth:`_cut` for one that takes writes during the swap).
The write path, the locks, read-your-writes, the order of a replace and close are here, once.
"""

from __future__ import annotations

import contextlib
import functools
import os
from abc import abstractmethod
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import BinaryIO

import anyio

from yoink._exceptions import CompactionNotSupportedError
from yoink._fork import drop_in_forked_children
from yoink._tasks import uninterrupted
from yoink.storage._lifecycle import ClosableStorage
from yoink.storage._stage import Batch, Stage, default_stage_root, read_batches

__all__ = ["StagedStorage"]


class StagedStorage(ClosableStorage):
    """A backend whose writes wait in a crash-surviving :class:`Stage` until a flush uploads them.

    Compaction (:meth:`replace`) takes the stage's lock if this storage does not hold it yet, and
    uploads what is staged first, as a flush would: what was staged belongs to the old journal, so
    the stage holds nothing from before the swap, and no later storage on it (after a crash at any
    instant) can upload an old batch on top of the new journal. Then the subclass's
    :meth:`_swap` puts the new journal in place in one step the remote side makes atomic, with
    uploads held (a flush waits for it).

    A subclass whose instances set ``writes_during_replace`` implements :meth:`_cut` instead: with
    uploads held and nothing staged, it fixes where the old journal ends, and returns what writes
    the new journal and swaps it in. That runs with uploads going on: a flush during it uploads
    what was written after the cut, which the swap must keep after the new journal. One replace
    runs at a time, and :meth:`close` waits for it.
    """

    def __init__(self, uri: str, stage_dir: str | os.PathLike[str] | None, identity: str):
        self._uri = uri
        root = stage_dir if stage_dir is not None else default_stage_root()
        self._stage = Stage(root, identity, describe=uri)
        self._write_lock = anyio.Lock()  # the stage's files
        self._flush_lock = anyio.Lock()  # one upload at a time
        self._replace_lock = anyio.Lock()  # one replace at a time, and close() after it

    @property
    def uri(self) -> str:
        return self._uri

    @property
    def stage_directory(self) -> str:
        """Where this journal's writes wait for upload."""
        return self._stage.directory

    async def write(self, data: str) -> None:
        self._check_open()
        if data:
            await uninterrupted(functools.partial(self._write, data.encode("utf-8")))

    async def flush(self) -> None:
        self._check_open()
        await uninterrupted(self._flush)

    async def replace(self, text: AsyncIterable[str]) -> None:
        """Upload what is staged, then swap in ``text`` as the whole journal (see the class docstring)."""
        self._check_open()
        self._check_swappable()
        await uninterrupted(functools.partial(self._replace, text))

    async def read(self) -> AsyncIterator[str]:
        staged, landed, remote = await self._look()
        try:
            async with contextlib.aclosing(remote):  # closed at once when a replay is abandoned
                async for block in remote:
                    yield block
            pending = [(batch, file) for batch, file in staged if batch.seq > landed]
            async with contextlib.aclosing(read_batches(pending, self._uri)) as batches:
                async for block in batches:
                    yield block
        finally:
            _close(staged)

    async def _look(self) -> tuple[list[tuple[Batch, BinaryIO]], int, AsyncGenerator[str, None]]:
        """What :meth:`read` yields: the stage's batches, opened first, then the remote side
        (:meth:`_open_remote`: the last of them that it holds, and its text)."""
        async with self._write_lock:  # staged files are opened before the remote side is read
            staged = self._stage.open_snapshot()
        try:
            landed, remote = await self._open_remote(self._stage.snapshot_writer(), bool(staged))
        except BaseException:
            _close(staged)
            raise
        return staged, landed, remote

    async def exists(self) -> bool:
        return bool(self._stage.snapshot()) or await self._remote_exists()

    async def _write(self, payload: bytes) -> None:
        async with self._write_lock:
            self._check_open()
            if not self._stage.is_open:
                await self._open_stage()
            await self._stage.write(payload)

    async def _flush(self) -> None:
        async with self._flush_lock:
            self._check_open()
            await self._upload_staged()

    async def _replace(self, text: AsyncIterable[str]) -> None:
        async with self._replace_lock:
            async with self._flush_lock:  # no upload under way, none starts: writes wait in the stage
                self._check_open()
                async with self._write_lock:
                    if not self._stage.is_open:  # the writer's lock, held through the swap and after it
                        await self._open_stage()
                    batches = self._stage.seal()
                if batches:
                    await self._upload(batches)
                if not self.writes_during_replace:
                    await self._swap(_encoded(text))
                    return
                swap = await self._cut()
            await swap(_encoded(text))  # flushes go on: they upload what follows the cut

    async def _close(self) -> None:
        async with self._replace_lock:  # a replace under way uses the client until its swap
            pass
        try:
            if self._stage.is_open:  # this storage wrote; a stage it never took is not its to upload
                async with self._flush_lock:
                    await self._upload_staged()
        finally:
            async with self._write_lock:
                await self._stage.close()
            await self._release()

    async def _open_stage(self) -> None:
        await self._stage.open()
        drop_in_forked_children(self)

    def _drop_after_fork(self) -> None:  # the stage lets go of its own files (Stage._drop_after_fork)
        if self._closed:
            return
        self._closed_by_fork()
        self._write_lock = anyio.Lock()
        self._flush_lock = anyio.Lock()
        self._replace_lock = anyio.Lock()
        self._drop_clients_after_fork()

    def _drop_clients_after_fork(self) -> None:
        """Forget clients that the parent process opened, without closing them (they are its)."""

    async def _upload_staged(self) -> None:
        async with self._write_lock:
            if not self._stage.is_open:
                if not self._stage.snapshot():
                    return  # nothing written here, nothing left by a crash
                await self._open_stage()
            batches = self._stage.seal()
        if batches:
            await self._upload(batches)

    @abstractmethod
    async def _open_remote(self, writer: str | None, staged: bool) -> tuple[int, AsyncGenerator[str, None]]:
        """Start reading the remote journal: return the last of ``writer``'s batches that it already
        holds (0 if none, or if ``staged`` is false and it need not be looked up), and its text."""

    @abstractmethod
    async def _remote_exists(self) -> bool: ...

    @abstractmethod
    async def _upload(self, batches: list[Batch]) -> None:
        """Upload the sealed ``batches`` (oldest first), then discard them from the stage."""

    def _check_swappable(self) -> None:
        """Raise CompactionNotSupportedError, before anything is done, if this journal cannot be swapped."""

    async def _swap(self, data: AsyncIterator[bytes]) -> None:
        """Make ``data`` the whole remote journal, atomically; it follows this writer's view of the
        journal (as an upload does), and later uploads follow it. Nothing is staged when it is called."""
        raise CompactionNotSupportedError(
            f"{self!r} cannot compact its journal: {type(self).__name__} does not implement _swap(); "
            "the journal is unchanged"
        )

    async def _cut(self) -> Callable[[AsyncIterator[bytes]], Awaitable[None]]:
        """Where ``writes_during_replace`` is set: fix where the old journal ends, with uploads held
        and nothing staged, and return what makes ``data`` the whole journal, atomically, followed
        by every upload made after the cut, in order. What it returns runs with uploads going on;
        if that raises, those uploads follow the old journal."""
        raise CompactionNotSupportedError(
            f"{self!r} cannot compact its journal while it writes: {type(self).__name__} sets "
            "writes_during_replace but does not implement _cut(); the journal is unchanged"
        )

    async def _release(self) -> None:
        """Release clients once the storage is closed."""


def _close(staged: list[tuple[Batch, BinaryIO]]) -> None:
    for _, file in staged:
        file.close()


async def _encoded(text: AsyncIterable[str]) -> AsyncIterator[bytes]:
    async for chunk in text:
        if chunk:
            yield chunk.encode("utf-8")
