"""FsspecStorage on fsspec's memory and local filesystems: the contract, crashes, two writers,
compaction."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import fsspec
import fsspec.implementations.memory
import pytest

from yoink import (
    CheckpointManager,
    CompactionNotSupportedError,
    ConcurrentWriterError,
    MissingDependencyError,
    StorageError,
    StorageFactory,
)
from yoink.storage import FsspecStorage
from yoink.testing import StorageContract
from yoink.testing._contract import _text as read_text


@pytest.mark.usefixtures("async_backend")
class TestFsspecMemoryAppending(StorageContract):
    @pytest.fixture
    def storage(self, tmp_path: Path) -> FsspecStorage:
        return FsspecStorage(f"fsspec+memory://{uuid.uuid4().hex}/j.jsonl", stage_dir=tmp_path / "stage")


@pytest.mark.usefixtures("async_backend")
class TestFsspecMemoryRewriting(StorageContract):
    """A store that cannot append: each flush rewrites the file."""

    @pytest.fixture
    def storage(self, tmp_path: Path) -> FsspecStorage:
        uri = f"fsspec+memory://{uuid.uuid4().hex}/j.jsonl"
        return FsspecStorage(uri, stage_dir=tmp_path / "stage", append=False)


@pytest.mark.usefixtures("async_backend")
class TestFsspecLocal(StorageContract):
    @pytest.fixture
    def storage(self, tmp_path: Path) -> FsspecStorage:
        return FsspecStorage(f"fsspec+file://{tmp_path}/j.jsonl", stage_dir=tmp_path / "stage")


def test_cloud_schemes_resolve_to_fsspec_and_a_missing_driver_is_named() -> None:
    for scheme in ("gs", "az", "abfs", "hdfs", "fsspec+memory"):
        assert StorageFactory.resolve(scheme) is FsspecStorage
    with pytest.raises(
        MissingDependencyError, match="gs://bucket/j.jsonl needs fsspec's driver for it: .*gcsfs"
    ):
        StorageFactory.from_uri("gs://bucket/j.jsonl")


async def test_a_second_writer_elsewhere_gets_concurrent_writer_error_and_loses_nothing(
    tmp_path: Path,
) -> None:
    uri = f"fsspec+memory://{uuid.uuid4().hex}/j.jsonl"
    first = FsspecStorage(uri, stage_dir=tmp_path / "machine-a")
    second = FsspecStorage(uri, stage_dir=tmp_path / "machine-b")
    assert await read_text(first) == await read_text(second) == ""
    await first.write('{"n":0}\n')
    await first.flush()
    await second.write('{"n":100}\n')
    with pytest.raises(
        ConcurrentWriterError, match="size went from 0 to 8 bytes.*stay staged in .*machine-b"
    ):
        await second.flush()
    with pytest.raises(ConcurrentWriterError):
        await second.close()
    await first.close()
    assert fsspec.filesystem("memory").cat_file(uri.removeprefix("fsspec+")) == b'{"n":0}\n'
    async with FsspecStorage(uri, stage_dir=tmp_path / "machine-b") as recovered:
        assert await read_text(recovered) == '{"n":0}\n{"n":100}\n'  # the refused record, still staged
        await recovered.flush()
    assert fsspec.filesystem("memory").cat_file(uri.removeprefix("fsspec+")) == b'{"n":0}\n{"n":100}\n'


def _run_child(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh Python, as a writer process that a test may kill or starve."""
    command = [sys.executable, "-c", textwrap.dedent(code), *args]
    return subprocess.run(command, capture_output=True, text=True)


# A writer that flushes {"n":0}, stages {"n":1} and {"n":2} and then dies at ``sys.argv[4]``: at the
# start of the stage's discard, at the clearing of the upload's intent, or part-way through the upload
# (the file refuses bytes past a limit, as a full disk or a dropped connection would).
_DYING_WRITER = """
    import os, resource, signal, sys, anyio
    from yoink.storage import FsspecStorage
    from yoink.storage._stage import Stage

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    async def main():
        uri, stage_dir, append, kill_at = sys.argv[1:5]
        storage = FsspecStorage(uri, stage_dir=stage_dir, append=append == "True")
        await storage.write('{"n":0}\\n')
        await storage.flush()
        await storage.write('{"n":1}\\n{"n":2,"pad":"%s"}\\n' % ("x" * 1000))
        if kill_at == "during-upload":
            size = os.path.getsize(uri.removeprefix("fsspec+file://"))
            resource.setrlimit(resource.RLIMIT_FSIZE, (size + 500, resource.RLIM_INFINITY))
            try:
                await storage.flush()
            finally:
                die()
        setattr(Stage, kill_at, die)
        await storage.flush()

    anyio.run(main)
"""
_RECORDS = '{"n":0}\n{"n":1}\n{"n":2,"pad":"%s"}\n' % ("x" * 1000)


@pytest.mark.parametrize("kill_at", ["discard", "clear_intent", "during-upload"])
@pytest.mark.parametrize("append", [True, False])
def test_kill_9_during_or_just_after_an_upload_uploads_nothing_twice_and_leaves_no_fragment(
    tmp_path: Path, append: bool, kill_at: str
) -> None:
    uri = f"fsspec+file://{tmp_path}/journal.jsonl"
    child = _run_child(_DYING_WRITER, uri, str(tmp_path / "stage"), str(append), kill_at)
    assert child.returncode == -9, child.stderr
    if kill_at == "during-upload" and append:  # the upload did leave a fragment behind
        assert len('{"n":0}\n') < (tmp_path / "journal.jsonl").stat().st_size < len(_RECORDS)

    async def recover() -> None:
        async with FsspecStorage(uri, stage_dir=tmp_path / "stage") as storage:
            assert await read_text(storage) == _RECORDS
            await storage.write('{"n":3}\n')
            await storage.flush()
            assert await read_text(storage) == _RECORDS + '{"n":3}\n'

    anyio.run(recover)
    assert (tmp_path / "journal.jsonl").read_text() == _RECORDS + '{"n":3}\n'


def test_an_upload_that_fails_part_way_is_undone_and_the_next_flush_makes_it_once(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    child = _run_child(
        """
        import os, resource, sys, anyio
        from yoink import CheckpointManager, StorageError

        async def main():
            async with CheckpointManager.from_uri(
                sys.argv[1], stage_dir=sys.argv[2], flush_interval=None
            ) as manager:
                await manager.append_many({"i": i, "pad": "x" * 100} for i in range(100))
                await manager.flush()
                size = os.path.getsize(sys.argv[1].removeprefix("fsspec+file://"))
                await manager.append_many({"i": i, "pad": "y" * 100} for i in range(100, 200))
                resource.setrlimit(resource.RLIMIT_FSIZE, (size + 5000, resource.RLIM_INFINITY))
                try:
                    await manager.flush()
                except StorageError as exc:
                    print("refused:", type(exc).__name__, os.path.getsize(sys.argv[1][14:]) - size)
                resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
                await manager.flush()
                print("flushed")

        anyio.run(main)
        """,
        f"fsspec+file://{path}",
        str(tmp_path / "stage"),
    )
    assert child.stdout == "refused: StorageError 5000\nflushed\n", child.stderr[-3000:]
    assert [json.loads(line)["i"] for line in path.read_text().splitlines()] == list(range(200))


def test_a_fragment_that_another_writer_changed_is_never_cut_and_the_stage_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    uri = f"fsspec+file://{path}"
    child = _run_child(_DYING_WRITER, uri, str(tmp_path / "stage"), "True", "during-upload")
    assert child.returncode == -9, child.stderr
    theirs = '{"n":0}\n{"theirs":1}\n'  # another writer replaced the fragment with its own record
    path.write_text(theirs)

    async def recover() -> None:
        storage = FsspecStorage(uri, stage_dir=tmp_path / "stage")
        await storage.write('{"n":3}\n')
        with pytest.raises(ConcurrentWriterError, match="another writer"):
            await storage.flush()
        with pytest.raises(ConcurrentWriterError):
            await storage.close()

    anyio.run(recover)
    assert path.read_text() == theirs
    assert sorted(p.name for p in (tmp_path / "stage").glob("*/*.jsonl")) == [
        "000000000002.jsonl",
        "000000000003.jsonl",
    ]


async def test_a_replay_on_the_memory_filesystem_while_flushes_append_sees_every_record(
    tmp_path: Path,
) -> None:
    uri = f"fsspec+memory://{uuid.uuid4().hex}/j.jsonl"
    storage = FsspecStorage(uri, stage_dir=tmp_path / "stage")
    lines = [f'{{"n":{n},"pad":"{"x" * 200}"}}\n' for n in range(20_000)]  # 4 MiB: replay reads it in parts
    await storage.write("".join(lines[:15_000]))
    await storage.flush()
    replay = storage.read()
    blocks = [await anext(replay)]
    for start in range(15_000, 20_000, 500):  # another task appends and flushes while the replay is under way
        await storage.write("".join(lines[start : start + 500]))
        await storage.flush()
    blocks += [block async for block in replay]
    replayed = "".join(block if block.endswith("\n") else block + "\n" for block in blocks).splitlines(True)
    assert len(replayed) == 15_000, f"the replay saw {len(replayed)} of the 15,000 records it began with"
    assert replayed == lines[:15_000]  # what the file held when the replay began, and nothing else
    assert (await read_text(storage)).splitlines(True) == lines
    await storage.close()


class _OvertakingMemoryFileSystem(fsspec.implementations.memory.MemoryFileSystem):
    """A memory filesystem on which another writer appends its record just as this one opens the file."""

    protocol = "yoink-overtaken"
    overtake = False

    def _open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        if mode == "ab" and type(self).overtake:
            type(self).overtake = False
            with super()._open(path, "ab") as file:
                file.write(b'{"theirs":1}\n')
        return super()._open(path, mode, *args, **kwargs)


async def test_a_writer_overtaken_between_its_check_and_its_append_is_refused_and_uploads_nothing_twice(
    tmp_path: Path,
) -> None:
    fsspec.register_implementation("yoink-overtaken", _OvertakingMemoryFileSystem, clobber=True)
    uri = f"fsspec+yoink-overtaken://{uuid.uuid4().hex}/j.jsonl"
    storage = FsspecStorage(uri, stage_dir=tmp_path / "stage")
    await storage.write('{"n":0}\n')
    await storage.flush()
    await storage.write('{"n":1}\n')
    _OvertakingMemoryFileSystem.overtake = True
    with pytest.raises(ConcurrentWriterError, match="follow the other writer's records"):
        await storage.flush()
    await storage.write('{"n":2}\n')
    with pytest.raises(ConcurrentWriterError, match="stay staged"):
        await storage.flush()
    with pytest.raises(ConcurrentWriterError):
        await storage.close()
    reader = FsspecStorage(uri, stage_dir=tmp_path / "elsewhere")
    assert await read_text(reader) == '{"n":0}\n{"theirs":1}\n{"n":1}\n'
    await reader.close()
    assert [p.name for p in (tmp_path / "stage").glob("*/*.jsonl")] == ["000000000003.jsonl"]  # {"n":2}


FILESYSTEMS = ["memory, appending", "memory, rewriting", "local"]


def _foreign_file(filesystem: str, tmp_path: Path, body: bytes) -> tuple[str, dict[str, Any]]:
    """A journal written by another tool, holding ``body``; its URI and the storage's options."""
    options: dict[str, Any] = {"stage_dir": tmp_path / "stage", "flush_interval": None}
    if filesystem == "local":
        (tmp_path / "j.jsonl").write_bytes(body)
        return f"fsspec+file://{tmp_path}/j.jsonl", options
    uri = f"fsspec+memory://{uuid.uuid4().hex}/j.jsonl"
    fsspec.filesystem("memory").pipe_file(uri.removeprefix("fsspec+memory://"), body)
    if filesystem == "memory, rewriting":
        options["append"] = False
    return uri, options


@pytest.mark.parametrize("filesystem", FILESYSTEMS)
@pytest.mark.parametrize(("last_line", "kept"), [(b'{"n":-1}', [-1]), (b'{"n":-1,"cut', [])])
async def test_a_foreign_files_last_line_without_a_newline_is_ended_as_a_record_or_set_aside_before_appending(
    tmp_path: Path, filesystem: str, last_line: bytes, kept: list[int]
) -> None:
    from yoink import CheckpointManager

    body = b'{"n":0}\n{"n":1}\n' + last_line
    uri, options = _foreign_file(filesystem, tmp_path, body)
    expected = [0, 1, *kept, 2, 3]
    async with CheckpointManager.from_uri(uri, **options) as manager:
        assert [r["n"] async for r in manager.replay()] == [0, 1, *kept]
        await manager.append_many([{"n": 2}, {"n": 3}])
        assert [r["n"] async for r in manager.replay()] == expected  # the same before the upload...
        await manager.flush()
    options["stage_dir"] = tmp_path / "reader"
    async with CheckpointManager.from_uri(uri, **options) as reader:
        assert [r["n"] async for r in reader.replay()] == expected  # ...and after it
    fs, path = fsspec.core.url_to_fs(uri.removeprefix("fsspec+"))
    if not kept:
        assert fs.cat_file(path + ".torn") == last_line + b"\n"


@pytest.mark.parametrize("filesystem", FILESYSTEMS)
@pytest.mark.parametrize(
    "last_lines",
    [b"[1,2]\n", b'{"n": -1, "cut\n\n', b'{"n": -1, "cut\n \n\t\n  '],
    ids=["array", "torn", "blanks"],
)
async def test_a_foreign_files_whole_last_line_that_is_not_a_record_is_set_aside_before_appending(
    tmp_path: Path, filesystem: str, last_lines: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    # Replay skips it as a torn last line; records appended after it would make it a corrupt one.
    from yoink import CheckpointManager

    body = b'{"n":0}\n{"n":1}\n' + last_lines
    uri, options = _foreign_file(filesystem, tmp_path, body)
    async with CheckpointManager.from_uri(uri, **options) as manager:
        assert [r["n"] async for r in manager.replay()] == [0, 1]
        await manager.append_many([{"n": 2}, {"n": 3}])
        with caplog.at_level(logging.WARNING, logger="yoink"):
            await manager.flush()
        assert [r["n"] async for r in manager.replay()] == [0, 1, 2, 3]
    assert f"from byte offset 16, to {uri.removeprefix('fsspec+')}.torn" in caplog.text
    options["stage_dir"] = tmp_path / "reader"
    async with CheckpointManager.from_uri(uri, **options) as reader:
        assert [r["n"] async for r in reader.replay()] == [0, 1, 2, 3]
    fs, path = fsspec.core.url_to_fs(uri.removeprefix("fsspec+"))
    assert fs.cat_file(path + ".torn") == last_lines + b"\n"
    assert fs.cat_file(path) == b'{"n":0}\n{"n":1}\n{"n":2}\n{"n":3}\n'


@pytest.mark.parametrize("append", [True, False])
def test_a_landed_upload_that_another_stage_appended_after_is_replayed_once_by_the_stage_that_made_it(
    tmp_path: Path, append: bool
) -> None:
    uri = f"fsspec+file://{tmp_path}/journal.jsonl"
    child = _run_child(_DYING_WRITER, uri, str(tmp_path / "machine-a"), str(append), "discard")
    assert child.returncode == -9, child.stderr
    theirs = '{"theirs":1}\n'

    async def then() -> None:
        async with FsspecStorage(uri, stage_dir=tmp_path / "machine-b") as other:
            assert await read_text(other) == _RECORDS
            await other.write(theirs)
        reader = FsspecStorage(uri, stage_dir=tmp_path / "machine-a")  # reads only: never takes the stage
        assert await read_text(reader) == _RECORDS + theirs
        await reader.close()
        async with FsspecStorage(uri, stage_dir=tmp_path / "machine-a") as writer:
            assert await read_text(writer) == _RECORDS + theirs
            await writer.write('{"n":3}\n')

    anyio.run(then)
    assert (tmp_path / "journal.jsonl").read_text() == _RECORDS + theirs + '{"n":3}\n'
    assert not list((tmp_path / "machine-a").glob("*/*.jsonl"))


async def _stage_holding(tmp_path: Path, records: str) -> tuple[str, Path]:
    """A journal flushed from a stage that still holds ``records`` staged; its URI and stage directory."""
    uri = f"fsspec+file://{tmp_path}/j.jsonl"
    async with FsspecStorage(uri, stage_dir=tmp_path / "stage") as storage:
        await storage.write('{"n":0}\n')
        await storage.flush()
        directory = Path(storage.stage_directory)
    (directory / "000000000007.jsonl").write_text(records)  # a crashed writer's batch
    return uri, directory


async def test_a_directory_named_like_a_staged_batch_is_ignored_by_readers_and_named_to_writers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    uri, directory = await _stage_holding(tmp_path, '{"n":1}\n')
    (directory / "000000000005.jsonl").mkdir()
    reader = FsspecStorage(uri, stage_dir=tmp_path / "stage")
    assert await reader.exists()
    assert await read_text(reader) == '{"n":0}\n{"n":1}\n'
    await reader.close()
    assert "000000000005.jsonl" in caplog.text
    assert "not a regular file" in caplog.text
    writer = FsspecStorage(uri, stage_dir=tmp_path / "stage")
    with pytest.raises(StorageError, match=r"000000000005\.jsonl.*remove it"):
        await writer.write('{"n":2}\n')
    await writer.close()
    assert (tmp_path / "j.jsonl").read_text() == '{"n":0}\n'
    assert (directory / "000000000007.jsonl").read_text() == '{"n":1}\n'  # kept


@pytest.mark.parametrize(
    "intent",
    [
        '{"writer": "%s", "first": 7, "through": 7, "before": 8, "after": Infinity}',
        '{"writer": "%s", "first": 7, "through": 7, "before": 8, "after": 16.5}',
        '{"writer": "%s", "first": 7, "through": 7, "before": 16, "after": 8}',
        '["%s"]',
        "{",
    ],
)
async def test_an_upload_record_yoink_did_not_write_is_ignored_by_readers_and_named_to_writers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, intent: str
) -> None:
    uri, directory = await _stage_holding(tmp_path, '{"n":1}\n')
    writer_id = json.loads((directory / "stage.json").read_text())["writer"]
    (directory / "upload.json").write_text(intent.replace("%s", writer_id))
    reader = FsspecStorage(uri, stage_dir=tmp_path / "stage")
    assert await read_text(reader) == '{"n":0}\n{"n":1}\n'
    await reader.close()
    assert "upload.json" in caplog.text
    writer = FsspecStorage(uri, stage_dir=tmp_path / "stage")
    await writer.write('{"n":2}\n')
    with pytest.raises(StorageError, match=r"is not one yoink wrote.*remove upload\.json"):
        await writer.flush()
    with pytest.raises(StorageError):
        await writer.close()
    assert (tmp_path / "j.jsonl").read_text() == '{"n":0}\n'


# -- compaction (replace()); the contract's promises run in the classes at the top ---------------


async def _chunks(*texts: str, during: Callable[[], Awaitable[None]] | None = None) -> AsyncIterator[str]:
    """``texts`` as replace() takes them; ``during`` runs after the first."""
    for index, text in enumerate(texts):
        if index == 1 and during is not None:
            await during()
        yield text


async def test_a_filesystem_without_an_atomic_swap_refuses_to_compact_and_keeps_its_journal(
    tmp_path: Path,
) -> None:
    (tmp_path / "dir").mkdir()
    options = {"path": str(tmp_path / "dir"), "target_protocol": "file"}  # not LocalFileSystem itself
    async with FsspecStorage(
        "fsspec+dir://j.jsonl", stage_dir=tmp_path / "stage", storage_options=options
    ) as storage:
        await storage.write('{"n":0}\n')
        await storage.flush()
        await storage.write('{"n":1}\n')
        with pytest.raises(CompactionNotSupportedError, match="'dir' filesystem.*journal is unchanged"):
            await storage.replace(_chunks('{"n":9}\n'))
        assert (tmp_path / "dir" / "j.jsonl").read_text() == '{"n":0}\n'  # not even the staged record went
        assert await read_text(storage) == '{"n":0}\n{"n":1}\n'
    assert (tmp_path / "dir" / "j.jsonl").read_text() == '{"n":0}\n{"n":1}\n'


@pytest.mark.parametrize("filesystem", ["memory", "local"])
async def test_a_compaction_while_a_writer_elsewhere_appends_is_refused_and_both_writers_records_stay(
    tmp_path: Path, filesystem: str
) -> None:
    if filesystem == "local":
        uri = f"fsspec+file://{tmp_path}/j.jsonl"
    else:
        uri = f"fsspec+memory://{uuid.uuid4().hex}/j.jsonl"
    compactor = FsspecStorage(uri, stage_dir=tmp_path / "machine-a")
    await compactor.write('{"n":0}\n')
    await compactor.flush()
    other = FsspecStorage(uri, stage_dir=tmp_path / "machine-b")

    async def other_writes() -> None:
        await other.write('{"theirs":1}\n')
        await other.close()

    with pytest.raises(
        ConcurrentWriterError, match="size went from 8 to 21 bytes.*compaction was not applied"
    ):
        await compactor.replace(_chunks('{"n":9}\n', '{"n":10}\n', during=other_writes))
    reader = FsspecStorage(uri, stage_dir=tmp_path / "reader")
    assert await read_text(reader) == '{"n":0}\n{"theirs":1}\n'
    await reader.close()
    await compactor.write('{"n":1}\n')
    with pytest.raises(ConcurrentWriterError):
        await compactor.close()
    if filesystem == "local":
        assert sorted(p.name for p in tmp_path.iterdir()) == ["j.jsonl", "machine-a", "machine-b"]


async def test_a_local_compaction_is_a_rename_that_keeps_the_mode_and_clears_a_crashed_ones_leftover(
    tmp_path: Path,
) -> None:
    """And only its own journal's: ``j.jsonl.x``'s new journal, beside it, is another job's."""
    path = tmp_path / "j.jsonl"
    async with FsspecStorage(f"fsspec+file://{path}", stage_dir=tmp_path / "stage") as storage:
        await storage.write('{"n":0}\n')
        await storage.flush()
        path.chmod(0o640)
        inode = path.stat().st_ino
        (tmp_path / "j.jsonl.4242.0badc0de.yoink-compact").write_text('{"half":')  # a crashed compaction's
        (tmp_path / "j.jsonl.x.4243.0badc0de.yoink-compact").write_text('{"x":')  # j.jsonl.x's, under way
        await storage.replace(_chunks('{"n":9}\n'))
        assert path.stat().st_ino != inode
        assert path.stat().st_mode & 0o777 == 0o640
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "j.jsonl",
            "j.jsonl.x.4243.0badc0de.yoink-compact",
            "stage",
        ]
        await storage.write('{"n":10}\n')
    assert path.read_text() == '{"n":9}\n{"n":10}\n'


_DYING_COMPACTOR = """
    import os, signal, sys, anyio
    from yoink.storage import FsspecStorage
    from yoink.storage import _fsspec_file

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    async def main():
        storage = FsspecStorage(sys.argv[1], stage_dir=sys.argv[2])

        async def snapshot():
            yield '{"n":9}\\n'
            await storage.write('{"n":3}\\n')  # flushed during the compaction: the swap carries it
            await storage.flush()
            yield '{"n":10}\\n'
            if sys.argv[3] == "mid-snapshot":
                die()

        await storage.write('{"n":0}\\n{"n":1}\\n')
        await storage.flush()
        await storage.write('{"n":2}\\n')  # staged: replace() uploads it first
        if sys.argv[3] == "before-the-last-carry":
            _fsspec_file._LocalSwap.sync = die
        if sys.argv[3] == "after-the-rename":
            _fsspec_file._LocalSwap.discard = die
        await storage.replace(snapshot())

    anyio.run(main)
"""


@pytest.mark.parametrize(
    ("kill_at", "journal"),
    [("mid-snapshot", "old"), ("before-the-last-carry", "old"), ("after-the-rename", "new")],
)
def test_kill_9_during_a_local_compaction_leaves_the_old_journal_or_the_new_one_and_the_next_writer_goes_on(
    tmp_path: Path, kill_at: str, journal: str
) -> None:
    """Either way with the record flushed during the compaction: in the old file, or carried."""
    path = tmp_path / "journal.jsonl"
    uri = f"fsspec+file://{path}"
    child = _run_child(_DYING_COMPACTOR, uri, str(tmp_path / "stage"), kill_at)
    assert child.returncode == -9, child.stderr
    whole = '{"n":0}\n{"n":1}\n{"n":2}\n{"n":3}\n' if journal == "old" else '{"n":9}\n{"n":10}\n{"n":3}\n'
    assert path.read_text() == whole

    async def recover() -> None:
        async with FsspecStorage(uri, stage_dir=tmp_path / "stage") as storage:
            assert await read_text(storage) == whole
            await storage.write('{"n":4}\n')
            await storage.flush()
            await storage.replace(_chunks(whole, '{"n":4}\n'))  # clears what a crash left beside it

    anyio.run(recover)
    assert path.read_text() == whole + '{"n":4}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal.jsonl", "stage"]


def test_a_stage_left_elsewhere_by_an_upload_cut_short_before_a_compaction_is_refused_and_kept(
    tmp_path: Path,
) -> None:
    uri = f"fsspec+file://{tmp_path}/journal.jsonl"
    child = _run_child(_DYING_WRITER, uri, str(tmp_path / "machine-a"), "True", "discard")
    assert child.returncode == -9, child.stderr

    async def then() -> None:
        async with FsspecStorage(uri, stage_dir=tmp_path / "machine-b") as compactor:
            assert await read_text(compactor) == _RECORDS
            await compactor.replace(_chunks('{"n":9}\n{"n":10}\n{"n":11}\n'))
        writer = FsspecStorage(uri, stage_dir=tmp_path / "machine-a")
        with pytest.raises(ConcurrentWriterError, match="not the upload of this stage"):
            await writer.flush()
        with pytest.raises(ConcurrentWriterError):
            await writer.close()

    anyio.run(then)
    assert (tmp_path / "journal.jsonl").read_text() == '{"n":9}\n{"n":10}\n{"n":11}\n'
    assert [p.name for p in (tmp_path / "machine-a").glob("*/*.jsonl")] == ["000000000002.jsonl"]


# -- flushes during a compaction: the swap carries what they appended after the cut ------------


def _compacted_uri(tmp_path: Path, filesystem: str) -> str:
    if filesystem == "local":
        return f"fsspec+file://{tmp_path}/j.jsonl"
    return f"fsspec+memory://{uuid.uuid4().hex}/j.jsonl"


async def _write_and_flush(storage: FsspecStorage, first: int, count: int) -> None:
    for n in range(first, first + count):
        await storage.write(f'{{"n":{n}}}\n')
        await storage.flush()


def _numbered(first: int, count: int) -> str:
    return "".join(f'{{"n":{n}}}\n' for n in range(first, first + count))


@pytest.mark.parametrize("filesystem", ["memory", "local"])
async def test_flushes_during_a_compaction_are_in_the_file_at_once_and_follow_the_snapshot_after_it(
    tmp_path: Path, filesystem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from yoink.storage import _fsspec

    monkeypatch.setattr(_fsspec, "_CARRY_BYTES", 16)  # the carry in many reads and rounds
    uri = _compacted_uri(tmp_path, filesystem)
    storage = FsspecStorage(uri, stage_dir=tmp_path / "stage")
    assert storage.writes_during_replace
    await _write_and_flush(storage, 0, 3)

    async def flushes() -> None:
        await _write_and_flush(storage, 3, 40)
        reader = FsspecStorage(uri, stage_dir=tmp_path / "reader")
        assert await read_text(reader) == _numbered(0, 43), "flushed, yet not in the file"
        await reader.close()

    await storage.replace(_chunks('{"snapshot":1}\n', '{"snapshot":2}\n', during=flushes))
    await _write_and_flush(storage, 43, 1)
    await storage.close()
    reader = FsspecStorage(uri, stage_dir=tmp_path / "reader")
    assert await read_text(reader) == '{"snapshot":1}\n{"snapshot":2}\n' + _numbered(3, 41)
    await reader.close()


async def test_a_compaction_ends_though_flushes_outpace_its_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each round of the copy with uploads going on sees more uploaded than it copied: the last
    round is made with them held, after a few."""
    from yoink.storage import _fsspec

    monkeypatch.setattr(_fsspec, "_CARRY_BYTES", 16)
    storage = FsspecStorage(_compacted_uri(tmp_path, "local"), stage_dir=tmp_path / "stage")
    await _write_and_flush(storage, 0, 1)
    copy = storage._carry
    rounds = 0

    async def outpaced(swap: Any, start: int) -> int:
        nonlocal rounds
        end = await copy(swap, start)
        if not storage._flush_lock.locked():  # a round with uploads going on: more land as it copies
            rounds += 1
            await _write_and_flush(storage, 1000 + 3 * rounds, 3)
        return end

    monkeypatch.setattr(storage, "_carry", outpaced)

    async def flushes() -> None:
        await _write_and_flush(storage, 1, 2)

    with anyio.fail_after(20):
        await storage.replace(_chunks('{"snapshot":1}\n', '{"snapshot":2}\n', during=flushes))
    assert rounds == 16
    outpacing = "".join(_numbered(1000 + 3 * n, 3) for n in range(1, rounds + 1))
    expected = '{"snapshot":1}\n{"snapshot":2}\n' + _numbered(1, 2) + outpacing
    assert await read_text(storage) == expected
    await storage.close()


async def test_an_upload_that_failed_part_way_during_a_compaction_is_settled_before_the_swap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its fragment is in the old file after the bytes to carry: the swap cuts it off and uploads
    the batch again, once, rather than taking it for another writer's change."""
    path = tmp_path / "j.jsonl"
    storage = FsspecStorage(f"fsspec+file://{path}", stage_dir=tmp_path / "stage")
    await _write_and_flush(storage, 0, 2)
    append = storage._file.append

    def fails_part_way(data: bytes, size: int) -> None:
        with open(path, "ab") as file:
            file.write(data[: len(data) // 2])
        monkeypatch.setattr(storage._file, "append", append)
        raise OSError(5, "Input/output error")

    async def flushes() -> None:
        await _write_and_flush(storage, 2, 1)
        monkeypatch.setattr(storage._file, "append", fails_part_way)
        await storage.write('{"n":3,"pad":"xxxxxxxxxxxxxxxx"}\n')
        with pytest.raises(StorageError, match="Input/output error.*they stay staged"):
            await storage.flush()

    await storage.replace(_chunks('{"snapshot":1}\n', '{"snapshot":2}\n', during=flushes))
    assert path.read_text() == '{"snapshot":1}\n{"snapshot":2}\n{"n":2}\n{"n":3,"pad":"xxxxxxxxxxxxxxxx"}\n'
    await _write_and_flush(storage, 4, 1)
    await storage.close()
    assert path.read_text().endswith('"}\n{"n":4}\n')


async def test_a_journal_cut_short_by_another_program_during_a_compaction_is_not_swapped(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j.jsonl"
    storage = FsspecStorage(f"fsspec+file://{path}", stage_dir=tmp_path / "stage")
    await _write_and_flush(storage, 0, 2)

    async def flushes_then_cut() -> None:
        await _write_and_flush(storage, 2, 2)
        os.truncate(path, len(_numbered(0, 3)))  # another program cuts the last flushed record off

    with pytest.raises(StorageError, match="cut short by another program.*the old journal is kept"):
        await storage.replace(_chunks('{"snapshot":1}\n', '{"snapshot":2}\n', during=flushes_then_cut))
    assert path.read_text() == _numbered(0, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["j.jsonl", "stage"]
    await storage.close()


@pytest.mark.parametrize("filesystem", ["memory", "local"])
async def test_another_tools_torn_last_line_is_set_aside_before_the_cut_not_carried(
    tmp_path: Path, filesystem: str
) -> None:
    """The cut is at a line's end: a torn tail set aside by the first flush after it would move
    the bytes to carry under it (and carry a piece of the next record)."""
    uri = _compacted_uri(tmp_path, filesystem)
    fs, path = fsspec.core.url_to_fs(uri.removeprefix("fsspec+"))
    fs.pipe_file(path, b'{"n":0}\n{"n":1')
    storage = FsspecStorage(uri, stage_dir=tmp_path / "stage")

    async def flushes() -> None:
        await _write_and_flush(storage, 2, 2)

    await storage.replace(_chunks('{"snapshot":1}\n', '{"snapshot":2}\n', during=flushes))
    await storage.close()
    assert fs.cat_file(path) == b'{"snapshot":1}\n{"snapshot":2}\n' + _numbered(2, 2).encode()
    assert fs.cat_file(path + ".torn") == b'{"n":1\n'


@pytest.mark.parametrize("filesystem", ["memory", "local"])
async def test_close_during_a_compaction_waits_for_its_swap_with_what_was_flushed_meanwhile(
    tmp_path: Path, filesystem: str
) -> None:
    uri = _compacted_uri(tmp_path, filesystem)
    storage = FsspecStorage(uri, stage_dir=tmp_path / "stage")
    await _write_and_flush(storage, 0, 2)
    closed = anyio.Event()

    async def close() -> None:
        await storage.close()
        closed.set()

    async with anyio.create_task_group() as tasks:

        async def flushes_then_close() -> None:
            await _write_and_flush(storage, 2, 2)
            await storage.write('{"n":4}\n')  # staged: close() uploads it, after the swap
            tasks.start_soon(close)
            await anyio.sleep(0.1)
            assert not closed.is_set(), "close() returned before the compaction under way ended"

        await storage.replace(_chunks('{"snapshot":1}\n', '{"snapshot":2}\n', during=flushes_then_close))
    assert closed.is_set()
    reader = FsspecStorage(uri, stage_dir=tmp_path / "reader")
    assert await read_text(reader) == '{"snapshot":1}\n{"snapshot":2}\n' + _numbered(2, 3)
    await reader.close()


@pytest.mark.parametrize("filesystem", ["memory", "local"])
async def test_a_writer_paused_in_its_append_while_another_compacts_is_refused_and_keeps_its_batch(
    tmp_path: Path, filesystem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writer B checks the file's size and is paused before its write (a SIGSTOP, a frozen VM);
    writer A compacts meanwhile, and its fence sees the size it expects. B's bytes then go to
    the file A's swap replaced: B must not take them for landed (and drop its staged batch)."""
    import threading
    import time

    uri = _compacted_uri(tmp_path, filesystem)
    journal = str(tmp_path / "j.jsonl")
    a = FsspecStorage(uri, stage_dir=tmp_path / "machine-a")
    await _write_and_flush(a, 0, 2)
    b = FsspecStorage(uri, stage_dir=tmp_path / "machine-b")
    assert await read_text(b) == _numbered(0, 2)
    armed, paused, go = threading.Event(), threading.Event(), threading.Event()

    def pause() -> None:
        armed.clear()
        paused.set()
        assert go.wait(10)
        time.sleep(0.01)

    if filesystem == "local":
        fstat = os.fstat

        def paused_fstat(fd: int) -> os.stat_result:  # B's check of the size, just before its write
            found = fstat(fd)
            if armed.is_set() and os.readlink(f"/proc/self/fd/{fd}") == journal:
                pause()
            return found

        monkeypatch.setattr(os, "fstat", paused_fstat)
    else:
        memory = fsspec.filesystem("memory")
        real_open = memory.open

        def paused_open(path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
            file = real_open(path, mode, *args, **kwargs)
            if mode == "ab" and armed.is_set():
                pause()
            return file

        monkeypatch.setattr(memory, "open", paused_open)
    await b.write('{"writer":"B"}\n')
    armed.set()
    async with anyio.create_task_group() as tasks:

        async def b_flushes() -> None:
            with pytest.raises(ConcurrentWriterError, match="compaction replaced it.*stay staged"):
                await b.flush()

        tasks.start_soon(b_flushes)
        while not paused.is_set():
            await anyio.sleep(0.01)
        await a.replace(_chunks('{"snapshot":1}\n'))
        go.set()
    await a.close()
    reader = FsspecStorage(uri, stage_dir=tmp_path / "reader")
    assert await read_text(reader) == '{"snapshot":1}\n'
    await reader.close()
    assert await read_text(b) == '{"snapshot":1}\n{"writer":"B"}\n', "B's batch is no longer staged"
    with pytest.raises(ConcurrentWriterError):
        await b.close()


def _slow_view(storage: FsspecStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    """The storage's look at the file comes 0.3 s late (a slow stat, a loaded machine)."""
    import time

    view = storage._file.view

    def slow() -> Any:
        time.sleep(0.3)
        return view()

    monkeypatch.setattr(storage._file, "view", slow)


async def _read_while(storage: FsspecStorage, during: Callable[[], Awaitable[None]]) -> str:
    """``storage``'s journal as a read begun 0.1 s before ``during()`` yields it."""
    read: list[str] = []
    async with anyio.create_task_group() as tasks:

        async def replay() -> None:
            read.append(await read_text(storage))

        tasks.start_soon(replay)
        await anyio.sleep(0.1)
        await during()
    return read[0]


@pytest.mark.parametrize("filesystem", ["memory", "local"])
async def test_a_read_while_the_writer_flushes_yields_each_record_once(
    tmp_path: Path, filesystem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read takes the stage's batches, then looks at the file: a flush that uploaded them and
    deleted them in between must not leave them in both (a replay beside the job's flushes)."""
    storage = FsspecStorage(_compacted_uri(tmp_path, filesystem), stage_dir=tmp_path / "stage")
    await _write_and_flush(storage, 0, 1)
    await storage.write('{"n":1}\n')
    _slow_view(storage, monkeypatch)
    assert await _read_while(storage, storage.flush) == _numbered(0, 2)
    await storage.close()


def test_a_reader_of_a_dead_writers_stage_reads_each_record_once_while_the_next_writer_uploads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"fsspec+file://{tmp_path}/journal.jsonl"
    child = _run_child(_DYING_WRITER, uri, str(tmp_path / "stage"), "True", "seal")
    assert child.returncode == -9, child.stderr

    async def then() -> None:
        reader = FsspecStorage(uri, stage_dir=tmp_path / "stage")  # yoink cat, beside the next writer
        _slow_view(reader, monkeypatch)

        async def next_writer() -> None:
            async with FsspecStorage(uri, stage_dir=tmp_path / "stage") as writer:
                await writer.flush()  # takes the stage over and uploads the dead writer's batches

        assert await _read_while(reader, next_writer) == _RECORDS
        await reader.close()

    anyio.run(then)
    assert (tmp_path / "journal.jsonl").read_text() == _RECORDS


_WRITER_THAT_FORKS_MID_UPLOAD = """
    import multiprocessing, os, sys, time, anyio
    from yoink.storage import FsspecStorage, _fsspec_file

    append = _fsspec_file._LocalFile.append

    def slow_append(self, data, size):
        time.sleep(30)  # a slow store: killed before it ends
        return append(self, data, size)

    def pool_worker(started):
        started.set()  # it runs: what the fork left it of the parent's is dropped by now
        time.sleep(60)

    async def main():
        storage = FsspecStorage(sys.argv[1], stage_dir=sys.argv[2])
        await storage.write('{"n":1}\\n')
        _fsspec_file._LocalFile.append = slow_append
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(storage.flush)
            await anyio.sleep(0.5)  # the upload holds its lock
            fork = multiprocessing.get_context("fork")
            started = fork.Event()
            child = fork.Process(target=pool_worker, args=(started,), daemon=False)
            child.start()
            assert started.wait(30)
            print(child.pid, flush=True)
            await anyio.sleep(60)

    anyio.run(main)
"""


def test_a_child_forked_during_an_upload_keeps_no_lock_once_the_writer_is_killed(tmp_path: Path) -> None:
    """A pool worker forked while an upload holds the stage's upload lock, its parent then killed:
    the next writer and a reader go on (the child closed its copy of the lock)."""
    import signal
    import time

    uri = f"fsspec+file://{tmp_path}/journal.jsonl"
    command = [
        sys.executable,
        "-c",
        textwrap.dedent(_WRITER_THAT_FORKS_MID_UPLOAD),
        uri,
        str(tmp_path / "stage"),
    ]
    writer = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None
    child = int(writer.stdout.readline())
    try:
        writer.kill()
        writer.wait()

        async def then() -> None:
            with anyio.fail_after(10):
                async with FsspecStorage(uri, stage_dir=tmp_path / "stage") as reader:
                    assert await read_text(reader) == '{"n":1}\n'
                async with FsspecStorage(uri, stage_dir=tmp_path / "stage") as next_writer:
                    await next_writer.flush()  # uploads the killed writer's batch

        anyio.run(then)
        assert (tmp_path / "journal.jsonl").read_text() == '{"n":1}\n'
    finally:
        writer.stdout.close()
        os.kill(child, signal.SIGKILL)
        time.sleep(0.1)


def test_a_fifo_in_place_of_the_stages_locks_freezes_no_reader_and_a_writer_is_told(tmp_path: Path) -> None:
    uri = f"fsspec+file://{tmp_path}/journal.jsonl"
    child = _run_child(_DYING_WRITER, uri, str(tmp_path / "stage"), "True", "seal")
    assert child.returncode == -9, child.stderr
    (directory,) = (tmp_path / "stage").iterdir()
    for name in ("uploading", "lock"):
        (directory / name).unlink()
        os.mkfifo(directory / name)

    async def then() -> None:
        with anyio.fail_after(5):
            reader = FsspecStorage(uri, stage_dir=tmp_path / "stage")
            assert await read_text(reader) == _RECORDS
            await reader.close()
            writer = FsspecStorage(uri, stage_dir=tmp_path / "stage")
            with pytest.raises(
                StorageError, match="cannot lock .*uploading for an upload.*not a regular file"
            ):
                await writer.flush()
            with pytest.raises(StorageError):
                await writer.close()

    anyio.run(then)
    assert (tmp_path / "journal.jsonl").read_text() == '{"n":0}\n'  # the staged records stay staged


def test_a_reader_creates_nothing_in_a_stage_and_waits_for_no_writer_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``yoink cat`` on a stage an older yoink left (no upload lock in it) adds nothing to it; and
    beside a live writer held up mid-upload it reads what the file holds, without waiting."""
    import time

    uri = f"fsspec+file://{tmp_path}/journal.jsonl"
    child = _run_child(_DYING_WRITER, uri, str(tmp_path / "stage"), "True", "seal")
    assert child.returncode == -9, child.stderr
    (directory,) = (tmp_path / "stage").iterdir()
    (directory / "uploading").unlink()
    left = sorted(path.name for path in directory.iterdir())

    async def then() -> None:
        reader = FsspecStorage(uri, stage_dir=tmp_path / "stage")
        assert await read_text(reader) == _RECORDS
        assert sorted(path.name for path in directory.iterdir()) == left
        writer = FsspecStorage(uri, stage_dir=tmp_path / "stage")
        append = writer._file.append

        def held_up(data: bytes, size: int) -> None:
            time.sleep(1)  # a stopped writer, its upload lock held
            append(data, size)

        monkeypatch.setattr(writer._file, "append", held_up)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(writer.flush)
            await anyio.sleep(0.3)
            with anyio.fail_after(0.5):
                assert await read_text(reader) == '{"n":0}\n'  # the writer's staged records are its own
        await writer.close()
        await reader.close()

    anyio.run(then)
    assert (tmp_path / "journal.jsonl").read_text() == _RECORDS


async def test_the_writers_replay_during_its_own_compaction_reads_one_journal_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compaction renames the new journal over the file while the replay opens it: the replay
    reads the file it opened (before, it looked at one file and opened another, and failed)."""
    import time

    path = tmp_path / "j.jsonl"
    storage = FsspecStorage(f"fsspec+file://{path}", stage_dir=tmp_path / "stage")
    await _write_and_flush(storage, 0, 2)
    await storage.write('{"n":2}\n')  # staged
    real_open = os.open
    slowed = []

    def slow_open(file: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(file) == str(path) and flags & os.O_ACCMODE == os.O_RDONLY and not slowed:
            slowed.append(file)
            time.sleep(0.3)  # the compaction renames meanwhile
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", slow_open)

    async def compact() -> None:
        await storage.replace(_chunks('{"snapshot":1}\n'))

    assert await _read_while(storage, compact) in (_numbered(0, 3), '{"snapshot":1}\n')
    assert slowed
    await storage.close()


def test_a_read_only_manager_on_a_crashed_writers_stage_uploads_nothing_as_it_closes(tmp_path: Path) -> None:
    """``yoink cat`` reads what a killed writer staged, and leaves it staged: its close() flushes
    nothing (a read-only manager's flush would take the stage over and upload it)."""
    uri = f"fsspec+file://{tmp_path}/journal.jsonl"
    child = _run_child(_DYING_WRITER, uri, str(tmp_path / "stage"), "True", "seal")
    assert child.returncode == -9, child.stderr

    async def read_only() -> None:
        async with CheckpointManager(
            FsspecStorage(uri, stage_dir=tmp_path / "stage"), read_only=True
        ) as reader:
            assert [record["n"] async for record in reader.replay()] == [0, 1, 2]

    anyio.run(read_only)
    assert (tmp_path / "journal.jsonl").read_text() == '{"n":0}\n'
    (directory,) = (tmp_path / "stage").iterdir()
    assert sorted(path.name for path in directory.glob("*.jsonl")) == ["000000000002.jsonl"]


async def test_a_writer_whose_upload_lock_was_removed_makes_it_again(tmp_path: Path) -> None:
    """A stage tidied by hand (its ``uploading`` removed) does not stop the writer's flushes."""
    storage = FsspecStorage(f"fsspec+file://{tmp_path}/j.jsonl", stage_dir=tmp_path / "stage")
    await _write_and_flush(storage, 0, 1)
    (Path(storage.stage_directory) / "uploading").unlink()
    await _write_and_flush(storage, 1, 1)
    assert (Path(storage.stage_directory) / "uploading").is_file()
    await storage.close()
    assert (tmp_path / "j.jsonl").read_text() == _numbered(0, 2)
