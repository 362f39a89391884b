"""Every exception yoink raises on purpose.

::

    YoinkError
    ├── StorageError                  a backend could not do what was asked
    │   ├── CheckpointLockedError     another writer holds the journal
    │   ├── CompactionNotSupportedError  (also a NotImplementedError) the backend cannot replace
    │   ├── ConcurrentWriterError     another writer changed a remote journal under this one
    │   ├── ReadOnlyError             a read-only manager was asked to append or flush
    │   └── StorageClosedError        the storage or manager was used after close()
    ├── CorruptCheckpointError        a line in the middle of the journal is not a record
    ├── LedgerError                   a work ledger cannot do what was asked
    │   ├── ClaimError                (also a RuntimeError) a key is done, or claimed already
    │   ├── FingerprintMismatchError  the journal is another job's ledger
    │   └── NotALedgerError           the journal holds records that are not a ledger's
    ├── UnknownSchemeError            (also a ValueError) no backend for a URI's scheme
    └── MissingDependencyError        (also an ImportError) a backend's extra is not installed

Errors of the libraries underneath (OS errors, aiobotocore, redis-py) are translated into these at
the edge and chained with ``raise ... from exc``; they are never leaked on their own.
"""

from __future__ import annotations

__all__ = [
    "CheckpointLockedError",
    "ClaimError",
    "CompactionNotSupportedError",
    "ConcurrentWriterError",
    "CorruptCheckpointError",
    "FingerprintMismatchError",
    "LedgerError",
    "MissingDependencyError",
    "NotALedgerError",
    "ReadOnlyError",
    "StorageClosedError",
    "StorageError",
    "UnknownSchemeError",
    "YoinkError",
]


class YoinkError(Exception):
    """The root of every error yoink raises on purpose."""


class StorageError(YoinkError):
    """A storage backend failed; the message says what was kept and what was not."""


class CheckpointLockedError(StorageError):
    """Another writer holds the journal: yoink refuses a second writer instead of interleaving."""


class CompactionNotSupportedError(StorageError, NotImplementedError):
    """The storage cannot replace its journal (it does not implement ``replace()``): no compaction.

    The journal is untouched, and appending to it goes on as before.
    """


class ConcurrentWriterError(StorageError):
    """A remote journal changed since this writer last saw it: someone else writes it too.

    Nothing is lost: what this writer had not uploaded stays in its local stage.
    """


class ReadOnlyError(StorageError):
    """A manager opened with ``read_only=True`` was asked to append or flush."""


class StorageClosedError(StorageError):
    """A storage or a manager was used after ``close()``."""


class CorruptCheckpointError(YoinkError):
    """A line that is not a JSON object stands before the end of the journal.

    ``line`` is the 1-based line number and ``offset`` the byte offset of the line's start in the
    journal's text.
    """

    def __init__(self, message: str, *, line: int, offset: int) -> None:
        super().__init__(message)
        self.line = line
        self.offset = offset


class LedgerError(YoinkError):
    """A work ledger (:class:`~yoink.Ledger`) cannot do what was asked."""


class ClaimError(LedgerError, RuntimeError):
    """A key was claimed that is done already, or claimed by another task right now."""


class FingerprintMismatchError(LedgerError):
    """The ledger's journal was written by a job with another fingerprint; the message shows both.

    ``stored`` is the journal's fingerprint, ``given`` the one :meth:`~yoink.Ledger.open` was given.
    """

    def __init__(self, message: str, *, stored: object, given: object) -> None:
        super().__init__(message)
        self.stored = stored
        self.given = given


class NotALedgerError(LedgerError):
    """The journal holds records that a ledger did not write (it was written by plain appends)."""


class UnknownSchemeError(YoinkError, ValueError):
    """No backend is registered for a URI's scheme; the message lists the ones that are."""


class MissingDependencyError(YoinkError, ImportError):
    """A backend needs a package that is not installed; the message says what to install."""
