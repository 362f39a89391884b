"""FsspecStorage on fsspec's memory and local filesystems: the contract, crashes, two writers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import anyio
import fsspec
import fsspec.implementations.memory
import pytest

from tests.conftest import read_text
from yoink import ConcurrentWriterError, MissingDependencyError, StorageFactory
from yoink.storage import FsspecStorage
from yoink.testing import StorageContract


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
