"""RedisStreamStorage: the journal as a Redis Stream.

Each entry holds a block of whole JSONL lines (field ``d``), tagged with the writer's id (``w``), its
fencing epoch (``e``; streams written before it existed have none) and the block's number in that
writer's sequence (``b``). A flush is one round trip: a Lua script that checks the writer's epoch and
lease and ``XADD``s every pending block atomically. A flush retried after a dropped connection may
add blocks that were already there; readers drop a block whose number they have already seen from
the same writer, so nothing is replayed twice.

Compaction (:meth:`RedisStreamStorage.replace`) writes the new journal into a stream of its own, the
next generation, in bounded pieces (entries with no block number), copies after it what flushes
appended to the journal meanwhile, then renames it over the journal in one script; the journal it
replaced lives on, renamed, for ``retired_ttl`` seconds, so that reads under way can finish it.

The keys, the blocks and the scripts are in ``_redis_scripts.py``, the lease and its fencing epoch
in ``_redis_lease.py``, compaction and the reads that follow it in ``_redis_compaction.py``, and the
connection with its error translation in ``_redis_client.py``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import urlsplit

import anyio
import redis.asyncio as redis

from yoink._compat import Self
from yoink._exceptions import CheckpointLockedError, ConcurrentWriterError, StorageError
from yoink._fork import drop_in_forked_children
from yoink._tasks import asyncio_loop_of, uninterrupted
from yoink.storage._lifecycle import ClosableStorage
from yoink.storage._redis_client import (
    Refused,
    Waits,
    connect,
    server_identity,
    server_of,
    split_key,
    translated,
    url_options,
)
from yoink.storage._redis_compaction import Generations
from yoink.storage._redis_lease import Lease
from yoink.storage._redis_scripts import APPEND, Keys, blocks
from yoink.storage._uri import Options, redact, take_uri_options

__all__ = ["RedisOptions", "RedisStreamStorage"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RedisOptions(Options):
    """The options of a :class:`RedisStreamStorage` (see its docstring)."""

    lease_ttl: float = 30.0
    wait_replicas: int = 0
    wait_aof: bool = False
    wait_timeout: float = 5.0
    page_size: int = 64
    entry_bytes: int = 64 << 10
    max_pending: int = 8 << 20
    retired_ttl: float = 300.0


class RedisStreamStorage(ClosableStorage):
    """A journal in a Redis Stream, written by one lease-holding writer at a time.

    ``RedisStreamStorage("redis://localhost:6379/0", "crawl-42")``, or through the factory:
    ``redis://[[user]:password@]host[:port][/db]?key=NAME``, ``rediss://`` for TLS, and
    ``unix:///path/to/redis.sock?db=0&key=NAME``.

    - :meth:`write` keeps blocks in memory (sending them early once ``max_pending`` bytes wait);
      :meth:`flush` sends them in one round trip and returns when Redis has applied them. For more
      durability, ``wait_replicas=N`` waits for N replicas (``WAIT``) and ``wait_aof=True`` for the
      append-only file (``WAITAOF``, Redis 7.2+, refused at connection on an older server).
    - One writer at a time: the first write takes a lease, the key ``{<key>}:lease`` (``SET NX PX``),
      renewed every third of ``lease_ttl`` while the storage is open and released by
      :meth:`close`. A second writer gets :class:`~yoink.CheckpointLockedError`; a crashed writer's
      lease expires after ``lease_ttl`` seconds.
    - Fencing: a lease alone cannot stop a writer that was paused (SIGSTOP, a long GC, a frozen VM)
      past its lease and comes back after another took over. So each lease comes with a token, an
      epoch that only grows (``INCR <key>:epoch``, a key that never expires), and every flush (the
      Lua script that ``XADD``s) and every renewal checks, atomically on the server, that the
      writer's epoch is still the newest, whether or not the lease is free at that moment. A writer
      that was replaced gets :class:`~yoink.ConcurrentWriterError` from :meth:`flush` (and from
      :meth:`write` and :meth:`close` from then on): nothing of the refused flush is written, its
      records stay pending in this storage (the manager keeps what it had not handed over), and it
      never takes the lease again; open a new writer, whose replay shows what the journal holds.
      Each entry carries its writer's epoch (field ``e``). Writers of yoink versions without
      fencing do not check it.
    - The token outlives a lost epoch key (a failover to a replica that lagged, a lost append-only
      file, an operator's cleanup): a lease's epoch is above the key's and above the stream's last
      entry's; a writer whose epoch key is gone is refused, and so is one whose epoch another
      writer has already written with.
    - A writer that read before writing (a resume's replay) is refused its lease, with
      :class:`~yoink.ConcurrentWriterError`, if since its first :meth:`read` another writer took a
      lease or added an entry, as on S3: its state was computed from a journal that has moved on.
      A storage that writes before it reads cannot tell, and is not checked.
    - :meth:`read` pages through the stream with ``XRANGE ... COUNT page_size``; memory is bounded
      by a page of blocks of at most ``entry_bytes`` each.
    - Compaction (:meth:`replace`) never sends the snapshot in one script: it goes into a stream of
      its own, the next generation ``{<key>}:next``, in scripts of about ``max_pending`` bytes each,
      while the journal stays as it was and flushes go on appending to it. What they appended
      after the compaction began is copied to the next generation after the snapshot (the last
      of it with writes held), and one script renames the journal to ``{<key>}:old:<n>`` and the
      next generation to ``<key>``, and counts the compaction in ``{<key>}:generation``, if
      nothing of the journal is left uncopied: a crash (of the writer, or of Redis with its
      append-only file) at any moment leaves the old journal whole or the new one whole, each
      with every flush that returned. Every one of these scripts checks
      the lease and the epoch as a flush does: a second writer is refused during a compaction and
      after it, and a writer fenced out switches nothing (:class:`~yoink.ConcurrentWriterError`,
      the journal untouched). A switch whose answer was lost is recognised, not repeated.
    - A read under way during a switch yields the journal it began on, whole: each page of the
      journal is read with the generation number in one transaction, and once the number has moved
      the read goes on in ``{<key>}:old:<n>``, which Redis deletes ``retired_ttl`` seconds (default
      300) after the switch. Restarting on the new journal is not an option, since what was
      yielded cannot be taken back; a read still under way once the old journal is deleted raises
      :class:`~yoink.StorageError` rather than yield part of each. The cost: Redis holds both
      journals for ``retired_ttl`` after a compaction. Readers of yoink versions without
      compaction do not know this, and may see the new journal follow part of the old one.
    - A compaction that fails deletes its next generation (a cancelled one finishes, as a write
      does); one that crashed leaves it to the next writer, which deletes it when it takes the
      lease, or to the next compaction. Readers never look at it. A journal written before
      compaction existed reads and appends as before; its first compaction creates
      ``{<key>}:generation``.
    - Redis Cluster: the stream, its lease, its epoch and compaction's keys must share a slot.
      yoink names them ``{<key>}:lease``, ``{<key>}:epoch``, ... for a key without a hash tag;
      give keys a hash tag (``{run-42}:journal``) to place them yourself. A key that is its hash
      tag alone, ``{crawl}``, shares those keys with the key ``crawl``: do not use both in one
      database.
    - Passwords never appear in a repr, a log line or an error.
    - redis-py's asyncio client runs on asyncio (not trio).
    """

    writes_during_replace = True

    def __init__(
        self,
        url: str,
        key: str,
        *,
        lease_ttl: float = 30.0,
        wait_replicas: int = 0,
        wait_aof: bool = False,
        wait_timeout: float = 5.0,
        page_size: int = 64,
        entry_bytes: int = 64 << 10,
        max_pending: int = 8 << 20,
        retired_ttl: float = 300.0,
    ) -> None:
        if not key:
            raise ValueError(
                "RedisStreamStorage needs a stream key, e.g. RedisStreamStorage(url, 'crawl-42')"
            )
        if lease_ttl <= 0 or wait_replicas < 0 or wait_timeout < 0 or page_size < 1 or entry_bytes < 1:
            raise ValueError("lease_ttl, page_size and entry_bytes must be positive; the waits not negative")
        if retired_ttl <= 0:
            raise ValueError("retired_ttl must be positive: a compacted-away journal is kept that long")
        self._url = url
        self._where = server_of(url)
        self._key = key
        self._options = RedisOptions(
            lease_ttl=lease_ttl,
            wait_replicas=wait_replicas,
            wait_aof=wait_aof,
            wait_timeout=wait_timeout,
            page_size=page_size,
            entry_bytes=entry_bytes,
            max_pending=max_pending,
            retired_ttl=retired_ttl,
        )
        self._waits = Waits(wait_replicas, wait_aof, int(wait_timeout * 1000))
        self._keys = Keys(key)
        self._lease = Lease(
            self._keys, ttl=lease_ttl, where=self._where, owner=self, current=lambda: self._client
        )
        self._generations = Generations(
            self._keys,
            self._lease,
            owner=self,
            where=self._where,
            run=self._run,
            connection=self._connection,
            waits=self._waits,
            entry_bytes=entry_bytes,
            max_pending=max_pending,
            retired_ttl=retired_ttl,
        )
        self._next_block = 0
        self._pending: list[tuple[int, bytes]] = []  # (block number, whole lines) not yet in Redis
        self._pending_bytes = 0
        self._client: redis.Redis | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the client belongs to
        self._lock = anyio.Lock()  # the pending blocks, and sending them
        self._compacting = anyio.Lock()  # held through a compaction, beside which writes go on
        self._connect_lock = anyio.Lock()

    @classmethod
    def from_uri(cls, uri: str, **options: Any) -> Self:
        """Build a storage from a Redis URI whose query names the stream key.

        >>> RedisStreamStorage.from_uri("redis://localhost:6379/0?key=crawl-42")
        >>> RedisStreamStorage.from_uri("rediss://:secret@cache.example.com:6380/2?key=crawl-42")
        >>> RedisStreamStorage.from_uri("unix:///run/redis.sock?db=0&key=crawl-42")
        >>> RedisStreamStorage.from_uri("redis://localhost/0?key=crawl-42&lease_ttl=10&wait_aof=true")

        The key is percent-decoded (``?key=a%26b`` names ``a&b``; a ``+`` stays a ``+``). The
        query may hold this class's options, converted to their types, and what redis-py's
        ``from_url`` takes (``password``, ``socket_timeout``, ...); anything else is refused.
        """
        scheme = urlsplit(uri).scheme.lower()
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"a Redis URI starts with redis://, rediss:// or unix://; got {redact(uri)!r}")
        without_key, key = split_key(uri)
        understood = url_options(scheme)
        url, given = take_uri_options(
            cls,
            without_key,
            shown=uri,
            keep=understood.__contains__,
            others=f"; redis-py's from_url takes {', '.join(sorted(understood))}",
        )
        return cls(url, key, **options, **given)

    @property
    def key(self) -> str:
        return self._key

    @property
    def _journal_id(self) -> tuple[Any, ...]:
        """The server, the database and the key, however the URI spelt them."""
        return ("redis", *server_identity(self._url), self._key)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({redact(self._url)!r}, key={self._key!r})"

    def _constructor_arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (self._url, self._key), self._options.changed()

    # -- the contract ------------------------------------------------------------------------

    async def write(self, data: str) -> None:
        self._check_open()
        if data:
            await uninterrupted(functools.partial(self._write, data))

    async def flush(self) -> None:
        self._check_open()
        await uninterrupted(self._flush)

    async def _write(self, data: str) -> None:
        async with self._lock:
            self._check_open()
            self._check_fence()
            if not self._lease.held:
                await self._lease.acquire(await self._connection())
                self._check_fence()
            first, kept = self._next_block, len(self._pending)
            for block in blocks(data.encode("utf-8"), self._options.entry_bytes):
                self._pending.append((self._next_block, block))
                self._next_block += 1
                self._pending_bytes += len(block)
            if self._pending_bytes < self._options.max_pending:
                return
            try:
                await self._send(wait=False)
            except (CheckpointLockedError, ConcurrentWriterError):  # refused by the script: undo this write
                self._pending_bytes -= sum(len(block) for _, block in self._pending[kept:])
                del self._pending[kept:]
                self._next_block = first
                raise
            except StorageError as exc:
                # Sent early only to bound memory. The blocks may have landed or not: they stay pending
                # under their numbers, the next flush sends them again, and readers drop repeats. The
                # write itself is accepted, so the manager does not hand it over again.
                logger.warning(
                    "%r: could not send %d bytes early (%s); they wait for the next flush",
                    self,
                    self._pending_bytes,
                    exc,
                )

    async def _flush(self) -> None:
        async with self._lock:
            self._check_open()
            if self._pending:
                await self._send(wait=True)

    async def read(self) -> AsyncIterator[str]:
        async with self._lock:
            pending = list(self._pending)
        client = await self._connection()
        await self._lease.note_first_read(client)
        last: dict[bytes, int] = {}  # writer -> the last block number seen from it
        async for page in self._generations.pages(client, self._options.page_size):
            for entry_id, fields in page:
                data = fields.get(b"d")
                writer, tag = fields.get(b"w"), fields.get(b"b")
                if data is None:
                    logger.warning("%r: entry %s has no 'd' field; skipped", self, entry_id.decode())
                    continue
                if writer is not None and tag is not None:
                    if int(tag) <= last.get(writer, -1):
                        continue  # a block repeated by a retried flush
                    last[writer] = int(tag)
                yield data.decode("utf-8", "surrogateescape")
        mine = last.get(self._lease.writer.encode(), -1)
        for number, block in pending:
            if number > mine:
                yield block.decode("utf-8", "surrogateescape")

    async def exists(self) -> bool:
        if self._pending:
            return True
        client = await self._connection()
        with translated(self._where, "EXISTS"):  # a journal compacted to nothing has a generation
            return bool(await client.exists(self._key, self._keys.generation))

    async def replace(self, text: AsyncIterable[str]) -> None:
        """Replace the journal with ``text``, atomically: a new generation, switched in by one script.

        What was written and not flushed is flushed into the old journal first. ``text`` goes into
        the next generation in pieces of about ``max_pending`` bytes, each a script fenced like a
        flush; then one script, fenced like a flush, renames the journal away and the next
        generation into its place. ``text`` may read this storage (it sees the old journal); it
        must not write to it.
        """
        self._check_open()
        await uninterrupted(functools.partial(self._replace, text))

    async def _replace(self, text: AsyncIterable[str]) -> None:
        async with self._compacting:  # one at a time; close() waits for it
            async with self._lock:
                self._check_open()
                self._check_fence()
                lease = self._lease
                if not lease.held:
                    await lease.acquire(await self._connection())
                    self._check_fence()
                if self._pending:
                    await self._send(wait=False)  # into the old journal, which keeps them should this fail
                compaction = await self._generations.begin()
            await self._generations.replace(compaction, text, self._locked)

    def _locked(self) -> anyio.Lock:
        return self._lock  # the lock of the moment (a forked child makes its own)

    async def _close(self) -> None:
        try:
            async with self._compacting, self._lock:
                if self._pending:
                    await self._send(wait=True)
        finally:
            if self._pending:
                logger.error("%r closed with %d bytes that were never flushed", self, self._pending_bytes)
            client, self._client = self._client, None
            if client is not None and self._loop is asyncio.get_running_loop():
                await self._lease.release(client)
                await client.aclose()
            else:  # its client, if any, belongs to a loop that is gone
                self._lease.forget()
                if client is not None and self._lease.held:
                    await self._lease.release_through(self._url)

    def _check_fence(self) -> None:
        if self._lease.fenced is not None:
            raise ConcurrentWriterError(
                f"{self!r}: {self._lease.fenced}. This writer writes nothing more: its {self._pending_bytes} "
                "bytes not flushed are kept here (its read() shows them), and a new writer's replay "
                "shows what the journal holds"
            )

    def _drop_after_fork(self) -> None:
        if self._client is None:
            return
        self._client = None  # the parent's connections and lease stay the parent's
        self._lease.forget()
        self._closed_by_fork()
        self._lock = anyio.Lock()
        self._compacting = anyio.Lock()
        self._connect_lock = anyio.Lock()

    # -- sending -------------------------------------------------------------------------------

    async def _send(self, *, wait: bool) -> None:
        """Send every pending block in one round trip; on failure they stay pending, numbered alike."""
        self._check_fence()
        pending, lease = self._pending, self._lease
        results = await self._run(
            APPEND,
            (self._key, self._keys.lease, self._keys.epoch),
            (lease.writer, lease.ms, lease.epoch, pending[0][0], *(block for _, block in pending)),
            wait=wait,
            command="XADD",
            kept=f"nothing of this flush was written, and its {self._pending_bytes} bytes are kept",
        )
        self._pending = []
        self._pending_bytes = 0
        if wait:
            self._waits.check(results, self)

    async def _run(
        self,
        script: str,
        keys: tuple[str, ...],
        arguments: tuple[Any, ...],
        *,
        wait: bool = False,
        command: str,
        kept: str,
    ) -> list[Any]:
        """Run a fenced script (and, if ``wait``, the waits for replicas and the append-only file)
        in one round trip; a refusal raises what it means, saying what was ``kept``."""
        self._check_fence()
        client = await self._connection()
        async with client.pipeline(transaction=False) as pipe:
            pipe.eval(script, len(keys), *keys, *arguments)
            if wait:
                self._waits.add_to(pipe)
            try:
                with translated(self._where, command):
                    results: list[Any] = await pipe.execute()
            except Refused as exc:
                self._refused(exc, kept)
        self._lease.appended()
        return results

    def _refused(self, exc: Refused, kept: str) -> NoReturn:
        if exc.fenced:
            self._lease.fence(newer=exc.detail)
            self._check_fence()
        if exc.kind == "LEASE":
            self._lease.lost_to(exc.detail)
            raise CheckpointLockedError(
                f"{self!r}: another writer ({exc.detail}) took the lease after this one's expired; {kept}"
            ) from None
        raise StorageError(
            f"{self!r}: the next generation of the journal that this compaction wrote is gone, cut "
            f"short or another's ({exc.detail}: another compaction began, or Redis lost keys); {kept}"
        ) from None

    async def _connection(self) -> redis.Redis:
        asyncio_loop_of(self, self._loop if self._client is not None else None)
        if self._client is not None:
            return self._client
        async with self._connect_lock:
            if self._client is None:
                self._client = await connect(self._url, wait_aof=self._options.wait_aof)
                self._loop = asyncio.get_running_loop()
                drop_in_forked_children(self)
        return self._client
