"""A work ledger's records, and the state they fold into: what is done, failed, pending, in flight.

The ledger (:mod:`yoink._ledger`) writes these records to its journal; replaying them through
:class:`LedgerState` rebuilds its state after a restart, and ``yoink stats`` reads a ledger's
progress the same way. Every record names its kind in the ``"$ledger"`` field::

    {"$ledger": "open", "v": 1}                          each time a job opens it (its lock taken)
    {"$ledger": "open", "v": 1, "fingerprint": {...}}   the job's identity, when new or changed
    {"$ledger": "add", "keys": ["a", "b"]}               work to do, in the order it was added
    {"$ledger": "start", "key": "a", "attempt": 2, "failures": 1}   an attempt began ("failures"
                                                         before it, when there were any)
    {"$ledger": "done", "key": "a", "result": ...}       it ended well ("result" if there is one)
    {"$ledger": "fail", "key": "a", "attempt": 2, "failures": 2, "error": "TimeoutError: ..."}
    {"$ledger": "stop", "key": "a", "attempt": 2, ...}   in a compacted journal: an attempt that
                                                         ended without a verdict (cancelled)
    {"$ledger": "done", "keys": ["a", "b"]}              in a compacted journal: done, no results

Keys are strings or integers. The fold is monotone: a record moves an item forward (pending, then
attempt 1 running, ended, attempt 2 running, ..., done) and never back, so a compaction's
snapshot, taken from live state a little after its cut, may be followed by records it already
holds without changing the outcome.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import orjson

from yoink._exceptions import LedgerError, NotALedgerError

__all__ = [
    "DONE",
    "PENDING",
    "Key",
    "LedgerState",
    "Tries",
    "attempt_of",
    "check_key",
    "open_record",
    "snapshot_records",
]

Key = str | int
FIELD = "$ledger"
VERSION = 1
BATCH_KEYS = 1000  # keys per "add" (or compacted "done") record, at most
BATCH_BYTES = 1 << 20  # and about this many bytes of them
MAX_KEY_BYTES = 1 << 20  # a key's limit, in UTF-8
INT_KEYS = (-(1 << 63), 1 << 64)  # the ints a key may be: those orjson writes


class _Mark:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


PENDING = _Mark("PENDING")  # added, never started
DONE = _Mark("DONE")


class Tries:
    """An item tried before, not done: its last attempt's number, how many attempts failed (and the
    last error), and whether the last attempt is still ``running`` (in a replayed journal: it was
    in flight when the writer stopped). An item whose last attempt failed is given up on once
    ``failures`` reaches the ledger's ``max_attempts``; an attempt that ended without a verdict
    (cancelled, or in flight at a crash) is not a failure."""

    __slots__ = ("attempt", "error", "failures", "running")

    def __init__(self, attempt: int, failures: int, error: str | None, running: bool) -> None:
        self.attempt = attempt
        self.failures = failures
        self.error = error
        self.running = running

    def __repr__(self) -> str:
        return (
            f"Tries({self.attempt}, failures={self.failures}, error={self.error!r}, running={self.running})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tries):
            return NotImplemented
        return (self.attempt, self.failures, self.error, self.running) == (
            other.attempt,
            other.failures,
            other.error,
            other.running,
        )

    __hash__ = None  # type: ignore[assignment]


# An item's state: PENDING, DONE, Tries, or an int: the number of an attempt that began, with no
# failure before it, and has not ended (in a replayed journal: it was in flight when the writer
# stopped). A small int is shared, so the common case costs no object of its own.
State = _Mark | Tries | int


def attempt_of(item: State) -> int:
    """The number of an item's last attempt (0 if it never began one); not for a done item."""
    if item is PENDING:
        return 0
    return item if type(item) is int else item.attempt  # type: ignore[union-attr]


def check_key(key: object) -> Key:
    """``key`` if it can be a ledger's key, else TypeError (or ValueError, for one too long).

    A key is a str or an int (JSON keeps them apart, and they come back as they went in); a str
    must be valid Unicode (no lone surrogate, which JSON cannot carry) and at most MAX_KEY_BYTES.
    """
    if type(key) is int:
        if not INT_KEYS[0] <= key < INT_KEYS[1]:
            raise TypeError(f"a ledger's int key is a 64-bit one, as JSON tools read them, got {key!r:.100}")
        return key
    if type(key) is not str:
        raise TypeError(
            f"a ledger's keys are str or int (JSON keeps them apart, and they come back as they "
            f"went in), got {type(key).__name__}: {key!r:.100}"
        )
    try:
        size = len(key.encode())
    except UnicodeEncodeError as exc:
        raise TypeError(
            f"a ledger's key must be valid Unicode (JSON cannot carry a lone surrogate): {key!r:.100}"
        ) from exc
    if size > MAX_KEY_BYTES:
        raise ValueError(
            f"a ledger's key is at most {MAX_KEY_BYTES:,} bytes, got one of {size:,}: {key[:50]!r}..."
        )
    return key


class LedgerState:
    """The items of a ledger, folded from its records in journal order.

    ``items`` maps each key, in the order it was first seen, to its state (see ``State``);
    ``results`` holds done items' results when ``keep_results``.
    """

    def __init__(self, source: str, *, keep_results: bool = True) -> None:
        self.source = source  # named in errors
        self.keep_results = keep_results
        self.items: dict[Key, State] = {}
        self.results: dict[Key, Any] = {}
        self.fingerprint: Any = None
        self.fingerprinted = False  # an opening has said which job the ledger is
        self.opened = False
        self.records = 0

    def fold(self, records: Iterable[dict[str, Any]]) -> None:
        """Apply records, in journal order. Raises :class:`~yoink.NotALedgerError` on a record that is
        not a ledger's (the journal was written by something else, or damaged by hand)."""
        items, results, keep = self.items, self.results, self.keep_results
        records = iter(records)
        if not self.opened:
            for first in records:
                self.records += 1
                if type(first) is not dict or first.get(FIELD) != "open":
                    raise self._not_a_ledger(first)
                self._open(first)
                break
        count = self.records
        record: Any = None
        try:
            for record in records:  # the hot path of a resume: a million records a second
                count += 1
                kind = record[FIELD]
                if kind == "done":
                    if "key" in record:
                        key = record["key"]
                        if type(key) is not str and (
                            type(key) is not int or not INT_KEYS[0] <= key < INT_KEYS[1]
                        ):
                            raise TypeError(key)
                        items[key] = DONE
                        if keep and "result" in record:
                            results[key] = record["result"]
                    else:
                        for key in _keys(record):
                            items[key] = DONE
                elif kind == "start":
                    key, attempt = record["key"], record["attempt"]
                    item = items.get(key, PENDING)
                    if item is PENDING and type(attempt) is int and attempt > 0 and "failures" not in record:
                        if type(key) is not str and (
                            type(key) is not int or not INT_KEYS[0] <= key < INT_KEYS[1]
                        ):
                            raise TypeError(key)
                        items[key] = attempt
                    elif item is not DONE:
                        self.start(key, attempt, record.get("failures", 0))
                elif kind == "add":
                    for key in _keys(record):
                        if key not in items:
                            items[key] = PENDING
                elif kind == "fail":
                    error = record["error"]
                    if type(error) is not str:
                        raise TypeError(error)
                    self.end(record["key"], record["attempt"], record["failures"], error)
                elif kind == "stop":
                    self.end(record["key"], record["attempt"], record.get("failures", 0), record.get("error"))
                elif kind == "open":  # each time a job opened the ledger
                    self._open(record)
                else:
                    raise KeyError(FIELD)
        except (KeyError, TypeError, AttributeError) as exc:  # a field missing, or of the wrong type
            self.records = count
            raise self._not_a_ledger(record) from exc
        self.records = count

    def _open(self, record: dict[str, Any]) -> None:
        if record.get("v") != VERSION:
            raise LedgerError(
                f"{self.source} is a ledger of version {record.get('v')!r}, written by another yoink; "
                f"this one reads version {VERSION}"
            )
        self.opened = True
        if "fingerprint" in record:  # an opening without one only took the journal's lock
            self.fingerprint = record["fingerprint"]
            self.fingerprinted = True

    def start(self, key: Key, attempt: int, failures: int = 0) -> None:
        """Attempt ``attempt`` at ``key`` began, after ``failures`` failed ones."""
        _check(key, attempt, failures)
        item = self.items.get(key, PENDING)
        if item is DONE or attempt <= attempt_of(item):
            return
        if type(item) is Tries:
            failures = max(failures, item.failures)
            self.items[key] = Tries(attempt, failures, item.error, True)
        elif failures:
            self.items[key] = Tries(attempt, failures, None, True)
        else:
            self.items[key] = attempt

    def end(self, key: Key, attempt: int, failures: int, error: str | None) -> None:
        """Attempt ``attempt`` at ``key`` ended without success: failed (``error``, and ``failures``
        counts it), or stopped without a verdict."""
        _check(key, attempt, failures)
        if error is not None and type(error) is not str:
            raise TypeError(error)
        item = self.items.get(key, PENDING)
        if item is DONE or attempt < attempt_of(item):
            return
        if type(item) is Tries and attempt == item.attempt and not item.running:
            return  # that attempt's end is known already
        self.items[key] = Tries(attempt, failures, error, False)

    def _not_a_ledger(self, record: Any) -> NotALedgerError:
        try:
            shown = orjson.dumps(record)[:200].decode(errors="replace")
        except TypeError:
            shown = repr(record)[:200]
        if self.records == 1:
            return NotALedgerError(
                f"{self.source} is not a ledger: its first record is {shown}, not a ledger's "
                f'{{"{FIELD}": "open", ...}}; open a new journal for the ledger'
            )
        return NotALedgerError(f"{self.source}: record {self.records:,} is not a ledger's: {shown}")

    def interrupted(self) -> list[Key]:
        """The items whose last attempt never ended: in flight when the journal's writer stopped."""
        return [
            key
            for key, item in self.items.items()
            if type(item) is int or (type(item) is Tries and item.running)
        ]

    def given_up(self, max_attempts: int) -> bool:
        """Whether any item has failed ``max_attempts`` times (a quick test, for ``yoink stats``)."""
        return any(type(item) is Tries and item.failures >= max_attempts for item in self.items.values())


def _keys(record: dict[str, Any]) -> list[Key]:
    keys = record["keys"]
    if type(keys) is not list:
        raise TypeError(keys)
    for key in keys:
        if type(key) is not str and (type(key) is not int or not INT_KEYS[0] <= key < INT_KEYS[1]):
            raise TypeError(key)
    return keys


def _check(key: Any, attempt: Any, failures: Any) -> None:
    if type(key) is not str and (type(key) is not int or not INT_KEYS[0] <= key < INT_KEYS[1]):
        raise TypeError(key)
    if type(attempt) is not int or type(failures) is not int or attempt < 1 or failures < 0:
        raise TypeError(attempt)


def open_record(*fingerprint: Any) -> dict[str, Any]:
    """An opening: with the job's fingerprint, or without (a job taking the journal's lock)."""
    record = {FIELD: "open", "v": VERSION}
    if fingerprint:
        record["fingerprint"] = fingerprint[0]
    return record


def key_batches(keys: Iterable[Key]) -> Iterator[list[Key]]:
    """``keys`` in lists of at most BATCH_KEYS keys and about BATCH_BYTES: one record each."""
    batch: list[Key] = []
    size = 0
    for key in keys:
        batch.append(key)
        size += len(key) if type(key) is str else 20  # characters: bytes, give or take
        if len(batch) >= BATCH_KEYS or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def snapshot_records(state: LedgerState, running: set[Key]) -> Iterator[dict[str, Any]]:
    """The records of a compacted ledger: its identity, then each item's state, in order.

    ``state`` and ``running`` are the ledger's at the compaction's cut (copies: the snapshot is
    written while the job goes on). An item not running then is written as stopped, with its
    failures and last error: one whose attempt was cancelled, or interrupted before, is offered
    again, and not reported as interrupted a second time.
    """
    yield open_record(state.fingerprint)
    runs: list[tuple[str, list[Key]]] = []  # consecutive items pending, or done without a result

    def batched() -> Iterator[dict[str, Any]]:
        for kind, run in runs:
            for batch in key_batches(run):
                yield {FIELD: kind, "keys": batch}
        runs.clear()

    for key, item in state.items.items():
        if item is PENDING or (item is DONE and key not in state.results):
            kind = "add" if item is PENDING else "done"
            if not runs or runs[-1][0] != kind:
                runs.append((kind, []))
            runs[-1][1].append(key)
            if len(runs[-1][1]) >= BATCH_KEYS:
                yield from batched()
            continue
        yield from batched()
        if item is DONE:
            yield {FIELD: "done", "key": key, "result": state.results[key]}
            continue
        # in flight: its claim is running and its attempt has not ended (a failed one has, though
        # its claim is still recording that)
        in_flight = key in running and (type(item) is int or item.running)  # type: ignore[union-attr]
        record: dict[str, Any] = {
            FIELD: "start" if in_flight else "stop",
            "key": key,
            "attempt": attempt_of(item),
        }
        if type(item) is Tries:
            if item.failures:
                record["failures"] = item.failures
            if item.error is not None and not in_flight:
                record["error"] = item.error
        yield record
    yield from batched()
