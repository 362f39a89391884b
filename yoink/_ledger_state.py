"""A work ledger's records, and the state they fold into: what is done, failed, pending, in flight.

The ledger (:mod:`yoink._ledger`) writes these records to its journal; replaying them through
:class:`LedgerState` rebuilds its state after a restart, and ``yoink stats`` reads a ledger's
progress the same way. Every record names its kind in the ``"$ledger"`` field::

    {"$ledger": "open", "v": 1, "fingerprint": {...}}      the first record: the job's identity
    {"$ledger": "add", "keys": ["a", "b"]}                  work to do, in the order it was added
    {"$ledger": "start", "key": "a", "attempt": 1}          a claim began (attempts count from 1)
    {"$ledger": "done", "key": "a", "result": ...}          it ended well ("result" if there is one)
    {"$ledger": "fail", "key": "a", "attempt": 1, "error": "TimeoutError: ..."}
    {"$ledger": "done", "keys": ["a", "b"]}                 in a compacted journal: done, no results

The fold is monotone: a record moves an item forward (pending, started 1, failed 1, started 2, ...,
done) and never back, so a compaction's snapshot, taken from live state a little after its cut,
may be followed by records it already holds without changing the outcome.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import orjson

from yoink._exceptions import LedgerError, NotALedgerError

__all__ = [
    "DONE",
    "INTERRUPTED",
    "PENDING",
    "Failed",
    "Key",
    "LedgerState",
    "attempts",
    "check_key",
    "open_record",
    "snapshot_records",
]

Key = str | int
FIELD = "$ledger"
VERSION = 1
BATCH_KEYS = 1000  # keys per "add" (or compacted "done") record
INTERRUPTED = "interrupted: the attempt never ended"


class _Mark:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


PENDING = _Mark("PENDING")  # added, never started
DONE = _Mark("DONE")


class Failed:
    """An item whose last attempt failed: its number (from 1), and the error it ended with."""

    __slots__ = ("count", "error")

    def __init__(self, count: int, error: str) -> None:
        self.count = count
        self.error = error

    def __repr__(self) -> str:
        return f"Failed({self.count}, {self.error!r})"


# An item's state: PENDING, DONE, Failed, or an int: the number of an attempt that began and has
# not ended (in a replayed journal: one in flight when the writer stopped). A small int is shared,
# so a million items in flight or done cost no object of their own.
State = _Mark | Failed | int


def attempts(item: State) -> int:
    """How many attempts an item (not done) has had."""
    if item is PENDING:
        return 0
    return item if type(item) is int else item.count  # type: ignore[union-attr]


def check_key(key: object) -> Key:
    """``key`` if it can be a ledger's key (a str or an int, as JSON keeps them apart), else TypeError."""
    if type(key) is str or type(key) is int:
        return key
    raise TypeError(
        f"a ledger's keys are str or int (JSON keeps them apart, and they come back as they went in), "
        f"got {type(key).__name__}: {key!r:.100}"
    )


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
        self.opened = False
        self.records = 0

    def fold(self, records: Iterable[dict[str, Any]]) -> None:
        """Apply records, in journal order. Raises :class:`~yoink.NotALedgerError` on a record that is
        not a ledger's (the journal was written by something else)."""
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
        try:
            for record in records:  # the hot path of a resume: a million records a second
                count += 1
                kind = record[FIELD]
                if kind == "done":
                    if "key" in record:
                        key = record["key"]
                        items[key] = DONE
                        if keep and "result" in record:
                            results[key] = record["result"]
                    else:
                        for key in record["keys"]:
                            items[key] = DONE
                elif kind == "start":
                    key, attempt = record["key"], record["attempt"]
                    item = items.get(key, PENDING)
                    if item is PENDING or (item is not DONE and attempt > attempts(item)):
                        if type(attempt) is not int:
                            raise TypeError(attempt)
                        items[key] = attempt
                elif kind == "add":
                    for key in record["keys"]:
                        if key not in items:
                            items[key] = PENDING
                elif kind == "fail":
                    self.fail(record["key"], record["attempt"], record["error"])
                elif kind == "open":  # a fingerprint changed: the job carried on under the new one
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
        self.fingerprint = record.get("fingerprint")

    def start(self, key: Key, attempt: int) -> None:
        item = self.items.get(key, PENDING)
        if item is PENDING or (item is not DONE and attempt > attempts(item)):
            self.items[key] = attempt

    def fail(self, key: Key, attempt: int, error: str) -> None:
        item = self.items.get(key, PENDING)
        if item is PENDING or (item is not DONE and attempt >= attempts(item)):
            if type(attempt) is not int or type(error) is not str:
                raise TypeError(attempt)
            self.items[key] = Failed(attempt, error)

    def _not_a_ledger(self, record: Any) -> NotALedgerError:
        shown = orjson.dumps(record)[:200].decode(errors="replace")
        if self.records == 1:
            return NotALedgerError(
                f"{self.source} is not a ledger: its first record is {shown}, not a ledger's "
                f'{{"{FIELD}": "open", ...}}; open a new journal for the ledger'
            )
        return NotALedgerError(f"{self.source}: record {self.records:,} is not a ledger's: {shown}")

    def interrupted(self) -> list[Key]:
        """The items whose last attempt never ended: in flight when the journal's writer stopped."""
        return [key for key, item in self.items.items() if type(item) is int]


def open_record(fingerprint: Any) -> dict[str, Any]:
    return {FIELD: "open", "v": VERSION, "fingerprint": fingerprint}


def snapshot_records(
    state: LedgerState, keys: list[Key], running: set[Key] | frozenset[Key]
) -> Iterator[dict[str, Any]]:
    """The records of a compacted ledger: its identity, then each item's state, in ``keys``' order.

    ``keys`` is a copy of ``state.items``' keys, taken once compaction's cut is in: the state read
    for each is that of the moment it is read, never older than at the cut (the fold is monotone).
    An item started and no longer ``running`` (interrupted before, or its claim cancelled) is
    written as failed: its attempt counts, and it is offered again. Nothing is reported as
    interrupted twice.
    """
    yield open_record(state.fingerprint)
    kind: str | None = None
    batch: list[Key] = []
    for key in keys:
        item = state.items[key]
        if item is PENDING or (item is DONE and key not in state.results):
            batched = "add" if item is PENDING else "done"
            if kind != batched or len(batch) >= BATCH_KEYS:
                if batch:
                    yield {FIELD: kind, "keys": batch}
                kind, batch = batched, []
            batch.append(key)
            continue
        if batch:
            yield {FIELD: kind, "keys": batch}
            kind, batch = None, []
        if item is DONE:
            yield {FIELD: "done", "key": key, "result": state.results[key]}
        elif type(item) is Failed:
            yield {FIELD: "fail", "key": key, "attempt": item.count, "error": item.error}
        elif key in running:
            yield {FIELD: "start", "key": key, "attempt": item}
        else:
            yield {FIELD: "fail", "key": key, "attempt": item, "error": INTERRUPTED}
    if batch:
        yield {FIELD: kind, "keys": batch}
