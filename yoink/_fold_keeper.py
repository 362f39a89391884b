"""Keeping the last line per key: on the event loop, or in a keeper process beside a fold's worker.

A fold by key (:class:`~yoink._compaction.KeyFold`) does two things with each record: it decodes
the line and finds the record's key, and it keeps the line as the last one of that key. The
keeping is about half of the fold's time, most of it waiting for memory (a dict of every distinct
key, touched at random). So a worker process (:mod:`yoink._fold_worker`) hands it to a keeper
process of its own, and the two halves run on two cores::

    the worker                                         the keeper (this module, run as a script)
                                                   <--- R: ready (it could import what it needs)
    decodes a piece of the journal, finds its keys ---> K: the keys (JSON), then the lines
    ...                                                 keeps the last line per key (LastPerKey)
    the journal ended                              ---> E
                                                   <--- S: how many lines it kept
                                                   <--- T: the kept lines, about a mebibyte a frame
                                                   <--- E

:class:`LastPerKey` is the one keeping there is: a fold on the event loop keeps with it too. This
module imports nothing of yoink, so that a keeper runs it as a script (``python -c`` with this
file's path) without yoink's imports, which are most of a worker's memory. It owns the frames'
format, which :mod:`yoink._fold`'s frames between the job and its worker share: a kind (one
byte), the payload's size, the payload.

A keeper exits when its stdin ends before the worker said the journal ended (the worker is gone,
whatever ended it), or when its output can no longer be written (the worker stopped reading); a
worker that exits because its own parent went kills its keeper first (a stopped keeper would
never see its pipe's end).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence, ValuesView
from typing import Any, NoReturn

__all__ = ["HEAD", "LastPerKey", "frame", "next_frame", "orphaned", "read_frame", "send", "text_frames"]

HEAD = struct.Struct(">cQ")  # a frame's kind and its payload's size
KEYS = b"K"  # to the keeper: a piece's keys and lines (KEYS_SIZE, the keys' JSON, the lines)
KEYS_SIZE = struct.Struct(">Q")  # the size of the keys' JSON, first in a K frame
END = b"E"  # both ways: the journal ended; the kept lines ended
READY = b"R"  # from the keeper, first: it has what it needs (its imports)
COUNT = b"S"  # from the keeper: how many lines it kept, in decimal
TEXT = b"T"  # from the keeper: kept lines, each with its newline (the worker sends them on as they are)
FRAME_BYTES = 1 << 20  # about how much of the kept lines goes in one frame
ORPHANED = 3  # its exit status when the worker went away


class LastPerKey:
    """The last value kept for each key, in the order of those last values (journal order)."""

    def __init__(self) -> None:
        self._latest: dict[Any, Any] = {}

    def keep(self, keys: Sequence[Any], values: Sequence[Any]) -> None:
        """Keep ``values[i]`` as the last value of ``keys[i]``, in order."""
        latest = self._latest
        pop = latest.pop
        for key, value in zip(keys, values, strict=True):
            pop(key, None)  # then put back at the end: the order is the last value's place
            latest[key] = value

    def __len__(self) -> int:
        return len(self._latest)

    def values(self) -> ValuesView[Any]:
        return self._latest.values()


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return HEAD.pack(kind, len(payload)) + payload


def read_frame(read: Callable[[int], bytes]) -> tuple[bytes, bytes] | None:
    """The next frame from a binary file's ``read``, or None at its end."""
    head = read(HEAD.size)
    if len(head) < HEAD.size:
        return None
    kind, size = HEAD.unpack(head)
    payload = read(size) if size else b""
    return None if len(payload) < size else (kind, payload)


def orphaned() -> NoReturn:
    os._exit(ORPHANED)


def next_frame(read: Callable[[int], bytes], gone: Callable[[], NoReturn] = orphaned) -> tuple[bytes, bytes]:
    """The next frame; at the pipe's end, ``gone()``: the writer went before it said all."""
    received = read_frame(read)
    if received is None:
        gone()
    return received


def send(fd: int, *frames: bytes) -> None:
    """Write ``frames`` whole to the pipe ``fd`` (an OSError if its reader has gone)."""
    for data in frames:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]


def keys_from_json(keys: list[Any]) -> list[Any]:
    """The keys a worker sent as JSON, as they were: a string as it is, anything else a tuple."""
    if set(map(type, keys)) <= {str}:
        return keys
    return [tuple(key) if type(key) is list else key for key in keys]


def text_frames(lines: Iterable[bytes]) -> Iterator[bytes]:
    """``lines`` (each with its newline) as TEXT frames of about FRAME_BYTES."""
    pieces: list[bytes] = []
    size = 0
    for line in lines:
        pieces.append(line)
        size += len(line)
        if size >= FRAME_BYTES:
            yield frame(TEXT, b"".join(pieces))
            pieces, size = [], 0
    if pieces:
        yield frame(TEXT, b"".join(pieces))


def main() -> None:
    import orjson  # here: the module is imported by yoink too, and needs nothing more there

    stdin = open(0, "rb", closefd=False)  # noqa: SIM115 (the process's own, for its life)
    kept = LastPerKey()
    try:
        send(1, frame(READY))
        while True:
            kind, payload = next_frame(stdin.read)  # the worker's, until the journal's end
            if kind == END:
                break
            assert kind == KEYS, kind
            (keys_size,) = KEYS_SIZE.unpack_from(payload)
            keys = keys_from_json(orjson.loads(payload[KEYS_SIZE.size : KEYS_SIZE.size + keys_size]))
            kept.keep(keys, payload[KEYS_SIZE.size + keys_size :].split(b"\n"))
        send(1, frame(COUNT, str(len(kept)).encode()))
        for data in text_frames(line + b"\n" for line in kept.values()):
            send(1, data)
        send(1, frame(END))
    except OSError:  # the worker no longer reads: it is gone, or it gave up on this fold
        os._exit(ORPHANED)


if __name__ == "__main__":
    main()
