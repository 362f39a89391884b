"""LocalFileStorage: what a crash, a second process and a failing disk do to a local journal."""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import os
import pickle
import re
import stat
import time
import types
from pathlib import Path

import pytest

from tests.helpers import run_python, spy_on_fsync
from yoink import CheckpointLockedError, CheckpointManager, StorageClosedError, StorageError
from yoink.storage import LocalFileStorage
from yoink.storage import _files as files_module
from yoink.storage._files import READ_CHUNK, file_chunks, path_chunks

TORN = '{"url":"https://example.com/3","sta'


async def replay_all(path: Path) -> list[dict[str, object]]:
    async with CheckpointManager.from_uri(path) as manager:
        return [record async for record in manager.replay()]


async def test_the_file_and_missing_parent_directories_appear_on_first_write(tmp_path: Path) -> None:
    path = tmp_path / "runs" / "2026" / "crawl.jsonl"
    storage = LocalFileStorage(path)
    assert not path.parent.exists()
    await storage.write('{"a":1}\n')
    assert path.read_text() == '{"a":1}\n'  # written through to the OS before any flush
    await storage.close()


async def test_a_torn_tail_is_set_aside_and_the_next_append_starts_on_a_clean_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "crawl.jsonl"
    path.write_text('{"url":"https://example.com/1"}\n{"url":"https://example.com/2"}\n' + TORN)
    with caplog.at_level(logging.WARNING, logger="yoink"):
        assert await replay_all(path) == [{"url": "https://example.com/1"}, {"url": "https://example.com/2"}]
        async with CheckpointManager.from_uri(path) as manager:
            await manager.append({"url": "https://example.com/3", "status": 200})
    assert "ends in 35 bytes without a newline" in caplog.text
    assert f"moved its last 35 bytes (from offset 64) to {path}.torn" in caplog.text
    assert path.read_text().splitlines()[-1] == '{"url":"https://example.com/3","status":200}'
    assert Path(f"{path}.torn").read_text() == TORN + "\n"
    assert len(await replay_all(path)) == 3


async def test_a_torn_tail_that_happens_to_be_valid_json_is_still_not_a_record(tmp_path: Path) -> None:
    # A crash just before the newline: the record was never flushed, so it is never replayed, not
    # even once before it is set aside.
    path = tmp_path / "crawl.jsonl"
    path.write_text('{"n":1}\n{"n":2}')
    assert await replay_all(path) == [{"n": 1}]
    async with CheckpointManager.from_uri(path) as manager:
        await manager.append({"n": 3})
    assert await replay_all(path) == [{"n": 1}, {"n": 3}]


async def test_a_journal_that_is_one_torn_line_is_set_aside_whole(tmp_path: Path) -> None:
    path = tmp_path / "crawl.jsonl"
    path.write_bytes(b"\x00" * 100_000)  # what a power cut can leave behind
    async with CheckpointManager.from_uri(path) as manager:
        await manager.append({"n": 1})
    assert path.read_text() == '{"n":1}\n'
    assert Path(f"{path}.torn").read_bytes() == b"\x00" * 100_000 + b"\n"


async def test_another_process_writing_the_same_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "crawl.jsonl"
    async with CheckpointManager.from_uri(path, flush_interval=None) as manager:
        await manager.append({"owner": "parent"})
        await manager.flush()
        child = run_python(
            """
            import asyncio, sys
            from yoink import CheckpointManager, CheckpointLockedError
            async def main():
                async with CheckpointManager.from_uri(sys.argv[1]) as manager:
                    assert [r async for r in manager.replay()] == [{"owner": "parent"}]  # reading is fine
                    await manager.append({"owner": "child"})
                    await manager.flush()
            try:
                asyncio.run(main())
            except CheckpointLockedError as exc:
                print("refused:", exc)
                sys.exit(3)
            """,
            str(path),
        )
        assert child.returncode == 3, child.stderr
        assert (
            f"{path} is open for writing elsewhere (another process or storage holds its lock); yoink "
            "allows one writer at a time, and nothing was written"
        ) in child.stdout
        await manager.append({"owner": "parent", "n": 2})
    assert await replay_all(path) == [{"owner": "parent"}, {"owner": "parent", "n": 2}]


async def test_an_unwritable_path_gives_a_clear_error_and_keeps_the_records(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    path = blocker / "crawl.jsonl"
    manager = CheckpointManager.from_uri(path, flush_interval=None)
    await manager.append({"n": 1})
    with pytest.raises(StorageError, match="cannot open .*not-a-directory/crawl.jsonl for appending"):
        await manager.flush()
    await manager.append({"n": 2})
    blocker.unlink()  # the cause goes away: a retry writes what the failed flush kept, once
    await manager.flush()
    assert path.read_text() == '{"n":1}\n{"n":2}\n'
    await manager.close()
    assert path.read_text() == '{"n":1}\n{"n":2}\n'


async def test_closing_on_an_unwritable_path_raises_why_it_could_not_write(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    manager = CheckpointManager.from_uri(blocker / "crawl.jsonl", flush_interval=None)
    await manager.append({"n": 1})
    with pytest.raises(StorageError, match="cannot open .*not-a-directory/crawl.jsonl for appending"):
        await manager.close()


def test_a_write_the_disk_refuses_leaves_the_journal_unchanged_and_is_retried(tmp_path: Path) -> None:
    # RLIMIT_FSIZE makes the kernel refuse a write past 64 KiB with EFBIG, part-way through a batch.
    child = run_python(
        """
        import asyncio, resource, signal, sys
        from yoink import CheckpointManager, StorageError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        async def main():
            manager = CheckpointManager.from_uri(sys.argv[1], flush_interval=None)
            await manager.append_many({"n": n} for n in range(1000))
            await manager.flush()
            resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))
            await manager.append_many({"n": n, "pad": "x" * 100} for n in range(1000, 2000))
            try:
                await manager.flush()
            except StorageError as exc:
                print("error:", exc)
            with open(sys.argv[1], "rb") as f:
                print("size after the failed flush:", len(f.read()))
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            await manager.flush()  # the same records, handed over again
            await manager.close()
        asyncio.run(main())
        """,
        str(tmp_path / "j.jsonl"),
    )
    assert child.returncode == 0, child.stderr
    clean_size = sum(len(f'{{"n":{n}}}\n') for n in range(1000))
    assert "File too large; the journal is unchanged" in child.stdout
    assert f"size after the failed flush: {clean_size}" in child.stdout
    lines = (tmp_path / "j.jsonl").read_text().splitlines()
    assert [int(line.split(",")[0].removeprefix('{"n":').rstrip("}")) for line in lines] == list(range(2000))


async def test_fsync_false_still_writes_through_to_the_operating_system(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    async with CheckpointManager.from_uri(path, fsync=False, flush_interval=None) as manager:
        await manager.append({"n": 1})
        await manager.flush()
        assert path.read_text() == '{"n":1}\n'


async def test_two_storages_in_one_process_cannot_both_write(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    async with LocalFileStorage(path) as first:
        await first.write('{"n":1}\n')
        async with LocalFileStorage(path) as second:
            with pytest.raises(CheckpointLockedError, match="is open for writing elsewhere"):
                await second.write('{"n":2}\n')
    assert path.read_text() == '{"n":1}\n'


async def test_read_stops_at_the_size_it_saw_when_it_started(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    async with LocalFileStorage(path) as storage:
        await storage.write("".join(f'{{"n":{n}}}\n' for n in range(200_000)))
        items = storage.read()
        first = await items.__anext__()
        await storage.write('{"late":1}\n')
        rest = [item async for item in items]
    assert "late" not in first + "".join(rest)
    assert (first + "".join(rest)).count("\n") == 200_000


# -- fsync: what flush() and close() promise against a crash of the machine ----------------------


def line(n: int) -> str:
    return f'{{"n":{n}}}\n'


async def test_flush_fsyncs_the_journal_after_the_write_it_covers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "j.jsonl"
    with spy_on_fsync(monkeypatch) as fsyncs:
        async with CheckpointManager.from_uri(path, flush_interval=None) as manager:
            await manager.append({"n": 1})
            await manager.flush()
            assert fsyncs.sizes(path) == [len(line(1))]  # one fsync, once the record was written
            await manager.append({"n": 2})
            await manager.append({"n": 3})
            await manager.flush()
            assert fsyncs.sizes(path) == [len(line(1)), len(line(1) + line(2) + line(3))]


async def test_a_flush_fsyncs_only_after_a_write_and_always_after_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "j.jsonl"
    with spy_on_fsync(monkeypatch) as fsyncs:
        async with LocalFileStorage(path) as storage:
            await storage.flush()  # nothing written: nothing to fsync
            assert fsyncs.calls == []
            await storage.write(line(1))
            await storage.flush()
            await storage.flush()  # nothing new since the last fsync
            assert fsyncs.sizes(path) == [len(line(1))]
            for n in range(2, 5):
                await storage.write(line(n))
                await storage.flush()
            await storage.write("")  # an empty write is no write
            await storage.flush()
        sizes = [len("".join(line(k) for k in range(1, n + 1))) for n in range(1, 5)]
        assert fsyncs.sizes(path) == sizes  # close() after a flush has nothing to fsync either


async def test_close_fsyncs_what_was_written_since_the_last_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "j.jsonl"
    with spy_on_fsync(monkeypatch) as fsyncs:
        storage = LocalFileStorage(path)
        await storage.write(line(1))
        await storage.flush()
        await storage.write(line(2))
        assert fsyncs.sizes(path) == [len(line(1))]
        await storage.close()
        assert fsyncs.sizes(path) == [len(line(1)), len(line(1) + line(2))]


async def test_fsync_false_never_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "new" / "j.jsonl"
    with spy_on_fsync(monkeypatch) as fsyncs:
        async with CheckpointManager.from_uri(path, fsync=False, flush_interval=None) as manager:
            for n in range(3):
                await manager.append({"n": n})
                await manager.flush()
            await manager.append({"n": 3})
        assert fsyncs.calls == []
    assert path.read_text() == "".join(line(n) for n in range(4))


async def test_the_directory_is_fsynced_once_when_the_journal_is_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "runs" / "j.jsonl"
    with spy_on_fsync(monkeypatch) as fsyncs:
        async with LocalFileStorage(path) as storage:
            await storage.write(line(1))
            made = [str(path.parent.resolve()), str(tmp_path.resolve())]  # the file's entry, and runs/'
            assert fsyncs.directories() == made  # before the write returned
            assert fsyncs.sizes(path) == []
            await storage.flush()
            await storage.write(line(2))
            await storage.flush()
        async with LocalFileStorage(path) as again:  # the file exists: its entry is durable already
            await again.write(line(3))
            await again.flush()
        assert fsyncs.directories() == made
        assert fsyncs.sizes(path) == [len(line(1)), len(line(1) + line(2)), len(line(1) + line(2) + line(3))]


async def test_each_directory_made_for_a_new_journal_is_made_durable_in_its_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "runs" / "2026" / "j.jsonl"
    with spy_on_fsync(monkeypatch) as fsyncs:
        async with LocalFileStorage(path) as storage:
            await storage.write(line(1))
    resolved = path.resolve()
    # The file's entry in 2026/, 2026's in runs/, runs' in the directory that was there.
    expected = [resolved.parent, resolved.parent.parent, tmp_path.resolve()]
    assert fsyncs.directories() == [str(directory) for directory in expected]


@pytest.mark.parametrize("fsync", [True, False])
async def test_a_pickled_storage_keeps_its_fsync_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsync: bool
) -> None:
    copy = pickle.loads(pickle.dumps(LocalFileStorage(tmp_path / "j.jsonl", fsync=fsync)))
    with spy_on_fsync(monkeypatch) as fsyncs:
        async with copy:
            await copy.write(line(1))
            await copy.flush()
    assert fsyncs.sizes(tmp_path / "j.jsonl") == ([len(line(1))] if fsync else [])
    assert (tmp_path / "j.jsonl").read_text() == line(1)


async def test_a_new_journal_gets_the_usual_permissions_of_a_new_file(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    async with LocalFileStorage(tmp_path / "j.jsonl") as storage:
        await storage.write(line(1))
    assert stat.S_IMODE((tmp_path / "j.jsonl").stat().st_mode) == 0o666 & ~umask


async def test_a_journal_path_that_is_a_directory_is_refused_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "j.jsonl").mkdir()
    async with LocalFileStorage(tmp_path / "j.jsonl") as storage:
        with pytest.raises(StorageError, match=r"^cannot open .*j\.jsonl for appending: Is a directory$"):
            await storage.write(line(1))


@pytest.mark.parametrize("fsync", [True, False])
async def test_setting_a_torn_tail_aside_is_fsynced_before_the_journal_is_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsync: bool
) -> None:
    path = tmp_path / "j.jsonl"
    path.write_bytes(line(1).encode() + b'{"n":2,"to')
    with spy_on_fsync(monkeypatch) as fsyncs:
        async with LocalFileStorage(path, fsync=fsync) as storage:
            await storage.write(line(3))
            await storage.flush()
    torn = tmp_path / "j.jsonl.torn"
    assert path.read_text() == line(1) + line(3)
    assert torn.read_bytes() == b'{"n":2,"to\n'
    # The set-aside bytes are durable, then the cut journal, then the new record; with
    # fsync=False, nothing is fsynced at all.
    expected = [
        (str(torn.resolve()), len(b'{"n":2,"to\n')),
        (str(path.resolve()), len(line(1))),
        (str(path.resolve()), len(line(1) + line(3))),
    ]
    assert [(call.path, call.size) for call in fsyncs.calls] == (expected if fsync else [])


async def test_a_torn_tail_behind_a_newline_in_the_first_byte_is_found_across_a_whole_block(
    tmp_path: Path,
) -> None:
    # The search for the last newline reads back 64 KiB at a time: here the only newline is the
    # file's first byte, alone in the last block read.
    path = tmp_path / "j.jsonl"
    path.write_bytes(b"\n" + b"x" * 65536)
    async with LocalFileStorage(path) as storage:
        await storage.write(line(1))
    assert path.read_bytes() == b"\n" + line(1).encode()
    assert Path(f"{path}.torn").read_bytes() == b"x" * 65536 + b"\n"


async def test_a_torn_staged_batch_taken_over_is_set_aside_durably(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A remote journal's stage (S3, fsspec) sets a crashed writer's torn batch aside with the local
    # backend's code, and fsyncs it: its batches are the only copy of records not yet uploaded.
    from yoink.storage._stage import Stage

    stage = Stage(tmp_path / "stage", "s3://bucket/j.jsonl", describe="s3://bucket/j.jsonl")
    os.makedirs(stage.directory)
    batch = Path(stage.directory) / "000000000001.jsonl"
    batch.write_bytes(line(1).encode() + b'{"n":2,"to')
    with spy_on_fsync(monkeypatch) as fsyncs:
        await stage.open()
    try:
        assert batch.read_bytes() == line(1).encode()
        assert fsyncs.sizes(f"{batch}.torn") == [len(b'{"n":2,"to\n')]
        assert fsyncs.sizes(batch) == [len(line(1))]
    finally:
        await stage.close()


async def test_a_torn_tail_that_cannot_be_set_aside_refuses_the_write_and_keeps_the_journal(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j.jsonl"
    path.write_bytes(line(1).encode() + b'{"n":2,"to')
    (tmp_path / "j.jsonl.torn").mkdir()  # where the torn tail would go
    async with LocalFileStorage(path) as storage:
        with pytest.raises(
            StorageError,
            match=rf"^cannot prepare {re.escape(str(path))} for appending: \[Errno 21\] Is a directory: "
            rf"'{re.escape(str(path))}\.torn'$",
        ):
            await storage.write(line(3))
    assert path.read_bytes() == line(1).encode() + b'{"n":2,"to'
    (tmp_path / "j.jsonl.torn").rmdir()
    async with LocalFileStorage(path) as storage:  # the refused storage let go of the lock
        await storage.write(line(3))
    assert path.read_text() == line(1) + line(3)


async def test_close_finishes_the_write_under_way_and_refuses_those_waiting_for_the_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j.jsonl"
    storage = LocalFileStorage(path)
    first = asyncio.create_task(storage.write(line(1)))
    await asyncio.sleep(0)  # the first write holds the file's lock, in its worker thread
    second = asyncio.create_task(storage.write(line(2)))
    await asyncio.sleep(0)  # the second waits for the lock
    await storage.close()
    await first
    with pytest.raises(StorageClosedError, match=r"is closed$"):
        await second
    assert path.read_text() == line(1)


async def test_a_second_close_returns_once_the_first_has_let_go_of_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "j.jsonl"
    fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(0.3)  # the first close() is still flushing when the second is called
        fsync(fd)

    storage = LocalFileStorage(path)
    await storage.write(line(1))
    monkeypatch.setattr(os, "fsync", slow_fsync)
    first = asyncio.create_task(storage.close())
    await asyncio.sleep(0.05)
    await storage.close()
    assert first.done(), "the second close() returned while the first was still closing"
    async with LocalFileStorage(path) as after:  # the lock was let go of
        await after.write(line(2))
    assert path.read_text() == line(1) + line(2)


@pytest.mark.parametrize(
    ("uri", "hint"),
    [
        ("file:/run.jsonl", "./run.jsonl"),
        ("file:runs/a.jsonl/", "./runs/a.jsonl/"),
        ("file:", "./run.jsonl"),
        ("file:/XMAS.jsonl", "./XMAS.jsonl"),  # only the slashes are taken off
    ],
)
def test_a_file_uri_without_its_slashes_is_refused_with_the_path_to_write(uri: str, hint: str) -> None:
    with pytest.raises(ValueError, match=r"^a file URI is written") as refused:
        LocalFileStorage.from_uri(uri)
    assert str(refused.value) == (
        "a file URI is written file:///abs/run.jsonl; for a relative path, give the path itself, "
        f"as in {hint}; got {uri!r}"
    )


async def test_a_record_that_ends_one_byte_into_the_second_read_chunk_is_replayed(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    pad = READ_CHUNK - len('{"n":1,"pad":""}')  # the record's newline is the chunk's byte READ_CHUNK + 1
    path.write_text('{"n":1,"pad":"' + "x" * pad + '"}\n')
    assert path.stat().st_size == READ_CHUNK + 1
    async with CheckpointManager.from_uri(path, read_only=True) as manager:
        assert [record["n"] async for record in manager.replay()] == [1]


async def test_a_journal_that_cannot_be_read_says_why(tmp_path: Path) -> None:
    (tmp_path / "j.jsonl").mkdir()
    storage = LocalFileStorage(tmp_path / "j.jsonl")
    with pytest.raises(StorageError) as failed:
        async for _ in storage.read():
            pass
    assert str(failed.value) == f"cannot read {tmp_path / 'j.jsonl'}: Is a directory"


async def test_a_staged_file_that_cannot_be_opened_says_which_and_why(tmp_path: Path) -> None:
    with pytest.raises(StorageError) as failed:
        async for _ in path_chunks(str(tmp_path / "gone.batch"), 10):
            pass
    assert str(failed.value) == f"cannot read {tmp_path / 'gone.batch'}: No such file or directory"


async def test_a_read_that_fails_part_way_says_what_and_why() -> None:
    class Failing(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(StorageError) as failed:
        async for _ in file_chunks(Failing(b"{}\n"), 3, describe="/data/j.jsonl"):
            pass
    assert str(failed.value) == "cannot read /data/j.jsonl: Input/output error"


class FailingRead:
    """A file whose read() meets a disk error."""

    def __init__(self, file: io.BufferedReader) -> None:
        self.file = file

    def fileno(self) -> int:
        return self.file.fileno()

    def read(self, size: int = -1) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    def close(self) -> None:
        self.file.close()


async def test_a_local_journal_whose_read_fails_part_way_names_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "j.jsonl"
    path.write_text('{"n":1}\n')
    # A local journal is opened by _files.open_journal, as a compaction's worker opens it.
    monkeypatch.setattr(files_module, "open", lambda *args: FailingRead(open(*args)), raising=False)  # noqa: SIM115
    with pytest.raises(StorageError) as failed:
        async for _ in LocalFileStorage(path).read():
            pass
    assert str(failed.value) == f"cannot read {path}: Input/output error"
    with pytest.raises(StorageError) as failed:
        async for _ in path_chunks(str(path), 8):  # a staged batch is read so
            pass
    assert str(failed.value) == f"cannot read {path}: Input/output error"


async def test_a_failed_fsync_is_a_storage_error_that_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    storage = LocalFileStorage(tmp_path / "j.jsonl")
    await storage.write(line(1))
    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(StorageError) as failed:
        await storage.flush()
    assert str(failed.value) == f"fsync of {tmp_path / 'j.jsonl'} failed: Input/output error"
    monkeypatch.undo()
    await storage.close()


def test_an_empty_path_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match=r"^LocalFileStorage needs") as refused:
        LocalFileStorage("")
    assert str(refused.value) == "LocalFileStorage needs a file path, got an empty string"


async def test_a_journal_whose_size_cannot_be_read_says_why_and_is_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_fstat(fd: int) -> os.stat_result:
        raise OSError(errno.EIO, "Input/output error")

    path = tmp_path / "j.jsonl"
    path.write_text('{"n":1}\n')
    opened: list[io.BufferedReader] = []

    def recording_open(*args: str) -> io.BufferedReader:
        opened.append(open(*args))  # noqa: SIM115 (the code under test closes it)
        return opened[-1]

    monkeypatch.setattr(files_module, "open", recording_open, raising=False)
    monkeypatch.setattr(files_module, "os", types.SimpleNamespace(fstat=failing_fstat))  # _files' os alone
    with pytest.raises(StorageError) as failed:
        async for _ in LocalFileStorage(path).read():
            pass
    assert str(failed.value) == f"cannot read {path}: Input/output error"
    assert [file.closed for file in opened] == [True], "the journal was left open"
