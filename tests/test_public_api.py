"""The public names: what users import, and the exception tree they catch."""

from __future__ import annotations

import pytest

import yoink
import yoink.storage
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
    from yoink import CheckpointManager, StorageFactory
    from yoink.storage import CheckpointStorage, LocalFileStorage, MemoryStorage
    from yoink.storage import StorageFactory as FactoryAgain

    assert FactoryAgain is StorageFactory
    assert {CheckpointManager, CheckpointStorage, LocalFileStorage, MemoryStorage}


def test_the_exception_tree() -> None:
    assert issubclass(StorageError, YoinkError)
    assert issubclass(CheckpointLockedError, StorageError)
    assert issubclass(StorageClosedError, StorageError)
    assert issubclass(ReadOnlyError, StorageError)
    assert issubclass(CorruptCheckpointError, YoinkError)
    assert issubclass(UnknownSchemeError, YoinkError)
    assert issubclass(UnknownSchemeError, ValueError)
    assert issubclass(MissingDependencyError, ImportError)
