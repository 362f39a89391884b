"""A compaction's worker process: fold a journal by key, away from the event loop that appends.

Started by :mod:`yoink._fold` (never imported by ``yoink`` itself), with the frames it reads and
writes described there. It reads the journal (a local file through a descriptor it was given, or
the items of ``storage.read()`` on its stdin), folds it as a compaction in-process would, and sends
back its log records, the counts and the kept records.

It ends with its parent: a thread of its own exits the process once the parent is no longer the
process that started it (a ``kill -9`` reparents the worker) or, when nothing else comes on stdin,
once stdin reaches its end (only the parent holds its write end). ``PR_SET_PDEATHSIG`` is not
used: it fires when the *thread* that started the worker ends, and trio starts processes from
worker threads that end when idle.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, BinaryIO

import anyio

from yoink._compaction import CHUNK_BYTES, KeyFold
from yoink._exceptions import CorruptCheckpointError, StorageError
from yoink._fold import (
    CONFIG,
    COUNTS,
    END,
    ERROR,
    ITEM,
    LOG,
    TEXT,
    TOO_LONG,
    fold_items,
    frame,
    read_frame,
)
from yoink._records import LineTooLongToRead
from yoink.storage._files import journal_lines

__all__ = ["main"]

ORPHANED = 3  # its exit status when its parent went away
WATCH_SECONDS = 0.1  # how often it looks for its parent


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C is for the parent, which then ends it
    out = os.dup(1)
    os.dup2(2, 1)  # the frames' pipe is theirs alone: a stray print goes to stderr
    stdin = open(0, "rb", closefd=False)  # noqa: SIM115 (the process's own, for its life)
    first = read_frame(stdin.read)
    if first is None or first[0] != CONFIG:
        os._exit(ORPHANED)  # the parent went before it said what to fold
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
    try:
        fold, bytes_before = anyio.run(_fold, items, config)
    except BaseException as exc:  # every failure is the parent's to raise
        if not local:
            os.close(0)  # a parent still sending is told at once that nothing more is read
        _send(out, *logs.frames, frame(ERROR, json.dumps(_error(exc)).encode()))
        return
    counts = {"records": fold.records, "bytes": bytes_before, "kept": len(fold)}
    _send(out, *logs.frames, frame(COUNTS, json.dumps(counts).encode()))
    pieces: list[bytes] = []
    size = 0
    for line in fold.lines():
        pieces.append(line)
        size += len(line)
        if size >= CHUNK_BYTES:
            _send(out, frame(TEXT, b"".join(pieces)))
            pieces, size = [], 0
    if pieces:
        _send(out, frame(TEXT, b"".join(pieces)))
    _send(out, *logs.frames, frame(END))


async def _fold(items: AsyncIterator[str], config: dict[str, Any]) -> tuple[KeyFold, int]:
    fold, decoder = await fold_items(items, config["key"], config["on_corrupt"], config["source"])
    return fold, decoder.offset


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
        received = read_frame(stdin.read)
        if received is None:
            os._exit(ORPHANED)  # the parent went before the journal's end
        kind, payload = received
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
        for data in frames:
            view = memoryview(data)
            while view:
                view = view[os.write(out, view) :]
    except OSError:  # the parent no longer reads: it is gone, or it gave up on this fold
        os._exit(ORPHANED)


def _watch(parent: int, lifeline: int | None) -> None:
    """Exit the process once its parent has gone (or, with ``lifeline``, once that pipe has ended)."""
    while os.getppid() == parent:
        if lifeline is None:
            time.sleep(WATCH_SECONDS)
            continue
        readable, _, _ = select.select([lifeline], [], [], WATCH_SECONDS)
        if readable and not os.read(lifeline, 1 << 16):
            break
    os._exit(ORPHANED)


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
