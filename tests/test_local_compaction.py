"""LocalFileStorage.replace(): the new journal keeps the old one's permissions, its place behind a
symbolic link, and the promise that a replace() that raises left the old journal."""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.helpers import run_python, spy_on_fsync
from yoink import CheckpointLockedError, CheckpointManager, StorageError
from yoink.storage import LocalFileStorage
from yoink.storage import _local as local_module
from yoink.storage._local import REPLACEMENT_SUFFIX
from yoink.testing._contract import replace_while_writing

pytestmark = pytest.mark.usefixtures("async_backend")


async def lines(*texts: str, during: Callable[[], None] | None = None) -> AsyncIterator[str]:
    """The new journal's text, one line a chunk; ``during`` runs before the first one is taken."""
    if during is not None:
        during()
    for text in texts:
        yield text


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


async def test_a_private_journal_stays_private_after_compact(tmp_path: Path) -> None:
    path = tmp_path / "private.jsonl"
    async with CheckpointManager.from_uri(path) as checkpoint:
        await checkpoint.append({"k": 1, "secret": "s3cr3t"})
        await checkpoint.append({"k": 1, "secret": "n3w"})
        await checkpoint.flush()
        os.chmod(path, 0o600)
        await checkpoint.compact(key="k")
        assert mode(path) == 0o600, "compaction made a private journal readable by others"
        await checkpoint.append({"k": 2})
    assert mode(path) == 0o600


async def test_the_new_journal_is_private_before_its_first_byte_is_written(tmp_path: Path) -> None:
    path = tmp_path / "private.jsonl"
    path.write_text('{"n":0}\n')
    os.chmod(path, 0o600)
    seen: list[int] = []
    storage = LocalFileStorage(path)
    await storage.write('{"n":1}\n')
    await storage.replace(
        lines('{"n":1}\n', during=lambda: seen.append(mode(str(path) + REPLACEMENT_SUFFIX)))
    )
    await storage.close()
    assert seen == [0o600], "the new journal was readable by others while its text was written"
    assert path.read_text() == '{"n":1}\n'


async def test_a_snapshot_of_many_mebibytes_is_written_whole_in_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "big.jsonl"
    storage = LocalFileStorage(path)
    await storage.write('{"n":0}\n')
    texts = [f'{{"n":{n},"pad":"{"x" * (n % 3000)}"}}\n' for n in range(3000)]  # 4.5 MB, chunks of 0 to 3 kB
    writes: list[int] = []
    write_replacement = local_module._write_replacement

    def counting(fd: int, payload: bytes, journal: str) -> None:
        writes.append(len(payload))
        write_replacement(fd, payload, journal)

    monkeypatch.setattr(local_module, "_write_replacement", counting)
    await storage.replace(lines(*texts))
    await storage.close()
    assert path.read_text() == "".join(texts)
    assert len(writes) == 5  # 1 MiB at a time, then the rest
    assert all(size >= 1 << 20 for size in writes[:-1])
    assert all(size < (1 << 20) + 3100 for size in writes)


async def test_a_journal_with_unusual_permission_bits_keeps_them(tmp_path: Path) -> None:
    path = tmp_path / "odd.jsonl"
    storage = LocalFileStorage(path)
    await storage.write('{"n":0}\n')
    os.chmod(path, 0o2640)  # set-group-id and group-readable: not what a umask would give
    await storage.replace(lines('{"n":1}\n'))
    await storage.close()
    assert mode(path) == 0o2640


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another owner")
async def test_as_root_the_new_journal_keeps_the_old_ones_owner_and_group(tmp_path: Path) -> None:
    path = tmp_path / "owned.jsonl"
    storage = LocalFileStorage(path)
    await storage.write('{"n":0}\n')
    os.chown(path, 4321, 8765)
    os.chmod(path, 0o4600)  # chown clears set-user-id: it must come back after the new file's chown
    await storage.replace(lines('{"n":1}\n'))
    await storage.write('{"n":2}\n')
    await storage.close()
    info = os.stat(path)
    assert (info.st_uid, info.st_gid) == (4321, 8765), "the compacted journal changed owner"
    assert mode(path) == 0o4600
    assert path.read_text() == '{"n":1}\n{"n":2}\n'


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another owner")
async def test_a_writer_that_cannot_give_the_new_journal_its_owner_says_so_and_keeps_its_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A writer that may not chown (not root, where the old journal is another user's): simulated,
    # as a process of another user cannot run this interpreter (it lives in root's home).
    def refused(fd: int, uid: int, gid: int) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    path = tmp_path / "theirs.jsonl"
    storage = LocalFileStorage(path)
    await storage.write('{"n":0}\n')
    os.chown(path, 4321, 8765)
    os.chmod(path, 0o640)
    monkeypatch.setattr(os, "fchown", refused)
    with caplog.at_level(logging.WARNING, logger="yoink"):
        await storage.replace(lines('{"n":1}\n'))
    await storage.close()
    assert caplog.messages == [
        f"the new journal {path}{REPLACEMENT_SUFFIX} is owned by 0:0, not 4321:8765 as the old one was "
        "(Operation not permitted); it has the old one's permission bits"
    ]
    info = os.stat(path)
    assert (info.st_uid, info.st_gid, mode(path)) == (0, 0, 0o640)
    assert path.read_text() == '{"n":1}\n'


async def test_a_journal_behind_a_symlink_is_compacted_where_the_link_points(tmp_path: Path) -> None:
    real = tmp_path / "real.jsonl"
    link = tmp_path / "link.jsonl"
    real.write_text('{"n":0}\n')
    link.symlink_to(real)
    first = LocalFileStorage(link)
    await first.write('{"n":1}\n')
    await first.replace(lines('{"snapshot":1}\n'))
    assert link.is_symlink(), "compaction replaced the link with a regular file"
    assert os.readlink(link) == str(real)
    assert real.read_text() == '{"snapshot":1}\n', "the file the link points to is not the new journal"
    assert not Path(str(real) + REPLACEMENT_SUFFIX).exists()
    assert not Path(str(link) + REPLACEMENT_SUFFIX).exists()
    for path in (real, link):
        second = LocalFileStorage(path)
        with pytest.raises(CheckpointLockedError):
            await second.write('{"intruder":1}\n')
        await second.close()
    await first.write('{"n":2}\n')
    await first.close()
    assert real.read_text() == '{"snapshot":1}\n{"n":2}\n'
    assert [line async for line in LocalFileStorage(link).read()] == [real.read_text()]
    third = LocalFileStorage(real)  # and once the first is closed, a writer on the target may write
    await third.write('{"n":3}\n')
    await third.close()


async def test_a_link_pointed_elsewhere_during_replace_keeps_both_files(tmp_path: Path) -> None:
    real = tmp_path / "real.jsonl"
    other = tmp_path / "other.jsonl"
    link = tmp_path / "link.jsonl"
    other.write_text('{"other":0}\n')
    link.symlink_to(real)
    storage = LocalFileStorage(link)
    await storage.write('{"n":0}\n')

    def repoint() -> None:
        link.unlink()
        link.symlink_to(other)

    with pytest.raises(StorageError, match=r"no longer leads to the file this storage writes") as refused:
        await storage.replace(lines('{"snapshot":1}\n', during=repoint))
    assert str(refused.value).endswith("the old journal is kept")
    assert real.read_text() == '{"n":0}\n'
    assert other.read_text() == '{"other":0}\n'
    assert not Path(str(real) + REPLACEMENT_SUFFIX).exists()
    await storage.close()


async def test_a_crashed_compactions_leftover_beside_a_links_target_is_removed(tmp_path: Path) -> None:
    real = tmp_path / "real.jsonl"
    link = tmp_path / "link.jsonl"
    real.write_text('{"n":0}\n')
    link.symlink_to(real)
    leftover = Path(str(real) + REPLACEMENT_SUFFIX)
    leftover.write_text('{"half":')
    storage = LocalFileStorage(link)
    await storage.write('{"n":1}\n')
    await storage.close()
    assert not leftover.exists()


async def test_a_failed_directory_fsync_after_the_swap_does_not_fail_replace_and_the_next_flush_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "j.jsonl"
    fsync = os.fsync

    def failing_directory_fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error")
        fsync(fd)

    storage = LocalFileStorage(path)
    await storage.write('{"n":0}\n')
    await storage.flush()
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", failing_directory_fsync)
        with caplog.at_level(logging.WARNING, logger="yoink.storage._local"):
            await storage.replace(lines('{"snapshot":1}\n'))  # the new journal is in place: no raise
        assert path.read_text() == '{"snapshot":1}\n'
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings == [
            f"the new journal is in place of {path}, but fsync of its directory failed (Input/output "
            "error): the directory entry may not be durable, and a power cut may bring the old journal "
            "back; the next flush() fsyncs the directory again"
        ]
        with pytest.raises(StorageError) as failed:
            await storage.flush()  # nothing written since: the directory alone is to sync
        assert str(failed.value) == (
            f"fsync of {tmp_path} failed: Input/output error; the compacted journal is in place of "
            f"{path}, but a power cut may bring the old one back"
        )
    with spy_on_fsync(monkeypatch) as fsyncs:
        await storage.flush()
        assert fsyncs.directories() == [str(tmp_path)], "the flush did not fsync the directory again"
        await storage.write('{"n":1}\n')
        await storage.flush()
    assert fsyncs.directories() == [str(tmp_path)], "the directory was fsynced again once it had succeeded"
    await storage.close()
    assert path.read_text() == '{"snapshot":1}\n{"n":1}\n'


async def test_a_failed_directory_fsync_after_the_swap_is_retried_at_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "j.jsonl"
    fsync = os.fsync

    def failing_directory_fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error")
        fsync(fd)

    storage = LocalFileStorage(path, fsync=False)  # the swap is made durable all the same
    await storage.write('{"n":0}\n')
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", failing_directory_fsync)
        await storage.replace(lines('{"snapshot":1}\n'))
    with spy_on_fsync(monkeypatch) as fsyncs:
        await storage.close()
    assert fsyncs.directories() == [str(tmp_path)], "close() left the swap's directory entry unsynced"


# 5,000 records fit in the new journal's last write; 20,000 (2 MiB) need writes before it.
@pytest.mark.parametrize("records", [5000, 20000], ids=["in-the-last-write", "in-a-write-before-it"])
def test_a_snapshot_the_disk_refuses_part_way_is_a_storage_error_that_keeps_the_old_journal(
    tmp_path: Path, records: int
) -> None:
    """RLIMIT_FSIZE makes the kernel refuse the new journal's write past 64 KiB (as a full disk
    would): a StorageError that says the old journal is kept (attack B5: a bare OSError), and it is."""
    child = run_python(
        """
        import asyncio, glob, resource, signal, sys
        from yoink import CheckpointManager, StorageError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        async def main():
            async with CheckpointManager.from_uri(sys.argv[1]) as manager:
                await manager.append_many({"old": n} for n in range(1000))
                await manager.flush()
                resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))
                try:
                    await manager.compact({"new": n, "pad": "x" * 100} for n in range(int(sys.argv[2])))
                except StorageError as exc:
                    print("error:", exc)
                resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
                await manager.append({"old": 1000})
            print("left beside it:", glob.glob(sys.argv[1] + ".*"))
        asyncio.run(main())
        """,
        str(tmp_path / "j.jsonl"),
        str(records),
    )
    assert child.returncode == 0, child.stderr
    new_journal = f"{tmp_path / 'j.jsonl'}{REPLACEMENT_SUFFIX}"
    assert (
        f"error: cannot write the new journal {new_journal}: File too large; the old one is kept"
        in child.stdout
    )
    assert "left beside it: []" in child.stdout
    assert (tmp_path / "j.jsonl").read_text() == "".join(f'{{"old":{n}}}\n' for n in range(1001))


@pytest.mark.skipif(os.geteuid() != 0, reason="making a device node takes root")
async def test_a_journal_that_is_not_a_regular_file_is_not_compacted_and_stays_as_it_is(
    tmp_path: Path,
) -> None:
    """A rename would put a regular file in place of a device (attack B3: `yoink compact /dev/null`
    made /dev/null a file, and a policy did it in the background)."""
    null = tmp_path / "null"
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    async with CheckpointManager.from_uri(f"file://{null}?fsync=false") as checkpoint:
        await checkpoint.append({"k": 1})
        await checkpoint.flush()
        for compaction in (checkpoint.compact(key="k"), checkpoint.compact([{"k": 2}])):
            with pytest.raises(StorageError, match=f"cannot compact {null}: .* is not a regular file"):
                await compaction
        await checkpoint.append({"k": 3})
    assert stat.S_ISCHR(os.stat(null).st_mode)
    assert not Path(f"{null}{REPLACEMENT_SUFFIX}").exists()


async def failing_after(text: str, failure: Callable[[], None]) -> AsyncIterator[str]:
    """The new journal's text: ``text``, then ``failure`` runs (and raises)."""
    yield text
    failure()


async def test_a_failed_replace_whose_new_journal_someone_removed_raises_its_own_error(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j.jsonl"
    storage = LocalFileStorage(path)
    await storage.write('{"n":0}\n')

    def remove_then_fail() -> None:
        os.unlink(f"{path}{REPLACEMENT_SUFFIX}")  # another process cleans up meanwhile
        raise ValueError("the snapshot failed")

    with pytest.raises(ValueError, match="^the snapshot failed$"):
        await storage.replace(failing_after('{"n":1}\n', remove_then_fail))
    await storage.write('{"n":2}\n')
    await storage.close()
    assert path.read_text() == '{"n":0}\n{"n":2}\n'


async def test_a_journal_deleted_under_its_writer_is_not_compacted_back_into_place(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    storage = LocalFileStorage(path)
    await storage.write('{"n":0}\n')
    path.unlink()
    with pytest.raises(StorageError) as refused:
        await storage.replace(lines('{"n":1}\n'))
    assert str(refused.value) == (
        f"{path} no longer leads to the file this storage writes ({path}): it was moved, deleted or its "
        "link pointed elsewhere; nothing was replaced, the old journal is kept"
    )
    assert sorted(os.listdir(tmp_path)) == [], "a journal appeared where the deleted one was"
    await storage.close()


async def test_a_journal_whose_path_cannot_be_looked_up_is_not_compacted_and_says_why(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    path = tmp_path / "run" / "j.jsonl"
    storage = LocalFileStorage(path)
    await storage.write('{"n":0}\n')
    (tmp_path / "run").rename(tmp_path / "moved")
    (tmp_path / "run").write_text("a file where the directory was")
    with pytest.raises(StorageError) as refused:
        await storage.replace(lines('{"n":1}\n'))
    assert str(refused.value) == (
        f"cannot compact {path}: [Errno 20] Not a directory: '{path}'; the old journal is kept"
    )
    await storage.close()
    assert (tmp_path / "moved" / "j.jsonl").read_text() == '{"n":0}\n'


async def test_a_new_journal_that_cannot_be_created_says_why_and_keeps_the_old_one(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    storage = LocalFileStorage(path)
    await storage.write('{"n":0}\n')
    Path(f"{path}{REPLACEMENT_SUFFIX}").mkdir()  # in the new journal's way, and not removable as a file
    with pytest.raises(StorageError) as refused:
        await storage.replace(lines('{"n":1}\n'))
    assert str(refused.value) == (
        f"cannot write the new journal {path}{REPLACEMENT_SUFFIX}: Is a directory; the old one is kept"
    )
    await storage.write('{"n":2}\n')
    await storage.close()
    assert path.read_text() == '{"n":0}\n{"n":2}\n'


async def test_a_new_journal_that_cannot_take_the_old_ones_mode_is_removed_and_the_old_one_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # fchmod fails where the file system refuses modes: simulated, as every local one here allows them.
    def refused(fd: int, mode: int) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    path = tmp_path / "j.jsonl"
    storage = LocalFileStorage(path)
    await storage.write('{"n":0}\n')
    with monkeypatch.context() as patch:
        patch.setattr(os, "fchmod", refused)
        with pytest.raises(StorageError) as failed:
            await storage.replace(lines('{"n":1}\n'))
    assert str(failed.value) == (
        f"cannot give the new journal {path}{REPLACEMENT_SUFFIX} the permissions of {path}: Operation not "
        "permitted; the old one is kept"
    )
    assert not Path(f"{path}{REPLACEMENT_SUFFIX}").exists()
    await storage.replace(lines('{"n":1}\n'))  # and the next compaction works
    await storage.write('{"n":2}\n')
    await storage.close()
    assert path.read_text() == '{"n":1}\n{"n":2}\n'


async def test_a_new_journal_whose_fsync_fails_is_not_swapped_in_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    path = tmp_path / "j.jsonl"
    storage = LocalFileStorage(path, fsync=False)  # the new journal is fsynced all the same
    await storage.write('{"n":0}\n')
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", failing_fsync)
        with pytest.raises(StorageError) as failed:
            await storage.replace(lines('{"n":1}\n'))
    assert str(failed.value) == (
        f"cannot put the new journal in place of {path}: [Errno 5] Input/output error; the old one is kept"
    )
    assert not Path(f"{path}{REPLACEMENT_SUFFIX}").exists()
    await storage.write('{"n":2}\n')
    await storage.close()
    assert path.read_text() == '{"n":0}\n{"n":2}\n'


async def test_a_flush_after_a_compaction_with_nothing_appended_fsyncs_nothing_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The swap fsynced the new journal: it is durable, and the next flush has nothing to do."""
    path = tmp_path / "j.jsonl"
    storage = LocalFileStorage(path)
    await storage.write('{"n":0}\n')
    with spy_on_fsync(monkeypatch) as fsyncs:
        await storage.replace(lines('{"n":1}\n'))
        await storage.flush()
        assert fsyncs.sizes(f"{path}{REPLACEMENT_SUFFIX}") == [8]  # the swap's, before the rename
        assert fsyncs.sizes(path) == [], "the journal was fsynced again with nothing written to it"
        await storage.write('{"n":2}\n')
        await storage.flush()
    assert fsyncs.sizes(path) == [16]
    await storage.close()


async def test_a_compaction_succeeds_when_closing_the_old_journal_reports_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() releases a descriptor whatever it reports (EIO on a network file system): the new
    journal is in place by then, and replace() says it is."""
    close_locked = local_module.close_locked

    def close_reporting_an_error(fd: int) -> None:
        close_locked(fd)
        raise OSError(errno.EIO, "Input/output error")

    path = tmp_path / "j.jsonl"
    storage = LocalFileStorage(path)
    await storage.write('{"n":0}\n')
    with monkeypatch.context() as patch:
        patch.setattr(local_module, "close_locked", close_reporting_an_error)
        await storage.replace(lines('{"n":1}\n'))
    await storage.write('{"n":2}\n')
    await storage.close()
    assert path.read_text() == '{"n":1}\n{"n":2}\n'


def test_a_write_undone_after_a_compaction_leaves_the_next_one_at_the_end_of_the_journal(
    tmp_path: Path,
) -> None:
    """The compacted journal is appended to through the descriptor the new journal was written with:
    a write cut part-way (RLIMIT_FSIZE) is undone by a truncation, and the retry must land at the
    new end of the file (O_APPEND), not where the cut write stopped, past a hole of zeros."""
    child = run_python(
        """
        import asyncio, resource, signal, sys
        from yoink import CheckpointManager, StorageError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        async def main():
            async with CheckpointManager.from_uri(sys.argv[1], flush_interval=None) as manager:
                await manager.append_many({"old": n} for n in range(100))
                await manager.compact({"new": n} for n in range(10))
                with open(sys.argv[1], "rb") as f:
                    size = len(f.read())
                resource.setrlimit(resource.RLIMIT_FSIZE, (size + 1000, resource.RLIM_INFINITY))
                await manager.append_many({"late": n, "pad": "x" * 100} for n in range(100))
                try:
                    await manager.flush()
                except StorageError as exc:
                    print("error:", exc)
                resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
                await manager.flush()  # the batch again, whole
        asyncio.run(main())
        """,
        str(tmp_path / "j.jsonl"),
    )
    assert child.returncode == 0, child.stderr
    assert "File too large; the journal is unchanged" in child.stdout
    journal = (tmp_path / "j.jsonl").read_bytes()
    assert b"\0" not in journal, "the retried write left a hole of zeros in the journal"
    late = b"".join(b'{"late":%d,"pad":"%s"}\n' % (n, b"x" * 100) for n in range(100))
    assert journal.endswith(b"".join(b'{"new":%d}\n' % n for n in range(10)) + late)


def in_a_forked_child(storage: LocalFileStorage) -> str:
    """Fork; the child writes to its copy of ``storage`` (in a thread, with a deadline) and says how
    that went."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            answer: list[str] = []

            def use() -> None:
                try:
                    anyio.run(storage.write, '{"n":"child"}\n')
                    answer.append("written")
                except Exception as exc:
                    answer.append(f"refused: {type(exc).__name__}")

            thread = threading.Thread(target=use, daemon=True)
            thread.start()
            thread.join(5)
            os.write(write, (answer[0] if answer else "hung").encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as answer_pipe:
        said = answer_pipe.read().decode()
    os.waitpid(pid, 0)
    return said


async def failing_snapshot() -> AsyncIterator[str]:
    yield '{"n":1}\n'
    raise ValueError("the snapshot's records failed")


@pytest.mark.parametrize(
    "when", ["while-it-is-written", "after-a-failed-compaction", "after-a-snapshot-that-failed"]
)
async def test_a_child_forked_around_a_compaction_is_refused_its_parents_storage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """A child lets go of its copies of the journal's and the new journal's descriptors, and its
    storage is closed: it never writes to its parent's journal."""
    path = tmp_path / "j.jsonl"
    storage = LocalFileStorage(path)
    await storage.write('{"n":0}\n')
    answers: list[str] = []
    if when == "after-a-snapshot-that-failed":  # the new journal is dropped after it was written to
        with pytest.raises(ValueError, match="the snapshot's records failed"):
            await storage.replace(failing_snapshot())
        answers.append(in_a_forked_child(storage))
        await storage.replace(lines('{"n":1}\n'))
    elif when == "after-a-failed-compaction":

        def refused(fd: int, mode: int) -> None:
            raise PermissionError(errno.EPERM, "Operation not permitted")

        with monkeypatch.context() as patch:
            patch.setattr(os, "fchmod", refused)
            with pytest.raises(StorageError, match="the permissions of"):
                await storage.replace(lines('{"n":1}\n'))
        answers.append(in_a_forked_child(storage))
        await storage.replace(lines('{"n":1}\n'))
    else:
        await storage.replace(lines('{"n":1}\n', during=lambda: answers.append(in_a_forked_child(storage))))
    await storage.write('{"n":2}\n')
    await storage.close()
    assert answers == ["refused: StorageClosedError"]
    assert path.read_text() == '{"n":1}\n{"n":2}\n'


async def test_a_write_during_replace_larger_than_a_piece_is_carried_whole(tmp_path: Path) -> None:
    path = tmp_path / "carried.jsonl"
    big = "".join(f'{{"n":{n},"pad":"{"x" * 100}"}}\n' for n in range(30_000))  # 3.3 MiB
    async with LocalFileStorage(path) as storage:
        await storage.write('{"old":1}\n')

        async def write_big() -> None:
            await storage.write(big)

        assert await replace_while_writing(storage, lines('{"new":1}\n'), write_big) is None
        await storage.write('{"after":1}\n')
    assert path.read_text() == '{"new":1}\n' + big + '{"after":1}\n'


async def test_what_is_written_while_the_carry_is_copied_is_copied_before_the_swap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The carry is copied once with writes going on, then the rest with writes held: a write
    that lands during the first copy is in the new journal."""
    path = tmp_path / "carried.jsonl"
    copy_to = local_module._Carry.copy_to
    copies: list[int] = []

    def copy_with_a_write_landing(carry: Any, fd: int, journal: str, end: int) -> None:
        if not copies:  # the first copy, writes going on: one lands after the end it was given
            with open(path, "a") as other:
                other.write('{"landed":1}\n')
        copies.append(end)
        copy_to(carry, fd, journal, end)

    monkeypatch.setattr(local_module._Carry, "copy_to", copy_with_a_write_landing)
    async with LocalFileStorage(path) as storage:
        await storage.write('{"old":1}\n')

        async def write() -> None:
            await storage.write('{"during":1}\n')

        assert await replace_while_writing(storage, lines('{"new":1}\n'), write) is None
    assert len(copies) == 2
    assert copies[1] > copies[0]
    assert path.read_text() == '{"new":1}\n{"during":1}\n{"landed":1}\n'


async def test_a_storage_closed_during_replace_keeps_the_old_journal_with_what_was_written(
    tmp_path: Path,
) -> None:
    path = tmp_path / "closed.jsonl"
    storage = LocalFileStorage(path)
    await storage.write('{"old":1}\n')

    async def write_and_close() -> None:
        await storage.write('{"during":1}\n')
        await storage.close()

    raised = await replace_while_writing(storage, lines('{"new":1}\n'), write_and_close)
    assert isinstance(raised, StorageError), raised
    assert path.read_text() == '{"old":1}\n{"during":1}\n'
    assert not os.path.exists(str(path) + REPLACEMENT_SUFFIX)


async def test_a_journal_cut_short_under_its_writer_during_replace_is_not_swapped(tmp_path: Path) -> None:
    path = tmp_path / "cut.jsonl"
    async with LocalFileStorage(path) as storage:
        await storage.write('{"old":1}\n{"old":2}\n')

        async def write_then_cut() -> None:
            await storage.write('{"during":1}\n')
            os.truncate(path, 5)  # another program, not a writer of yoink's

        raised = await replace_while_writing(storage, lines('{"new":1}\n'), write_then_cut)
    assert isinstance(raised, StorageError)
    assert "cut short" in str(raised)
    assert not os.path.exists(str(path) + REPLACEMENT_SUFFIX)


@pytest.mark.parametrize("copy", ["with writes going on", "with writes held"])
async def test_a_journal_cut_short_while_the_carry_is_copied_is_not_swapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, copy: str
) -> None:
    """Cut after the copy was told where the journal ends: the copy finds the file ends sooner."""
    path = tmp_path / "cut.jsonl"
    copy_to = local_module._Carry.copy_to
    copies: list[int] = []

    def cut_then_copy(carry: Any, fd: int, journal: str, end: int) -> None:
        copies.append(end)
        if copy == "with writes going on":
            os.truncate(path, 5)  # another program, between the end's measure and the copy
        elif len(copies) == 1:  # another program appends, then cuts in the middle of it
            copy_to(carry, fd, journal, end)
            with open(path, "a") as other:
                other.write('{"landed":1}\n')
            return
        else:
            os.truncate(path, carry.copied + 3)
        copy_to(carry, fd, journal, end)

    monkeypatch.setattr(local_module._Carry, "copy_to", cut_then_copy)
    async with LocalFileStorage(path) as storage:
        await storage.write('{"old":1}\n')

        async def write() -> None:
            await storage.write('{"during":1}\n')

        raised = await replace_while_writing(storage, lines('{"new":1}\n'), write)
    assert isinstance(raised, StorageError)
    assert str(raised) == (
        f"{path} was cut short by another program during the compaction; nothing was replaced, the "
        "old journal is kept as it is"
    )
    if copy == "with writes going on":
        assert path.read_bytes() == b'{"old'
    else:
        assert path.read_bytes() == b'{"old":1}\n{"during":1}\n{"l'
    assert not os.path.exists(str(path) + REPLACEMENT_SUFFIX)


@pytest.mark.parametrize("copy", ["with writes going on", "with writes held"])
@pytest.mark.parametrize("fails", ["read", "write"])
async def test_a_carry_the_disk_fails_names_the_journal_and_keeps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, copy: str, fails: str
) -> None:
    path = tmp_path / "failing.jsonl"
    copy_to = local_module._Carry.copy_to
    copies: list[int] = []
    pread, write = os.pread, os.write

    def failing_copy(carry: Any, fd: int, journal: str, end: int) -> None:
        copies.append(end)
        if (len(copies) == 1) != (copy == "with writes going on"):
            return copy_to(carry, fd, journal, end)
        if len(copies) == 2:  # something to copy at the second: another program appends
            with open(path, "a") as other:
                other.write('{"landed":1}\n')
            end = os.path.getsize(path)

        def failing_pread(descriptor: int, *args: Any) -> bytes:
            if descriptor == carry.fd and fails == "read":
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return pread(descriptor, *args)

        def failing_write(descriptor: int, data: Any) -> int:
            if descriptor == fd and fails == "write":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return write(descriptor, data)

        with monkeypatch.context() as patch:
            patch.setattr(os, "pread", failing_pread)
            patch.setattr(os, "write", failing_write)
            copy_to(carry, fd, journal, end)

    monkeypatch.setattr(local_module._Carry, "copy_to", failing_copy)
    async with LocalFileStorage(path) as storage:
        await storage.write('{"old":1}\n')

        async def write_during() -> None:
            await storage.write('{"during":1}\n')

        raised = await replace_while_writing(storage, lines('{"new":1}\n'), write_during)
        await storage.write('{"after":1}\n')
    assert isinstance(raised, StorageError), raised
    journal = os.path.realpath(path)
    if fails == "read":
        assert str(raised) == (
            f"cannot read {journal} to carry what was written during the compaction: "
            f"{os.strerror(errno.EIO)}; the old journal is kept"
        )
    else:
        assert str(raised) == (
            f"cannot write the new journal {journal}{REPLACEMENT_SUFFIX}: {os.strerror(errno.ENOSPC)}; "
            "the old one is kept"
        )
    assert path.read_text().startswith('{"old":1}\n{"during":1}\n')
    assert path.read_text().endswith('{"after":1}\n')
    assert not os.path.exists(str(path) + REPLACEMENT_SUFFIX)


class _ChangedAsItBegins(LocalFileStorage):
    """Another program changes the journal's path just after replace() set up its new file."""

    change: Callable[[], None]

    def _open_replacement(self) -> tuple[int, str]:
        opened = super()._open_replacement()
        self.change()
        return opened


async def test_a_journal_replaced_as_the_compaction_begins_is_not_compacted(tmp_path: Path) -> None:
    path, other = tmp_path / "job.jsonl", tmp_path / "other.jsonl"
    other.write_text('{"other":1}\n')
    storage = _ChangedAsItBegins(path)
    storage.change = lambda: os.rename(other, path)
    async with storage:
        await storage.write('{"old":1}\n')
        with pytest.raises(StorageError) as raised:
            await storage.replace(lines('{"new":1}\n'))
    assert str(raised.value) == (
        f"{path} was moved or replaced as the compaction began; nothing was replaced, the old journal is kept"
    )
    assert path.read_text() == '{"other":1}\n'
    assert not os.path.exists(str(path) + REPLACEMENT_SUFFIX)


async def test_a_journal_removed_as_the_compaction_begins_is_not_compacted(tmp_path: Path) -> None:
    path = tmp_path / "job.jsonl"
    storage = _ChangedAsItBegins(path)
    storage.change = lambda: os.unlink(path)
    async with storage:
        await storage.write('{"old":1}\n')
        with pytest.raises(StorageError) as raised:
            await storage.replace(lines('{"new":1}\n'))
    assert str(raised.value) == (
        f"cannot compact {path}: [Errno 2] No such file or directory: '{path}'; the old journal is kept"
    )
    assert not os.path.exists(path)
    assert not os.path.exists(str(path) + REPLACEMENT_SUFFIX)


async def test_a_compaction_leaves_no_descriptor_open_behind_it(tmp_path: Path) -> None:
    path = tmp_path / "job.jsonl"
    async with LocalFileStorage(path) as storage:
        await storage.write('{"old":1}\n')
        await storage.flush()
        before = len(os.listdir("/proc/self/fd"))
        for n in range(3):

            async def write(n: int = n) -> None:
                await storage.write(f'{{"during":{n}}}\n')

            assert await replace_while_writing(storage, lines(f'{{"new":{n}}}\n'), write) is None
        assert len(os.listdir("/proc/self/fd")) == before
