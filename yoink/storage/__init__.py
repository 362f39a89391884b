"""Storage backends: where a :class:`~yoink.CheckpointManager` keeps its journal.

:class:`CheckpointStorage` is the contract; :class:`StorageFactory` turns a URI into a backend.
"""

from __future__ import annotations

from yoink.storage._base import CheckpointStorage
from yoink.storage._factory import StorageFactory
from yoink.storage._local import LocalFileStorage
from yoink.storage._memory import MemoryStorage

__all__ = ["CheckpointStorage", "LocalFileStorage", "MemoryStorage", "StorageFactory"]
