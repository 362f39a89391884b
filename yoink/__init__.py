"""yoink: an async checkpoint journal that lets a long job resume where it stopped.

>>> from yoink import CheckpointManager
>>> async with CheckpointManager.from_uri("./crawl.jsonl") as checkpoint:
...     done = {record["url"] async for record in checkpoint.replay()}
...     await checkpoint.append({"url": "https://example.com/", "status": 200})
"""

from __future__ import annotations

from yoink._compaction import Compaction, CompactionPolicy
from yoink._exceptions import (
    CheckpointLockedError,
    ClaimError,
    CompactionNotSupportedError,
    ConcurrentWriterError,
    CorruptCheckpointError,
    FingerprintMismatchError,
    LedgerError,
    MissingDependencyError,
    NotALedgerError,
    ReadOnlyError,
    StorageClosedError,
    StorageError,
    UnknownSchemeError,
    YoinkError,
)
from yoink._ledger import Claim, Ledger, Progress
from yoink._manager import CheckpointManager
from yoink.storage import CheckpointStorage, StorageFactory

__all__ = [
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

__version__ = "0.1.0.dev0"
