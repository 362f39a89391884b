"""Storage backends: where a :class:`~yoink.CheckpointManager` keeps its journal.

:class:`CheckpointStorage` is the contract, and :class:`ClosableStorage` the lifecycle a backend may
inherit; :class:`StorageFactory` turns a URI into a backend; :func:`uninterrupted` keeps a
backend's calls whole when their callers are cancelled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from yoink._tasks import uninterrupted
from yoink.storage._base import CheckpointStorage
from yoink.storage._factory import StorageFactory
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


def __getattr__(name: str) -> Any:
    """Import a backend with optional dependencies on first use: ``import yoink`` stays light."""
    if name == "S3Storage":
        return StorageFactory.resolve("s3")
    if name == "RedisStreamStorage":
        return StorageFactory.resolve("redis")
    if name == "FsspecStorage":
        return StorageFactory.resolve("fsspec+")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
