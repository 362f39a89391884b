"""The journal's file on any fsspec filesystem, for FsspecStorage: sized, read, appended to, cut,
and swapped for a new one (compaction).

Its methods block, and run in a worker thread. fsspec has no conditional writes, so each write
checks the file's size just before it: a file that is not the size the writer expects raises
:class:`Moved`. Local files and fsspec's memory filesystem have ways of their own, and are the
two whose file can be swapped atomically: a local file by a rename over it, the memory
filesystem by one assignment in its store. fsspec promises neither for other filesystems (a
move may be a copy and a delete; a write may show a partial file), so they refuse to compact.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import secrets
import stat
import sys
import weakref
from collections.abc import Callable
from typing import Any

from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from yoink.storage._files import READ_CHUNK, TORN_SUFFIX

__all__ = ["CannotAppend", "JournalFile", "Moved", "Swap", "View"]

_SWAP_SUFFIX = ".yoink-compact"  # <path>.<pid>.<random>.yoink-compact: a new journal being written
_SWAP_NAME = re.compile(r"\.[0-9]+\.[0-9a-f]{8}" + re.escape(_SWAP_SUFFIX))  # after <path>


class Moved(Exception):  # becomes a ConcurrentWriterError
    """The file was not the size the writer expected; ``written``: the data went in all the same.

    ``replaced``: the path holds another file than the one the data went to (another writer's
    compaction renamed its journal over it during the append): the data is not in the journal.
    """

    def __init__(self, size: int, written: bool, replaced: bool = False) -> None:
        self.size = size
        self.written = written
        self.replaced = replaced

    def how(self, expected: int) -> str:
        if self.replaced:
            return "another writer's compaction replaced it while this one appended to it"
        return f"its size went from {expected} to {self.size} bytes"


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

    def view(self) -> View:
        """What a replay reads: the file as it is now (see :class:`View`)."""
        return View(self)

    def swap_refusal(self) -> str | None:
        """Why this file cannot be swapped atomically for a new one; None if it can (:meth:`begin_swap`)."""
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return (
            f"fsspec promises no atomic way to replace a file on its {protocol!r} filesystem (a move "
            "may copy then delete, and a write may show a partial file), and yoink compacts a journal "
            "only where a crash leaves the old one or the new one whole: a local file or fsspec's "
            "memory filesystem (for S3, S3Storage compacts)"
        )

    def begin_swap(self) -> Swap:
        """Start writing the file's replacement; :meth:`Swap.commit` puts it in place."""
        raise NotImplementedError(self.swap_refusal())

    def size(self) -> int:
        try:
            info = self.fs.info(self.path)
        except FileNotFoundError:
            return 0
        return int(info.get("size") or 0)

    def cat(self, start: int, end: int) -> bytes:
        return bytes(self.fs.cat_file(self.path, start=start, end=end))

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
        self._check_still_the_journal(file)
        if (now := self.size()) != size + len(data):
            raise Moved(now - len(data), written=True)

    def _check_still_the_journal(self, file: Any) -> None:
        """Raise :class:`Moved` if ``file``, just appended to, is no longer the one at the path."""

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


class View:
    """The journal as a replay reads it: ``size`` bytes, read from the start by :meth:`read`.

    On most filesystems it reads the path, so it sees what the path holds when it reads. A local
    file's view reads the file that held the path when the view was made, even if a compaction has
    renamed another over it since; the memory filesystem's, a copy of its bytes then.
    """

    def __init__(self, file: JournalFile) -> None:
        self._file = file
        self.size = file.size()

    def read(self, start: int, end: int) -> bytes:
        return self._file.cat(start, end)

    def close(self) -> None:
        pass


class Swap:
    """A new journal being written beside the old one, to be put in its place by :meth:`commit`."""

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        """Make what is written so far durable, so that :meth:`commit` has only the rest to sync."""

    def commit(self, size: int) -> tuple[int, bool]:
        """Put the new journal in place if the file still holds ``size`` bytes (else raise
        :class:`Moved`, keeping the old one); return its size and whether it ends in a newline."""
        raise NotImplementedError

    def discard(self) -> None:
        """Forget the new journal: the old one stays. Safe to call twice, and after :meth:`commit`."""


class _LocalView(View):
    """A local file's view: the file that holds the path when the view is made, opened then (a
    compaction that renames another over it later changes nothing it reads)."""

    def __init__(self, file: JournalFile) -> None:
        self._file = file
        self._fd: int | None = None
        self.size = 0
        try:
            fd = os.open(file.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._closing: Callable[[], Any] = lambda: None
            return
        self._fd = fd
        self._closing = weakref.finalize(self, os.close, fd)  # a view never read (a look made again)
        self.size = os.fstat(fd).st_size

    def read(self, start: int, end: int) -> bytes:
        if self._fd is None:
            return b""
        return os.pread(self._fd, end - start, start)

    def close(self) -> None:
        self._fd = None
        self._closing()


class _LocalSwap(Swap):
    """``<path>.<pid>.<random>.yoink-compact``, fsynced, then renamed over the journal."""

    def __init__(self, file: _LocalFile) -> None:
        self._path = file.path
        directory = os.path.dirname(self._path) or "."
        if file.fs.auto_mkdir:
            os.makedirs(directory, exist_ok=True)
        for stale in glob.glob(glob.escape(self._path) + ".*" + _SWAP_SUFFIX):  # a crashed compaction's
            if _SWAP_NAME.fullmatch(stale[len(self._path) :]):  # not <path>.jsonl's, another journal's
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(stale)
        self._temporary = f"{self._path}.{os.getpid()}.{secrets.token_hex(4)}{_SWAP_SUFFIX}"
        self._fd: int | None = os.open(
            self._temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666
        )
        self._size = 0
        self._last = b""

    def write(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self._size += len(data)
        self._last = data[-1:] or self._last

    def sync(self) -> None:
        assert self._fd is not None
        os.fsync(self._fd)

    def commit(self, size: int) -> tuple[int, bool]:
        fd = self._fd
        assert fd is not None
        with contextlib.suppress(FileNotFoundError):
            os.fchmod(fd, stat.S_IMODE(os.stat(self._path).st_mode))  # the journal keeps its permissions
        os.fsync(fd)
        self._fd = None
        os.close(fd)
        if (now := _local_size(self._path)) != size:  # the fence: as close to the rename as can be
            raise Moved(now, written=False)
        os.replace(self._temporary, self._path)  # the old file whole, or the new one whole
        directory = os.open(os.path.dirname(self._path) or ".", os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(directory)  # the rename itself survives a power cut
        finally:
            os.close(directory)
        return self._size, self._last in (b"", b"\n")

    def discard(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._temporary)


def _is_at(fd: int, path: str) -> bool:
    try:
        at_path = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (opened.st_dev, opened.st_ino) == (at_path.st_dev, at_path.st_ino)


def _local_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


class _LocalFile(JournalFile):
    """A local file: appended to with one ``write`` after one ``fstat``, fsynced, truncated in place."""

    def view(self) -> View:
        return _LocalView(self)

    def swap_refusal(self) -> str | None:
        return None

    def begin_swap(self) -> Swap:
        return _LocalSwap(self)

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
            if not _is_at(fd, self.path):  # renamed over while it wrote: its bytes are not the journal's
                raise Moved(_local_size(self.path), written=False, replaced=True)
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

    def view(self) -> View:
        return _MemoryView(self)

    def swap_refusal(self) -> str | None:
        return None

    def begin_swap(self) -> Swap:
        return _MemorySwap(self)

    def _bytes(self) -> bytes | None:
        file = self.fs.store.get(self.path)
        return None if file is None else bytes(file.getvalue())

    def exists(self) -> bool:
        return self.path in self.fs.store

    def size(self) -> int:
        file = self.fs.store.get(self.path)
        return 0 if file is None else int(file.seek(0, os.SEEK_END))  # where every append starts anyway

    def _check_still_the_journal(self, file: Any) -> None:
        if self.fs.store.get(self.path) is not file:  # a swap put new bytes in the store meanwhile
            raise Moved(self.size(), written=False, replaced=True)

    def cat(self, start: int, end: int) -> bytes:
        data = self._bytes()
        if data is None:
            raise FileNotFoundError(self.path)
        return data[start:end]


class _MemoryView(View):
    """A copy of the file's bytes when the view is made: a swap or an append later changes nothing."""

    def __init__(self, file: _MemoryFile) -> None:
        self._data = file._bytes() or b""
        self.size = len(self._data)

    def read(self, start: int, end: int) -> bytes:
        return self._data[start:end]


class _MemorySwap(Swap):
    """The new bytes, gathered, then set in the filesystem's store in one step."""

    def __init__(self, file: _MemoryFile) -> None:
        self._file = file
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        self._parts.append(data)

    def commit(self, size: int) -> tuple[int, bool]:
        data = b"".join(self._parts)
        self._parts = []
        if (now := self._file.size()) != size:
            raise Moved(now, written=False)
        self._file.fs.pipe_file(self._file.path, data)  # one assignment in the store, at its close
        return len(data), data[-1:] in (b"", b"\n")

    def discard(self) -> None:
        self._parts = []
