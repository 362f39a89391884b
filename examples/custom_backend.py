"""A complete storage backend in about 120 lines: a journal in SQLite, under its own URI scheme.

    python examples/custom_backend.py /tmp/jobs.db

SQLite comes with Python, so this runs anywhere. Every blocking call goes through one thread
(``anyio.to_thread`` with a limiter of one), so calls never overlap, and through
``yoink.storage.uninterrupted``, so a caller's cancellation never cuts one short. Each ``write()``
is one row; ``flush()`` commits. ``ClosableStorage`` keeps the closed state, closes once and
pickles the storage as its arguments. tests/test_custom_backend.py runs
``yoink.testing.StorageContract`` against it.
"""

from __future__ import annotations

import functools
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import anyio
import anyio.to_thread

from yoink import CheckpointLockedError, CheckpointManager, StorageError
from yoink.storage import ClosableStorage, StorageFactory, uninterrupted

T = TypeVar("T")


class SQLiteStorage(ClosableStorage):
    """``sqlite:///path/to/jobs.db?table=journal``: one row of whole lines per write."""

    def __init__(self, path: str, *, table: str = "journal") -> None:
        if not table.isidentifier():
            raise ValueError(f"table must be an identifier, got {table!r}")
        self.path, self.table = path, table
        self._db: sqlite3.Connection | None = None
        self._thread = anyio.CapacityLimiter(1)  # one thread, one call at a time

    @classmethod
    def from_uri(cls, uri: str, **options: Any) -> SQLiteStorage:
        parts = urlsplit(uri)  # sqlite:///abs/path.db
        query = dict(pair.split("=", 1) for pair in parts.query.split("&") if pair)
        return cls(unquote(parts.path), **{**query, **options})

    def _constructor_arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (self.path,), {"table": self.table}  # what a pickled storage is built from

    async def _run(self, call: Callable[..., T], *args: Any) -> T:
        try:
            run = functools.partial(anyio.to_thread.run_sync, call, *args, limiter=self._thread)
            return await uninterrupted(run)  # finishes even if the caller is cancelled
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc):
                raise CheckpointLockedError(f"{self.path} is being written by another storage") from exc
            raise StorageError(f"SQLite {self.path}: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=0)
            db.execute("PRAGMA journal_mode=WAL")  # readers go on while the writer holds its lock
            db.execute(f"CREATE TABLE IF NOT EXISTS {self.table} (id INTEGER PRIMARY KEY, lines TEXT)")
            try:
                db.execute("BEGIN IMMEDIATE")  # the single-writer rule: held until close()
            except sqlite3.OperationalError:
                db.close()
                raise
            self._db = db
        return self._db

    def _insert(self, data: str) -> None:
        db = self._connect()
        db.execute("SAVEPOINT w")
        db.execute(f"INSERT INTO {self.table} (lines) VALUES (?)", (data,))
        db.execute("RELEASE w")

    async def write(self, data: str) -> None:
        self._check_open()
        if data:
            await self._run(self._insert, data)

    async def read(self) -> AsyncIterator[str]:
        last = 0
        while True:  # a page of rows at a time, so memory stays bounded
            rows = await self._run(self._page, last)
            for _, lines in rows:
                yield lines
            if len(rows) < 100:
                return
            last = rows[-1][0]

    def _page(self, after: int) -> list[tuple[int, str]]:
        db = self._db or sqlite3.connect(self.path, timeout=0)
        try:
            query = f"SELECT id, lines FROM {self.table} WHERE id > ? ORDER BY id LIMIT 100"
            return db.execute(query, (after,)).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise
        finally:
            if db is not self._db:
                db.close()

    async def exists(self) -> bool:
        return bool(await self._run(self._page, 0))

    async def flush(self) -> None:
        self._check_open()
        if self._db is not None:
            await self._run(self._commit, self._db)

    async def _close(self) -> None:  # called once, by ClosableStorage.close()
        if self._db is not None:
            await self._run(self._commit, self._db, False)

    @staticmethod
    def _commit(db: sqlite3.Connection, keep_writing: bool = True) -> None:
        db.execute("COMMIT")  # durable
        if keep_writing:
            db.execute("BEGIN IMMEDIATE")  # and keep the writer's lock, in the same call
        else:
            db.close()


StorageFactory.register("sqlite", SQLiteStorage, replace=True)


async def main(path: str) -> None:
    async with CheckpointManager.from_uri(f"sqlite://{path}") as checkpoint:
        done = {record["job"] async for record in checkpoint.replay()}
        for job in range(10):
            if job not in done:
                await checkpoint.append({"job": job, "result": job * job})
        await checkpoint.flush()
    print(f"{len(done)} jobs were done already; the journal now holds 10")


if __name__ == "__main__":
    anyio.run(main, sys.argv[1] if len(sys.argv) > 1 else "jobs.db")
