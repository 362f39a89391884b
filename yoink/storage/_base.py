"""The contract between yoink and a storage backend.

A backend is a subclass of :class:`CheckpointStorage` with five async methods, and a sixth,
``replace()``, if it can compact. Everything yoink
promises its users rests on the promises written in their docstrings, so read them all before
writing one; ``yoink.testing`` will check them for you. Subclass
:class:`~yoink.storage.ClosableStorage` instead to have closing and pickling done for you.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, AsyncIterator
from types import TracebackType
from typing import Any

from yoink._compat import Self
from yoink._exceptions import CompactionNotSupportedError

__all__ = ["CheckpointStorage"]


class CheckpointStorage(ABC):
    """An append-only journal of text, written by one writer at a time.

    :class:`~yoink.CheckpointManager` hands a backend whole JSONL lines, several at a time, through
    :meth:`write`, and asks for durability with :meth:`flush`. A backend stores the text; it never
    needs to parse it.

    Cancellation: the manager never cancels a call it has started (it runs each in a task of its
    own), but code that uses a storage directly may, and asyncio's cancellation (``task.cancel()``,
    ``asyncio.timeout()``, ``wait_for()``) goes through anyio's shielded scopes. So a cancelled
    :meth:`write` must be whole or absent, never half there, and must leave the storage in step
    with its journal: later writes land after it, in order, and nothing written before is lost
    or undone. A cancelled :meth:`flush` leaves what it had not made durable to the next flush.
    The simplest way to keep this is what yoink's backends do: run the body of each call through
    ``yoink.storage.uninterrupted``, so that it finishes whatever happens to its caller.

    ``async with storage:`` returns the storage and awaits :meth:`close` on the way out.
    """

    writes_during_replace: bool = False
    """Whether :meth:`write` and :meth:`flush` may go on while :meth:`replace` runs. Optional.

    yoink reads it from the storage, not its class: a backend may set it per instance, where it
    depends on the options (every built-in backend sets it True where it compacts).

    Left False, the manager writes nothing during a compaction: records appended meanwhile wait in
    memory, and :meth:`CheckpointManager.flush <yoink.CheckpointManager.flush>` waits for the swap.
    A backend that sets it True promises, on top of those of :meth:`replace`:

    - ``replace()`` fixes where the old journal ends before it takes the first item of its text,
      and everything :meth:`write` stores after that point follows the new journal once it is
      swapped in, in the order written. The swap and that carry are one: a crash leaves the old
      journal with those writes, or the new one with them, never the new one without them.
    - :meth:`flush` during ``replace()`` makes those writes durable as it always does: a crash after
      it returns loses none of them, before the swap or after it.
    - If ``replace()`` raises, those writes are in the old journal, as if it had not been called.
    - :meth:`read` yields nothing written after it yielded its first item (or ended), so that a
      fold begun with writes held reads the journal as it was then, however long it takes.

    ``yoink.testing.StorageContract`` checks these where it is True. A subclass of a backend that
    sets it, whose own ``replace()`` or ``read()`` does not keep them, sets it back to False (a
    class attribute is enough: the built-in backends that set it per instance only ever turn it
    off there).
    """

    @classmethod
    def from_uri(cls, uri: str, **options: Any) -> Self:
        """Build the storage for ``uri``; :class:`~yoink.StorageFactory` calls this.

        The default passes the URI and the options to the constructor unchanged. Override it when
        the constructor takes something else (a path, a key parsed from a query string).
        """
        return cls(uri, **options)  # type: ignore[call-arg]

    @abstractmethod
    async def write(self, data: str) -> None:
        """Append ``data`` to the journal.

        - Order: text from successive calls is stored in the order the calls were made, including
          calls from concurrent tasks, and is never interleaved.
        - ``data`` is usually one or more whole lines, each ending in ``"\\n"``.
        - All or nothing: if ``write()`` raises, the journal is as it was before the call, so the
          caller may hand the same text over again. A write that failed part-way is undone to what
          the journal really held before it, never to what the backend believed it held.
        - Cancelled: the text is stored whole or not at all, and later writes follow it (see the
          class docstring); a caller that was cancelled cannot tell which, and must not retry
          blindly.
        - Durability comes only from :meth:`flush`; what was written but not flushed may be lost in
          a crash.
        - After :meth:`close`, raises :class:`~yoink.StorageClosedError`.
        """

    @abstractmethod
    def read(self) -> AsyncIterator[str]:
        """Yield the journal's text in order, from its start.

        - Implement it as ``async def read(self) -> AsyncIterator[str]: ... yield ...``.
        - Each item is one or more whole lines. The newline that ends an item may be left off; an
          item never ends in the middle of a line. Yielding a block of many lines at a time is
          allowed and much faster than one line per item.
        - Read your writes: it sees everything :meth:`write` accepted before ``read()`` was called,
          flushed or not.
        - Memory stays bounded by an item, not by the journal.
        - A backend that can recognise a torn last write (a crash in the middle of a write) leaves
          it out and logs a warning; otherwise the manager skips an unreadable last line itself.
        - An empty or missing journal yields nothing.
        """

    @abstractmethod
    async def exists(self) -> bool:
        """Return whether the journal exists (has been written to, here or by an earlier writer)."""

    @abstractmethod
    async def flush(self) -> None:
        """Make everything written before this call durable, then return.

        Once ``flush()`` returns, a crash of this process (``kill -9``) loses none of that text, and
        a later ``read()`` by any process yields it. What "durable" means past a process crash (an
        fsync, an acknowledged upload, a replicated write) is the backend's to document.
        Flushing with nothing written is cheap and does nothing. After :meth:`close`, raises
        :class:`~yoink.StorageClosedError`.
        """

    @abstractmethod
    async def close(self) -> None:
        """Flush, then release every resource (file handles, locks, clients).

        Safe to call twice: the second call does nothing. Afterwards :meth:`write` and :meth:`flush`
        raise :class:`~yoink.StorageClosedError`. A cancelled ``close()`` still releases what the
        storage holds (a lock, a lease) before its caller's cancellation goes on, so that a new
        writer is not refused. A process forked from one that holds a lock or a lease must not
        keep it: it is the parent's.
        """

    async def replace(self, text: AsyncIterable[str]) -> None:
        """Replace the whole journal with ``text``, atomically: compaction. Optional.

        :meth:`CheckpointManager.compact <yoink.CheckpointManager.compact>` calls it, after
        writing and flushing what it had buffered, with no write under way. The default raises
        :class:`~yoink.CompactionNotSupportedError`; a backend that can swap its journal overrides
        it, and ``yoink.testing.StorageContract`` then checks every promise below.

        - ``text`` is whole lines, in order, as :meth:`write` takes them. It may be far larger than
          memory: consume it as it comes, never all at once.
        - Atomic: a crash (``kill -9``) at any moment leaves either the old journal whole or the
          new one whole. When ``replace()`` returns, the new journal is durable, as after
          :meth:`flush`, and later writes follow it.
        - If ``replace()`` raises (``text`` itself may raise), the journal is the old one, untouched,
          and later writes follow it.
        - Readers: a :meth:`read` under way when the swap happens yields the old journal whole or
          the new one whole, never a mix of the two.
        - The writer's lock or lease is held throughout and after: a second writer is refused
          during the swap and after it, as before it.
        - Cancelled: like :meth:`write`, it finishes or leaves the old journal, never half of each.
        - After :meth:`close`, raises :class:`~yoink.StorageClosedError`.
        """
        raise CompactionNotSupportedError(
            f"{self!r} cannot compact its journal: {type(self).__name__} does not implement replace(); "
            "the journal is unchanged"
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
