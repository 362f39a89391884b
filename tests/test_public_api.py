"""The public names: what users import, and the exception tree they catch."""

from __future__ import annotations

import pytest

import yoink
import yoink._exceptions
import yoink._manager
import yoink.storage
import yoink.storage._base
import yoink.storage._local
import yoink.storage._memory
from yoink import (
    CheckpointLockedError,
    CorruptCheckpointError,
    MissingDependencyError,
    ReadOnlyError,
    StorageClosedError,
    StorageError,
    UnknownSchemeError,
    YoinkError,
)


@pytest.mark.parametrize("module", [yoink, yoink.storage])
def test_all_is_sorted_and_every_name_in_it_exists(module: object) -> None:
    names = module.__all__  # type: ignore[attr-defined]
    assert names == sorted(names)
    assert all(hasattr(module, name) for name in names)


def test_the_documented_imports_work() -> None:
    from yoink import CheckpointManager, CheckpointStorage, StorageFactory
    from yoink.storage import CheckpointStorage as StorageAgain
    from yoink.storage import LocalFileStorage, MemoryStorage
    from yoink.storage import StorageFactory as FactoryAgain

    assert FactoryAgain is StorageFactory
    assert StorageAgain is CheckpointStorage
    assert CheckpointManager is yoink._manager.CheckpointManager
    assert CheckpointStorage is yoink.storage._base.CheckpointStorage
    assert LocalFileStorage is yoink.storage._local.LocalFileStorage
    assert MemoryStorage is yoink.storage._memory.MemoryStorage
    assert issubclass(LocalFileStorage, CheckpointStorage)
    assert issubclass(MemoryStorage, CheckpointStorage)


def test_all_names_the_public_api_and_nothing_else() -> None:
    assert yoink.__all__ == [
        "CheckpointLockedError",
        "CheckpointManager",
        "CheckpointStorage",
        "ConcurrentWriterError",
        "CorruptCheckpointError",
        "MissingDependencyError",
        "ReadOnlyError",
        "StorageClosedError",
        "StorageError",
        "StorageFactory",
        "UnknownSchemeError",
        "YoinkError",
    ]
    assert yoink.storage.__all__ == [
        "CheckpointStorage",
        "ClosableStorage",
        "FsspecStorage",
        "LocalFileStorage",
        "MemoryStorage",
        "RedisStreamStorage",
        "S3Storage",
        "StorageFactory",
        "uninterrupted",
    ]
    exceptions = {name: getattr(yoink, name) for name in yoink.__all__ if name.endswith("Error")}
    assert all(error is getattr(yoink._exceptions, name) for name, error in exceptions.items())


def test_the_optional_backends_are_imported_on_first_use_and_are_the_registered_ones() -> None:
    from yoink.storage import FsspecStorage, RedisStreamStorage, S3Storage
    from yoink.storage._fsspec import FsspecStorage as FsspecDirect
    from yoink.storage._redis import RedisStreamStorage as RedisDirect
    from yoink.storage._s3 import S3Storage as S3Direct

    assert (S3Storage, RedisStreamStorage, FsspecStorage) == (S3Direct, RedisDirect, FsspecDirect)
    for backend in (S3Storage, RedisStreamStorage, FsspecStorage):
        assert issubclass(backend, yoink.CheckpointStorage)
    with pytest.raises(AttributeError, match="module 'yoink.storage' has no attribute 'NoSuchStorage'"):
        yoink.storage.NoSuchStorage  # noqa: B018


def test_the_exception_tree() -> None:
    assert issubclass(StorageError, YoinkError)
    assert issubclass(CheckpointLockedError, StorageError)
    assert issubclass(StorageClosedError, StorageError)
    assert issubclass(ReadOnlyError, StorageError)
    assert issubclass(CorruptCheckpointError, YoinkError)
    assert issubclass(UnknownSchemeError, YoinkError)
    assert issubclass(UnknownSchemeError, ValueError)
    assert issubclass(MissingDependencyError, ImportError)
