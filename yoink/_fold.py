"""The fold of ``compact(key=...)``: the last record per key, in a worker process for a large journal.

Folding reads the whole journal, decodes every line and keeps the last record per key
(:class:`~yoink._compaction.KeyFold`). On the event loop that appends, it takes about as much of
the loop's time as the appends do. So a journal of :data:`WORKER_FROM_BYTES` or more is folded in
a worker process, on another core, while the loop goes on appending::

    this process (the event loop)                  the worker (yoink._fold_worker)
    local journal: opens it, passes the fd  ----->  reads it as LocalFileStorage.read() does
    other storages: storage.read()'s items  ----->  (or takes them, framed, on its stdin)
                                                    fold_items(), as here, its keeping
                                                    done by a keeper process (yoink._fold_keeper)
                                            <-----  its log records, the counts, then the kept
                                                    lines (from its keeper), in ~1 MiB frames
    storage.replace(header + kept records)

Both ways run the same fold (:func:`fold_items`) and write the kept records the same way, so the
snapshot is the same text; a corrupt line raises the same ``CorruptCheckpointError`` (line, offset,
message). The worker ends with this process: it exits when its stdin, whose write end only this
process holds, reaches its end, or when its parent is no longer the process that started it.
A worker that dies (killed, crashed) raises :class:`~yoink.StorageError`: the journal is
unchanged, and appending goes on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import anyio.abc

from yoink._compaction import Keeper, KeyFold, snapshot_text
from yoink._exceptions import CorruptCheckpointError, StorageError
from yoink._fold_keeper import END, HEAD, TEXT, frame, read_frame
from yoink._records import JournalDecoder, LineTooLongToRead, OnCorrupt
from yoink.storage import CheckpointStorage, LocalFileStorage
from yoink.storage._files import journal_lines, open_journal

__all__ = ["WORKER_FROM_BYTES", "Fold", "fold_by_key", "fold_items", "frame", "how_it_ended", "read_frame"]

logger = logging.getLogger(__name__)

WORKER_FROM_BYTES = 16 << 20
"""A journal this large or larger is folded in a worker process, a smaller one on the event loop.

A worker takes about 0.2 s to start (an interpreter and yoink's imports), about as long as the loop
takes to fold 16 MiB (see docs/performance.md). A smaller journal would wait longer for its worker
than the worker spares the loop; a larger one spares the loop more, the more so the larger it is.

A journal that is not a local file is read through ``storage.read()`` before its size is known, and
what is read is held until a worker takes it: one is started once a quarter of this is read, so
the loop holds 4 MiB of it, not 16 (a worker's start is small beside reading that much remotely)."""

PIECE = 64 << 10  # characters of an item decoded at a time

# Frames, both ways: a kind (one byte), the payload's size, the payload. The format (HEAD, frame,
# read_frame) and the kinds END and TEXT are yoink._fold_keeper's, whose frames these are too:
# END to the worker when storage.read() ended, and from it when the kept records ended; TEXT from
# it, kept records as lines.
CONFIG = b"C"  # to the worker, first: what to fold (JSON)
ITEM = b"I"  # to the worker: one item of storage.read(), UTF-8 (surrogatepass: any str comes back whole)
TOO_LONG = b"O"  # to the worker: storage.read() met a line too long to read, at this byte offset
LOG = b"L"  # from the worker: a log record of yoink's, [logger name, level, message]
COUNTS = b"S"  # from the worker: the journal's records and bytes, and the records kept
ERROR = b"X"  # from the worker: why it could not fold (JSON)

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the yoink this one is
# The worker's command: this yoink first on its path, in place of the working directory (``-c`` puts
# that first, before the standard library: a struct.py there would be imported), then its main().
# Inserted where sys.path[0] is not the working directory: under PYTHONSAFEPATH it is the standard library.
_BOOT = (
    "import sys; sys.path[:1] = [sys.argv[1]] if sys.path[:1] == [''] else [sys.argv[1], *sys.path[:1]]; "
    "from yoink._fold_worker import main; main()"
)


async def fold_items(
    items: AsyncIterator[str], key: str, on_corrupt: OnCorrupt, source: str, keeper: Keeper | None = None
) -> tuple[KeyFold, JournalDecoder]:
    """Fold a storage's ``read()`` items by ``key``; the decoder says how much it read.

    Items are decoded in pieces of whole lines of about PIECE characters: the records of one piece
    are all it holds besides the fold, however large the items (a file's are a mebibyte). The fold
    keeps the text of each line it keeps, where the decoder tells which line a record was read from
    (:attr:`~yoink._records.JournalDecoder.texts`), in ``keeper`` if given (a worker's keeper
    process), else here.
    """
    fold = KeyFold(key, keeper)
    decoder = JournalDecoder(source, on_corrupt=on_corrupt)

    async def pieces() -> AsyncGenerator[str, None]:
        try:
            async for item in items:
                for piece in _pieces(item):
                    yield piece
        finally:
            await _aclose(items)

    async for batch in decoder.batches(pieces()):
        fold.add(batch, decoder.texts)
    return fold, decoder


def _pieces(item: str) -> Iterator[str]:
    start = 0
    while len(item) - start > PIECE:
        end = item.find("\n", start + PIECE) + 1
        if end == 0:  # one line to the end
            break
        yield item[start:end]
        start = end
    if start < len(item):
        yield item[start:]


class Fold:
    """A journal folded by key: its counts, then the snapshot's text from :meth:`text`."""

    def __init__(self, records_before: int, bytes_before: int, kept: int) -> None:
        self.records_before = records_before
        self.bytes_before = bytes_before
        self.kept = kept
        self.bytes = 0  # the kept records' bytes, once text() has ended

    def text(self, header: str) -> AsyncGenerator[str, None]:
        """``header``, then the kept records as lines, in pieces of about a mebibyte."""
        raise NotImplementedError


@contextlib.asynccontextmanager
async def fold_by_key(
    storage: CheckpointStorage, key: str, on_corrupt: OnCorrupt, *, bounded: Callable[[], None] = lambda: None
) -> AsyncIterator[Fold]:
    """Fold ``storage``'s journal by ``key``: here, or in a worker process if it is large.

    ``bounded()`` is called once the fold reads no further than what was written before: a local
    journal once it is open (up to its size then), another storage once its ``read()`` has begun, a
    journal folded here once it is read. The worker, if one was started, is ended and waited for
    on the way out, whatever happened.
    """
    source = repr(storage)
    path = _local_journal(storage)
    if path is not None:  # the worker reads the file itself, through a descriptor of it
        opened = open_journal(path)
        if opened is None or opened[1] < WORKER_FROM_BYTES:
            if opened is not None:
                opened[0].close()
            fold = await _fold_here(storage.read(), key, on_corrupt, source)
            bounded()
            yield fold
            return
        file, size = opened
        bounded()
        with file:
            config = {"fd": file.fileno(), "size": size, "path": path}
            worker = await _Worker.start(_config(key, on_corrupt, source, config), source, file.fileno())
            if worker is None:  # folded here, from the file as it was opened
                folded = await _fold_here(journal_lines(file, size, path), key, on_corrupt, source)
        if worker is None:
            yield folded
            return
        async with worker:
            yield await worker.fold()
        return
    items = storage.read()
    try:
        prefix, too_long, ended = await _read_up_to(items, WORKER_FROM_BYTES // 4)
        bounded()
        worker = None if ended else await _Worker.start(_config(key, on_corrupt, source, {}), source)
    except BaseException:
        await _aclose(items)
        raise
    if worker is None:  # ended (a small journal), or no worker could be started
        yield await _fold_here(_replayed(prefix, too_long, items), key, on_corrupt, source)
        return
    async with worker:
        await worker.send_journal(prefix, items)
        yield await worker.fold()


def _local_journal(storage: CheckpointStorage) -> str | None:
    """The path of a journal that another process may read as ``storage.read()`` would, if it is one."""
    if isinstance(storage, LocalFileStorage) and type(storage).read is LocalFileStorage.read:
        return storage.path
    return None


def _config(key: str, on_corrupt: OnCorrupt, source: str, local: dict[str, Any]) -> dict[str, Any]:
    return {"key": key, "on_corrupt": on_corrupt, "source": source, "parent": os.getpid(), **local}


async def _fold_here(items: AsyncIterator[str], key: str, on_corrupt: OnCorrupt, source: str) -> Fold:
    fold, decoder = await fold_items(items, key, on_corrupt, source)
    return _FoldedHere(fold, decoder.offset)


class _FoldedHere(Fold):
    def __init__(self, fold: KeyFold, bytes_before: int) -> None:
        super().__init__(fold.records, bytes_before, len(fold))
        self._fold = fold

    async def text(self, header: str) -> AsyncGenerator[str, None]:
        def counted(records: int, size: int) -> None:
            self.bytes = size

        lines = snapshot_text(header, self._fold.lines(), _as_is, counted)
        async with contextlib.aclosing(lines) as text:
            async for piece in text:
                yield piece


def _as_is(line: bytes) -> bytes:
    return line


async def _read_up_to(
    items: AsyncIterator[str], size: int
) -> tuple[list[str], LineTooLongToRead | None, bool]:
    """The first items of a storage's read(), about ``size`` characters and at least one (from the
    first on, the read yields nothing written after it began); and whether it ended there."""
    prefix: list[str] = []
    read = 0
    while read < size or not prefix:
        try:
            item = await items.__anext__()
        except StopAsyncIteration:
            return prefix, None, True
        except LineTooLongToRead as exc:  # the decoder says which line it is, after those before it
            return prefix, exc, True
        prefix.append(item)
        read += len(item)
    return prefix, None, False


async def _replayed(
    prefix: list[str], too_long: LineTooLongToRead | None, rest: AsyncIterator[str]
) -> AsyncGenerator[str, None]:
    """The items read ahead, then (at the same place) what ended them, then the rest of the read."""
    try:
        for item in prefix:
            yield item
        if too_long is not None:
            raise too_long
        async for item in rest:
            yield item
    finally:
        await _aclose(rest)


async def _aclose(items: AsyncIterator[str]) -> None:
    aclose = getattr(items, "aclose", None)
    if aclose is not None:
        await aclose()


class _Worker:
    """A worker process folding a journal, and the frames it sends back."""

    def __init__(self, process: anyio.abc.Process, source: str) -> None:
        self._process = process
        self._source = source
        self._received = bytearray()
        self._done = False  # it sent its last frame

    @classmethod
    async def start(cls, config: dict[str, Any], source: str, *fds: int) -> _Worker | None:
        """Start a worker and send it ``config``; None, with a WARNING, if it cannot be started."""
        try:
            if not sys.executable:
                raise OSError("sys.executable is empty: no Python interpreter to run")
            process = await anyio.open_process(
                [sys.executable, "-c", _BOOT, _PACKAGE_ROOT], stderr=None, pass_fds=fds
            )
        except OSError as exc:
            logger.warning(
                "cannot start a worker process to fold %s (%s); folding it on the event loop, which "
                "slows appends meanwhile",
                source,
                exc,
            )
            return None
        worker = cls(process, source)
        logger.debug("folding %s by %r in worker process %d", source, config["key"], process.pid)
        try:
            await worker._send(CONFIG, json.dumps(config).encode())
        except BaseException:
            await worker.__aexit__(None, None, None)
            raise
        return worker

    async def __aenter__(self) -> _Worker:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Let the worker end, or kill it if it has not finished; wait for it either way."""
        process = self._process
        with anyio.CancelScope(shield=True):
            if not self._done:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            with anyio.move_on_after(10):
                await process.aclose()  # closes its stdin: a worker that finished exits at that end
                return
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    async def send_journal(self, prefix: list[str], items: AsyncIterator[str]) -> None:
        """Send the items read ahead, then the rest of ``storage.read()``; stop if the worker stops."""
        try:
            for item in prefix:
                if not await self._send(ITEM, item.encode("utf-8", "surrogatepass")):
                    return
            prefix.clear()
            try:
                async for item in items:
                    if not await self._send(ITEM, item.encode("utf-8", "surrogatepass")):
                        return
            except LineTooLongToRead as exc:
                await self._send(TOO_LONG, str(exc.offset).encode())
                return
            await self._send(END)
        finally:
            await _aclose(items)

    async def fold(self) -> Fold:
        """Wait for the worker's counts; raise the error it reports, or its death."""
        while True:
            kind, payload = await self._receive()
            if kind == COUNTS:
                counts = json.loads(payload)
                return _FoldedThere(self, counts["records"], counts["bytes"], counts["kept"])
            raise self._unexpected(kind, payload)

    async def kept(self) -> AsyncGenerator[bytes, None]:
        """The kept records' frames, as lines, until the worker says they ended."""
        while True:
            kind, payload = await self._receive()
            if kind == TEXT:
                yield payload
            elif kind == END:
                self._done = True
                return
            else:
                raise self._unexpected(kind, payload)

    async def _send(self, kind: bytes, payload: bytes = b"") -> bool:
        """Send a frame; False if the worker no longer reads (it ended: its frames say why)."""
        stdin = self._process.stdin
        assert stdin is not None
        try:
            await stdin.send(HEAD.pack(kind, len(payload)))
            if payload:
                await stdin.send(payload)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return False
        return True

    async def _receive(self) -> tuple[bytes, bytes]:
        """The worker's next frame other than a log record's (those are logged here)."""
        stdout = self._process.stdout
        assert stdout is not None
        received = self._received
        while True:
            if len(received) >= HEAD.size:
                kind, size = HEAD.unpack_from(received)
                end = HEAD.size + size
                if len(received) >= end:
                    payload = bytes(received[HEAD.size : end])
                    del received[:end]
                    if kind != LOG:
                        return kind, payload
                    _log(payload)
                    continue
            try:
                received += await stdout.receive(1 << 20)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                raise await self._died() from None

    def _unexpected(self, kind: bytes, payload: bytes) -> Exception:
        if kind != ERROR:
            return StorageError(
                f"the compaction's worker process sent {kind!r} out of turn while folding {self._source}; "
                "the journal is unchanged"
            )
        error = json.loads(payload)
        if error["kind"] == "corrupt":
            return CorruptCheckpointError(error["message"], line=error["line"], offset=error["offset"])
        if error["kind"] == "storage":
            return StorageError(error["message"])
        return StorageError(
            f"the compaction's worker process failed while folding {self._source}: {error['message']}; "
            "the journal is unchanged"
        )

    async def _died(self) -> StorageError:
        with anyio.move_on_after(10):
            await self._process.wait()
        how = how_it_ended(self._process.returncode)
        return StorageError(
            f"the compaction's worker process (pid {self._process.pid}) {how} before it had folded "
            f"{self._source}; the journal is unchanged"
        )


class _FoldedThere(Fold):
    def __init__(self, worker: _Worker, records_before: int, bytes_before: int, kept: int) -> None:
        super().__init__(records_before, bytes_before, kept)
        self._worker = worker

    async def text(self, header: str) -> AsyncGenerator[str, None]:
        yield header
        async with contextlib.aclosing(self._worker.kept()) as kept:
            async for lines in kept:
                self.bytes += len(lines)
                yield lines.decode()


def _log(payload: bytes) -> None:
    """Log here a record the worker logged: the same logger, level and message."""
    name, level, message = json.loads(payload)
    target = logging.getLogger(name)
    if target.isEnabledFor(level):
        fields = {"name": name, "levelno": level, "levelname": logging.getLevelName(level), "msg": message}
        target.handle(logging.makeLogRecord(fields))


def how_it_ended(status: int | None) -> str:
    """How a child process ended, from its return code (None: it has not, but closed its output)."""
    if status is None:
        return "closed its output"
    if status < 0:
        return f"was killed by {_signal_name(-status)}"
    return f"exited with status {status}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
