"""FsspecStorage on fsspec's memory and local filesystems: the contract, crashes, two writers."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import fsspec
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


@pytest.mark.parametrize("append", [True, False])
def test_kill_9_after_an_upload_and_before_the_stage_is_cleared_uploads_nothing_twice(
    tmp_path: Path, append: bool
) -> None:
    uri = f"fsspec+file://{tmp_path}/journal.jsonl"
    code = textwrap.dedent(
        """
        import os, signal, sys, anyio
        from yoink.storage import FsspecStorage
        from yoink.storage._stage import Stage

        async def main():
            storage = FsspecStorage(sys.argv[1], stage_dir=sys.argv[2], append=sys.argv[3] == "True")
            await storage.write('{"n":0}\\n')
            await storage.flush()
            await storage.write('{"n":1}\\n{"n":2}\\n')
            Stage.clear_intent = lambda self: os.kill(os.getpid(), signal.SIGKILL)
            await storage.flush()

        anyio.run(main)
        """
    )
    child = subprocess.run(
        [sys.executable, "-c", code, uri, str(tmp_path / "stage"), str(append)],
        capture_output=True,
        text=True,
    )
    assert child.returncode == -9, child.stderr

    async def recover() -> None:
        async with FsspecStorage(uri, stage_dir=tmp_path / "stage") as storage:
            assert await read_text(storage) == '{"n":0}\n{"n":1}\n{"n":2}\n'
            await storage.write('{"n":3}\n')
            await storage.flush()

    import anyio

    anyio.run(recover)
    assert (tmp_path / "journal.jsonl").read_text() == '{"n":0}\n{"n":1}\n{"n":2}\n{"n":3}\n'
