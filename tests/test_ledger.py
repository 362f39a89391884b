"""Ledger: keyed units of work that survive a restart, are never done twice, and are retried."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import orjson
import pytest

from tests.helpers import RecordingStorage, spy_on_fsync
from yoink import (
    CheckpointLockedError,
    CheckpointManager,
    ClaimError,
    FingerprintMismatchError,
    Ledger,
    LedgerError,
    NotALedgerError,
    Progress,
    StorageClosedError,
    _ledger,
)
from yoink._ledger_state import LedgerState, Tries, check_key
from yoink.storage import CheckpointStorage, LocalFileStorage, MemoryStorage

pytestmark = pytest.mark.usefixtures("async_backend")


def lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


async def work_through(ledger: Ledger, tasks: int = 4, body: Any = None) -> list[Any]:
    """Claim every pending item from ``tasks`` tasks; what each body ran on, in order."""
    ran: list[Any] = []

    async def worker() -> None:
        async for key in ledger.pending():
            async with ledger.claim(key) as item:
                ran.append(key)
                if body is not None:
                    await body(item)
                else:
                    await anyio.lowlevel.checkpoint()
                    item.result = {"n": key} if isinstance(key, int) else key.upper()

    async with anyio.create_task_group() as group:
        for _ in range(tasks):
            group.start_soon(worker)
    return ran


async def test_the_three_lines_do_every_item_once_and_a_restart_does_none_again(tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    async with Ledger.open(path, fingerprint={"job": 1}) as ledger:
        assert await ledger.add(range(50)) == 50
        ran = await work_through(ledger)
        assert sorted(ran) == list(range(50))
        assert ledger.progress == Progress(done=50, failed=0, pending=0, running=0, interrupted=0)
    async with Ledger.open(path, fingerprint={"job": 1}) as ledger:
        assert await ledger.add(range(60)) == 10  # the first 50 are known, and done
        ran = await work_through(ledger)
        assert sorted(ran) == list(range(50, 60))
        assert ledger.result(7) == {"n": 7}
        assert ledger.state(7) == "done"
        assert ledger.progress.done == 60
        assert ledger.interrupted == []


async def test_pending_offers_items_first_added_first_and_add_during_iteration_grows_the_work(
    tmp_path: Path,
) -> None:
    async with Ledger.open(tmp_path / "crawl.jsonl") as ledger:
        await ledger.add(["a", "b"])
        order = []
        async for key in ledger.pending():
            async with ledger.claim(key):
                order.append(key)
                if key == "a":
                    assert await ledger.add(["c", "a", "d", "c"]) == 2  # duplicates ignored
                if key == "b":
                    await ledger.add("e")  # one key
        assert order == ["a", "b", "c", "d", "e"]


async def test_lifo_order_offers_the_last_added_first(tmp_path: Path) -> None:
    async with Ledger.open(tmp_path / "crawl.jsonl", order="lifo") as ledger:
        await ledger.add(["a", "b", "c"])
        order = []
        async for key in ledger.pending():
            async with ledger.claim(key):
                order.append(key)
                if key == "c":
                    await ledger.add(["d", "e"])
        assert order == ["c", "e", "d", "b", "a"]


async def test_many_tasks_claim_each_item_exactly_once(tmp_path: Path) -> None:
    async with Ledger.open(tmp_path / "jobs.jsonl", durable=False) as ledger:
        await ledger.add(range(300))

        async def body(item: Any) -> None:
            for _ in range(random.randrange(3)):
                await anyio.lowlevel.checkpoint()
            if item.key % 7 == 0 and item.key < 140:
                await ledger.add(1000 + item.key)  # work found while working

        ran = await work_through(ledger, tasks=16, body=body)
    assert sorted(ran) == [*range(300), *(1000 + n for n in range(0, 140, 7))]


async def test_a_key_is_claimed_once_at_a_time_and_a_done_key_never_again(tmp_path: Path) -> None:
    async with Ledger.open(tmp_path / "jobs.jsonl") as ledger:
        await ledger.add("x")
        async with ledger.claim("x"):
            with pytest.raises(ClaimError, match="claimed already"):
                async with ledger.claim("x"):
                    pass
            assert ledger.state("x") == "running"
            assert ledger.progress.running == 1
        with pytest.raises(ClaimError, match="done already"):
            async with ledger.claim("x"):
                pass
        assert ledger.state("x") == "done"


async def test_a_claim_of_a_key_never_added_adds_it(tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    async with Ledger.open(path) as ledger, ledger.claim("new") as item:
        item.result = 1
    async with Ledger.open(path) as ledger:
        assert ledger.state("new") == "done"
        assert ledger.result("new") == 1


async def test_a_failing_body_is_retried_then_given_up_with_its_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "jobs.jsonl"
    tries: dict[int, int] = {}

    async def body(item: Any) -> None:
        tries[item.key] = tries.get(item.key, 0) + 1
        assert item.attempt == tries[item.key]
        if item.key == 3 or (item.key == 5 and item.attempt == 1):
            raise ConnectionError(f"refused for {item.key}")

    with caplog.at_level(logging.WARNING, logger="yoink"):
        async with Ledger.open(path, max_attempts=2) as ledger:
            await ledger.add(range(8))
            await work_through(ledger, tasks=3, body=body)
            assert tries[3] == 2
            assert tries[5] == 2
            assert tries[0] == 1
            assert ledger.given_up == {3: "ConnectionError: refused for 3"}
            assert ledger.state(3) == "failed"
            assert ledger.state(5) == "done"
            assert ledger.progress == Progress(done=7, failed=1, pending=0, running=0, interrupted=0)
    assert "attempt 1 at 3 failed: ConnectionError: refused for 3" in caplog.text
    async with Ledger.open(path, max_attempts=2) as ledger:  # given up stays given up
        assert [key async for key in ledger.pending()] == []
        assert ledger.given_up == {3: "ConnectionError: refused for 3"}
    async with Ledger.open(path, max_attempts=3) as ledger:  # a higher limit tries it again
        ran = await work_through(ledger, body=lambda item: anyio.lowlevel.checkpoint())
        assert ran == [3]
        assert ledger.progress.failed == 0
        assert ledger.state(3) == "done"


async def test_reraise_records_the_failure_and_raises_it(tmp_path: Path) -> None:
    async with Ledger.open(tmp_path / "jobs.jsonl") as ledger:
        with pytest.raises(KeyError, match="gone"):
            async with ledger.claim("a", reraise=True) as item:
                raise KeyError("gone")
        assert item.error == "KeyError: 'gone'"
        assert ledger.state("a") == "pending"


async def test_a_result_that_cannot_be_stored_fails_the_attempt_and_raises(tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    async with Ledger.open(path) as ledger:
        with pytest.raises(TypeError, match="nothing was appended"):
            async with ledger.claim("a") as item:
                item.result = object()
        assert ledger.state("a") == "pending"
        async with ledger.claim("a") as item:
            assert item.attempt == 2
            item.result = "fine"
    async with Ledger.open(path) as ledger:
        assert ledger.result("a") == "fine"


async def test_a_cancelled_claim_is_offered_again_and_after_a_restart_reported_interrupted(
    tmp_path: Path,
) -> None:
    path = tmp_path / "jobs.jsonl"
    async with Ledger.open(path) as ledger:
        await ledger.add(["a", "b"])
        with anyio.move_on_after(0.05):
            async with ledger.claim("a"):
                await anyio.sleep(10)
        assert ledger.state("a") == "pending"
        assert [key async for key in _first(ledger.pending(), 1)] == ["a"]  # first again
    async with Ledger.open(path) as ledger:
        assert ledger.interrupted == ["a"]
        assert ledger.progress.interrupted == 1
        async with ledger.claim("a") as item:
            assert item.attempt == 2  # the interrupted attempt counts
    async with Ledger.open(path) as ledger:
        assert ledger.interrupted == []


async def test_asyncio_cancellation_of_a_claim_at_each_await_leaves_a_consistent_ledger(
    tmp_path: Path, async_backend: str
) -> None:
    if async_backend != "asyncio":
        pytest.skip("task.cancel() is asyncio's")
    path = tmp_path / "jobs.jsonl"
    for step in range(6):
        async with Ledger.open(path) as ledger:
            key = f"k{step}"

            async def claim_it(key: str = key, ledger: Ledger = ledger) -> None:
                async with ledger.claim(key) as item:
                    await asyncio.sleep(0)
                    item.result = key

            task = asyncio.create_task(claim_it())
            for _ in range(step):
                await asyncio.sleep(0)
            task.cancel()
            try:
                await task
                finished = True
            except asyncio.CancelledError:
                finished = False
            state = ledger.state(key)  # None: cancelled before the claim began
            assert state in ("done", "pending", None), state
            assert finished <= (state == "done")
        async with Ledger.open(path) as reopened:  # memory and journal agree
            assert reopened.state(key) == state


async def test_breaking_out_of_pending_offers_the_item_again(tmp_path: Path) -> None:
    async with Ledger.open(tmp_path / "jobs.jsonl") as ledger:
        await ledger.add(["a", "b"])
        async for key in ledger.pending():
            assert key == "a"
            break
        assert [key async for key in _first(ledger.pending(), 2)] == ["a", "b"]


async def test_an_item_handed_to_a_task_stays_its_own_until_claimed(tmp_path: Path) -> None:
    async with Ledger.open(tmp_path / "jobs.jsonl") as ledger:
        await ledger.add(range(20))
        ran: list[int] = []
        limiter = anyio.CapacityLimiter(3)

        async def work(key: int) -> None:
            async with limiter, ledger.claim(key):
                await anyio.sleep(0.001)
                ran.append(key)

        async with anyio.create_task_group() as group:
            async for key in ledger.pending():
                group.start_soon(work, key)  # claimed later, in its task: not offered twice
        assert sorted(ran) == list(range(20))


async def test_pending_waits_while_items_run_and_ends_when_none_is_left(tmp_path: Path) -> None:
    async with Ledger.open(tmp_path / "jobs.jsonl") as ledger:
        await ledger.add("seed")
        seen = []

        async def slow_claim(key: str) -> None:
            async with ledger.claim(key):
                await anyio.sleep(0.05)
                if key == "seed":
                    await ledger.add("found")

        async with anyio.create_task_group() as group:
            async for key in ledger.pending():
                seen.append(key)
                group.start_soon(slow_claim, key)
        assert seen == ["seed", "found"]


async def test_start_is_durable_before_the_body_and_done_when_the_claim_exits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "jobs.jsonl"
    with spy_on_fsync(monkeypatch) as fsyncs:
        async with Ledger.open(path) as ledger:
            await ledger.add("a")
            async with ledger.claim("a"):
                assert lines(path)[-1] == {"$ledger": "start", "key": "a", "attempt": 1}
                assert fsyncs.sizes(path)[-1] == path.stat().st_size
            assert lines(path)[-1] == {"$ledger": "done", "key": "a"}
            assert fsyncs.sizes(path)[-1] == path.stat().st_size


async def test_durable_false_leaves_the_flush_to_the_interval(tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    async with Ledger.open(path, durable=False, flush_interval=None) as ledger:
        opened = path.stat().st_size  # the opening is flushed: it takes the lock
        await ledger.add("a")
        async with ledger.claim("a"):
            pass
        assert path.stat().st_size == opened
    assert lines(path)[-1] == {"$ledger": "done", "key": "a"}


async def test_a_changed_fingerprint_is_refused_naming_both_and_the_journal_is_unchanged(
    tmp_path: Path,
) -> None:
    path = tmp_path / "jobs.jsonl"
    async with Ledger.open(path, fingerprint={"input": "abc", "v": 1}) as ledger:
        await ledger.add("a")
    before = path.read_bytes()
    with pytest.raises(FingerprintMismatchError) as raised:
        async with Ledger.open(path, fingerprint={"input": "abd", "v": 1}):
            pass
    message = str(raised.value)
    assert '{"input":"abc","v":1}' in message
    assert '{"input":"abd","v":1}' in message
    assert raised.value.stored == {"input": "abc", "v": 1}
    # all it wrote is an opening that says nothing of a job: the lock it took to read the journal
    assert path.read_bytes() == before + b'{"$ledger":"open","v":1}\n'
    before = path.read_bytes()
    async with Ledger.open(path, fingerprint={"v": 1, "input": "abc"}) as ledger:  # key order is not identity
        assert "a" in ledger
    async with Ledger.open(path, fingerprint="v2", on_fingerprint_change="continue") as ledger:
        assert ledger.state("a") == "pending"
    async with Ledger.open(path, fingerprint="v2") as ledger:  # the new one is the journal's now
        assert ledger.fingerprint == "v2"


async def test_a_journal_of_plain_records_is_not_a_ledger_and_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "crawl.jsonl"
    async with CheckpointManager.from_uri(path) as manager:
        await manager.append({"url": "https://example.com/", "status": 200})
    before = path.read_bytes()
    with pytest.raises(NotALedgerError, match=r'its first record is \{"url":"https://example.com/"'):
        async with Ledger.open(path):
            pass
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    "record",
    [
        {"$ledger": "add", "keys": [None, "real"]},
        {"$ledger": "add", "keys": [2**64]},  # no 64-bit int: orjson could not write it back
        {"$ledger": "add", "keys": "abc"},  # a string, not a list: not its letters
        {"$ledger": "done", "key": True},  # not the item 1
        {"$ledger": "start", "key": 2.0, "attempt": 1},
        {"$ledger": "fail", "key": "a", "attempt": 1, "failures": 1, "error": 5},
        {"$ledger": "stop", "key": "a", "attempt": 0},
        {"$ledger": "start", "key": "a"},
        {"$ledger": "add", "keys": 5},
        {"$ledger": "fail", "key": "a", "attempt": "one", "error": "x"},
        {"$ledger": "start", "key": "a", "attempt": [1]},
        {"$ledger": "mystery"},
        {"other": 1},
    ],
)
async def test_a_hostile_record_after_the_first_is_named_in_a_clear_error(
    tmp_path: Path, record: dict[str, Any]
) -> None:
    path = tmp_path / "jobs.jsonl"
    async with Ledger.open(path) as ledger:
        await ledger.add(["a", "b"])
    with path.open("a") as journal:  # by another tool: json writes any int
        journal.write(json.dumps(record) + "\n")
    with pytest.raises(NotALedgerError, match=r"record 4 is not a ledger's"):  # after two openings
        async with Ledger.open(path):
            pass


async def test_a_ledger_of_another_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_bytes(b'{"$ledger":"open","v":2,"fingerprint":null}\n')
    with pytest.raises(LedgerError, match="version 2"):
        async with Ledger.open(path):
            pass


@pytest.mark.parametrize("key", [True, 1.5, None, ("a",), b"a", "caf\udce9", 2**64, -(2**63) - 1])
async def test_keys_are_str_or_int(tmp_path: Path, key: Any) -> None:
    async with Ledger.open(tmp_path / "jobs.jsonl") as ledger:
        await ledger.add(1)
        with pytest.raises(TypeError, match="key"):
            await ledger.add(["fine", key])
        with pytest.raises(TypeError, match="key"):
            ledger.claim(key)
        assert list(ledger._state.items) == [1]  # nothing of a refused add() is taken


async def test_int_and_str_keys_stay_apart(tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    async with Ledger.open(path) as ledger:
        await ledger.add([1, "1"])
        async with ledger.claim(1):
            pass
    async with Ledger.open(path) as ledger:
        assert (ledger.state(1), ledger.state("1")) == ("done", "pending")


async def test_results_are_kept_in_memory_only_on_request(tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    async with Ledger.open(path, keep_results=False) as ledger:
        async with ledger.claim("a") as item:
            item.result = [1, 2]
        with pytest.raises(ValueError, match="keep_results=False"):
            ledger.result("a")
    async with Ledger.open(path) as ledger:  # the journal has it
        assert ledger.result("a") == [1, 2]
        with pytest.raises(KeyError):
            ledger.result("nope")


async def test_a_closed_ledger_refuses_work(tmp_path: Path) -> None:
    async with Ledger.open(tmp_path / "jobs.jsonl") as ledger:
        pass
    with pytest.raises(StorageClosedError):
        await ledger.add("a")
    with pytest.raises(StorageClosedError):
        async with ledger.claim("a"):
            pass


async def test_compact_keeps_the_live_state_and_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    keys: list[Any] = [*range(100), "r", "i", "x", "y"]
    async with Ledger.open(path, fingerprint="f", max_attempts=3) as ledger:
        await ledger.add(range(100))

        async def body(item: Any) -> None:
            if item.key % 10 == 0:
                raise RuntimeError("no")
            item.result = item.key if item.key < 50 else None

        await work_through(ledger, body=body)  # multiples of 10 given up, the rest done
        async with ledger.claim("r"):
            raise RuntimeError("once")  # failed once: pending
        with anyio.move_on_after(0.01):
            async with ledger.claim("i"):  # cancelled: interrupted, pending
                await anyio.sleep(1)
        await ledger.add(["x", "y"])
        before = (ledger.progress, {key: ledger.state(key) for key in keys}, ledger.given_up)
        size = path.stat().st_size
        await ledger.compact()
        assert path.stat().st_size < size / 2
    async with Ledger.open(path, fingerprint="f", max_attempts=3) as ledger:
        assert (ledger.progress, {key: ledger.state(key) for key in keys}, ledger.given_up) == before
        assert ledger.result(3) == 3
        assert ledger.result(71) is None
        assert ledger.interrupted == []  # "i" was reported before the compaction, not again
        attempts = {}
        async for key in ledger.pending():
            async with ledger.claim(key) as item:
                attempts[key] = item.attempt
        assert attempts == {"r": 2, "i": 2, "x": 1, "y": 1}
        assert list(attempts) == ["r", "i", "x", "y"]


async def test_claims_during_a_compaction_end_up_in_the_journal(tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    async with Ledger.open(path) as ledger:
        await ledger.add(range(400))

        async def compact_often() -> None:
            for _ in range(5):
                await ledger.compact()
                await anyio.sleep(0.005)

        async with anyio.create_task_group() as group:
            group.start_soon(compact_often)
            await work_through(ledger, tasks=8)
        expected = {key: ledger.state(key) for key in range(400)}
    async with Ledger.open(path) as ledger:
        assert {key: ledger.state(key) for key in range(400)} == expected
        assert set(expected.values()) == {"done"}
        assert ledger.interrupted == []


async def test_the_ledger_compacts_itself_as_its_journal_grows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_ledger, "COMPACT_MIN_RECORDS", 50)
    path = tmp_path / "jobs.jsonl"
    async with Ledger.open(path) as ledger:
        await ledger.add(range(200))
        await work_through(ledger, body=lambda item: anyio.lowlevel.checkpoint())  # no results
    records = lines(path)
    assert records[0][0] == "$yoink"  # the header of a compacted journal
    assert len(records) < 200  # 401 records without compaction: "start" and "done" per item
    async with Ledger.open(path) as ledger:
        assert ledger.progress.done == 200


async def test_a_storage_that_cannot_compact_is_not_asked_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, async_backend: str
) -> None:
    monkeypatch.setattr(_ledger, "COMPACT_MIN_RECORDS", 20)

    class Uncompactable(MemoryStorage):
        replace = CheckpointStorage.replace  # the default: CompactionNotSupportedError

    storage = Uncompactable(f"uncompactable-{async_backend}-{random.random()}")
    with caplog.at_level(logging.INFO, logger="yoink"):
        async with Ledger.open(storage) as ledger:
            await ledger.add(range(100))
            await work_through(ledger, body=lambda item: anyio.lowlevel.checkpoint())  # no results
    assert caplog.text.count("is not compacted as it grows") == 1
    async with Ledger.open(MemoryStorage(storage.name)) as ledger:
        assert ledger.progress.done == 100


async def test_the_ledger_runs_on_any_storage(async_backend: str) -> None:
    storage = MemoryStorage(f"ledger-{async_backend}-{os.getpid()}-{random.random()}")
    async with Ledger.open(storage) as ledger:
        await ledger.add(["a", "b"])
        await work_through(ledger)
    async with Ledger.open(MemoryStorage(storage.name)) as ledger:
        assert ledger.progress.done == 2


def test_the_fold_is_monotone_so_a_snapshot_may_run_ahead_of_the_records_that_follow() -> None:
    state = LedgerState("test")
    state.fold(
        [
            {"$ledger": "open", "v": 1, "fingerprint": None},
            {"$ledger": "done", "keys": ["a"]},
            {"$ledger": "stop", "key": "b", "attempt": 2, "failures": 1, "error": "e"},
            {"$ledger": "start", "key": "c", "attempt": 3, "failures": 2},
            # what followed the cut, older than the snapshot: nothing moves back
            {"$ledger": "start", "key": "a", "attempt": 1},
            {"$ledger": "start", "key": "b", "attempt": 2},
            {"$ledger": "fail", "key": "b", "attempt": 1, "failures": 1, "error": "old"},
            {"$ledger": "start", "key": "c", "attempt": 3, "failures": 2},
            {"$ledger": "add", "keys": ["a", "b", "c", "d"]},
        ]
    )
    assert state.items["a"] is _ledger.DONE
    assert state.items["b"] == Tries(2, failures=1, error="e", running=False)
    assert state.items["c"] == Tries(3, failures=2, error=None, running=True)
    assert state.items["d"] is _ledger.PENDING
    assert state.interrupted() == ["c"]


async def test_keys_added_while_a_compaction_runs_are_all_kept(tmp_path: Path) -> None:
    # add() appends a record per batch of keys; each append can wait for a full batch to be
    # written, and a compaction called then must find, in memory, the keys of the records before
    # its cut (found by an attacker: they were lost).
    path = tmp_path / "jobs.jsonl"
    keys = [f"{n:04d}-" + "x" * 2000 for n in range(1500)]
    async with Ledger.open(path, batch_bytes=8192) as ledger:
        await ledger.add("seed")
        async with anyio.create_task_group() as group:
            group.start_soon(ledger.add, keys)
            await anyio.lowlevel.checkpoint()
            group.start_soon(ledger.compact)
        assert len(ledger) == 1501
    async with Ledger.open(path) as ledger:
        assert len(ledger) == 1501


async def test_a_new_key_claimed_from_two_tasks_at_once_runs_once(tmp_path: Path) -> None:
    ran = []

    async def claim_it(ledger: Ledger) -> None:
        with contextlib.suppress(ClaimError):
            async with ledger.claim("new"):
                ran.append(1)
                await anyio.sleep(0.01)

    # batch_bytes=1: every append waits for its write
    async with Ledger.open(tmp_path / "j.jsonl", batch_bytes=1) as ledger, anyio.create_task_group() as group:
        group.start_soon(claim_it, ledger)
        group.start_soon(claim_it, ledger)
    assert ran == [1]


async def test_a_cancelled_attempt_is_no_failure_and_the_item_comes_back_even_on_its_last(
    tmp_path: Path,
) -> None:
    async with Ledger.open(tmp_path / "jobs.jsonl", max_attempts=1) as ledger:
        await ledger.add("a")
        for _ in range(3):
            with anyio.move_on_after(0.01):
                async with ledger.claim("a"):
                    await anyio.sleep(1)
        assert ledger.state("a") == "pending"
        assert ledger.progress == Progress(done=0, failed=0, pending=1, running=0, interrupted=0)
        async with ledger.claim("a") as item:
            assert item.attempt == 4
            raise RuntimeError("the one failure allowed")
        assert ledger.given_up == {"a": "RuntimeError: the one failure allowed"}
        with anyio.move_on_after(0.01):
            async with ledger.claim("a"):  # claimed by hand, cancelled: given up as before
                await anyio.sleep(1)
        assert ledger.state("a") == "failed"
        assert ledger.progress == Progress(done=0, failed=1, pending=0, running=0, interrupted=0)


async def test_items_in_flight_at_every_crash_come_back_however_many(tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_text(
        '{"$ledger":"open","v":1,"fingerprint":null}\n{"$ledger":"add","keys":["a"]}\n'
        + "".join(
            f'{{"$ledger":"open","v":1,"fingerprint":null}}\n{{"$ledger":"start","key":"a","attempt":{n}}}\n'
            for n in range(1, 6)
        )
    )
    async with Ledger.open(path, max_attempts=2) as ledger:  # five crashes, no failure
        assert ledger.interrupted == ["a"]
        assert ledger.state("a") == "pending"
        async with ledger.claim("a") as item:
            assert item.attempt == 6


async def test_an_error_message_that_is_not_unicode_is_recorded_and_the_item_retried(tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    name = b"caf\xe9.csv".decode("utf-8", "surrogateescape")  # a file name as os.listdir() gives it
    async with Ledger.open(path) as ledger:
        async with ledger.claim("a") as item:
            raise FileNotFoundError(f"no {name}")
        assert item.error == "FileNotFoundError: no caf\\udce9.csv"
        assert ledger.state("a") == "pending"
    async with Ledger.open(path) as ledger, ledger.claim("a") as item:
        assert item.attempt == 2


async def test_many_long_keys_go_in_records_of_a_bounded_size(tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    keys = [f"{n:04d}" + "k" * 70_000 for n in range(1000)]  # 70 MB in all: over the line limit
    async with Ledger.open(path) as ledger:
        await ledger.add(keys)
        await ledger.compact()
    assert max(len(line) for line in path.read_bytes().splitlines()) < 4 << 20
    async with Ledger.open(path) as ledger:
        assert list(ledger._state.items) == keys
    with pytest.raises(ValueError, match="at most 1,048,576 bytes"):
        check_key("k" * (1 << 20 + 1))


def test_a_second_job_on_the_same_ledger_is_refused_when_it_opens(tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "holding\n"

        async def second() -> None:
            async with Ledger.open(path):
                raise AssertionError("opened beside another job")

        with pytest.raises(CheckpointLockedError):
            anyio.run(second)
    finally:
        holder.communicate("")
    assert holder.returncode == 0


async def test_a_second_ledger_on_the_same_journal_is_refused_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "jobs.jsonl"
    async with Ledger.open(path) as ledger:
        await ledger.add("a")
        with caplog.at_level(logging.WARNING, logger="yoink"), pytest.raises(CheckpointLockedError):
            async with Ledger.open(path):
                pass
        assert caplog.text == ""  # its refused opening record is not tried again at close
        async with ledger.claim("a"):
            pass
    async with Ledger.open(path) as ledger:
        assert ledger.state("a") == "done"


async def test_an_error_whose_str_fails_is_recorded_as_failed_all_the_same(tmp_path: Path) -> None:
    class Upstream(Exception):
        def __str__(self) -> str:
            return self.detail  # type: ignore[attr-defined, no-any-return]  # never set

    async with Ledger.open(tmp_path / "jobs.jsonl", max_attempts=2) as ledger:
        await ledger.add("a")

        async def body(item: Any) -> None:
            raise Upstream

        await work_through(ledger, body=body)  # ends: the item is not left running
        assert list(ledger.given_up) == ["a"]
        assert ledger.given_up["a"].endswith("Upstream: (its str() raised AttributeError)")


async def test_compactions_come_as_the_journal_grows_not_one_after_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Items tried and not done each keep a record in a snapshot: the next compaction is due at
    # four times what the last one wrote, not at once (found by an attacker: back to back).
    monkeypatch.setattr(_ledger, "COMPACT_MIN_RECORDS", 100)
    compactions = 0
    compact = Ledger.compact

    async def counted(self: Ledger) -> None:
        nonlocal compactions
        compactions += 1
        await compact(self)

    monkeypatch.setattr(Ledger, "compact", counted)
    async with Ledger.open(tmp_path / "jobs.jsonl", durable=False) as ledger:
        await ledger.add(range(1000))

        async def body(item: Any) -> None:
            raise RuntimeError("an outage")  # each fails once: 1,000 items pending a retry

        async for key in _first(ledger.pending(), 1000):
            async with ledger.claim(key) as item:
                await body(item)
        while ledger._compactor is not None:
            await anyio.sleep(0.01)
        before = compactions
        assert before >= 1
        for n in range(300):
            await ledger.add(f"new-{n}")
        while ledger._compactor is not None:
            await anyio.sleep(0.01)
        assert compactions == before


async def test_a_job_that_opens_as_the_last_one_ends_reads_all_it_did(
    tmp_path: Path, async_backend: str
) -> None:
    if async_backend != "asyncio":
        pytest.skip("the scenario is timed with asyncio events")
    # The new job takes the lock before it reads: refused while the old one holds it, and never
    # working from a journal read before the old job's last records (found by an attacker).
    path = tmp_path / "jobs.jsonl"
    async with Ledger.open(path) as ledger:
        await ledger.add(["a", "b"])
    reading, go_on = asyncio.Event(), asyncio.Event()

    class SlowRead(LocalFileStorage):
        async def read(self) -> Any:
            async for block in super().read():
                yield block
            reading.set()
            await go_on.wait()  # the rest of a long replay

    ran = []
    async with Ledger.open(path) as old, old.claim("a"):
        ran.append("old a")

        async def new_job() -> None:
            async with Ledger.open(SlowRead(str(path))) as new:
                async for key in new.pending():
                    async with new.claim(key):
                        ran.append(f"new {key}")

        task = asyncio.create_task(new_job())
        await asyncio.wait([task, asyncio.create_task(reading.wait())], return_when=asyncio.FIRST_COMPLETED)
    go_on.set()
    with contextlib.suppress(CheckpointLockedError):
        await task
    assert "new a" not in ran


async def test_a_key_added_while_a_compaction_begins_is_in_the_journal_after_it() -> None:
    storage = RecordingStorage(delay=0.05)  # a write takes 50 ms, as a remote one may
    async with Ledger.open(storage, batch_bytes=1) as ledger:  # each append writes its batch
        async with anyio.create_task_group() as group:
            group.start_soon(ledger.add, "found")  # appended, then waits for its batch to be written
            await anyio.sleep(0.01)
            await ledger.compact()
        assert "found" in ledger
    async with Ledger.open(MemoryStorage(storage.name)) as ledger:  # after a restart
        assert "found" in ledger, "a key the job added is gone: it will never be done"


async def test_a_failed_attempts_retry_begins_after_the_failed_claim_has_exited() -> None:
    storage = RecordingStorage(delay=0.05)  # a flush takes 50 ms, as a remote one may
    events: list[str] = []
    async with Ledger.open(storage) as ledger:
        await ledger.add("a")

        async def worker() -> None:
            async for key in ledger.pending():
                async with ledger.claim(key) as item:
                    events.append(f"body {item.attempt}")
                    if item.attempt == 1:
                        raise RuntimeError("the first attempt fails")
                events.append(f"exited {item.attempt}")

        async with anyio.create_task_group() as group:
            group.start_soon(worker)
            group.start_soon(worker)
    assert events == ["body 1", "exited 1", "body 2", "exited 2"]


def test_a_crash_after_a_compactions_swap_leaves_no_item_done_without_the_work_it_found(
    tmp_path: Path,
) -> None:
    # The snapshot is the state at the cut: an item that ends after it is not written done there,
    # since the keys its body added after the cut are only in the records that follow the snapshot,
    # which a crash right after the swap loses (found by an attacker's kill loop).
    path = tmp_path / "crawl.jsonl"
    job = subprocess.Popen(
        [sys.executable, "-c", CRASH_AFTER_SWAP, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert job.stdout is not None
    assert job.stdout.readline() == "swapped\n"
    job.kill()  # the machine dies before what followed the cut is written
    job.wait()
    job.stdout.close()

    async def reopened() -> tuple[Any, ...]:
        async with Ledger.open(path) as ledger:
            return ledger.state("page"), ledger.state("link"), ledger.interrupted

    assert anyio.run(reopened) == ("pending", None, ["page"])  # in flight: done again, and finds it


CRASH_AFTER_SWAP = """
import asyncio, sys
from yoink import Ledger
from yoink.storage import LocalFileStorage

class CrashAfterSwap(LocalFileStorage):
    swapped = False
    async def replace(self, text):
        await super().replace(text)
        self.swapped = True
    async def write(self, data):
        if self.swapped:
            print("swapped", flush=True)
            await asyncio.sleep(3600)
        await super().write(data)

async def main():
    async with Ledger.open(CrashAfterSwap(sys.argv[1])) as ledger:
        await ledger.add(["page", "other"])
        claim = ledger.claim("page")
        item = await claim.__aenter__()
        compaction = asyncio.create_task(ledger.compact())
        await asyncio.sleep(0)  # its cut is taken
        await ledger.add("link")  # found by the body, after the cut
        item.result = {"links": 1}
        ending = asyncio.create_task(claim.__aexit__(None, None, None))
        await compaction
        await ending
asyncio.run(main())
"""


async def test_claims_cancelled_again_and_again_do_not_grow_the_queue(tmp_path: Path) -> None:
    async with Ledger.open(tmp_path / "jobs.jsonl", durable=False) as ledger:
        await ledger.add(["a", "b"])
        for _ in range(2000):
            with anyio.CancelScope() as scope:
                scope.cancel()
                async with ledger.claim("a"):
                    await anyio.lowlevel.checkpoint()
        assert len(ledger._queue) < 100
        assert [key async for key in _first(ledger.pending(), 2)] == ["a", "b"]


@pytest.mark.parametrize("fingerprint", [{1: "a"}, 2**64, float("nan") * 0 + 1j])
async def test_a_fingerprint_the_journal_cannot_hold_is_refused_before_anything_is_written(
    tmp_path: Path, fingerprint: Any
) -> None:
    with pytest.raises(TypeError):
        async with Ledger.open(tmp_path / "jobs.jsonl", fingerprint=fingerprint):
            pass
    assert not (tmp_path / "jobs.jsonl").exists()


async def test_long_fingerprints_that_differ_late_are_shown_where_they_differ(tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    async with Ledger.open(path, fingerprint={"inputs": ["x" * 50] * 20 + ["old"]}):
        pass
    with pytest.raises(FingerprintMismatchError) as raised:
        async with Ledger.open(path, fingerprint={"inputs": ["x" * 50] * 20 + ["new"]}):
            pass
    assert '"old"' in str(raised.value)
    assert '"new"' in str(raised.value)


HOLDER = """
import anyio, sys
from yoink import Ledger
async def main():
    async with Ledger.open(sys.argv[1]) as ledger:
        print("holding", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)
anyio.run(main)
"""


async def _first(iterator: Any, n: int) -> Any:
    """The first ``n`` items of an async iterator, closing it after."""
    count = 0
    try:
        async for item in iterator:
            yield item
            count += 1
            if count >= n:
                return
    finally:
        await iterator.aclose()
