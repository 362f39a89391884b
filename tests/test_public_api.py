"""The public names: what users import, and the exception tree they catch."""

from __future__ import annotations

import subprocess
import sys

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
        "Claim",
        "ClaimError",
        "Compaction",
        "CompactionNotSupportedError",
        "CompactionPolicy",
        "ConcurrentWriterError",
        "CorruptCheckpointError",
        "FingerprintMismatchError",
        "Ledger",
        "LedgerError",
        "MissingDependencyError",
        "NotALedgerError",
        "Progress",
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


def test_the_optional_backends_are_imported_on_first_use_from_their_own_modules() -> None:
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


@pytest.fixture
def fresh_lazy_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget the backends yoink.storage has already imported, and restore the registry afterwards."""
    for name in ("FsspecStorage", "RedisStreamStorage", "S3Storage"):
        monkeypatch.delitem(vars(yoink.storage), name, raising=False)
    monkeypatch.setattr(yoink.StorageFactory, "_registry", dict(yoink.StorageFactory._registry))


@pytest.mark.usefixtures("fresh_lazy_names")
def test_replacing_a_scheme_in_the_registry_does_not_change_the_backend_names() -> None:
    class Mine(yoink.storage.MemoryStorage):
        pass

    from yoink.storage._s3 import S3Storage as S3Direct

    yoink.StorageFactory.register("s3", Mine, replace=True)
    yoink.StorageFactory.register("redis", Mine, replace=True)
    assert yoink.StorageFactory.resolve("s3") is Mine
    assert yoink.storage.S3Storage is S3Direct
    from yoink.storage import RedisStreamStorage

    assert RedisStreamStorage.__module__ == "yoink.storage._redis"


@pytest.mark.usefixtures("fresh_lazy_names")
def test_unregistering_a_scheme_does_not_break_importing_its_backend() -> None:
    for scheme in ("s3", "redis", "fsspec+"):
        yoink.StorageFactory.unregister(scheme)
    from yoink.storage import FsspecStorage, RedisStreamStorage, S3Storage

    assert [S3Storage.__name__, RedisStreamStorage.__name__, FsspecStorage.__name__] == [
        "S3Storage",
        "RedisStreamStorage",
        "FsspecStorage",
    ]


def test_a_backend_without_its_extra_raises_an_import_error_that_names_the_extra() -> None:
    # hasattr() only passes over AttributeError, so it raises this ImportError too: what an
    # ``from yoink.storage import RedisStreamStorage`` must say matters more (an AttributeError
    # would reach that import as a bare "cannot import name").
    code = (
        "import sys\n"
        "class WithoutRedis:  # what an install without the extra has\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] == 'redis':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, WithoutRedis())\n"
        "import yoink.storage\n"
        "from yoink import MissingDependencyError\n"
        "try:\n"
        "    from yoink.storage import RedisStreamStorage\n"
        "except MissingDependencyError as exc:\n"
        "    print('import:', exc)\n"
        "try:\n"
        "    hasattr(yoink.storage, 'RedisStreamStorage')\n"
        "except ImportError as exc:\n"
        "    print('hasattr:', type(exc).__name__)\n"
        "print('others:', yoink.storage.MemoryStorage.__name__, yoink.storage.StorageFactory.__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == [
        "import: yoink.storage.RedisStreamStorage needs the 'redis' extra: "
        "pip install 'yoink-checkpoint[redis]' (module 'redis' is missing)",
        "hasattr: MissingDependencyError",
        "others: MemoryStorage StorageFactory",
    ]
