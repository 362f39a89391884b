"""A forked child lets go of what its parent holds: file locks, leases, connections.

``flock`` belongs to an open file, and a forked child shares its parent's open files: a child that
kept them would hold the parent's journal lock after the parent closed, and refuse every later
writer (a ``multiprocessing`` pool, handed a pickled manager, is the usual way to meet this). So a
storage that holds such a thing registers here, and in each forked child its
``_drop_after_fork()`` forgets it: it closes the child's copies of descriptors without unlocking
them (the parent keeps its lock), never renews or releases the parent's lease, and refuses further
use with an error that says to open a new storage in the child.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import weakref
from collections.abc import Iterator
from typing import Protocol

__all__ = ["ForkAware", "close_locked", "drop_in_forked_children", "forked_note", "forks_wait"]

logger = logging.getLogger(__name__)


class ForkAware(Protocol):
    def _drop_after_fork(self) -> None: ...


_holders: weakref.WeakSet[ForkAware] = weakref.WeakSet()
_opening = threading.Lock()  # held from opening a locked descriptor until its holder is registered


@contextlib.contextmanager
def forks_wait() -> Iterator[None]:
    """A fork waits for this block: open and lock a descriptor, and register its holder, in it."""
    with _opening:
        yield


def drop_in_forked_children(holder: ForkAware) -> None:
    """Call ``holder._drop_after_fork()`` in every child this process forks from now on."""
    _holders.add(holder)


def close_locked(fd: int) -> None:
    """Unlock, then close, a descriptor that holds an ``flock``.

    A child forked at any moment shares the lock until it closes its copy, which it does in its
    own time: unlocking first lets go of the lock for every copy, so the next writer is not refused
    by a child that has not run yet.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def forked_note(pid: int) -> str:
    return (
        f"it was opened by process {pid}, and this process is a fork of it; open a new storage or "
        "manager here (a pickled one opens anew)"
    )


def _after_fork_in_child() -> None:
    _opening.release()  # taken by the parent's forking thread before the fork
    for holder in list(_holders):
        try:
            holder._drop_after_fork()
        except Exception:  # a child must start whatever one holder does
            logger.exception("%r could not let go of its parent's resources after a fork", holder)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_opening.acquire, after_in_parent=_opening.release, after_in_child=_after_fork_in_child
    )
