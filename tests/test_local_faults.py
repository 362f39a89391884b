"""The local file under faults: torn tails named to the byte, and a failed write whose undo fails too.

The faults are the operating system's own: RLIMIT_FSIZE cuts a write part-way, and an append-only
file (``chattr +a``) refuses the ftruncate that would undo it.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest

from yoink import CheckpointManager


def lines(count: int, *, first: int = 0, pad: int = 0) -> bytes:
    return b"".join(orjson.dumps({"n": n, "pad": "p" * pad}) + b"\n" for n in range(first, first + count))


async def test_a_reader_names_a_torn_tail_by_its_size_and_offset_across_read_chunks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "j.jsonl"
    whole = lines(30_000, pad=40)  # over 1 MiB: the tail comes in the second read chunk
    torn = b'{"n":30000,"pad":"pp'
    path.write_bytes(whole + torn)
    with caplog.at_level(logging.WARNING, logger="yoink"):
        async with CheckpointManager.from_uri(path, read_only=True) as reader:
            records = [record async for record in reader.replay()]
    assert len(records) == 30_000
    assert (
        f"{path} ends in {len(torn)} bytes without a newline (a torn write, or one still under way), "
        f"from byte offset {len(whole)}; they are not part of the journal"
    ) in caplog.text


@pytest.mark.parametrize(
    "last",
    [b"\0" * 40 + b"\n", b'{"n": 2, "cut sh\n', b"[1, 2]\n", b'{"n": "\xff\xfe"}\n'],
    ids=["zeros", "cut-short", "not-an-object", "not-utf-8"],
)
@pytest.mark.parametrize(
    "blank", [b"", b"\n", b"\n  \n\n"], ids=["no-blank-line", "a-blank-line", "blank-lines"]
)
@pytest.mark.parametrize("torn", [b"", b'{"n":'], ids=["whole", "then-torn"])
@pytest.mark.parametrize("pad", [0, 1 << 20], ids=["short-journal", "after-2-MiB"])
async def test_a_last_line_that_is_not_a_record_is_set_aside_before_a_writer_appends(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, last: bytes, blank: bytes, torn: bytes, pad: int
) -> None:
    # Replay skips such a line, as it skips a torn write; appended to, it would be a corrupt line in
    # the middle, and the journal would never replay again (found by an attacker of the ledger).
    # Replay passes over blank lines, so the line it judges last is the last that is not blank: one
    # kept because blank lines followed it (an editor's, another tool's) did the same.
    path = tmp_path / "j.jsonl"
    whole = b"".join(b'{"n":%d,"pad":"%s"}\n' % (n, b"p" * pad) for n in range(2))
    path.write_bytes(whole + last + blank + torn)
    with caplog.at_level(logging.WARNING, logger="yoink"):
        async with CheckpointManager.from_uri(path) as manager:
            await manager.append({"n": 3})
    async with CheckpointManager.from_uri(path, read_only=True) as reader:
        assert [record["n"] async for record in reader.replay()] == [0, 1, 3]
    assert Path(f"{path}.torn").read_bytes() == last + blank + torn + b"\n"
    assert (
        f"{path} ended in a torn write (its last line is not a record): moved its last "
        f"{len(last + blank + torn)} bytes (from offset {len(whole)})"
    ) in caplog.text


async def test_a_last_line_of_a_mebibyte_exactly_that_is_not_a_record_is_judged_and_set_aside(
    tmp_path: Path,
) -> None:
    """The longest last line judged before a writer appends is a mebibyte, its newline included."""
    path = tmp_path / "j.jsonl"
    last = b'"' + b"s" * ((1 << 20) - 3) + b'"\n'  # a JSON string, not an object
    path.write_bytes(b'{"n":0}\n' + last)
    async with CheckpointManager.from_uri(path) as manager:
        await manager.append({"n": 1})
    async with CheckpointManager.from_uri(path, read_only=True) as reader:
        assert [record["n"] async for record in reader.replay()] == [0, 1]
    assert Path(f"{path}.torn").read_bytes() == last + b"\n"


async def test_a_torn_tail_after_a_last_line_too_long_to_judge_is_set_aside_without_judging_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A last line over a mebibyte is left for replay to judge: only the torn bytes after it are set
    aside, and the warning does not say the line is not a record."""
    path = tmp_path / "j.jsonl"
    long = b'{"n":1,"pad":"' + b"p" * (1 << 20) + b'"}\n'
    torn = b'{"n":'
    path.write_bytes(b'{"n":0}\n' + long + torn)
    with caplog.at_level(logging.WARNING, logger="yoink"):
        async with CheckpointManager.from_uri(path) as manager:
            await manager.append({"n": 2})
    async with CheckpointManager.from_uri(path, read_only=True) as reader:
        assert [record["n"] async for record in reader.replay()] == [0, 1, 2]
    assert Path(f"{path}.torn").read_bytes() == torn + b"\n"
    assert (
        f"{path} ended in a torn write: moved its last {len(torn)} bytes (from offset {8 + len(long)}) "
        f"to {path}.torn"
    ) in caplog.messages


async def test_a_journal_whose_only_line_is_not_a_record_is_set_aside_whole(tmp_path: Path) -> None:
    """The first line is kept unjudged only if it is a compacted journal's header."""
    path = tmp_path / "j.jsonl"
    path.write_bytes(b"[1, 2]\n")
    async with CheckpointManager.from_uri(path) as manager:
        await manager.append({"n": 0})
    assert path.read_bytes() == b'{"n":0}\n'
    assert Path(f"{path}.torn").read_bytes() == b"[1, 2]\n\n"


async def test_a_compacted_journal_of_its_header_alone_keeps_it_when_appended_to(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    async with CheckpointManager.from_uri(path) as manager:
        await manager.append({"n": 0})
        await manager.compact([])  # nothing left but the header
    header = path.read_bytes()
    async with CheckpointManager.from_uri(path) as manager:
        await manager.append({"n": 1})
    assert path.read_bytes() == header + b'{"n":1}\n'
    assert not Path(f"{path}.torn").exists()


@pytest.mark.parametrize("torn_size", [20, 70_000, 200_000], ids=["short", "over-64KiB", "over-128KiB"])
async def test_a_writer_sets_a_torn_tail_aside_and_names_its_size_and_offset(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, torn_size: int
) -> None:
    # A tail longer than the 64 KiB read back from the end at a time is found all the same.
    path = tmp_path / "j.jsonl"
    whole = lines(3_000, pad=40)
    torn = b'{"n":3000,"pad":"' + b"p" * (torn_size - 17)
    path.write_bytes(whole + torn)
    with caplog.at_level(logging.WARNING, logger="yoink"):
        async with CheckpointManager.from_uri(path, flush_interval=None) as writer:
            await writer.append({"n": 3000})
    assert (
        f"{path} ended in a torn write: moved its last {len(torn)} bytes (from offset {len(whole)}) "
        f"to {path}.torn"
    ) in caplog.messages
    assert path.read_bytes() == whole + b'{"n":3000}\n'
    assert Path(f"{path}.torn").read_bytes() == torn + b"\n"


@pytest.mark.parametrize(
    "torn",
    [b' \t{"n":30', b'{"n":3000}', b" "],
    ids=["blank-first", "a-record-without-its-newline", "a-blank"],
)
@pytest.mark.parametrize("before", [0, 100], ids=["alone", "after-2-KiB"])
async def test_every_byte_after_the_last_newline_is_set_aside(
    tmp_path: Path, torn: bytes, before: int
) -> None:
    """A local journal's last line has its newline (yoink writes whole lines): whatever follows
    the last one, a record or blanks included, is set aside whole, its first byte too."""
    path = tmp_path / "j.jsonl"
    whole = lines(before, pad=10)
    path.write_bytes(whole + torn)
    async with CheckpointManager.from_uri(path, flush_interval=None) as writer:
        await writer.append({"n": 3000})
    assert path.read_bytes() == whole + b'{"n":3000}\n'
    assert Path(f"{path}.torn").read_bytes() == torn + b"\n"


needs_append_only_files = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("chattr") is None,
    reason="making a file append-only (chattr +a) needs root and chattr",
)

UNDO_FAILS = """
    import asyncio, os, resource, signal, subprocess, sys
    from yoink import CheckpointManager, StorageError
    from yoink.storage import LocalFileStorage
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    path = sys.argv[1]
    async def main():
        manager = CheckpointManager.from_uri(path, flush_interval=None)
        await manager.append_many({"n": n} for n in range(100))
        await manager.flush()
        with open(path, "rb") as f:
            size = len(f.read())
        subprocess.run(["chattr", "+a", path], check=True)  # ftruncate now fails (EPERM)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 1000, resource.RLIM_INFINITY))
        await manager.append_many({"n": n, "pad": "x" * 100} for n in range(100, 200))
        try:
            await manager.flush()
        except StorageError as exc:
            print("error:", exc)
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        try:
            await manager.storage.write('{"n":-1}\\n')
        except StorageError as exc:
            print("then:", type(exc).__name__)
        if (pid := os.fork()) == 0:  # a child of a closed storage has nothing of it to let go of
            os._exit(0)
        os.waitpid(pid, 0)
        subprocess.run(["chattr", "-a", path], check=True)
        second = LocalFileStorage(path)  # the lock was let go of with the descriptor
        await second.write('{"n":-2}\\n')
        print("a second storage could write")
        await second.close()
        try:
            await manager.close()
        except StorageError as exc:
            print("close:", exc)
    asyncio.run(main())
"""


@needs_append_only_files
def test_a_write_cut_part_way_whose_undo_fails_closes_the_storage_and_keeps_every_flushed_record(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j.jsonl"
    code = textwrap.dedent(UNDO_FAILS)
    try:
        child = subprocess.run(
            [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120, check=False
        )
    finally:
        subprocess.run(["chattr", "-a", str(path)], check=False)
    assert child.returncode == 0, child.stderr
    assert (
        f"error: appending to {path} failed (File too large) and the partial write could not be undone; "
        "the storage is closed, and the next writer sets the torn tail aside"
    ) in child.stdout
    assert "then: StorageClosedError" in child.stdout
    assert "could not let go" not in child.stderr, "a forked child found a descriptor to close"
    assert "a second storage could write" in child.stdout
    assert "close: " in child.stdout, "the manager says its last records were not written"
    # Every flushed record is there; then the complete lines of the cut write, the second storage's
    # record, and nothing else.
    journal = path.read_bytes()
    flushed = b"".join(b'{"n":%d}\n' % n for n in range(100))
    assert journal.startswith(flushed)
    rest = journal[len(flushed) :]
    assert len(rest) > 1000 - 200, "the cut write is still in the file: it could not be undone"
    assert rest.endswith(b'{"n":-2}\n'), "the next writer started on a clean line"
    cut = [orjson.loads(line) for line in rest.splitlines()[:-1]]
    assert [record["n"] for record in cut] == list(range(100, 100 + len(cut)))
    assert Path(f"{path}.torn").read_bytes().startswith(b'{"n":%d,' % (100 + len(cut)))


async def test_a_last_line_that_is_not_a_record_is_found_behind_more_than_64_kib_of_records(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The line before the last newline is looked for back from the end, 64 KiB at a time.
    path = tmp_path / "j.jsonl"
    whole = lines(3_000, pad=40)
    assert len(whole) > 2 * 65536
    path.write_bytes(whole + b"[1, 2]\n")
    with caplog.at_level(logging.WARNING, logger="yoink"):
        async with CheckpointManager.from_uri(path) as manager:
            await manager.append({"n": 3000})
    assert path.read_bytes() == whole + b'{"n":3000}\n'
    assert Path(f"{path}.torn").read_bytes() == b"[1, 2]\n\n"
    assert (
        f"{path} ended in a torn write (its last line is not a record): moved its last 7 bytes "
        f"(from offset {len(whole)})"
    ) in caplog.text


@pytest.mark.parametrize("torn", [b"", b'{"n":'], ids=["alone", "then-torn"])
async def test_a_blank_first_line_is_kept_and_only_what_follows_it_is_set_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, torn: bytes
) -> None:
    # A blank line is no torn write: the newline in the file's first byte ends a line like any other.
    path = tmp_path / "j.jsonl"
    path.write_bytes(b"\n" + torn)
    with caplog.at_level(logging.WARNING, logger="yoink"):
        async with CheckpointManager.from_uri(path) as manager:
            await manager.append({"n": 1})
    assert path.read_bytes() == b'\n{"n":1}\n'
    if torn:
        assert Path(f"{path}.torn").read_bytes() == torn + b"\n"
        assert caplog.messages == [
            f"{path} ended in a torn write: moved its last {len(torn)} bytes (from offset 1) to {path}.torn"
        ]
    else:
        assert not Path(f"{path}.torn").exists()
        assert caplog.messages == []
