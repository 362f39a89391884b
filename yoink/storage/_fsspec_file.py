"""The journal's file on any fsspec filesystem, for FsspecStorage: sized, read, appended to, cut.

Its methods block, and run in a worker thread. fsspec has no conditional writes, so each write
checks the file's size just before it: a file that is not the size the writer expects raises
:class:`Moved`. Local files and fsspec's memory filesystem have ways of their own.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from yoink._lines import tail_reads
from yoink._records import MAX_LINE_BYTES
from yoink.storage._files import READ_CHUNK, TORN_SUFFIX

__all__ = ["CannotAppend", "JournalFile", "Moved"]


class Moved(Exception):  # becomes a ConcurrentWriterError
    """The file was not the size the writer expected; ``written``: the data went in all the same."""

    def __init__(self, size: int, written: bool) -> None:
        self.size = size
        self.written = written


class CannotAppend(Exception):
    """The store refused to open the file for appending (the cause says why)."""


class JournalFile:
    """The journal's file on any fsspec filesystem. Its methods block: they run in a worker thread."""

    read_size = READ_CHUNK  # bytes a replay asks for at once

    def __init__(self, fs: Any, path: str) -> None:
        self.fs = fs
        self.path = path

    @staticmethod
    def on(fs: Any, path: str) -> JournalFile:
        """The class for ``fs``: local files and fsspec's memory need their own ways."""
        if isinstance(fs, LocalFileSystem):
            return _LocalFile(fs, path)
        if isinstance(fs, MemoryFileSystem):
            return _MemoryFile(fs, path)
        return JournalFile(fs, path)

    def exists(self) -> bool:
        return bool(self.fs.exists(self.path))

    def size(self) -> int:
        try:
            info = self.fs.info(self.path)
        except FileNotFoundError:
            return 0
        return int(info.get("size") or 0)

    def cat(self, start: int, end: int) -> bytes:
        return bytes(self.fs.cat_file(self.path, start=start, end=end))

    def tail(self, size: int) -> bytes:
        """The bytes after the last newline of the file's first ``size``, read from the end."""
        for start in tail_reads(size):
            block = self.cat(start, size)
            cut = block.rfind(b"\n") + 1
            if cut or start == 0:
                return block[cut:]
        raise ValueError(
            f"it ends in a line longer than {MAX_LINE_BYTES:,} bytes without a newline, which "
            "yoink does not read; nothing was uploaded. Remove that line and flush again"
        )

    def set_aside(self, tail: bytes) -> None:
        """Add ``tail`` to ``<path>.torn``, one fragment a line, as LocalFileStorage does."""
        sidecar = self.path + TORN_SUFFIX
        kept = bytes(self.fs.cat_file(sidecar)) if self.fs.exists(sidecar) else b""
        if not kept.endswith(tail + b"\n"):  # else a crash came after it was set aside
            self.fs.pipe_file(sidecar, kept + tail + b"\n")

    def append(self, data: bytes, size: int) -> None:
        """Append ``data`` if the file still holds ``size`` bytes; checked again afterwards."""
        self._expect(size)
        try:
            file = self.fs.open(self.path, "ab")
        except (NotImplementedError, ValueError, OSError) as exc:
            raise CannotAppend from exc
        with file:
            file.write(data)
        if (now := self.size()) != size + len(data):
            raise Moved(now - len(data), written=True)

    def rewrite(self, data: bytes, size: int) -> None:
        """Write the file's first ``size`` bytes and ``data`` in its place, if it still holds ``size``."""
        self._expect(size)
        old = self.cat(0, size) if size else b""
        self._expect(size)  # the other writer's records that a rewrite would lose: as few as can be
        self.replace(old + data)

    def replace(self, data: bytes) -> None:
        self.fs.pipe_file(self.path, data)

    def cut(self, size: int) -> None:
        """Cut the file back to its first ``size`` bytes."""
        self.replace(self.cat(0, size))

    def _expect(self, size: int) -> None:
        if (now := self.size()) != size:
            raise Moved(now, written=False)


class _LocalFile(JournalFile):
    """A local file: appended to with one ``write`` after one ``fstat``, fsynced, truncated in place."""

    def size(self) -> int:
        try:
            return os.stat(self.path).st_size
        except FileNotFoundError:
            return 0

    def append(self, data: bytes, size: int) -> None:
        if self.fs.auto_mkdir:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            if (now := os.fstat(fd).st_size) != size:
                raise Moved(now, written=False)
            view = memoryview(data)
            while view:  # one write: a process stopped (SIGSTOP) mid-write stops after it
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            end = os.lseek(fd, 0, os.SEEK_CUR)  # O_APPEND: where this write ended
        finally:
            os.close(fd)
        if end != size + len(data):
            raise Moved(end - len(data), written=True)

    def replace(self, data: bytes) -> None:
        temporary = f"{self.path}.{os.getpid()}.yoink-tmp"
        try:
            with open(temporary, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)  # whole or not at all, whenever the process dies
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    def cut(self, size: int) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)


class _MemoryFile(JournalFile):
    """fsspec's memory filesystem hands every opener the same BytesIO: read copies of it, never a handle."""

    read_size = sys.maxsize  # one copy per replay: it is in memory already

    def _bytes(self) -> bytes | None:
        file = self.fs.store.get(self.path)
        return None if file is None else bytes(file.getvalue())

    def exists(self) -> bool:
        return self.path in self.fs.store

    def size(self) -> int:
        file = self.fs.store.get(self.path)
        return 0 if file is None else int(file.seek(0, os.SEEK_END))  # where every append starts anyway

    def cat(self, start: int, end: int) -> bytes:
        data = self._bytes()
        if data is None:
            raise FileNotFoundError(self.path)
        return data[start:end]
