"""ClosableStorage: the lifecycle every backend needs (closed state, close once, pickling), written once.

:class:`~yoink.storage.CheckpointStorage` says what :meth:`close` promises; this base keeps those
promises for a backend, so that its author writes only what is its own: how to write, read and
flush, and what to release.
"""

from __future__ import annotations

import os
from typing import Any

import anyio

from yoink._exceptions import StorageClosedError
from yoink._fork import forked_note
from yoink._tasks import uninterrupted
from yoink.storage._base import CheckpointStorage

__all__ = ["ClosableStorage"]


class ClosableStorage(CheckpointStorage):
    """A :class:`CheckpointStorage` that keeps its closed state, closes once and pickles as its arguments.

    A backend that subclasses it:

    - calls ``self._check_open()`` first thing in :meth:`write` and :meth:`flush` (and again once it
      holds its own lock, for a :meth:`close` that began while it waited): after ``close()`` they
      raise :class:`~yoink.StorageClosedError`;
    - puts its closing in ``async def _close(self)``: flush what is pending, then release what it
      holds (files, locks, clients, leases). :meth:`close` marks the storage closed first, so no
      write starts after it, and then awaits ``_close()`` once: to its end even if the caller is
      cancelled (the caller's cancellation goes on afterwards), so a cancelled ``close()`` still
      releases what a new writer would be refused by. A second ``close()`` returns once the
      first has released everything;
    - returns from ``_constructor_arguments()`` the positional and keyword arguments that build an
      equal storage (a URI and its options, never a client, a file or a secret the URI did not
      hold). A pickled storage is those arguments, and unpickling calls the constructor with them:
      the copy opens anew in whatever process receives it.

    ::

        class SQLiteStorage(ClosableStorage):
            def __init__(self, path: str, *, table: str = "journal") -> None:
                self.path, self.table = path, table
                self._db: sqlite3.Connection | None = None

            def _constructor_arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
                return (self.path,), {"table": self.table}

            async def write(self, data: str) -> None:
                self._check_open()
                ...

            async def _close(self) -> None:
                if self._db is not None:
                    ...  # commit, then close the connection

    A backend that holds what a forked child must not keep (see ``yoink._fork``) calls
    ``self._closed_by_fork()`` in the child: its use there is refused with an error that says why.
    """

    _closed: bool = False
    _closed_note: str = ""  # why, when it was not closed by close(): a fork
    _closing: anyio.Event | None = None  # set once close() has released everything

    async def close(self) -> None:
        if self._closing is None and self._closed:
            return  # closed without close(): by a fork, or by a failure that let go of everything
        if self._closing is None or not self._closing.is_set():
            await uninterrupted(self._close_once, finish_first=True)

    async def _close_once(self) -> None:
        if self._closing is not None:  # another close() is under way: return when it has released
            await self._closing.wait()
            return
        self._closing = anyio.Event()
        self._closed = True
        try:
            await self._close()
        finally:
            self._closing.set()

    async def _close(self) -> None:
        """Flush what is pending, then release what the storage holds; called once, by :meth:`close`."""

    def _check_open(self) -> None:
        """Raise :class:`~yoink.StorageClosedError` once the storage is closed."""
        if self._closed:
            raise StorageClosedError(f"{self!r} is closed{self._closed_note}")

    def _closed_by_fork(self) -> None:
        """Refuse further use in a forked child: what the storage holds is its parent's."""
        self._closed = True
        self._closed_note = f": {forked_note(os.getppid())}"
        self._closing = None  # a close() of the parent's, under way at the fork, is not the child's

    def _constructor_arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The arguments that build an equal storage: what a pickled storage keeps."""
        raise TypeError(
            f"{type(self).__name__} cannot be pickled: it does not say how to build it again "
            "(a ClosableStorage returns its constructor's arguments from _constructor_arguments())"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        args, kwargs = self._constructor_arguments()
        return _rebuild, (type(self), args, kwargs)


def _rebuild(cls: type[ClosableStorage], args: tuple[Any, ...], kwargs: dict[str, Any]) -> ClosableStorage:
    return cls(*args, **kwargs)
