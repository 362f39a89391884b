"""Compaction of a RedisStreamStorage's journal: a next generation written in fenced pieces and
switched in by one script, and the reads that follow a switch.

A compaction (:meth:`Generations.replace`) runs scripts of ``_redis_scripts.py`` on the journal's
keys (``Keys``), each fenced like a flush (the writer's lease and epoch are checked on the server):

1. BEGIN claims the next generation, ``{<key>}:next``, for the compaction's token (kept in
   ``{<key>}:next:owner``), deleting whatever an earlier compaction left there, and returns how
   many compactions the journal has had (``{<key>}:generation``) and the id of the journal's last
   entry: the cut. The writer's lock is held for this step only: flushes go on after it.
2. STAGE, as many times as it takes, adds about ``max_pending`` bytes of the new journal to the
   next generation. Its entries carry no block number (no reader drops one as a flush's repeat).
3. CARRY, as many times as it takes, copies the entries that flushes appended to the journal after
   the cut (or after the last one it copied) to the next generation, fields and all, so that they
   follow the snapshot there as they follow the cut in the journal. The last call runs with the
   writer's lock held, and finds nothing more to copy.
4. SWITCH, with the lock still held, once every piece is there and nothing of the journal is left
   uncarried, renames the journal to ``{<key>}:old:<n>`` (which Redis deletes ``retired_ttl``
   seconds later) and the next generation to ``<key>``, and counts the compaction: one script, so
   the journal is the old one or the new one, whole, and every flush is in the one it is.

A compaction that fails deletes its next generation (DISCARD), which readers never look at; one
whose switch's answer was lost learns from DISCARD whether the switch went through. A read
follows the generation (:meth:`Generations.pages`): once a switch has moved it on, the read
finishes the journal it began on, under ``{<key>}:old:<n>``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as redis

from yoink._exceptions import CheckpointLockedError, ConcurrentWriterError, StorageError
from yoink.storage._redis_client import Waits, translated
from yoink.storage._redis_lease import Lease
from yoink.storage._redis_scripts import BEGIN, CARRY, DISCARD, STAGE, SWITCH, Keys, blocks

__all__ = ["Compaction", "Generations", "Page", "Run"]

logger = logging.getLogger(__name__)

Page = list[tuple[bytes, dict[bytes, bytes]]]  # XRANGE's entries: (id, fields)

_KEPT = "the compaction was abandoned, and the journal is the old one, unchanged"
_CARRY_ROUNDS = 16  # scripts of the carry with writes going on; the rest is copied with them held


@dataclass
class Compaction:
    """One compaction under way: its token, the generation it replaces, the cut (the id of the
    journal's last entry when it began, '' for none), and how many blocks of the snapshot it staged."""

    token: str
    generation: int
    cut: str
    staged: int = 0


class Run(Protocol):
    """How the storage runs a fenced script: in one round trip (with the waits for replicas and
    the append-only file if ``wait``), raising what a refusal means and saying what was ``kept``."""

    async def __call__(
        self,
        script: str,
        keys: tuple[str, ...],
        arguments: tuple[Any, ...],
        *,
        wait: bool = False,
        command: str,
        kept: str,
    ) -> list[Any]: ...


class Generations:
    """The compactions of one writer's journal, and the reads that follow them.

    ``lease`` is the writer's, held whenever a compaction runs. The storage, ``owner`` (as errors
    and log lines name it), lends what it uses for its own writes: ``run`` a fenced script, its
    ``connection()`` and its ``waits`` after a flush.
    """

    def __init__(
        self,
        keys: Keys,
        lease: Lease,
        *,
        owner: object,
        where: str,
        run: Run,
        connection: Callable[[], Awaitable[redis.Redis]],
        waits: Waits,
        entry_bytes: int,
        max_pending: int,
        retired_ttl: float,
    ) -> None:
        self._keys = keys
        self._lease = lease
        self._owner = owner
        self._where = where
        self._run = run
        self._connection = connection
        self._waits = waits
        self._entry_bytes = entry_bytes
        self._max_pending = max_pending
        self._retired_ttl = retired_ttl
        self._tokens = itertools.count(1)  # numbers this writer's compactions' tokens
        # the KEYS of BEGIN and SWITCH
        self._switch_keys = (keys.stream, keys.lease, keys.epoch, keys.next, keys.next_owner, keys.generation)

    async def begin(self) -> Compaction:
        """Claim the next generation and note where the journal ends: what is appended after that
        is carried into the next generation. The caller holds the writer's lock and its lease, and
        has nothing pending."""
        lease = self._lease
        token = f"{lease.writer}:{next(self._tokens)}"
        ((generation, cut),) = await self._run(
            BEGIN, self._switch_keys, (lease.writer, lease.ms, lease.epoch, token), command="EVAL", kept=_KEPT
        )
        return Compaction(token, int(generation), cut.decode() if isinstance(cut, bytes) else cut)

    async def replace(
        self,
        compaction: Compaction,
        text: AsyncIterable[str],
        locked: Callable[[], AbstractAsyncContextManager[Any]],
    ) -> None:
        """Write ``text`` into the next generation, carry what flushes appended to the journal
        meanwhile, and switch it in; if that fails, delete it (unless it was switched in after all).

        Writes go on while the text is staged and most of what they appended is carried;
        ``locked()`` holds them (the storage's lock) for the rest of the carry and the switch."""
        try:
            await self._stage(compaction, text)
            await self._carry(compaction, rounds=_CARRY_ROUNDS)
        except BaseException:
            await self.abandon(compaction.token)
            raise
        async with locked():
            try:
                await self._carry(compaction)
            except BaseException:
                await self.abandon(compaction.token)
                raise
            await self._switch(compaction)

    async def _stage(self, compaction: Compaction, text: AsyncIterable[str]) -> None:
        """Write ``text`` into the next generation, about ``max_pending`` bytes per script."""
        lease, keys = self._lease, self._keys
        staged = (keys.next, keys.lease, keys.epoch, keys.next_owner)
        piece: list[bytes] = []
        size = 0

        async def send() -> None:
            arguments = (lease.writer, lease.ms, lease.epoch, compaction.token, compaction.staged, *piece)
            await self._run(STAGE, staged, arguments, command="XADD", kept=_KEPT)
            compaction.staged += len(piece)
            piece.clear()

        async for chunk in text:
            for block in blocks(chunk.encode("utf-8"), self._entry_bytes):
                piece.append(block)
                size += len(block)
            if size >= self._max_pending:
                await send()
                size = 0
        if piece:
            await send()

    async def _carry(self, compaction: Compaction, rounds: int | None = None) -> None:
        """Copy the journal's entries after the cut, or after the last one carried, into the next
        generation, about ``max_pending`` bytes per script, until a script finds none left, or
        after ``rounds`` scripts (writes that go on faster than the copy would keep it going)."""
        lease, keys = self._lease, self._keys
        carried = (keys.stream, keys.lease, keys.epoch, keys.next, keys.next_owner)
        arguments = (lease.writer, lease.ms, lease.epoch, compaction.token, compaction.cut, self._max_pending)
        for _ in itertools.repeat(None) if rounds is None else range(rounds):
            ((_, more),) = await self._run(CARRY, carried, arguments, command="XADD", kept=_KEPT)
            if not more:
                return

    async def _switch(self, compaction: Compaction) -> None:
        """Switch the next generation in; if that fails, delete it, unless it went through after all."""
        lease, token = self._lease, compaction.token
        keys = (*self._switch_keys, self._keys.retired(compaction.generation))
        retired_ms = int(self._retired_ttl * 1000)
        arguments = (
            lease.writer,
            lease.ms,
            lease.epoch,
            token,
            compaction.generation,
            compaction.staged,
            retired_ms,
            compaction.cut,
        )
        try:
            results = await self._run(SWITCH, keys, arguments, wait=True, command="RENAME", kept=_KEPT)
        except (CheckpointLockedError, ConcurrentWriterError):  # refused: nothing was switched
            await self.abandon(token)
            raise
        except Exception as exc:
            switched = await self.abandon(token)
            if switched:
                logger.warning(
                    "%r: the compaction's switch went through though its answer was lost", self._owner
                )
                return
            if switched is None:
                raise StorageError(
                    f"{self._owner!r}: could not tell whether the compaction's switch went through "
                    f"({exc}); the journal is the old one or the new one, whole, and a new writer's "
                    "replay shows which"
                ) from exc
            raise
        self._waits.check(results, self._owner)

    async def abandon(self, token: str) -> bool | None:
        """Delete the next generation of compaction ``token``: False if it was not switched in, True
        if it was, None if Redis cannot be asked."""
        keys = self._keys
        try:
            client = await self._connection()
            with translated(self._where, "UNLINK"):
                outcome = await client.eval(DISCARD, 2, keys.next, keys.next_owner, token)
        except StorageError as exc:
            logger.warning(
                "%r: could not ask Redis what became of a compaction that failed (%s); unless it was "
                "switched in, the next writer or the next compaction deletes its next generation, "
                "which readers never look at",
                self._owner,
                exc,
            )
            return None
        return bool(outcome == 2)

    async def pages(self, client: redis.Redis, size: int) -> AsyncIterator[Page]:
        """The journal's entries, ``size`` at a time, all of the generation the first page was read
        in, up to the entry that was its last then.

        Each page of the journal is read with the generation number, in one transaction; the first
        also notes the journal's last entry, where the read ends (what is appended later is not
        this read's). Once a compaction has moved the number on, the page (of the new journal) is
        dropped and the read goes on where the compaction moved the journal it began on, which
        lasts ``retired_ttl`` seconds: what was yielded cannot be taken back, so the read finishes
        that journal.
        """
        keys = self._keys
        source, start, end = keys.stream, "-", "+"
        began: bytes | None = None  # the generation the first page was read in (None: never compacted)
        first = True
        while True:
            with translated(self._where, "XRANGE"):
                async with client.pipeline(transaction=True) as pipe:
                    if source == keys.stream:
                        pipe.get(keys.generation)
                    else:
                        pipe.exists(source)
                    if first:
                        pipe.xrevrange(source, max="+", min="-", count=1)
                    pipe.xrange(source, min=start, max=end, count=size)
                    mark, *last, page = await pipe.execute()
            if source != keys.stream:
                if not mark:
                    raise StorageError(
                        f"{self._owner!r}: the journal was compacted while this read was under way, and "
                        f"the journal it began on ({source!r}) was deleted, retired_ttl="
                        f"{self._retired_ttl:g} s after, before the read finished; nothing of the new "
                        "journal was mixed in: read again"
                    )
            elif first:
                began, first = mark, False
                if last[0]:
                    end = last[0][0][0].decode()
            elif mark != began:  # compacted since the read began
                source = keys.retired(int(began or 0))
                continue
            yield page
            if len(page) < size or page[-1][0].decode() == end:
                return
            start = "(" + page[-1][0].decode()
