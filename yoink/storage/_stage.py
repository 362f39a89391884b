"""Stage: batches waiting for upload, kept in a local directory that outlives the process.

A remote backend (S3, fsspec) cannot append, so it stages what :meth:`write` accepts and uploads it
at :meth:`flush`. yoink's stage is not a temporary directory: a ``kill -9`` before the upload loses
nothing, and the next storage for the same URI finds the batches and uploads them. ::

    <stage root>/<digest of the URI>/
        lock                  flock held by the writing storage; a second writer is refused
        uploading             flock held by an upload, shared by a reader looking (Stage.looking)
        stage.json            the URI, and the writer id the remote side records per upload
        000000000007.jsonl    sealed batches, uploaded and deleted in order
        000000000008.jsonl    the batch being written

Exactly once: every upload records in the remote object which writer it came from and the number
of the last batch it holds. A new storage that finds batches compares them with that record and
uploads only what is missing, so a crash between an upload and the deletion of its batches does
not upload them twice. Once a stage is empty, the next storage picks a new writer id.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import stat
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import BinaryIO

import anyio
import anyio.to_thread

from yoink._exceptions import CheckpointLockedError, StorageError
from yoink._fork import close_locked, drop_in_forked_children, forks_wait
from yoink._lines import whole_lines
from yoink.storage._files import file_chunks, set_aside_torn_tail

__all__ = ["Batch", "Stage", "default_stage_root", "read_batches"]

logger = logging.getLogger(__name__)

_BATCH = re.compile(r"(\d{12})\.jsonl")
_LOCK_POLL = 0.005  # seconds between tries of the upload lock (never a blocking flock on the event loop)


def default_stage_root() -> str:
    """The user's cache directory for yoink's stages (``~/.cache/yoink/stage`` on Linux)."""
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.expanduser("~/AppData/Local")
    elif sys.platform == "darwin":
        base = os.path.expanduser("~/Library/Caches")
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "yoink", "stage")


@dataclass(frozen=True)
class Batch:
    """One staged batch: its number and its file."""

    seq: int
    path: str
    size: int


class Stage:
    """The stage of one remote journal, written by one storage at a time.

    ``identity`` names the journal (URI and endpoint); the directory is derived from it.
    """

    def __init__(self, root: str | os.PathLike[str], identity: str, *, describe: str) -> None:
        digest = hashlib.sha256(identity.encode()).hexdigest()[:32]
        self.directory = os.path.join(os.path.abspath(os.path.expanduser(os.fspath(root))), digest)
        self._describe = describe  # what errors and logs call the journal: its URI, no secrets
        self.writer = ""
        self._lock_fd: int | None = None
        self._sealed: list[Batch] = []
        self._active: int | None = None  # fd of the batch being written
        self._active_seq = 0
        self._active_size = 0
        self.recovered = 0  # bytes left by an earlier process, found by open()
        self._ignored: set[str] = set()  # junk in the stage that a reader was already warned about
        self._upload_locks: set[int] = set()  # descriptors of the upload lock (uploading, looking)

    @property
    def is_open(self) -> bool:
        return self._lock_fd is not None

    @property
    def staged_bytes(self) -> int:
        return sum(batch.size for batch in self._sealed) + self._active_size

    async def open(self) -> None:
        """Lock the stage, and take over what an earlier process left in it."""
        await anyio.to_thread.run_sync(self._open)
        if self.recovered:
            logger.warning(
                "%s: found %d staged bytes (%d batches) left by an earlier process in %s; "
                "the next flush uploads what the remote journal does not already hold",
                self._describe,
                self.recovered,
                len(self._sealed),
                self.directory,
            )

    def _open(self) -> None:
        with forks_wait():  # a child forked meanwhile would keep the lock: it waits until we know of it
            try:
                os.makedirs(self.directory, exist_ok=True)
                fd = os.open(
                    os.path.join(self.directory, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
                )
            except OSError as exc:
                raise StorageError(
                    f"cannot create the stage of {self._describe} in {self.directory}: {exc}"
                ) from exc
            if not _lock_exclusively(fd):
                os.close(fd)
                raise CheckpointLockedError(
                    f"{self._describe} is open for writing by another storage on this machine (it holds "
                    f"the stage {self.directory}); yoink allows one writer at a time, and nothing was written"
                )
            self._lock_fd = fd
            drop_in_forked_children(self)
        try:
            self._make_upload_lock()  # before any upload: a reader that found none looks again if one came
            self._sealed = self._take_over()
        except BaseException:
            self._lock_fd = None
            close_locked(fd)
            raise
        self._active_seq = self._sealed[-1].seq + 1 if self._sealed else 1
        self.recovered = self.staged_bytes

    def _take_over(self) -> list[Batch]:
        batches = []
        listed, junk = _list_batches(self.directory)
        if junk:
            raise StorageError(
                f"{self._describe}: {junk[0]} is named like a staged batch but is not a regular file, so "
                f"yoink did not write it; remove it and open the journal again. Nothing was written or "
                f"uploaded, and the staged batches in {self.directory} are kept"
            )
        for seq, path in listed:
            try:
                with open(path, "rb+") as file:
                    size = set_aside_torn_tail(path, file.fileno())
            except OSError as exc:
                raise StorageError(
                    f"{self._describe}: cannot open the staged batch {path} ({exc.strerror}); nothing was "
                    f"written or uploaded, and the staged batches in {self.directory} are kept"
                ) from exc
            if size:
                batches.append(Batch(seq, path, size))
            else:
                os.unlink(path)
        state_path = os.path.join(self.directory, "stage.json")
        writer = _read_writer(state_path) if batches else None
        if writer is None:
            if batches:
                logger.warning("%s: the stage's writer id is unreadable; starting a new one", self._describe)
            writer = secrets.token_hex(8)
            _write_atomically(state_path, json.dumps({"journal": self._describe, "writer": writer}))
        self.writer = writer
        return batches

    async def write(self, payload: bytes) -> None:
        """Append ``payload`` to the batch being written; all or nothing."""
        await anyio.to_thread.run_sync(self._write, payload)

    def _write(self, payload: bytes) -> None:
        if self._active is None:
            path = self._batch_path(self._active_seq)
            try:
                self._active = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            except OSError as exc:
                raise StorageError(f"cannot stage a write for {self._describe} in {path}: {exc}") from exc
        view = memoryview(payload)
        try:
            while view:
                view = view[os.write(self._active, view) :]
        except OSError as exc:
            with contextlib.suppress(OSError):  # if not, the next writer sets the torn tail aside
                os.ftruncate(self._active, self._active_size)
            raise StorageError(
                f"staging a write for {self._describe} failed ({os.strerror(exc.errno or errno.EIO)}); "
                "nothing of it was kept"
            ) from exc
        self._active_size += len(payload)

    def seal(self) -> list[Batch]:
        """End the batch being written; return every batch waiting for upload, oldest first."""
        if self._active is not None:
            os.close(self._active)
            self._active = None
            if self._active_size:
                self._sealed.append(self._active_batch())
            self._active_seq += 1
            self._active_size = 0
        return list(self._sealed)

    async def discard(self, through: int) -> None:
        """Delete the batches numbered up to ``through``: the remote journal holds them."""
        done = [batch for batch in self._sealed if batch.seq <= through]
        self._sealed = [batch for batch in self._sealed if batch.seq > through]
        await anyio.to_thread.run_sync(_unlink_all, [batch.path for batch in done])

    async def close(self) -> None:
        """Release the lock; staged batches stay for the next storage."""
        self.seal()
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            close_locked(fd)

    def _drop_after_fork(self) -> None:
        """In a forked child: close the child's copies of the stage's files, keeping the parent's lock."""
        for fd in (self._active, self._lock_fd, *self._upload_locks):
            if fd is not None:
                os.close(fd)  # an upload lock too: a parent killed holding it leaves none behind
        self._active = self._lock_fd = None
        self._upload_locks = set()

    def snapshot(self) -> list[Batch]:
        """The batches (with the one being written) as they are now, for :func:`read_batches`."""
        if self.is_open:
            batches = list(self._sealed)
            if self._active_size:
                batches.append(self._active_batch())
            return batches
        if self._held_elsewhere():
            return []  # another live writer's staged records are its own until it flushes them
        # Left by a crashed writer: read what is there without taking the stage.
        listed, junk = _list_batches(self.directory)
        for path in junk:
            self._ignore(path, "named like a staged batch, but not a regular file")
        batches = []
        for seq, path in listed:
            try:
                batches.append(Batch(seq, path, os.stat(path).st_size))
            except FileNotFoundError:
                continue
        return batches

    def _ignore(self, path: str, why: str) -> None:
        """Warn, once per stage, that a reader passes over ``path`` in the stage."""
        if path not in self._ignored:
            self._ignored.add(path)
            logger.warning("%s: ignoring %s in its stage: %s", self._describe, path, why)

    def _held_elsewhere(self) -> bool:
        try:
            fd = os.open(os.path.join(self.directory, "lock"), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # and with it the shared lock, at once
        return False

    def open_snapshot(self) -> list[tuple[Batch, BinaryIO]]:
        """Open the batches of :meth:`snapshot`: an open file stays readable after an upload deletes it."""
        opened: list[tuple[Batch, BinaryIO]] = []
        try:
            for batch in self.snapshot():
                try:
                    opened.append((batch, open(batch.path, "rb")))  # noqa: SIM115 (the caller closes them)
                except FileNotFoundError:
                    continue
        except OSError as exc:
            for _, file in opened:
                file.close()
            raise StorageError(
                f"{self._describe}: cannot read the staged batch {exc.filename} ({exc.strerror}); nothing "
                "was changed"
            ) from exc
        return opened

    @contextlib.asynccontextmanager
    async def uploading(self) -> AsyncIterator[None]:
        """Held by an upload from its record (:meth:`write_intent`) until it has deleted what it
        uploaded and cleared the record, in this process or another: see :meth:`looking`."""
        try:
            fd = self._open_upload_lock(os.O_CREAT)  # made again if something removed it
        except OSError as exc:
            raise StorageError(
                f"{self._describe}: cannot lock {self._upload_lock_path} for an upload "
                f"({exc.strerror or exc}); nothing was uploaded, and the staged batches are kept"
            ) from exc
        async with self._flocked(fd, fcntl.LOCK_EX):
            yield

    @contextlib.asynccontextmanager
    async def looking(self) -> AsyncIterator[bool]:
        """Held by a reader while it takes the stage's :meth:`snapshot` and then looks at what the
        remote journal holds of it: no upload lands and deletes its batches between the two, which
        the reader would then read twice (in the journal, and from the batch files it opened).

        Yields whether the lock is held. A reader creates nothing: where the lock's file does not
        exist (no writer has opened the stage since yoink had it), or is not one yoink made, it
        looks without it, and asks :meth:`upload_lock_made` afterwards whether to look again."""
        try:
            fd: int | None = self._open_upload_lock()
        except OSError:
            fd = None
        if fd is None:
            yield False
            return
        async with self._flocked(fd, fcntl.LOCK_SH):
            yield True

    def upload_lock_made(self) -> bool:
        """Whether the lock of :meth:`uploading` exists: a writer makes it as it opens the stage."""
        return os.path.lexists(self._upload_lock_path)

    @property
    def _upload_lock_path(self) -> str:
        return os.path.join(self.directory, "uploading")

    def _make_upload_lock(self) -> None:
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_CREAT  # O_NONBLOCK: a FIFO there
        try:
            os.close(os.open(self._upload_lock_path, flags, 0o600))
        except OSError as exc:
            raise StorageError(
                f"cannot create the stage of {self._describe} in {self.directory}: {exc}"
            ) from exc

    def _open_upload_lock(self, create: int = 0) -> int:
        """The lock's descriptor, never blocking (a FIFO in its place), and only a regular file's."""
        with forks_wait():  # its holder is known before a fork can copy it
            fd = os.open(self._upload_lock_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | create, 0o600)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise OSError(errno.EINVAL, f"{self._upload_lock_path} is not a regular file")
            self._upload_locks.add(fd)
            drop_in_forked_children(self)
        return fd

    @contextlib.asynccontextmanager
    async def _flocked(self, fd: int, operation: int) -> AsyncIterator[None]:
        """``flock`` on ``fd`` (taken without blocking the event loop), then unlocked and closed."""
        try:
            while True:
                try:
                    fcntl.flock(fd, operation | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await anyio.sleep(_LOCK_POLL)
            yield
        finally:
            self._upload_locks.discard(fd)
            close_locked(fd)

    def snapshot_writer(self) -> str | None:
        return self.writer or _read_writer(os.path.join(self.directory, "stage.json"))

    @property
    def intent_path(self) -> str:
        return os.path.join(self.directory, "upload.json")

    def write_intent(self, intent: dict[str, int | str]) -> None:
        """Record, before an upload, what the upload will do: a later storage checks it."""
        try:
            _write_atomically(self.intent_path, json.dumps(intent))
        except OSError as exc:
            raise StorageError(
                f"{self._describe}: cannot record the upload in {self.intent_path} ({exc.strerror}); "
                f"nothing was uploaded, and the staged batches in {self.directory} are kept"
            ) from exc

    def read_intent(self, *, strict: bool = False) -> dict[str, object] | None:
        """The upload record, None if there is none. One that is not a JSON object of finite values
        counts as none, or raises ValueError (saying why) if ``strict``."""
        try:
            with open(self.intent_path, encoding="utf-8") as file:
                intent = json.load(file, parse_constant=_refuse_constant)
            if not isinstance(intent, dict):
                raise ValueError(f"a JSON {type(intent).__name__}, not an object")
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            if strict:
                raise ValueError(exc.strerror if isinstance(exc, OSError) else str(exc)) from exc
            return None
        return intent

    def ignore_intent(self, why: str) -> None:
        """Warn, once per stage, that a reader passes over the upload record."""
        self._ignore(self.intent_path, why)

    def clear_intent(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.intent_path)

    def _active_batch(self) -> Batch:
        return Batch(self._active_seq, self._batch_path(self._active_seq), self._active_size)

    def _batch_path(self, seq: int) -> str:
        return os.path.join(self.directory, f"{seq:012d}.jsonl")


async def read_batches(batches: list[tuple[Batch, BinaryIO]], describe: str) -> AsyncGenerator[str, None]:
    """Yield the text of batches opened by :meth:`Stage.open_snapshot`, in whole lines."""
    for batch, file in batches:
        async with contextlib.aclosing(
            whole_lines(file_chunks(file, batch.size, describe=batch.path), describe=describe)
        ) as blocks:
            async for block in blocks:
                yield block


def _lock_exclusively(fd: int) -> bool:
    """Take the writer's lock; False if another writer holds it.

    A reader asking whether a writer is alive holds a shared lock for an instant
    (:meth:`Stage._held_elsewhere`), so a refusal is tried again a few times before it counts.
    """
    for attempt in range(20):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            time.sleep(0.001 * (attempt + 1))
            continue
        return True
    return False


def _list_batches(directory: str) -> tuple[list[tuple[int, str]], list[str]]:
    """The staged batches in ``directory`` (number and path, oldest first), and the paths named like
    batches that are not regular files (a directory, a device): junk, which yoink never reads."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return [], []
    batches, junk = [], []
    for name in sorted(names):
        if match := _BATCH.fullmatch(name):
            path = os.path.join(directory, name)
            try:
                regular = stat.S_ISREG(os.stat(path).st_mode)
            except FileNotFoundError:
                continue
            if regular:
                batches.append((int(match[1]), path))
            else:
                junk.append(path)
    return batches, junk


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number yoink writes")


def _read_writer(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as file:
            writer = json.load(file)["writer"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return writer if isinstance(writer, str) and re.fullmatch(r"[0-9a-f]{16}", writer) else None


def _write_atomically(path: str, text: str) -> None:
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def _unlink_all(paths: list[str]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
