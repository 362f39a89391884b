"""LocalFileStorage: the journal as a local JSONL file."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import stat
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit

import anyio
import anyio.to_thread

from yoink._compat import Self
from yoink._exceptions import CheckpointLockedError, StorageError
from yoink._fork import close_locked, drop_in_forked_children, forks_wait
from yoink._tasks import uninterrupted
from yoink.storage._files import journal_lines, open_journal, set_aside_torn_tail
from yoink.storage._lifecycle import ClosableStorage
from yoink.storage._uri import take_uri_options

__all__ = ["LocalFileStorage"]

logger = logging.getLogger(__name__)

REPLACEMENT_SUFFIX = ".compacting"  # the new journal, written beside the old one until it is renamed over it
_REPLACE_WRITE = 1 << 20  # bytes of the new journal gathered for each write


class LocalFileStorage(ClosableStorage):
    """A journal in a local file, appended through anyio's worker threads (asyncio or trio).

    - The file is opened in append mode on the first :meth:`write`, creating missing parent
      directories. From then on the storage holds an advisory lock (``flock``) on it until
      :meth:`close`: a second writer, in this process or another, gets
      :class:`~yoink.CheckpointLockedError` and writes nothing. Readers need no lock. A forked
      child lets go of its copy of the lock, so a writer in the child is not refused once the
      parent closes.
    - Every :meth:`write` goes to the operating system at once, so it survives a crash of this
      process. :meth:`flush` fsyncs the file (and, once, its directory after creating it) so it
      also survives a crash of the machine. ``fsync=False`` skips that, for speed where a power
      cut may cost the last seconds of work.
    - A write is one call in a worker thread that measures the file, appends, and on an error
      truncates back to what it measured: it is whole or absent, and a cancelled caller cannot cut
      it short (it finishes in its own task, see :mod:`yoink._tasks`).
    - A crash in the middle of a write can leave a last line without its newline. It is never part
      of the journal: :meth:`read` leaves it out, and before the next append the fragment is moved
      to ``<path>.torn`` (one fragment a line) and logged at WARNING, so the next record starts on a
      clean line.
    - :meth:`replace` (compaction) writes the new journal to ``<path>.compacting``, fsyncs it (even
      with ``fsync=False``: a power cut must not swap a whole journal for an empty file), locks
      it, renames it over the journal and fsyncs the directory. A crash before the rename leaves
      the old journal (the next writer deletes the leftover); after it, the new one. A reader
      under way keeps reading the file it opened, whole. The lock moves with the journal: a writer
      that locked the old file after the swap finds that it is no longer the journal and tries the
      new one, which is locked. Writes and flushes go on while the new journal is written: what
      they appended to the old file after :meth:`replace` began is copied after the new text
      (most of it while writes go on, the rest with writes held) before the fsync and the rename.
    - The new journal has the old one's permission bits before its first byte (a private journal
      stays private), and its owner and group where the process may set them (as root); ACLs and
      extended attributes are not copied. A journal reached through a symbolic link is compacted
      where the link points: the new file is written beside that one and renamed over it, and the
      link stays a link to the journal. If the link is pointed elsewhere meanwhile, :meth:`replace`
      raises and keeps the old journal.
    - Once the rename is done, :meth:`replace` does not raise: if the directory's fsync then
      fails, the new journal is in place but a power cut may bring the old one back. That is
      logged at WARNING, and every :meth:`flush` (and :meth:`close`) fsyncs the directory again
      until it succeeds, raising :class:`~yoink.StorageError` while it fails, as a failed fsync of
      the file does; this also holds with ``fsync=False``.
    """

    writes_during_replace = True

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = True) -> None:
        path = os.fspath(path)
        if not path:
            raise ValueError("LocalFileStorage needs a file path, got an empty string")
        self._path = os.path.abspath(os.path.expanduser(path))
        self._fsync = fsync
        self._fd: int | None = None
        self._replacement: int | None = None  # the new journal's descriptor, while replace() writes it
        self._dirty = False
        self._unsynced_directory: str | None = None  # a swap's directory whose fsync failed
        self._lock = anyio.Lock()
        self._replacing = anyio.Lock()

    @classmethod
    def from_uri(cls, uri: str, **options: Any) -> Self:
        """Build a storage from a path or a ``file://`` URI, whose query may give ``fsync``.

        >>> LocalFileStorage.from_uri("./crawl.jsonl")        # relative to the working directory
        >>> LocalFileStorage.from_uri("~/runs/crawl.jsonl")   # in the home directory
        >>> LocalFileStorage.from_uri("file:///var/lib/run.jsonl?fsync=false")

        A path is taken as it is (a ``?`` in it is part of the name). ``file:run.jsonl``, without
        the ``//``, is refused: write the path itself.
        """
        if uri[:5].lower() == "file:":
            if uri[5:7] != "//":
                raise ValueError(
                    f"a file URI is written file:///abs/run.jsonl; for a relative path, give the path "
                    f"itself, as in ./{uri[5:].lstrip('/') or 'run.jsonl'}; got {uri!r}"
                )
            rest, given = take_uri_options(cls, uri)
            parts = urlsplit(rest)
            if parts.netloc not in ("", "localhost") or not parts.path:
                raise ValueError(f"a file URI names a local path, as in file:///abs/run.jsonl; got {uri!r}")
            if parts.fragment:
                raise ValueError(f"a file URI takes no fragment; got {uri!r}")
            uri, options = unquote(parts.path), {**options, **given}
        return cls(uri, **options)

    @property
    def path(self) -> str:
        """The journal's absolute path."""
        return self._path

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._path!r})"

    def _constructor_arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (self._path,), {"fsync": self._fsync}  # never the open file or its lock

    async def write(self, data: str) -> None:
        self._check_open()
        if data:
            await uninterrupted(functools.partial(self._write, data.encode("utf-8")))

    async def read(self) -> AsyncIterator[str]:
        opened = open_journal(self._path)  # up to its size now: a batch appended meanwhile is not half-seen
        if opened is None:
            return
        file, size = opened
        try:
            async with contextlib.aclosing(journal_lines(file, size, self._path)) as blocks:
                async for block in blocks:
                    yield block
        finally:
            file.close()

    async def exists(self) -> bool:
        return await anyio.to_thread.run_sync(os.path.exists, self._path)

    async def replace(self, text: AsyncIterable[str]) -> None:
        self._check_open()
        await uninterrupted(functools.partial(self._replace, text))

    async def flush(self) -> None:
        self._check_open()
        await uninterrupted(self._flush)

    async def _write(self, payload: bytes) -> None:
        async with self._lock:
            self._check_open()
            fd = self._fd if self._fd is not None else await self._open()
            await anyio.to_thread.run_sync(self._append, fd, payload)

    async def _replace(self, text: AsyncIterable[str]) -> None:
        async with self._replacing:  # one at a time: each writes the same new file
            async with self._lock:
                self._check_open()
                if self._fd is None:
                    await self._open()  # the writer's lock first: a refused writer replaces nothing
                fd, journal = await anyio.to_thread.run_sync(self._open_replacement)
            old: _Carry | None = None
            try:
                async with self._lock:  # where the old journal ends: what is written after it is carried
                    self._check_open()
                    old = await anyio.to_thread.run_sync(self._open_for_carrying, journal)
                await self._write_replacement(fd, journal, text)
                async with self._lock:  # no write under way: the bytes up to here are whole
                    self._check_open()
                    assert self._fd is not None
                    end = os.fstat(self._fd).st_size
                await anyio.to_thread.run_sync(old.copy_to, fd, journal, end)  # writes go on meanwhile
                async with self._lock:  # what they wrote, then the swap, with no write between
                    self._check_open()
                    await anyio.to_thread.run_sync(self._carry_and_swap, old, fd, journal)
            except BaseException:
                if self._replacement is not None:  # not swapped in: the old journal stays
                    self._replacement = None
                    await anyio.to_thread.run_sync(_drop_replacement, fd, journal)
                raise
            finally:
                if old is not None:
                    old.close()

    async def _write_replacement(self, fd: int, journal: str, text: AsyncIterable[str]) -> None:
        pending: list[bytes] = []
        size = 0
        async for chunk in text:
            pending.append(chunk.encode("utf-8"))
            size += len(pending[-1])
            if size >= _REPLACE_WRITE:
                await anyio.to_thread.run_sync(_write_replacement, fd, b"".join(pending), journal)
                pending, size = [], 0
        await anyio.to_thread.run_sync(_write_replacement, fd, b"".join(pending), journal)

    def _open_for_carrying(self, journal: str) -> _Carry:
        """A descriptor of the old journal of its own, to copy from, and the journal's size now."""
        assert self._fd is not None
        try:
            reader = os.open(journal, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise StorageError(f"cannot compact {self._path}: {exc}; the old journal is kept") from exc
        carry = _Carry(reader, os.fstat(self._fd).st_size)
        if not _same_file(reader, self._fd):
            carry.close()
            raise StorageError(
                f"{self._path} was moved or replaced as the compaction began; nothing was replaced, "
                "the old journal is kept"
            )
        return carry

    def _carry_and_swap(self, old: _Carry, fd: int, journal: str) -> None:
        assert self._fd is not None
        old.copy_to(fd, journal, os.fstat(self._fd).st_size)
        self._swap(fd, journal)

    def _open_replacement(self) -> tuple[int, str]:
        """Create the new journal beside the file the path leads to, with that file's permissions.

        Return its descriptor and the journal's real path (through any symbolic links).
        """
        assert self._fd is not None  # replace() opens the journal first
        journal = os.path.realpath(self._path)
        replacement = journal + REPLACEMENT_SUFFIX
        try:
            self._check_still_the_journal(self._fd, journal)
            old = os.fstat(self._fd)
        except OSError as exc:
            raise StorageError(f"cannot compact {self._path}: {exc}; the old journal is kept") from exc
        if not stat.S_ISREG(old.st_mode):  # a device (/dev/null), a FIFO: a rename would put a file there
            raise StorageError(
                f"cannot compact {self._path}: {journal} is not a regular file; it is left as it is"
            )
        with forks_wait():  # a child forked meanwhile drops it, as it drops the journal's descriptor
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(replacement)  # O_EXCL below: never through a link, never a file open elsewhere
                # Private until it has the old file's owner and mode: no reader can open it before.
                fd = os.open(
                    replacement, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600
                )
            except OSError as exc:
                raise StorageError(
                    f"cannot write the new journal {replacement}: {exc.strerror}; the old one is kept"
                ) from exc
            self._replacement = fd
        try:
            _take_ownership_and_mode(fd, old, replacement)
        except OSError as exc:
            self._replacement = None
            _drop_replacement(fd, journal)
            raise StorageError(
                f"cannot give the new journal {replacement} the permissions of {journal}: {exc.strerror}; "
                "the old one is kept"
            ) from exc
        return fd, journal

    def _check_still_the_journal(self, fd: int, journal: str) -> None:
        if os.path.realpath(self._path) != journal or not _is_the_journal(fd, journal):
            raise StorageError(
                f"{self._path} no longer leads to the file this storage writes ({journal}): it was "
                "moved, deleted or its link pointed elsewhere; nothing was replaced, the old journal is kept"
            )

    def _swap(self, fd: int, journal: str) -> None:
        """Make the written replacement the journal: fsync it, lock it, rename it over the old one.

        Raises only before the rename (the old journal stays); after it, a failed fsync of the
        directory is logged and left for the next :meth:`flush`.
        """
        assert self._fd is not None
        try:
            os.fsync(fd)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody else knows the file: it cannot block
            self._check_still_the_journal(self._fd, journal)
            os.rename(journal + REPLACEMENT_SUFFIX, journal)
        except OSError as exc:
            raise StorageError(
                f"cannot put the new journal in place of {journal}: {exc}; the old one is kept"
            ) from exc
        old, self._fd, self._replacement = self._fd, fd, None
        self._dirty = False
        with contextlib.suppress(OSError):  # its descriptor is released whatever close() says
            close_locked(old)  # after the rename: a writer that locks the old file finds it replaced
        directory = os.path.dirname(journal)
        try:
            _fsync_directory(directory)
        except OSError as exc:
            self._unsynced_directory = directory
            logger.warning(
                "the new journal is in place of %s, but fsync of its directory failed (%s): the "
                "directory entry may not be durable, and a power cut may bring the old journal back; "
                "the next flush() fsyncs the directory again",
                journal,
                exc.strerror,
            )
        else:
            self._unsynced_directory = None

    async def _flush(self) -> None:
        async with self._lock:
            self._check_open()
            await self._sync()

    async def _close(self) -> None:
        async with self._lock:  # after the write under way: those waiting for the lock are refused
            fd, self._fd = self._fd, None
            if fd is None:
                return
            try:
                await self._sync(fd)
            finally:
                close_locked(fd)

    async def _open(self) -> int:
        return await anyio.to_thread.run_sync(self._open_and_lock)

    def _open_and_lock(self) -> int:
        """Open the journal, take the writer's lock and set aside a torn tail."""
        created = not os.path.exists(self._path)
        new_directories = _missing_directories(os.path.dirname(self._path))
        try:
            os.makedirs(os.path.dirname(self._path), exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot open {self._path} for appending: {exc.strerror}") from exc
        with forks_wait():  # a child forked meanwhile would keep the lock: it waits until we know of it
            try:
                fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError as exc:
                raise StorageError(f"cannot open {self._path} for appending: {exc.strerror}") from exc
            self._fd = fd
            drop_in_forked_children(self)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CheckpointLockedError(
                    f"{self._path} is open for writing elsewhere (another process or storage holds "
                    "its lock); yoink allows one writer at a time, and nothing was written"
                ) from None
            if not _is_the_journal(fd, self._path):
                # Compacted by the writer whose lock this was, between our open and our lock: the
                # file we hold is no longer the journal, and the new one is that writer's.
                raise CheckpointLockedError(
                    f"{self._path} was compacted by another writer as this one opened it; yoink allows "
                    "one writer at a time, and nothing was written"
                )
            try:
                if created and self._fsync:
                    # The file's entry, and the entry of each directory made for it, in its parent.
                    for directory in [self._path, *new_directories]:
                        _fsync_directory(os.path.dirname(directory))
                set_aside_torn_tail(self._path, fd, fsync=self._fsync)
                with contextlib.suppress(FileNotFoundError):  # a crashed compaction's half-written journal
                    os.unlink(os.path.realpath(self._path) + REPLACEMENT_SUFFIX)
            except OSError as exc:
                raise StorageError(f"cannot prepare {self._path} for appending: {exc}") from exc
        except BaseException:
            self._fd = None
            close_locked(fd)
            raise
        return fd

    def _append(self, fd: int, payload: bytes) -> None:
        """Append ``payload`` whole, or leave the file as this call found it (in a worker thread)."""
        start = os.fstat(fd).st_size  # what is there, not what this storage believes is there
        view = memoryview(payload)
        try:
            while view:
                view = view[os.write(fd, view) :]
        except OSError as exc:
            self._undo_partial_append(fd, start, exc)
        self._dirty = True

    def _undo_partial_append(self, fd: int, start: int, exc: OSError) -> NoReturn:
        try:
            os.ftruncate(fd, start)
        except OSError:
            self._closed = True
            self._fd = None
            close_locked(fd)
            raise StorageError(
                f"appending to {self._path} failed ({exc.strerror}) and the partial write could not be "
                "undone; the storage is closed, and the next writer sets the torn tail aside"
            ) from exc
        raise StorageError(
            f"appending to {self._path} failed: {exc.strerror}; the journal is unchanged"
        ) from exc

    async def _sync(self, fd: int | None = None) -> None:
        fd = self._fd if fd is None else fd
        if fd is None:
            return
        if self._dirty:
            if self._fsync:
                try:
                    await anyio.to_thread.run_sync(os.fsync, fd)
                except OSError as exc:
                    raise StorageError(f"fsync of {self._path} failed: {exc.strerror}") from exc
            self._dirty = False
        if self._unsynced_directory is not None:  # a compaction's rename, not yet durable
            try:
                await anyio.to_thread.run_sync(_fsync_directory, self._unsynced_directory)
            except OSError as exc:
                raise StorageError(
                    f"fsync of {self._unsynced_directory} failed: {exc.strerror}; the compacted journal "
                    f"is in place of {self._path}, but a power cut may bring the old one back"
                ) from exc
            self._unsynced_directory = None

    def _drop_after_fork(self) -> None:
        fd, self._fd = self._fd, None
        replacement, self._replacement = self._replacement, None
        if replacement is not None:
            os.close(replacement)  # the child's copy: the parent locks it when it swaps it in
        if fd is None:
            return
        os.close(fd)  # the child's copy only: the parent keeps its lock
        self._closed_by_fork()  # from now on every call is refused before it would take self._lock


def _take_ownership_and_mode(fd: int, old: os.stat_result, replacement: str) -> None:
    """Give the new journal the old one's owner and group (where allowed), then its permission bits."""
    new = os.fstat(fd)
    if (new.st_uid, new.st_gid) != (old.st_uid, old.st_gid):
        try:
            os.fchown(fd, old.st_uid, old.st_gid)  # before fchmod: it may clear the set-id bits
        except OSError as exc:
            logger.warning(
                "the new journal %s is owned by %d:%d, not %d:%d as the old one was (%s); it has the old "
                "one's permission bits",
                replacement,
                new.st_uid,
                new.st_gid,
                old.st_uid,
                old.st_gid,
                exc.strerror,
            )
    os.fchmod(fd, old.st_mode & 0o7777)


def _drop_replacement(fd: int, journal: str) -> None:
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(journal + REPLACEMENT_SUFFIX)


def _write_replacement(fd: int, payload: bytes, journal: str) -> None:
    view = memoryview(payload)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError as exc:  # a full disk, a file size limit
        raise StorageError(
            f"cannot write the new journal {journal}{REPLACEMENT_SUFFIX}: {exc.strerror}; the old one is kept"
        ) from exc


class _Carry:
    """The old journal during a replace: a descriptor to read it, and how far it is copied."""

    def __init__(self, fd: int, copied: int) -> None:
        self.fd = fd
        self.copied = copied

    def copy_to(self, fd: int, journal: str, end: int) -> None:
        """Append the old journal's bytes from where the last copy stopped up to ``end`` to ``fd``."""
        while self.copied < end:
            try:
                block = os.pread(self.fd, min(end - self.copied, _REPLACE_WRITE), self.copied)
            except OSError as exc:
                raise StorageError(
                    f"cannot read {journal} to carry what was written during the compaction: "
                    f"{exc.strerror}; the old journal is kept"
                ) from exc
            if not block:
                break
            _write_replacement(fd, block, journal)
            self.copied += len(block)
        if self.copied != end:  # cut short by another program: what it cut is not carried, or lost
            raise StorageError(
                f"{journal} was cut short by another program during the compaction; nothing was "
                "replaced, the old journal is kept as it is"
            )

    def close(self) -> None:
        os.close(self.fd)


def _same_file(fd: int, other: int) -> bool:
    return _file_id(os.fstat(fd)) == _file_id(os.fstat(other))


def _file_id(status: os.stat_result) -> tuple[int, int]:
    return status.st_dev, status.st_ino


def _is_the_journal(fd: int, path: str) -> bool:
    """Whether the open file ``fd`` is still the file at ``path`` (compaction renames a new one over it)."""
    try:
        at_path = os.stat(path)
    except FileNotFoundError:
        return False
    return _file_id(os.fstat(fd)) == _file_id(at_path)


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _missing_directories(directory: str) -> list[str]:
    """``directory`` and those above it that do not exist yet, the deepest first."""
    missing = []
    while directory and not os.path.isdir(directory):  # "/" is one, and "" ends a relative path
        missing.append(directory)
        directory = os.path.dirname(directory)
    return missing
