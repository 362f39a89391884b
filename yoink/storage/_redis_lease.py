"""A RedisStreamStorage writer's lease on its stream, and the fencing epoch it came with.

The lease (``SET NX PX``) keeps a second writer out while the first is alive; the epoch, a token
that only grows, refuses a first writer that was paused past its lease and comes back after
another took over. Both are checked on the server by the scripts of ``_redis_scripts.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable

import redis.asyncio as redis
from redis.exceptions import RedisError

from yoink._exceptions import CheckpointLockedError
from yoink.storage._redis_client import translated
from yoink.storage._redis_scripts import ACQUIRE, RELEASE, RENEW, Keys

__all__ = ["Lease"]

logger = logging.getLogger(__name__)


class Lease:
    """One writer's lease on the journal of ``keys``, renewed every third of its ``ttl`` while held.

    ``owner`` is what log lines and errors call the writer (its storage); ``current()`` is the
    owner's client, or None once it is closed. A writer that learns a newer epoch exists is
    ``fenced`` (the text says how) and never writes again.
    """

    def __init__(
        self, keys: Keys, *, ttl: float, where: str, owner: object, current: Callable[[], redis.Redis | None]
    ) -> None:
        self.keys = keys
        self.writer = secrets.token_hex(8)
        self.ms = int(ttl * 1000)
        self.held = False
        self.epoch = 0  # the fencing token this writer's lease came with
        self.fenced: str | None = None  # how this writer learnt that a newer epoch exists
        self._lost: str | None = None
        self._seen: tuple[int, str] | None = None  # the epoch and the last entry's id at the first read()
        self._renewer: asyncio.Task[None] | None = None
        self._where = where
        self._owner = owner
        self._current = current

    async def note_first_read(self, client: redis.Redis) -> None:
        """Remember the journal as the first read() finds it: a writer whose state was computed from
        that read must not take the lease once another writer has taken it or written since."""
        if self._seen is not None or self.held:
            return
        with translated(self._where, "XREVRANGE"):
            async with client.pipeline(transaction=True) as pipe:
                pipe.get(self.keys.epoch)
                pipe.xrevrange(self.keys.stream, count=1)
                epoch, last = await pipe.execute()
        if self._seen is None and not self.held:
            self._seen = (int(epoch or 0), last[0][0].decode() if last else "")

    async def acquire(self, client: redis.Redis) -> None:
        """Take the lease and a new epoch, or raise :class:`~yoink.CheckpointLockedError`. If the
        journal moved on since the first read, take nothing and become ``fenced``. A compaction's
        next generation left by an earlier writer is deleted with the lease taken."""
        seen_epoch, seen_last = ("", "") if self._seen is None else self._seen
        with translated(self._where, "SET"):
            holder, ttl, epoch, *now = await client.eval(
                ACQUIRE,
                5,
                self.keys.lease,
                self.keys.epoch,
                self.keys.stream,
                self.keys.next,
                self.keys.next_owner,
                self.writer,
                self.ms,
                seen_epoch,
                seen_last,
            )
        if epoch < 0:
            self.fenced = (
                f"the journal changed since this storage first read it (epoch {seen_epoch}, last entry "
                f"{seen_last or 'none'} then; epoch {now[0]}, last entry {now[1].decode() or 'none'} now): "
                "another writer took it over or wrote, so what this one computed from that read is stale"
            )
            return
        if holder.decode() != self.writer:
            raise self.locked(ttl)
        self.held = True
        self.epoch = epoch
        self._renewer = asyncio.get_running_loop().create_task(self._renew())

    def appended(self) -> None:
        """The append script, which renews the lease, went through: if it was lost, renew it again."""
        if self._lost is not None:
            self._lost = None
            self._renewer = asyncio.get_running_loop().create_task(self._renew())

    def lost_to(self, holder: str) -> None:
        """The append script found the lease held by ``holder``, a writer that does not fence."""
        if self._renewer is not None:
            self._renewer.cancel()
        self._lost = f"writer {holder} holds it now"

    def fence(self, newer: str | None) -> None:
        """Note that this writer may no longer be the newest (``newer``: the script's word for why):
        it never writes again."""
        self._lost = "a newer writer took the journal over"
        renewer = self._renewer
        if renewer is not None and renewer is not asyncio.current_task():
            renewer.cancel()
        if newer == "lost":
            self.fenced = (
                f"the fencing epoch {self.keys.epoch!r} is gone from Redis (a failover to a replica that "
                "lagged, a lost append-only file, or a deleted key), so this writer (epoch "
                f"{self.epoch}) cannot tell whether another took the journal over"
            )
            return
        if newer is not None and newer.startswith("shared:"):
            self.fenced = (
                f"another writer ({newer.removeprefix('shared:')}) wrote with this writer's epoch "
                f"{self.epoch}, which Redis issued twice after losing {self.keys.epoch!r}"
            )
            return
        newest = f"epoch {newer}" if newer else "a newer epoch"
        self.fenced = (
            f"another writer took the journal over ({newest}; this writer's lease was epoch "
            f"{self.epoch}) while this one was paused or could not reach Redis"
        )

    def locked(self, ttl_ms: int) -> CheckpointLockedError:
        expires = f"expires in {ttl_ms / 1000:.1f} s" if ttl_ms > 0 else "has no expiry set"
        return CheckpointLockedError(
            f"{self._owner!r} is held by another writer: its lease {self.keys.lease!r} {expires} if that "
            "writer has crashed (a live writer renews it); yoink allows one writer at a time, and "
            "nothing was written"
        )

    async def release(self, client: redis.Redis) -> None:
        """Stop renewing, and release the lease if this writer holds it (``client`` is of this loop)."""
        renewer, self._renewer = self._renewer, None
        if renewer is not None:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
        if self.held:
            with contextlib.suppress(RedisError):
                await client.eval(RELEASE, 1, self.keys.lease, self.writer)

    async def release_through(self, url: str) -> None:
        """Release the lease through a new connection: the writer's client belongs to a dead loop."""
        self.forget()
        client = redis.from_url(url, socket_connect_timeout=5)
        try:
            with contextlib.suppress(RedisError, OSError):
                await client.eval(RELEASE, 1, self.keys.lease, self.writer)
        finally:
            await client.aclose()

    def forget(self) -> None:
        """Drop the renewal without touching it: it belongs to a parent process or a dead loop."""
        self._renewer = None

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.ms / 3000)
            client = self._current()
            if client is None:
                return
            try:
                renewed = await client.eval(
                    RENEW, 2, self.keys.lease, self.keys.epoch, self.writer, self.ms, self.epoch
                )
            except RedisError as exc:
                logger.warning(
                    "%r: could not renew the writer's lease (%s); retrying", self._owner, type(exc).__name__
                )
                continue
            if renewed < 0:
                self.fence(newer=None if renewed == -1 else "lost")
                logger.error("%r stopped renewing its lease: %s", self._owner, self.fenced)
                return
            if renewed == 0:  # taken by a writer that does not fence (an older yoink)
                self._lost = "another writer took it after it expired"
                logger.error("%r: lost the writer's lease: %s", self._owner, self._lost)
                return
