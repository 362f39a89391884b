"""A compaction's worker process: fold a journal by key, away from the event loop that appends.

Started by :mod:`yoink._fold` (never imported by ``yoink`` itself), with the frames it reads and
writes described there. It reads the journal (a local file through a descriptor it was given, or
the items of ``storage.read()`` on its stdin), folds it as a compaction in-process would, and sends
back its log records, the counts and the kept records. The keeping of the last line per key runs
in a keeper process of its own (:mod:`yoink._fold_keeper`), on another core, while this one decodes.

It ends with its parent: a thread of its own exits the process once the parent is no longer the
process that started it (a ``kill -9`` reparents the worker) or, when nothing else comes on stdin,
once stdin reaches its end (only the parent holds its write end). ``PR_SET_PDEATHSIG`` is not
used: it fires when the *thread* that started the worker ends, and trio starts processes from
worker threads that end when idle.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from typing import Any, BinaryIO, NoReturn

import anyio
import orjson

from yoink import _fold_keeper
from yoink._compaction import KeyFold, encode_replayed
from yoink._exceptions import CorruptCheckpointError, StorageError
from yoink._fold import CONFIG, COUNTS, ERROR, ITEM, LOG, TOO_LONG, fold_items, how_it_ended
from yoink._fold_keeper import (
    COUNT,
    END,
    KEYS,
    KEYS_SIZE,
    READY,
    TEXT,
    frame,
    next_frame,
    orphaned,
    read_frame,
    send,
    text_frames,
)
from yoink._records import LineTooLongToRead
from yoink.storage._files import journal_lines

__all__ = ["main"]

logger = logging.getLogger(__name__)

WATCH_SECONDS = 0.1  # how often it looks for its parent
PIPE_BYTES = 1 << 20
READY_SECONDS = 10.0  # how long a keeper may take to say it is ready before the worker keeps itself
# The keeper's command: its module's file run as a script, without yoink's imports (it needs none);
# without the working directory on its path (``-c`` puts it first, before the standard library),
# and with the directory this process found orjson in first (a job may have put it on its own path).
_KEEPER_BOOT = (
    "import sys; sys.path[:1] = [sys.argv[2]] if sys.path[:1] == [''] else [sys.argv[2], *sys.path[:1]]; "
    "import runpy; runpy.run_path(sys.argv[1], run_name='__main__')"
)
_keeper_pid: int | None = None  # the keeper running, which goes when this process goes for its parent


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C is for the parent, which then ends it
    out = os.dup(1)
    os.dup2(2, 1)  # the frames' pipe is theirs alone: a stray print goes to stderr
    for pipe in (0, out):  # Linux's: fewer, larger hand-overs of the journal and the kept lines
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(pipe, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    stdin = open(0, "rb", closefd=False)  # noqa: SIM115 (the process's own, for its life)
    first = read_frame(stdin.read)
    if first is None or first[0] != CONFIG:
        _orphaned()  # the parent went before it said what to fold
    config = json.loads(first[1])
    local = config.get("fd") is not None
    watcher = threading.Thread(
        target=_watch, args=(config["parent"], 0 if local else None), name="yoink-parent-watch", daemon=True
    )
    watcher.start()
    logs = _Logs()
    yoink_logger = logging.getLogger("yoink")
    yoink_logger.addHandler(logs)
    yoink_logger.setLevel(logging.WARNING)
    yoink_logger.propagate = False
    items = _local_items(config) if local else _piped_items(stdin, config["source"])
    keeper = _Keeper.start()
    try:
        fold, bytes_before = anyio.run(_fold, items, config, keeper)
        kept = len(fold) if keeper is None else keeper.end()
    except BaseException as exc:  # every failure is the parent's to raise
        if keeper is not None:
            keeper.kill()
        if not local:
            os.close(0)  # a parent still sending is told at once that nothing more is read
        _send(out, *logs.frames, frame(ERROR, json.dumps(_error(exc)).encode()))
        return
    counts = {"records": fold.records, "bytes": bytes_before, "kept": kept}
    _send(out, *logs.frames, frame(COUNTS, json.dumps(counts).encode()))
    try:
        for data in text_frames(fold.lines()) if keeper is None else keeper.kept_frames():
            _send(out, data)
    except StorageError as exc:
        _send(out, *logs.frames, frame(ERROR, json.dumps(_error(exc)).encode()))
        return
    _send(out, *logs.frames, frame(END))


async def _fold(
    items: AsyncIterator[str], config: dict[str, Any], keeper: _Keeper | None
) -> tuple[KeyFold, int]:
    fold, decoder = await fold_items(items, config["key"], config["on_corrupt"], config["source"], keeper)
    return fold, decoder.offset


class _Keeper:
    """This worker's keeper process (:mod:`yoink._fold_keeper`): it keeps the last line per key
    while this process decodes the journal, on another core."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self._process = process
        assert process.stdin is not None
        assert process.stdout is not None
        self._to = process.stdin
        self._from = process.stdout
        with contextlib.suppress(OSError, AttributeError):  # as main()'s pipes
            fcntl.fcntl(self._to.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)

    @classmethod
    def start(cls) -> _Keeper | None:
        """Start a keeper and wait until it says it is ready; None, with a WARNING, if it cannot be
        started or does not get ready (the worker keeps the lines itself then)."""
        global _keeper_pid
        orjson_home = os.path.dirname(os.path.dirname(os.path.abspath(orjson.__file__)))
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", _KEEPER_BOOT, _fold_keeper.__file__, orjson_home],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
        except OSError as exc:
            logger.warning("cannot start a keeper process (%s); the worker keeps the lines itself", exc)
            return None
        _keeper_pid = process.pid
        keeper = cls(process)
        ready, _, _ = select.select([keeper._from], [], [], READY_SECONDS)
        first = read_frame(keeper._from.read) if ready else None
        if first is None or first[0] != READY:
            keeper.kill()
            how = "it was not ready in time" if not ready else keeper.ended()
            logger.warning("cannot start a keeper process (%s); the worker keeps the lines itself", how)
            return None
        return keeper

    def keep(self, keys: Sequence[Any], values: Sequence[Any]) -> None:
        """Send a piece's keys and the lines to keep for them (lines, or replayed records)."""
        if not keys:
            return
        if type(values[0]) is str:
            lines = "\n".join(values).encode()
        else:
            lines = b"".join(map(encode_replayed, values))[:-1]
        if set(map(type, keys)) - {str}:  # the KeyFold's identities: (n,) or canonical JSON bytes
            keys = [
                key if type(key) is str else list(key) if type(key) is tuple else [key.decode("latin-1")]
                for key in keys
            ]
        encoded = orjson.dumps(keys)
        try:
            send(self._to.fileno(), frame(KEYS, KEYS_SIZE.pack(len(encoded)) + encoded + lines))
        except OSError:
            raise self._died("before the journal's end") from None

    def end(self) -> int:
        """Say that the journal ended; return how many lines the keeper kept."""
        try:
            send(self._to.fileno(), frame(END))
        except OSError:
            raise self._died("before the journal's end") from None
        kind, payload = self._receive()
        if kind != COUNT:
            raise self._died(f"after it sent {kind!r} out of turn")
        return int(payload)

    def kept_frames(self) -> Iterator[bytes]:
        """The keeper's frames of kept lines (TEXT frames, as the parent takes them); then it ends."""
        while True:
            kind, payload = self._receive()
            if kind == END:
                self._to.close()
                self._wait()
                return
            if kind != TEXT:
                raise self._died(f"after it sent {kind!r} out of turn")
            yield frame(TEXT, payload)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._process.kill()
        self._wait()

    def _wait(self) -> None:
        global _keeper_pid
        self._process.wait()
        _keeper_pid = None

    def ended(self) -> str:
        """How the keeper ended (once it has)."""
        return how_it_ended(self._process.returncode)

    def _receive(self) -> tuple[bytes, bytes]:
        received = read_frame(self._from.read)
        if received is None:
            raise self._died("before it had sent the lines it kept")
        return received

    def _died(self, when: str) -> StorageError:
        self.kill()
        return StorageError(
            f"the compaction's keeper process (pid {self._process.pid}) {self.ended()} {when}; "
            "the journal is unchanged"
        )


def _local_items(config: dict[str, Any]) -> AsyncGenerator[str, None]:
    file = os.fdopen(config["fd"], "rb")
    return _closing(file, journal_lines(file, config["size"], config["path"]))


async def _closing(file: BinaryIO, items: AsyncGenerator[str, None]) -> AsyncGenerator[str, None]:
    try:
        async for item in items:
            yield item
    finally:
        await items.aclose()
        file.close()


async def _piped_items(stdin: BinaryIO, source: str) -> AsyncGenerator[str, None]:
    """The items of the parent's ``storage.read()``, as it sends them."""
    while True:
        kind, payload = next_frame(stdin.read, _orphaned)  # the parent's, until the journal's end
        if kind == ITEM:
            yield payload.decode("utf-8", "surrogatepass")
        elif kind == TOO_LONG:
            raise LineTooLongToRead(source, int(payload))
        else:
            assert kind == END, kind
            return


def _error(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, CorruptCheckpointError):
        return {"kind": "corrupt", "message": str(exc), "line": exc.line, "offset": exc.offset}
    if isinstance(exc, StorageError):
        return {"kind": "storage", "message": str(exc)}
    return {"kind": "error", "message": f"{type(exc).__name__}: {exc}"}


def _send(out: int, *frames: bytes) -> None:
    try:
        send(out, *frames)
    except OSError:  # the parent no longer reads: it is gone, or it gave up on this fold
        _orphaned()


def _orphaned() -> NoReturn:
    """Exit: the parent is gone, or gave up on this fold. The keeper goes first (one stopped with
    SIGSTOP would never see its pipe's end, and stay)."""
    if _keeper_pid is not None:
        with contextlib.suppress(OSError):
            os.kill(_keeper_pid, signal.SIGKILL)
    orphaned()


def _watch(parent: int, lifeline: int | None) -> None:
    """Exit the process once its parent has gone (or, with ``lifeline``, once that pipe has ended)."""
    while os.getppid() == parent:
        if lifeline is None:
            time.sleep(WATCH_SECONDS)
            continue
        readable, _, _ = select.select([lifeline], [], [], WATCH_SECONDS)
        if readable and not os.read(lifeline, 1 << 16):
            break
    _orphaned()


class _Logs(logging.Handler):
    """yoink's log records in this process, held as frames until the next ones are sent."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self._frames: list[bytes] = []

    def emit(self, record: logging.LogRecord) -> None:
        entry = [record.name, record.levelno, record.getMessage()]
        self._frames.append(frame(LOG, json.dumps(entry).encode()))

    @property
    def frames(self) -> list[bytes]:
        frames, self._frames = self._frames, []
        return frames


if __name__ == "__main__":
    sys.exit("run by yoink._fold, not by hand")
