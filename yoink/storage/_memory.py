"""MemoryStorage: a journal in this process's memory, for tests and throwaway runs."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any, ClassVar
from urllib.parse import urlsplit

from yoink._compat import Self
from yoink._exceptions import CheckpointLockedError
from yoink.storage._lifecycle import ClosableStorage
from yoink.storage._uri import redact, take_uri_options

__all__ = ["MemoryStorage"]

_anonymous = itertools.count(1)


class MemoryStorage(ClosableStorage):
    """A journal held in memory, shared by every ``MemoryStorage`` of the same name in a process.

    ``MemoryStorage("jobs")`` and ``StorageFactory.from_uri("memory://jobs")`` reach the same
    journal, so a test can write through one storage, close it, and replay through another, as a
    restarted job would. ``MemoryStorage()`` is a journal of its own. The text lives as long as the
    process; :meth:`flush` has nothing to do. Like the other backends it allows one writer at a
    time: a second storage writing a name that an open storage has written raises
    :class:`~yoink.CheckpointLockedError`. It compacts (:meth:`replace`) by swapping in the new
    text once it is all there, followed by what was written meanwhile.
    """

    _journals: ClassVar[dict[str, list[str]]] = {}
    _writers: ClassVar[set[str]] = set()

    def __init__(self, name: str | None = None) -> None:
        self._name = name if name else f"anonymous-{next(_anonymous)}"
        self._writing = False

    @classmethod
    def from_uri(cls, uri: str, **options: Any) -> Self:
        """Build a storage from ``memory://name``.

        >>> MemoryStorage.from_uri("memory://crawl-test")
        """
        parts = urlsplit(take_uri_options(cls, uri)[0])  # it takes no options: any is named
        name = parts.netloc + parts.path
        if parts.scheme.lower() != "memory" or not name or parts.fragment:
            raise ValueError(f"a memory URI names a journal, as in memory://crawl-test; got {redact(uri)!r}")
        return cls(name, **options)

    @property
    def name(self) -> str:
        """The journal's name within this process."""
        return self._name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._name!r})"

    def _constructor_arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (self._name,), {}  # the journal stays in this process: a copy elsewhere is empty

    async def write(self, data: str) -> None:
        self._check_open()
        if not data:
            return
        self._claim()
        self._journals.setdefault(self._name, []).append(data)

    writes_during_replace = True

    async def replace(self, text: AsyncIterable[str]) -> None:
        """Swap in the new journal once all of ``text`` is read, with what was written meanwhile
        after it; a read under way keeps the old one."""
        self._check_open()
        self._claim()
        old = self._journals.get(self._name)
        cut = len(old) if old is not None else 0
        journal = [chunk async for chunk in text if chunk]
        self._check_open()
        now = self._journals.get(self._name, [])
        carried = now[cut:] if now is old else now  # written during the replace: it follows the new text
        self._journals[self._name] = journal + carried

    def _claim(self) -> None:
        """Become the journal's one writer, or raise CheckpointLockedError."""
        if not self._writing:
            if self._name in self._writers:
                raise CheckpointLockedError(
                    f"memory://{self._name} is open for writing by another MemoryStorage; "
                    "yoink allows one writer at a time, and nothing was written"
                )
            self._writers.add(self._name)
            self._writing = True

    async def read(self) -> AsyncIterator[str]:
        items = self._journals.get(self._name, [])
        for index in range(len(items)):  # what was there when read() was called
            yield items[index]

    async def exists(self) -> bool:
        return self._name in self._journals

    async def flush(self) -> None:
        self._check_open()

    async def _close(self) -> None:
        if self._writing:
            self._writers.discard(self._name)
            self._writing = False
