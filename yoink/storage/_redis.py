"""RedisStreamStorage: the journal as a Redis Stream.

Each entry holds a block of whole JSONL lines (field ``d``), tagged with the writer's id (``w``), its
fencing epoch (``e``; streams written before it existed have none) and the block's number in that
writer's sequence (``b``). A flush is one round trip: a Lua script that checks the writer's epoch and
lease and ``XADD``s every pending block atomically. A flush retried after a dropped connection may
add blocks that were already there; readers drop a block whose number they have already seen from
the same writer, so nothing is replayed twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import re
import secrets
import typing
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

import anyio
import redis.asyncio as redis
from redis.asyncio.connection import (
    URL_QUERY_ARGUMENT_PARSERS,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from yoink._compat import Self
from yoink._exceptions import CheckpointLockedError, ConcurrentWriterError, StorageError
from yoink._fork import drop_in_forked_children
from yoink._tasks import asyncio_loop_of, uninterrupted
from yoink.storage._lifecycle import ClosableStorage
from yoink.storage._uri import query_pairs, redact, take_uri_options

__all__ = ["RedisStreamStorage"]

logger = logging.getLogger(__name__)

# The newest epoch the stream's last entry carries, or 0 (a Lua chunk shared by the scripts below).
_LAST_EPOCH = """
local function last_entry(stream)
  local entry = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
  if not entry then
    return '', 0, nil
  end
  local fields, epoch, writer = entry[2], 0, nil
  for i = 1, #fields, 2 do
    if fields[i] == 'e' then epoch = tonumber(fields[i + 1]) or 0 end
    if fields[i] == 'w' then writer = fields[i + 1] end
  end
  return entry[1], epoch, writer
end
"""
# KEYS: the stream, the lease, the epoch. ARGV: writer, lease ms, epoch, first block number, blocks...
# Refused when the epoch key is gone, holds another epoch, or the stream's last entry was written with a
# newer epoch or with this one by another writer (an epoch issued twice after the key was lost).
_APPEND = (
    _LAST_EPOCH
    + """
local current = redis.call('GET', KEYS[3])
if not current then
  return redis.error_reply('YOINKFENCED lost')
end
if tonumber(current) ~= tonumber(ARGV[3]) then
  return redis.error_reply('YOINKFENCED ' .. current)
end
local _, written, by = last_entry(KEYS[1])
if written > tonumber(ARGV[3]) then
  return redis.error_reply('YOINKFENCED ' .. written)
end
if written == tonumber(ARGV[3]) and by ~= ARGV[1] then
  return redis.error_reply('YOINKFENCED shared:' .. tostring(by))
end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then
  return redis.error_reply('YOINKLEASE ' .. holder)
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
local b = tonumber(ARGV[4])
for i = 5, #ARGV do
  redis.call('XADD', KEYS[1], '*', 'w', ARGV[1], 'e', ARGV[3], 'b', b, 'd', ARGV[i])
  b = b + 1
end
return #ARGV - 4
"""
)
# KEYS: the lease, the epoch, the stream. ARGV: writer, lease ms, and what the first read() saw: the
# epoch and the last entry's id ('' and '' if it never read). Returns {holder, ms left, epoch}, epoch 0
# if the lease is held by another; or {'', 0, -1, epoch now, last id now} if the journal moved on since
# that read. The epoch issued is above the key's and above every entry's, should the key have been lost.
_ACQUIRE = (
    _LAST_EPOCH
    + """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  return {holder, redis.call('PTTL', KEYS[1]), 0}
end
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
local last, written = last_entry(KEYS[3])
if ARGV[3] ~= '' and (current > tonumber(ARGV[3]) or last ~= ARGV[4]) then
  return {'', 0, -1, current, last}
end
local epoch = math.max(current, written) + 1
redis.call('SET', KEYS[2], epoch)
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {ARGV[1], tonumber(ARGV[2]), epoch}
"""
)
# KEYS: the lease, the epoch. ARGV: writer, lease ms, epoch.
# 1 renewed, 0 held by another, -1 a newer epoch exists, -2 the epoch key is gone.
_RENEW = """
local current = redis.call('GET', KEYS[2])
if not current then
  return -2
end
if tonumber(current) ~= tonumber(ARGV[3]) then
  return -1
end
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisStreamStorage(ClosableStorage):
    """A journal in a Redis Stream, written by one lease-holding writer at a time.

    ``RedisStreamStorage("redis://localhost:6379/0", "crawl-42")``, or through the factory:
    ``redis://[[user]:password@]host[:port][/db]?key=NAME``, ``rediss://`` for TLS, and
    ``unix:///path/to/redis.sock?db=0&key=NAME``.

    - :meth:`write` keeps blocks in memory (sending them early once ``max_pending`` bytes wait);
      :meth:`flush` sends them in one round trip and returns when Redis has applied them. For more
      durability, ``wait_replicas=N`` waits for N replicas (``WAIT``) and ``wait_aof=True`` for the
      append-only file (``WAITAOF``, Redis 7.2+, refused at connection on an older server).
    - One writer at a time: the first write takes a lease, the key ``<key>:lease`` (``SET NX PX``),
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
    - Redis Cluster: the stream, its lease and its epoch must share a slot. yoink names them
      ``{<key>}:lease`` and ``{<key>}:epoch`` for a key without a hash tag; give keys a hash tag
      (``{run-42}:journal``) to place them yourself.
    - Passwords never appear in a repr, a log line or an error.
    - redis-py's asyncio client runs on asyncio (not trio).
    """

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
    ) -> None:
        if not key:
            raise ValueError(
                "RedisStreamStorage needs a stream key, e.g. RedisStreamStorage(url, 'crawl-42')"
            )
        if lease_ttl <= 0 or wait_replicas < 0 or wait_timeout < 0 or page_size < 1 or entry_bytes < 1:
            raise ValueError("lease_ttl, page_size and entry_bytes must be positive; the waits not negative")
        self._url = url
        self._where = _where(url)
        self._key = key
        base = key if _has_hash_tag(key) else f"{{{key}}}"
        self._lease_key = f"{base}:lease"
        self._epoch_key = f"{base}:epoch"
        self._options = {
            "lease_ttl": lease_ttl,
            "wait_replicas": wait_replicas,
            "wait_aof": wait_aof,
            "wait_timeout": wait_timeout,
            "page_size": page_size,
            "entry_bytes": entry_bytes,
            "max_pending": max_pending,
        }
        self._lease_ms = int(lease_ttl * 1000)
        self._wait_replicas = wait_replicas
        self._wait_aof = wait_aof
        self._wait_ms = int(wait_timeout * 1000)
        self._page_size = page_size
        self._entry_bytes = entry_bytes
        self._max_pending = max_pending
        self._writer = secrets.token_hex(8)
        self._next_block = 0
        self._pending: list[tuple[int, bytes]] = []  # (block number, whole lines) not yet in Redis
        self._pending_bytes = 0
        self._client: redis.Redis | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the client belongs to
        self._leased = False
        self._epoch = 0  # the fencing token this writer's lease came with
        self._seen: tuple[int, str] | None = None  # the epoch and the last entry's id at the first read()
        self._fenced: str | None = None  # how this writer learnt that a newer epoch exists
        self._lease_lost: str | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._lock = anyio.Lock()
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
        parts = urlsplit(uri)
        scheme = parts.scheme.lower()
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"a Redis URI starts with redis://, rediss:// or unix://; got {redact(uri)!r}")
        pairs = query_pairs(parts.query)
        keys = [value for name, value, _ in pairs if name == "key"]
        if len(keys) != 1 or not keys[0]:
            others = [piece for name, _, piece in pairs if name != "key"]
            example = uri.partition("?")[0] + "?" + "&".join([*others, "key=crawl-42"])
            raise ValueError(
                f"a Redis URI names the stream in its query, once, as in {redact(example)!r}; "
                f"got {redact(uri)!r}"
            )
        rest = "&".join(piece for name, _, piece in pairs if name != "key")
        without_key = uri.partition("?")[0] + (f"?{rest}" if rest else "")
        understood = _redis_url_options(scheme)
        url, given = take_uri_options(
            cls,
            without_key,
            shown=uri,
            keep=understood.__contains__,
            others=f"; redis-py's from_url takes {', '.join(sorted(understood))}",
        )
        return cls(url, keys[0], **options, **given)

    @property
    def key(self) -> str:
        return self._key

    @property
    def _journal_id(self) -> tuple[Any, ...]:
        """The server, the database and the key, however the URI spelt them."""
        found = parse_url(self._url)
        if "path" in found:
            where: tuple[Any, ...] = ("unix", os.path.realpath(found["path"]))
        else:
            host = str(found.get("host", "localhost")).lower().strip("[]")
            host = "localhost" if host in ("127.0.0.1", "::1") else host
            where = (host, int(found.get("port", 6379)))
        return ("redis", *where, int(found.get("db", 0)), self._key)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({redact(self._url)!r}, key={self._key!r})"

    def _constructor_arguments(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (self._url, self._key), dict(self._options)

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
            if not self._leased:
                await self._acquire()
            first, kept = self._next_block, len(self._pending)
            for block in _blocks(data.encode("utf-8"), self._entry_bytes):
                self._pending.append((self._next_block, block))
                self._next_block += 1
                self._pending_bytes += len(block)
            if self._pending_bytes < self._max_pending:
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
        if self._seen is None and not self._leased:
            await self._note_what_the_first_read_sees(client)
        last: dict[bytes, int] = {}  # writer -> the last block number seen from it
        start = "-"
        while True:
            with self._translated("XRANGE"):
                page: list[tuple[bytes, dict[bytes, bytes]]] = await client.xrange(  # type: ignore[assignment]
                    self._key, min=start, max="+", count=self._page_size
                )
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
            if len(page) < self._page_size:
                break
            start = "(" + page[-1][0].decode()
        mine = last.get(self._writer.encode(), -1)
        for number, block in pending:
            if number > mine:
                yield block.decode("utf-8", "surrogateescape")

    async def exists(self) -> bool:
        if self._pending:
            return True
        client = await self._connection()
        with self._translated("EXISTS"):
            return bool(await client.exists(self._key))

    async def _close(self) -> None:
        try:
            async with self._lock:
                if self._pending:
                    await self._send(wait=True)
        finally:
            if self._pending:
                logger.error("%r closed with %d bytes that were never flushed", self, self._pending_bytes)
            client, self._client = self._client, None
            renewer, self._renewer = self._renewer, None
            if client is not None and self._loop is asyncio.get_running_loop():
                if renewer is not None:
                    renewer.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await renewer
                if self._leased:
                    with contextlib.suppress(RedisError):
                        await client.eval(_RELEASE, 1, self._lease_key, self._writer)
                await client.aclose()
            elif client is not None and self._leased:
                await self._release_from_this_loop()

    async def _release_from_this_loop(self) -> None:
        """Release the lease through a new connection: the client belongs to another, dead loop."""
        client = redis.from_url(self._url, socket_connect_timeout=5)
        try:
            with contextlib.suppress(RedisError, OSError):
                await client.eval(_RELEASE, 1, self._lease_key, self._writer)
        finally:
            await client.aclose()

    def _check_fence(self) -> None:
        if self._fenced is not None:
            raise ConcurrentWriterError(
                f"{self!r}: {self._fenced}. This writer writes nothing more: its {self._pending_bytes} "
                "bytes not flushed are kept here (its read() shows them), and a new writer's replay "
                "shows what the journal holds"
            )

    def _drop_after_fork(self) -> None:
        if self._client is None:
            return
        self._client = self._renewer = None  # the parent's connections and lease stay the parent's
        self._closed_by_fork()
        self._lock = anyio.Lock()
        self._connect_lock = anyio.Lock()

    # -- the lease -----------------------------------------------------------------------------

    async def _note_what_the_first_read_sees(self, client: redis.Redis) -> None:
        """Remember the journal as the first read() finds it: a writer whose state was computed from
        that read must not take the lease once another writer has taken it or written since."""
        with self._translated("XREVRANGE"):
            async with client.pipeline(transaction=True) as pipe:
                pipe.get(self._epoch_key)
                pipe.xrevrange(self._key, count=1)
                epoch, last = await pipe.execute()
        if self._seen is None and not self._leased:
            self._seen = (int(epoch or 0), last[0][0].decode() if last else "")

    async def _acquire(self) -> None:
        client = await self._connection()
        seen_epoch, seen_last = ("", "") if self._seen is None else self._seen
        with self._translated("SET"):
            holder, ttl, epoch, *now = await client.eval(
                _ACQUIRE,
                3,
                self._lease_key,
                self._epoch_key,
                self._key,
                self._writer,
                self._lease_ms,
                seen_epoch,
                seen_last,
            )
        if epoch < 0:
            self._fenced = (
                f"the journal changed since this storage first read it (epoch {seen_epoch}, last entry "
                f"{seen_last or 'none'} then; epoch {now[0]}, last entry {now[1].decode() or 'none'} now): "
                "another writer took it over or wrote, so what this one computed from that read is stale"
            )
            self._check_fence()
        if holder.decode() != self._writer:
            raise self._locked(ttl)
        self._leased = True
        self._epoch = epoch
        self._renewer = asyncio.get_running_loop().create_task(self._renew_lease())

    async def _renew_lease(self) -> None:
        while True:
            await asyncio.sleep(self._lease_ms / 3000)
            client = self._client
            if client is None:
                return
            try:
                renewed = await client.eval(
                    _RENEW, 2, self._lease_key, self._epoch_key, self._writer, self._lease_ms, self._epoch
                )
            except RedisError as exc:
                logger.warning(
                    "%r: could not renew the writer's lease (%s); retrying", self, type(exc).__name__
                )
                continue
            if renewed < 0:
                self._fence(newer=None if renewed == -1 else "lost")
                logger.error("%r stopped renewing its lease: %s", self, self._fenced)
                return
            if renewed == 0:  # taken by a writer that does not fence (an older yoink)
                self._lease_lost = "another writer took it after it expired"
                logger.error("%r: lost the writer's lease: %s", self, self._lease_lost)
                return

    def _fence(self, newer: str | None) -> None:
        """Note that this writer may no longer be the newest (``newer``: the script's word for why):
        it never writes again."""
        self._lease_lost = "a newer writer took the journal over"
        renewer = self._renewer
        if renewer is not None and renewer is not asyncio.current_task():
            renewer.cancel()
        if newer == "lost":
            self._fenced = (
                f"the fencing epoch {self._epoch_key!r} is gone from Redis (a failover to a replica that "
                "lagged, a lost append-only file, or a deleted key), so this writer (epoch "
                f"{self._epoch}) cannot tell whether another took the journal over"
            )
            return
        if newer is not None and newer.startswith("shared:"):
            self._fenced = (
                f"another writer ({newer.removeprefix('shared:')}) wrote with this writer's epoch "
                f"{self._epoch}, which Redis issued twice after losing {self._epoch_key!r}"
            )
            return
        newest = f"epoch {newer}" if newer else "a newer epoch"
        self._fenced = (
            f"another writer took the journal over ({newest}; this writer's lease was epoch "
            f"{self._epoch}) while this one was paused or could not reach Redis"
        )

    def _locked(self, ttl_ms: int) -> CheckpointLockedError:
        expires = f"expires in {ttl_ms / 1000:.1f} s" if ttl_ms > 0 else "has no expiry set"
        return CheckpointLockedError(
            f"{self!r} is held by another writer: its lease {self._lease_key!r} {expires} if that "
            "writer has crashed (a live writer renews it); yoink allows one writer at a time, and "
            "nothing was written"
        )

    # -- sending -------------------------------------------------------------------------------

    async def _send(self, *, wait: bool) -> None:
        """Send every pending block in one round trip; on failure they stay pending, numbered alike."""
        self._check_fence()
        client = await self._connection()
        blocks = self._pending
        async with client.pipeline(transaction=False) as pipe:
            pipe.eval(
                _APPEND,
                3,
                self._key,
                self._lease_key,
                self._epoch_key,
                self._writer,
                self._lease_ms,
                self._epoch,
                blocks[0][0],
                *(block for _, block in blocks),
            )
            if wait and self._wait_replicas:
                pipe.execute_command("WAIT", self._wait_replicas, self._wait_ms)
            if wait and self._wait_aof:
                pipe.execute_command("WAITAOF", 1, self._wait_replicas, self._wait_ms)
            try:
                with self._translated("XADD"):
                    results = await pipe.execute()
            except _Refused as exc:
                if exc.fenced:
                    self._fence(newer=exc.detail)
                    self._check_fence()
                if self._renewer is not None:
                    self._renewer.cancel()
                self._lease_lost = f"writer {exc.detail} holds it now"
                raise CheckpointLockedError(
                    f"{self!r}: another writer ({exc.detail}) took the lease after this one's expired; "
                    f"nothing of this flush was written, and its {self._pending_bytes} bytes are kept"
                ) from None
        self._pending = []
        self._pending_bytes = 0
        if self._lease_lost is not None:  # the script took the lease again: keep renewing it
            self._lease_lost = None
            self._renewer = asyncio.get_running_loop().create_task(self._renew_lease())
        if wait and self._wait_replicas:
            acked = results[1]
            if acked < self._wait_replicas:
                raise StorageError(
                    f"{self!r}: only {acked} of {self._wait_replicas} replicas acknowledged the flush "
                    f"within {self._wait_ms / 1000:g} s; it is on the primary"
                )
        if wait and self._wait_aof:
            local, replicas = results[-1]
            if local < 1 or replicas < self._wait_replicas:
                raise StorageError(
                    f"{self!r}: the append-only file did not confirm the flush within "
                    f"{self._wait_ms / 1000:g} s (local {local}, replicas {replicas}); it is in memory"
                )

    # -- the connection and its errors ----------------------------------------------------------

    async def _connection(self) -> redis.Redis:
        asyncio_loop_of(self, self._loop if self._client is not None else None)
        if self._client is not None:
            return self._client
        async with self._connect_lock:
            if self._client is None:
                client = redis.from_url(
                    self._url,
                    retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
                    retry_on_error=[RedisConnectionError, RedisTimeoutError],
                    socket_connect_timeout=5,
                )
                try:
                    with self._translated("PING"):
                        await client.ping()
                        if self._wait_aof:
                            await self._check_waitaof(client)
                except BaseException:
                    await client.aclose()
                    raise
                self._client = client
                self._loop = asyncio.get_running_loop()
                drop_in_forked_children(self)
        return self._client

    async def _check_waitaof(self, client: redis.Redis) -> None:
        version = (await client.info("server"))["redis_version"]
        if tuple(int(part) for part in str(version).split(".")[:2]) < (7, 2):
            raise StorageError(
                f"wait_aof=True needs WAITAOF, from Redis 7.2; the server at {self._where} is {version}"
            )

    @contextlib.contextmanager
    def _translated(self, command: str) -> Iterator[None]:
        try:
            yield
        except AuthenticationError as exc:
            raise StorageError(f"Redis at {self._where} refused the credentials (AUTH)") from exc
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StorageError(
                f"cannot reach Redis at {self._where} ({type(exc).__name__}); what was not flushed is kept"
            ) from exc
        except ResponseError as exc:
            message = str(exc)
            # The script's refusal, wherever redis-py put it: a pipeline's error quotes the command
            # (the script's source, where the marker is followed by a quote) before the reply.
            refusals = _REFUSAL.findall(message)
            if refusals:
                kind, detail = refusals[-1]
                raise _Refused(kind == "FENCED", detail) from None
            raise StorageError(f"Redis at {self._where} refused {command}: {message}") from exc
        except RedisError as exc:
            raise StorageError(f"Redis {command} at {self._where} failed: {type(exc).__name__}") from exc


_REFUSAL = re.compile(r"\bYOINK(LEASE|FENCED) ([^\s'\",)]+)")


class _Refused(Exception):
    """The append script refused: a newer epoch exists (``fenced``), or another holds the lease."""

    def __init__(self, fenced: bool, detail: str) -> None:
        super().__init__(detail)
        self.fenced = fenced
        self.detail = detail


def _blocks(data: bytes, size: int) -> Iterator[bytes]:
    """Cut ``data`` (whole lines) into blocks of whole lines of about ``size`` bytes."""
    start = 0
    while len(data) - start > size:
        cut = data.find(b"\n", start + size - 1) + 1  # a line longer than size is a block of its own
        if cut == 0:
            break
        yield data[start:cut]
        start = cut
    if start < len(data):
        yield data[start:]


def _has_hash_tag(key: str) -> bool:
    opening = key.find("{")
    return opening >= 0 and key.find("}", opening + 2) > 0


def _where(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme.lower() == "unix":
        return parts.path
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"


@functools.cache
def _redis_url_options(scheme: str) -> frozenset[str]:
    """The query parameters redis-py's ``from_url`` takes for ``scheme``: those it parses itself,
    and the connection's parameters that take text (``password``, ``client_name``, ...)."""
    connection = {"unix": UnixDomainSocketConnection, "rediss": SSLConnection}.get(scheme, Connection)
    names = set(URL_QUERY_ARGUMENT_PARSERS)
    for cls in connection.__mro__:
        init = vars(cls).get("__init__")
        if init is None:
            continue
        for parameter in inspect.signature(init).parameters.values():
            hint = parameter.annotation
            texts = hint is str or str in typing.get_args(hint)
            if texts and not parameter.name.startswith("orig_"):
                names.add(parameter.name)
    return frozenset(names - {"host", "port", "path"})  # the URI's own parts
