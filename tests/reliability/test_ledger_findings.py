"""What the ledger's kill loop turned up, each as the smallest test that shows it (issue 17).

They are expected to fail until yoink/_ledger.py is changed (strict: one that passes fails the run,
so the mark is taken off with the fix). Move them to tests/test_ledger.py then.
"""

from __future__ import annotations

import anyio
import pytest

from tests.helpers import RecordingStorage
from yoink import Ledger
from yoink.storage import MemoryStorage


@pytest.mark.xfail(
    strict=True,
    reason="add() puts its keys in memory after its records are appended; a compaction that lists the "
    "items in between leaves them out of the snapshot, and its cut drops their add record",
)
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


@pytest.mark.xfail(
    strict=True,
    reason="a failed attempt's key is queued again in _fail(), before __aexit__ has flushed the fail "
    "record: another task claims it and its body runs while the failed claim's async with is still open",
)
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
