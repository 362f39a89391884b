"""Storage backends: where a :class:`~yoink.CheckpointManager` keeps its journal.

:class:`CheckpointStorage` is the contract, and :class:`ClosableStorage` the lifecycle a backend may
inherit; :class:`StorageFactory` turns a URI into a backend; :func:`uninterrupted` keeps a
backend's calls whole when their callers are cancelled.

The backends with optional dependencies (:class:`S3Storage`, :class:`RedisStreamStorage`,
:class:`FsspecStorage`) are imported on first use, so ``import yoink`` stays light. Without its
extra installed, using one raises :class:`~yoink.MissingDependencyError` (an ``ImportError``) that
names the extra, also from ``hasattr()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from yoink._tasks import uninterrupted
from yoink.storage._base import CheckpointStorage
from yoink.storage._factory import FSSPEC, REDIS, S3, StorageFactory, load_backend
from yoink.storage._lifecycle import ClosableStorage
from yoink.storage._local import LocalFileStorage
from yoink.storage._memory import MemoryStorage

if TYPE_CHECKING:
    from yoink.storage._fsspec import FsspecStorage
    from yoink.storage._redis import RedisStreamStorage
    from yoink.storage._s3 import S3Storage

__all__ = [
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

# Fixed: what StorageFactory.register() does to a URI scheme never changes these names.
_LAZY = {"FsspecStorage": FSSPEC, "RedisStreamStorage": REDIS, "S3Storage": S3}


def __getattr__(name: str) -> Any:
    """Import a backend with optional dependencies on first use: ``import yoink`` stays light."""
    entry = _LAZY.get(name)
    if entry is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    backend = load_backend(entry, needs=f"{__name__}.{name} needs", name=f"{__name__}.{name}")
    globals()[name] = backend  # found directly from now on
    return backend
