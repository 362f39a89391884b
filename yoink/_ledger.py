"""Ledger: keyed units of work on a journal, so that resuming a job is three lines.

The ledger owns the bookkeeping every resumable job writes by hand on top of ``append`` and
``replay``: which items are done (never offered again), which were in flight at a crash (offered
again, and reported), which failed (retried up to ``max_attempts``), and the work still to do, in
the order it was added. Its records and their fold are in :mod:`yoink._ledger_state`.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import anyio
import anyio.lowlevel
import orjson

from yoink import _json
from yoink._exceptions import (
    CheckpointLockedError,
    ClaimError,
    CompactionNotSupportedError,
    ConcurrentWriterError,
    FingerprintMismatchError,
    StorageClosedError,
)
from yoink._ledger_state import (
    DONE,
    FIELD,
    PENDING,
    Key,
    LedgerState,
    Tries,
    attempt_of,
    check_key,
    key_batches,
    open_record,
    snapshot_records,
)
from yoink._manager import CheckpointManager
from yoink._records import encode_record
from yoink._tasks import start_background
from yoink.storage import CheckpointStorage

__all__ = ["Claim", "Ledger", "Progress"]

logger = logging.getLogger(__name__)

COMPACT_GROWTH = 4  # compact once the journal holds this many times the records of the live state
COMPACT_MIN_RECORDS = 100_000  # and at least this many records were appended since
ERROR_CHARS = 1000  # a failure's error is kept to this length


@dataclass(frozen=True)
class Progress:
    """Where a ledger's work stands: every item is done, failed, pending or running.

    ``failed`` counts the items given up on (they failed ``max_attempts`` times); an item that
    failed and will be tried again is ``pending``. ``interrupted`` counts the items that were in
    flight when the journal's last writer stopped (:attr:`Ledger.interrupted` lists them).
    The counts are the ledger's memory: an item is done from the moment its claim's body ended,
    a little before its record is durable (the claim's exit waits for that, with ``durable=True``).
    """

    done: int
    failed: int
    pending: int
    running: int
    interrupted: int

    @property
    def total(self) -> int:
        return self.done + self.failed + self.pending + self.running


class Ledger:
    """Keyed units of work on a yoink journal: what is done survives a crash, and is never redone.

    >>> async with Ledger.open("./crawl.jsonl", fingerprint={"site": root}) as ledger:
    ...     await ledger.add(seed_urls)
    ...     async for url in ledger.pending():
    ...         async with ledger.claim(url) as item:
    ...             item.result = await fetch(url)

    Each item is a key (a str or an int) in one of these states: pending, running (claimed),
    done, or failed. :meth:`claim` records the start of an attempt, and at its end "done" (with
    ``item.result``) or "failed" (with the error). After a restart, done items are never offered
    again; items whose attempt never ended (in flight at a crash) are offered again and listed
    in :attr:`interrupted`; failed items are offered again until they have failed
    ``max_attempts`` times, then given up (:attr:`given_up`).

    Open it with :meth:`open`. The ledger owns its journal: it writes every record, refuses a
    journal with records that are not a ledger's, and holds the journal's lock (or lease) from
    the moment it opens, so that a second job on the same ledger is refused before it runs any
    work.
    """

    def __init__(
        self,
        manager: CheckpointManager,
        *,
        fingerprint: Any = None,
        max_attempts: int = 3,
        keep_results: bool = True,
        durable: bool = True,
        order: Literal["fifo", "lifo"] = "fifo",
        compact: bool = True,
    ) -> None:
        if not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(f"max_attempts must be an int >= 1, got {max_attempts!r}")
        if order not in ("fifo", "lifo"):
            raise ValueError(f"order must be 'fifo' or 'lifo', got {order!r}")
        orjson.dumps(fingerprint)  # TypeError now, as the journal would raise it once open
        self._manager = manager
        self._fingerprint = fingerprint
        self._max_attempts = max_attempts
        self._durable = durable
        self._lifo = order == "lifo"
        self._compact = compact
        self._state = LedgerState(repr(manager.storage), keep_results=keep_results)
        self._queue: collections.deque[Key] = collections.deque()  # may hold stale keys: see _take()
        self._offered: dict[Key, object] = {}  # handed out by pending(), not claimed yet: to whom
        self._running: set[Key] = set()
        self._done = self._given_up = 0
        self._changed = anyio.Event()  # set (and replaced) when work is added or ends, if waited on
        self._waiting = 0  # iterators waiting on it
        self._records = 0  # in the journal, as far as this ledger knows
        self._compact_at = COMPACT_MIN_RECORDS  # records from which a compaction may be due
        self._compactor: anyio.CancelScope | None = None
        self._closed = False
        self.interrupted: list[Key] = []
        """The items whose attempt never ended when the journal's last writer stopped (a crash, a
        kill): they are offered again, as often as it happens (an attempt with no verdict is not a
        failure), except one given up on before (its failures reached ``max_attempts``) and tried
        again by hand, which stays given up. Work with side effects checks them: their side effects
        may have happened."""

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        journal: str | os.PathLike[str] | CheckpointStorage,
        *,
        fingerprint: Any = None,
        on_fingerprint_change: Literal["raise", "continue"] = "raise",
        max_attempts: int = 3,
        keep_results: bool = True,
        durable: bool = True,
        order: Literal["fifo", "lifo"] = "fifo",
        compact: bool = True,
        **options: Any,
    ) -> AsyncIterator[Ledger]:
        """Open the ledger in ``journal`` (a URI, a path or a storage), rebuilding its state.

        ``fingerprint`` is the job's identity (its configuration, a hash of its input, its code
        version: any JSON value). A new ledger records it; an existing one must have been written
        with an equal one, or :class:`~yoink.FingerprintMismatchError` names both, unless
        ``on_fingerprint_change="continue"``, which records the new one and goes on.

        ``max_attempts``: how many failed attempts give an item up (the body raised, each time;
        an attempt cancelled, or in flight at a crash, is not a failure). ``keep_results=False``
        keeps done items' results in the journal only, not in memory (:meth:`result` then
        raises), so a ledger of millions of items stays small; compaction then leaves them out of
        the journal too.

        ``durable=True``: a claim's start is durable before its body runs, and its end when its
        ``async with`` exits (claims that end together share one flush). ``durable=False``
        leaves it to the journal's flush interval (``flush_interval``, 1 s by default): a crash
        can then cost the work of the last interval, done again after the restart, and an item
        in flight at the crash may be offered again without being listed in :attr:`interrupted`.

        ``order``: the order :meth:`pending` offers items in, first added first (``"fifo"``) or
        last added first (``"lifo"``, depth first for a crawler). ``compact``: compact the journal
        to the live state in the background once it has grown to four times that, as long as the
        storage can compact. The remaining options go to the manager and the storage, as for
        :meth:`CheckpointManager.from_uri`.
        """
        if on_fingerprint_change not in ("raise", "continue"):
            raise ValueError(
                f"on_fingerprint_change must be 'raise' or 'continue', got {on_fingerprint_change!r}"
            )
        if isinstance(journal, CheckpointStorage):
            manager = CheckpointManager(journal, **options)
        else:
            manager = CheckpointManager.from_uri(journal, **options)
        ledger = cls(
            manager,
            fingerprint=fingerprint,
            max_attempts=max_attempts,
            keep_results=keep_results,
            durable=durable,
            order=order,
            compact=compact,
        )
        async with manager:
            try:
                await ledger._load(on_fingerprint_change)
            except (CheckpointLockedError, ConcurrentWriterError):
                manager._forget_unwritten()  # its opening record: refused, and not to be tried again
                raise
            try:
                yield ledger
            finally:
                await ledger._close()

    async def _load(self, on_fingerprint_change: str) -> None:
        state = self._state
        async with contextlib.aclosing(self._manager.replay_batches()) as batches:
            async for records in batches:  # the first record only: is this a ledger?
                LedgerState(state.source).fold(records[:1])
                break
        # The journal's lock (or lease) is taken before it is read: a second job on the same ledger
        # is refused here, before it runs any work, and one that opens as the last job ends reads
        # all it did. The opening record says nothing of the job yet: it may be another's ledger.
        await self._manager.append(open_record())
        await self._manager.flush()
        async with contextlib.aclosing(self._manager.replay_batches()) as batches:
            async for records in batches:
                state.fold(records)
        self._records = state.records
        own = 0  # items with a record of their own in a snapshot; the others go a thousand a record
        done = 0
        results, queue, interrupted = state.results, self._queue, self.interrupted
        for key, item in state.items.items():  # one pass: a million items or more
            if item is DONE:
                done += 1
                if results:
                    own += key in results
            elif item is PENDING:
                queue.append(key)
            else:
                own += 1
                if type(item) is int or item.running:  # type: ignore[union-attr]
                    interrupted.append(key)
                if self._gives_up(item):
                    self._given_up += 1
                else:
                    queue.append(key)
        self._done = done
        if self._lifo:
            self._queue.reverse()
        live = own + (len(state.items) - own) // 1000
        self._compact_at = max(COMPACT_MIN_RECORDS, COMPACT_GROWTH * live)
        fingerprint = _json.dumps(self._fingerprint, sort_keys=True)
        if not state.fingerprinted:
            await self._append(open_record(self._fingerprint))
        elif _json.dumps(state.fingerprint, sort_keys=True) != fingerprint:
            if on_fingerprint_change == "raise":
                raise FingerprintMismatchError(
                    f"{self._manager.storage!r} is the ledger of a job with the fingerprint "
                    f"{_shown(state.fingerprint, self._fingerprint)}, not "
                    f"{_shown(self._fingerprint, state.fingerprint)}; open another journal, "
                    'or pass on_fingerprint_change="continue" to carry on this one under the new fingerprint',
                    stored=state.fingerprint,
                    given=self._fingerprint,
                )
            logger.warning(
                "%r: carrying on a ledger whose fingerprint was %s under %s",
                self._manager.storage,
                _shown(state.fingerprint),
                _shown(self._fingerprint),
            )
            await self._append(open_record(self._fingerprint))
        state.fingerprint = self._fingerprint

    # -- the work -----------------------------------------------------------------------------

    async def add(self, keys: Key | Iterable[Key]) -> int:
        """Add work: one key, or an iterable of keys. Keys the ledger has already are ignored.

        Returns how many were new. They are appended to the journal (durable with the next
        flush: a claim's end, with ``durable=True``) and offered by :meth:`pending` in order.
        """
        self._check_open()
        items = self._state.items
        each: Iterable[Key] = (keys,) if isinstance(keys, (str, int)) else keys
        new: dict[Key, None] = {}  # in order, once each
        for key in each:
            if check_key(key) not in items:
                new[key] = None
        for batch in key_batches(new):
            # Memory first, with no await before the record is appended: a compaction whose cut
            # falls between two records sees, in memory, the keys of those before it.
            for key in batch:
                items[key] = PENDING
            self._queue.extend(batch)
            self._wake()
            await self._append({FIELD: "add", "keys": batch})
        return len(new)

    def pending(self) -> AsyncIterator[Key]:
        """Offer the items to do, each once, until none is left and none is running.

        An item is handed out to this iterator alone, and stays reserved for it until it is
        claimed with :meth:`claim` (at once, or in a task of its own) or the iterator ends (a
        ``break``, which offers it again). While no item is pending but some are running or
        reserved, the iterator waits: a claim may add work, or fail and be tried again. So every
        item it yields must be claimed: an iterator that only lists the work waits for its own
        items forever (:attr:`progress` and :meth:`state` tell what is pending). Many tasks may
        iterate at once.
        """
        self._check_open()
        return _Pending(self)

    def claim(self, key: Key, *, reraise: bool = False) -> Claim:
        """Claim ``key`` for an attempt, as an async context manager that yields a :class:`Claim`.

        Entering it records the attempt's start (durable before the body runs, with
        ``durable=True``). If the body ends well, the item is done, with ``item.result`` as its
        result. If it raises an ``Exception``, the attempt failed with that error, which is
        logged and, unless ``reraise=True``, not raised further: the item is offered again until
        it has failed ``max_attempts`` times. If the body is cancelled, the attempt ends with no
        verdict: the item is offered again, first (nothing is written; after a restart, it is
        listed in :attr:`interrupted`). A result that cannot be stored (not JSON, or over the
        line limit) fails the attempt, and its ``TypeError`` or ``ValueError`` is raised.

        A key not added before is added. Raises :class:`~yoink.ClaimError` if the item is done,
        or claimed now by another task.
        """
        return Claim(self, check_key(key), reraise=reraise)

    # -- what it knows --------------------------------------------------------------------------

    @property
    def progress(self) -> Progress:
        """How many items are done, failed (given up), pending and running now."""
        running = len(self._running)
        pending = len(self._state.items) - self._done - self._given_up - running
        return Progress(self._done, self._given_up, pending, running, len(self.interrupted))

    @property
    def fingerprint(self) -> Any:
        return self._fingerprint

    @property
    def given_up(self) -> dict[Key, str]:
        """The items given up on after ``max_attempts`` failed attempts, with the last error."""
        return {
            key: item.error or ""
            for key, item in self._state.items.items()
            if type(item) is Tries and item.failures >= self._max_attempts and key not in self._running
        }

    def state(self, key: Key) -> Literal["pending", "running", "done", "failed"] | None:
        """Where one item stands, or None if the ledger does not have it."""
        item = self._state.items.get(key)
        if item is None:
            return None
        if item is DONE:
            return "done"
        if key in self._running:
            return "running"
        if self._gives_up(item):
            return "failed"
        return "pending"

    def result(self, key: Key) -> Any:
        """The result of a done item (None if its claim set none). KeyError if it is not done."""
        if not self._state.keep_results:
            raise ValueError("the ledger was opened with keep_results=False: results are in the journal only")
        if self._state.items.get(key) is not DONE:
            raise KeyError(key)
        return self._state.results.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._state.items

    def __len__(self) -> int:
        return len(self._state.items)

    def __repr__(self) -> str:
        return f"Ledger({self._manager.storage!r})"

    async def compact(self) -> None:
        """Replace the journal with the live state: one record per item that is not done, and the
        done ones' keys (with their results, if kept). Done by itself in the background with
        ``compact=True``; a storage that cannot compact raises
        :class:`~yoink.CompactionNotSupportedError`."""
        self._check_open()
        # The state at the cut, copied before the manager takes it (no await between): the records
        # after the cut follow the snapshot, and a crash after the swap may leave the journal without
        # them, so the snapshot must hold no later state (an item done, and not the keys it added).
        # Shallow: an item's state is never changed in place, only replaced.
        state = LedgerState(self._state.source, keep_results=self._state.keep_results)
        state.items, state.results = dict(self._state.items), dict(self._state.results)
        state.fingerprint = self._state.fingerprint
        before = self._records
        result = await self._manager.compact(snapshot_records(state, set(self._running)))
        self._records += (result.records or 0) - before  # and those appended meanwhile
        self._compact_at = max(COMPACT_MIN_RECORDS, COMPACT_GROWTH * (result.records or 0))

    # -- inside ---------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StorageClosedError(f"{self!r} is closed")

    async def _append(self, record: dict[str, Any] | orjson.Fragment) -> None:
        await self._manager.append(record)
        self._records += 1
        if self._compact and self._compactor is None and self._records >= self._compact_at:
            self._compactor = start_background(self._compact_in_background)

    async def _compact_in_background(self) -> None:
        try:
            await self.compact()
        except CompactionNotSupportedError as exc:
            self._compact = False
            logger.info("%r is not compacted as it grows: %s", self, exc)
        except Exception as exc:  # the journal is unchanged; appending goes on
            self._compact_at = self._records * 3 // 2  # tried again once it has grown by half
            logger.warning("compacting %r failed; it is tried again as the journal grows: %s", self, exc)
        finally:
            self._compactor = None

    async def _flush(self) -> None:
        if self._durable:
            await self._manager.flush()

    def _take(self) -> Key | None:
        """The next item to offer, or None: stale keys (claimed, done, given up meanwhile) are dropped."""
        queue, items = self._queue, self._state.items
        while queue:
            key = queue.pop() if self._lifo else queue.popleft()
            if key in self._running or key in self._offered:
                continue
            item = items[key]
            if item is not DONE and not self._gives_up(item):
                return key
        return None

    def _requeue(self, key: Key, *, first: bool) -> None:
        """Offer ``key`` again, first or after the others. The queue may hold stale keys (see
        _take()); once they are most of it (claims cancelled again and again, with nobody taking
        from it), it is rebuilt without them."""
        queue = self._queue
        if first != self._lifo:
            queue.appendleft(key)
        else:
            queue.append(key)
        if len(queue) > 2 * (len(self._state.items) - self._done - self._given_up) + 64:
            waiting = dict.fromkeys(
                k
                for k in queue
                if k not in self._running and k not in self._offered and self._state.items[k] is not DONE
            )
            queue.clear()
            queue.extend(waiting)

    def _gives_up(self, item: Any) -> bool:
        """Whether an item (not running now) is given up on: it failed ``max_attempts`` times."""
        return type(item) is Tries and item.failures >= self._max_attempts

    def _in_flight(self) -> bool:
        return bool(self._running or self._offered)

    def _wake(self) -> None:
        if self._waiting:  # iterators wait on it: an Event made only then
            self._waiting = 0
            self._changed.set()
            self._changed = anyio.Event()

    def _attempt(self, key: Key, item: Any) -> int:
        """The number of the attempt at ``key`` that a claim begins, or ClaimError."""
        if key in self._running:
            raise ClaimError(f"{key!r} is claimed already, by another task; a key is claimed once at a time")
        if item is DONE:
            raise ClaimError(f"{key!r} is done already; done items are never done again")
        return 1 if item is None else attempt_of(item) + 1

    async def _close(self) -> None:
        self._closed = True
        if self._compactor is not None:
            self._compactor.cancel()  # the manager's close() waits for a compaction under way
        self._wake()


class Claim:
    """One attempt at an item: what :meth:`Ledger.claim` yields. Set :attr:`result` in the body."""

    def __init__(self, ledger: Ledger, key: Key, *, reraise: bool = False) -> None:
        self.key = key
        self.attempt = 0
        """This attempt's number, from 1."""
        self.result: Any = None
        """What the item's "done" record keeps (any JSON value), and :meth:`Ledger.result` returns."""
        self.error: str | None = None
        """Once the body raised: the error recorded for the attempt."""
        self._ledger = ledger
        self._reraise = reraise

    def __repr__(self) -> str:
        return f"Claim({self.key!r}, attempt={self.attempt})"

    async def __aenter__(self) -> Claim:
        ledger, key = self._ledger, self.key
        ledger._check_open()
        state = ledger._state
        item = state.items.get(key)
        attempt = ledger._attempt(key, item)
        failures = item.failures if type(item) is Tries else 0
        # Memory first, with no await until the records are appended: a second claim of the key
        # meanwhile is refused, a compaction's snapshot sees the item, and a cancelled append()
        # has appended its record (the claim is then interrupted like any other).
        if item is None:
            state.items[key] = PENDING
        elif ledger._gives_up(item):
            ledger._given_up -= 1  # given up on, and claimed by hand: tried again
        state.start(key, attempt, failures)
        self.attempt = attempt
        ledger._running.add(key)
        ledger._offered.pop(key, None)
        start = {FIELD: "start", "key": key, "attempt": attempt}
        if failures:
            start["failures"] = failures
        try:
            if item is None:
                await ledger._append({FIELD: "add", "keys": [key]})
            await ledger._append(start)
            await ledger._flush()  # the start is durable before the work: a crash now lists it
        except BaseException:
            self._interrupted()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc is None:
            await self._done()
            return False
        if not isinstance(exc, Exception):  # cancelled, or the process is stopping: no verdict
            self._interrupted()
            return False
        error = f"{type(exc).__qualname__}: {_text(exc)}"
        logger.warning("%r: attempt %d at %r failed: %s", self._ledger, self.attempt, self.key, error)
        await self._fail(error)
        return not self._reraise

    async def _done(self) -> None:
        ledger, key = self._ledger, self.key
        record = {FIELD: "done", "key": key, "result": self.result}
        if self.result is None:
            del record["result"]
        try:  # encoded first: memory says done only once the record is sure to be appended
            line = encode_record(record, ledger._manager._default)
        except (TypeError, ValueError) as error:
            await self._fail(f"its result cannot be stored: {error}")
            raise
        state = ledger._state
        state.items[key] = DONE
        if state.keep_results and self.result is not None:
            state.results[key] = self.result
        ledger._done += 1
        ledger._running.discard(key)
        ledger._wake()
        await ledger._append(orjson.Fragment(line[:-1]))
        await ledger._flush()

    async def _fail(self, error: str) -> None:
        """Record the attempt as failed; the item is offered again (or given up) once that is
        durable and this claim has all but exited, never while its ``async with`` is still open."""
        ledger, key = self._ledger, self.key
        # JSON carries no lone surrogate (a file name that is not UTF-8 leaves them in messages)
        error = error[:ERROR_CHARS].encode("utf-8", "backslashreplace").decode()
        self.error = error
        item = ledger._state.items[key]
        failures = (item.failures if type(item) is Tries else 0) + 1
        ledger._state.end(key, self.attempt, failures, error)  # memory first, as in __aenter__
        try:
            await ledger._append(
                {FIELD: "fail", "key": key, "attempt": self.attempt, "failures": failures, "error": error}
            )
            await ledger._flush()
        finally:
            ledger._running.discard(key)
            if failures >= ledger._max_attempts:
                ledger._given_up += 1
            else:
                ledger._requeue(key, first=False)  # tried again after the others
            ledger._wake()

    def _interrupted(self) -> None:
        """The attempt stops without a verdict (a cancellation): the item is offered again, first
        (an attempt with no verdict is not a failure)."""
        ledger, key = self._ledger, self.key
        if key in ledger._running:
            ledger._running.discard(key)
            if ledger._gives_up(ledger._state.items[key]):  # given up before, claimed by hand
                ledger._given_up += 1
            else:
                ledger._requeue(key, first=True)
            ledger._wake()


class _Pending:
    """The iterator :meth:`Ledger.pending` returns."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._token = object()  # what the ledger knows it by: not the iterator, which it would keep alive
        self._mine: list[Key] = []  # offered by this iterator (claimed since, or not)
        self._prune_at = 64

    def __aiter__(self) -> _Pending:
        return self

    async def __anext__(self) -> Key:
        ledger = self._ledger
        while True:
            if ledger._closed:
                self._release()
                raise StopAsyncIteration
            key = ledger._take()
            if key is not None:
                ledger._offered[key] = self._token
                self._mine.append(key)
                if len(self._mine) > self._prune_at:  # drop those claimed since: amortised O(1)
                    self._mine = [mine for mine in self._mine if ledger._offered.get(mine) is self._token]
                    self._prune_at = 2 * len(self._mine) + 64
                return key  # no checkpoint: the claim that follows awaits the journal
            if not ledger._in_flight():
                self._release()
                raise StopAsyncIteration
            ledger._waiting += 1
            await ledger._changed.wait()

    async def aclose(self) -> None:
        self._release()

    def _release(self) -> None:
        """Offer again what this iterator handed out and nobody claimed."""
        ledger = self._ledger
        released = [key for key in self._mine if ledger._offered.get(key) is self._token]
        self._mine = []
        for key in reversed(released):  # at the front, in the order they were offered
            del ledger._offered[key]
            if ledger._lifo:
                ledger._queue.append(key)
            else:
                ledger._queue.appendleft(key)
        if released:
            ledger._wake()

    def __del__(self) -> None:
        if self._mine:
            self._release()


def _text(exc: BaseException) -> str:
    """``str(exc)``, or what can be said of it when its ``__str__`` fails."""
    try:
        return str(exc)
    except Exception as failure:
        return f"(its str() raised {type(failure).__qualname__})"


def _shown(value: Any, other: Any = None) -> str:
    """A fingerprint as JSON, cut at 300 characters, or around where it differs from ``other``."""
    text = orjson.dumps(value, option=orjson.OPT_SORT_KEYS, default=repr).decode()
    if len(text) <= 300:
        return text
    if other is None:
        return text[:300] + "..."
    theirs = orjson.dumps(other, option=orjson.OPT_SORT_KEYS, default=repr).decode()
    differ = next(
        (n for n, (a, b) in enumerate(zip(text, theirs, strict=False)) if a != b), min(len(text), len(theirs))
    )
    start = max(0, differ - 100)
    return f"{'...' if start else ''}{text[start : start + 300]}{'...' if start + 300 < len(text) else ''}"
