"""RedisStreamStorage.replace() against a real redis-server: generations, fencing, readers, crashes.

The contract's promises of replace() run against Redis in test_storage_contract.py; these check what
is Redis's own: the next generation and its switch, the lease and the epoch through a compaction,
reads on other connections, kill -9 of the writer and of Redis, and the size of what is sent.
"""

from __future__ import annotations

import itertools
import logging
import pickle
import random
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
import redis.asyncio as redis

from tests.servers.proxy import DroppingProxy
from tests.servers.redis import RedisServer
from yoink import CheckpointLockedError, CheckpointManager, ConcurrentWriterError, StorageError
from yoink.storage import RedisStreamStorage
from yoink.storage._redis_scripts import CARRY
from yoink.testing._contract import _text as read_text


@pytest.fixture
def key() -> str:
    return f"compact-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def monitor(redis_url: str) -> AsyncIterator[redis.Redis]:
    client = redis.from_url(redis_url)
    yield client
    await client.aclose()


def records(first: int, count: int, pad: int = 0) -> str:
    padding = f',"pad":"{"p" * pad}"' if pad else ""
    return "".join(f'{{"n":{n}{padding}}}\n' for n in range(first, first + count))


async def chunks(first: int, count: int, per_chunk: int = 100, pad: int = 0) -> AsyncIterator[str]:
    for start in range(first, first + count, per_chunk):
        yield records(start, min(per_chunk, first + count - start), pad)


async def numbers(storage: RedisStreamStorage) -> list[int]:
    return [orjson.loads(line)["n"] for line in (await read_text(storage)).splitlines()]


# -- the generations -----------------------------------------------------------------------------


async def test_a_compaction_renames_the_next_generation_over_the_journal_and_keeps_the_old_one_a_while(
    redis_url: str, key: str, monitor: redis.Redis
) -> None:
    async with RedisStreamStorage(redis_url, key, max_pending=4096, retired_ttl=60) as storage:
        await storage.write(records(0, 10))
        await storage.flush()
        old_entries = await monitor.xrange(key)
        await storage.replace(chunks(100, 1000))
        assert await monitor.get(f"{{{key}}}:generation") == b"1"
        assert await monitor.xrange(f"{{{key}}}:old:0") == old_entries  # the old journal, renamed whole
        assert 55_000 < await monitor.pttl(f"{{{key}}}:old:0") <= 60_000  # and deleted a while after
        assert not await monitor.exists(f"{{{key}}}:next")
        assert await monitor.xlen(key) > 5  # sent in pieces of about max_pending bytes
        assert await numbers(storage) == list(range(100, 1100))
        await storage.write(records(10, 2))
        await storage.replace(chunks(0, 0))  # to nothing: the journal's key goes, its generation stays
        assert await monitor.get(f"{{{key}}}:generation") == b"2"
        assert await monitor.exists(f"{{{key}}}:old:1")
        assert not await monitor.exists(key)
        assert await storage.exists()
        await storage.write(records(7, 1))
    async with RedisStreamStorage(redis_url, key) as reader:
        assert await numbers(reader) == [7]


async def test_a_journal_written_before_compaction_existed_reads_appends_and_compacts(
    redis_url: str, key: str, monitor: redis.Redis
) -> None:
    await monitor.xadd(key, {"w": "old-writer", "b": 0, "d": records(0, 2)})  # before fencing
    await monitor.xadd(key, {"d": records(2, 1)})  # and before block numbers
    async with RedisStreamStorage(redis_url, key) as storage:
        await storage.write(records(3, 1))  # this version, before its first compaction
    async with RedisStreamStorage(redis_url, key) as storage:
        assert await numbers(storage) == [0, 1, 2, 3]
        assert not await monitor.exists(f"{{{key}}}:generation")
        await storage.write(records(4, 1))
        await storage.replace(chunks(0, 5))
        assert await monitor.get(f"{{{key}}}:generation") == b"1"  # introduced by the first compaction
        await storage.write(records(5, 1))
    async with RedisStreamStorage(redis_url, key) as reader:
        assert await numbers(reader) == list(range(6))


async def test_a_stale_next_generation_is_cleared_by_the_next_compaction(
    redis_url: str, key: str, monitor: redis.Redis
) -> None:
    async with RedisStreamStorage(redis_url, key) as storage:
        await storage.write(records(0, 1))
        await storage.flush()  # holds the lease; then a next generation that is not this compaction's:
        await monitor.xadd(f"{{{key}}}:next", {"w": "gone", "b": 0, "d": records(666, 3)})
        await monitor.set(f"{{{key}}}:next:owner", "gone:1")
        await storage.replace(chunks(10, 2))
        assert await numbers(storage) == [10, 11]
        assert not await monitor.exists(f"{{{key}}}:next")


class SnapshotFailed(Exception):
    pass


async def test_a_compaction_whose_snapshot_fails_deletes_its_next_generation(
    redis_url: str, key: str, monitor: redis.Redis
) -> None:
    async def failing() -> AsyncIterator[str]:
        async for chunk in chunks(100, 500, pad=40):
            yield chunk
        raise SnapshotFailed("the snapshot's source failed part-way")

    async with RedisStreamStorage(redis_url, key, max_pending=4096) as storage:
        await storage.write(records(0, 10))
        with pytest.raises(SnapshotFailed):
            await storage.replace(failing())
        assert not await monitor.exists(f"{{{key}}}:next", f"{{{key}}}:next:owner", f"{{{key}}}:generation")
        assert await numbers(storage) == list(range(10))


async def test_a_snapshot_that_reads_the_same_storage_while_it_is_written_sees_the_old_journal(
    redis_url: str, key: str
) -> None:
    async with RedisStreamStorage(redis_url, key, max_pending=4096) as storage:
        await storage.write(records(0, 500))
        await storage.flush()

        async def doubled() -> AsyncIterator[str]:
            async for item in storage.read():  # read lazily, while the pieces go in
                yield "".join(
                    f'{{"n":{orjson.loads(line)["n"] * 2}}}\n' for line in item.splitlines() if line
                )

        with anyio.fail_after(30):
            await storage.replace(doubled())
        assert await numbers(storage) == list(range(0, 1000, 2))


async def test_a_manager_compacts_a_redis_journal_by_key_and_a_restart_replays_the_snapshot(
    redis_url: str, key: str, monitor: redis.Redis
) -> None:
    uri = f"{redis_url}?key={key}"
    async with CheckpointManager.from_uri(uri, flush_interval=None, batch_bytes=4096) as manager:
        for round_ in range(5):
            await manager.append_many({"url": f"u{n}", "round": round_} for n in range(1000))
            await manager.flush()
        done = await manager.compact(key="url")
        assert (done.records_before, done.records) == (5000, 1000)
        await manager.append({"url": "u0", "round": 5})
    assert await monitor.get(f"{{{key}}}:generation") == b"1"
    async with CheckpointManager.from_uri(uri) as manager:
        replayed = [record async for record in manager.replay()]
    assert replayed == [*({"url": f"u{n}", "round": 4} for n in range(1000)), {"url": "u0", "round": 5}]


# -- one writer at a time, and fencing -----------------------------------------------------------


async def replace_into(
    storage: RedisStreamStorage, text: AsyncIterable[str], errors: list[Exception]
) -> None:
    """``storage.replace(text)`` in a task group, its error kept for the test to look at."""
    try:
        await storage.replace(text)
    except Exception as exc:
        errors.append(exc)


class Gate:
    """A snapshot that stops after its first ``before`` chunks until it is let go."""

    def __init__(self, text: AsyncIterator[str], before: int) -> None:
        self.text, self.before = text, before
        self.reached, self.go = anyio.Event(), anyio.Event()

    async def __aiter__(self) -> AsyncIterator[str]:
        sent = 0
        async for chunk in self.text:
            if sent == self.before:
                self.reached.set()
                await self.go.wait()
            yield chunk
            sent += 1
        if sent == self.before:
            self.reached.set()
            await self.go.wait()


async def test_a_second_writer_during_a_compaction_is_refused_and_nothing_is_lost(
    redis_url: str, key: str, monitor: redis.Redis
) -> None:
    first = RedisStreamStorage(redis_url, key, max_pending=4096)
    await first.write(records(0, 10))
    await first.flush()
    gate = Gate(chunks(100, 1000, pad=40), before=5)  # each chunk is sent as it comes
    second = RedisStreamStorage(redis_url, key)  # another connection, as on another machine
    errors: list[Exception] = []
    async with anyio.create_task_group() as group:
        group.start_soon(replace_into, first, gate, errors)
        await gate.reached.wait()
        assert await monitor.exists(f"{{{key}}}:next")  # pieces are in
        with pytest.raises(CheckpointLockedError, match="is held by another writer.*nothing was written"):
            await second.write(records(5000, 1))
        gate.go.set()
    assert not errors
    assert await numbers(first) == list(range(100, 1100))
    await first.write(records(1100, 1))
    await first.close()
    await second.write(records(5000, 1))  # once the lease is free
    await second.close()
    async with RedisStreamStorage(redis_url, key) as reader:
        assert await numbers(reader) == [*range(100, 1101), 5000]


async def test_a_fenced_out_writers_replace_is_refused_and_changes_nothing(
    redis_url: str, key: str, monitor: redis.Redis
) -> None:
    first = RedisStreamStorage(redis_url, key)
    await first.write(records(0, 1))
    await first.flush()
    await monitor.delete(f"{{{key}}}:lease")  # the first writer was paused past its lease
    async with RedisStreamStorage(redis_url, key) as second:
        await second.write(records(100, 1))
    with pytest.raises(ConcurrentWriterError, match="another writer took the journal over") as caught:
        await first.replace(chunks(500, 10))
    assert type(caught.value) is ConcurrentWriterError
    assert sorted(name.decode() for name in await monitor.keys(f"*{key}*")) == [key, f"{{{key}}}:epoch"]
    with pytest.raises(ConcurrentWriterError):
        await first.replace(chunks(500, 10))
    await first.close()
    async with RedisStreamStorage(redis_url, key) as reader:
        assert await numbers(reader) == [0, 100]


@pytest.mark.parametrize("taken_over", ["by a writer", "by an epoch alone"])
async def test_a_writer_paused_past_its_lease_in_a_compaction_cannot_switch_it_in(
    redis_url: str, key: str, monitor: redis.Redis, taken_over: str
) -> None:
    first = RedisStreamStorage(redis_url, key, max_pending=4096)
    await first.write(records(0, 10))
    await first.flush()
    gate = Gate(chunks(100, 1000, pad=40), before=10)  # all sent as they come: paused before the switch
    errors: list[Exception] = []
    async with anyio.create_task_group() as group:
        group.start_soon(replace_into, first, gate, errors)
        await gate.reached.wait()
        assert await monitor.xlen(f"{{{key}}}:next") >= 10
        await monitor.delete(f"{{{key}}}:lease")  # paused past its lease...
        if taken_over == "by a writer":  # ...and another took the journal over, and left
            async with RedisStreamStorage(redis_url, key) as second:
                await second.write(records(20, 1))
            assert not await monitor.exists(f"{{{key}}}:next")  # cleared with the lease taken
        else:  # ...and a newer epoch was issued, the next generation left as it was
            await monitor.incr(f"{{{key}}}:epoch")
        gate.go.set()
    assert [type(error) for error in errors] == [ConcurrentWriterError]
    assert "another writer took the journal over" in str(errors[0])
    expected = [*range(10), 20] if taken_over == "by a writer" else list(range(10))
    assert not await monitor.exists(f"{{{key}}}:generation")
    assert not await monitor.exists(f"{{{key}}}:lease")
    await first.close()
    async with RedisStreamStorage(redis_url, key) as reader:
        assert await numbers(reader) == expected
    if taken_over == "by an epoch alone":  # its next generation is the next writer's to clear
        async with RedisStreamStorage(redis_url, key) as writer:
            await writer.write(records(30, 1))
        assert not await monitor.exists(f"{{{key}}}:next")


async def test_a_writer_fenced_while_it_writes_the_pieces_adds_none_after(
    redis_url: str, key: str, monitor: redis.Redis
) -> None:
    first = RedisStreamStorage(redis_url, key, max_pending=4096)
    await first.write(records(0, 10))
    await first.flush()
    gate = Gate(chunks(100, 1000, pad=40), before=3)
    errors: list[Exception] = []
    async with anyio.create_task_group() as group:
        group.start_soon(replace_into, first, gate, errors)
        await gate.reached.wait()
        assert await monitor.xlen(f"{{{key}}}:next") >= 3
        await monitor.delete(f"{{{key}}}:lease")
        second = RedisStreamStorage(redis_url, key)
        await second.write(records(20, 1))  # takes the lease: the first's pieces are deleted
        assert not await monitor.exists(f"{{{key}}}:next")
        gate.go.set()
    assert [type(error) for error in errors] == [ConcurrentWriterError]
    assert not await monitor.exists(f"{{{key}}}:next")  # its next piece did not write it again
    await second.replace(chunks(40, 2))  # and the new writer compacts as it likes
    await second.close()
    await first.close()
    async with RedisStreamStorage(redis_url, key) as reader:
        assert await numbers(reader) == [40, 41]


async def test_an_epoch_issued_twice_refuses_the_paused_compactions_pieces_and_its_switch(
    redis_url: str, key: str, monitor: redis.Redis
) -> None:
    paused = RedisStreamStorage(redis_url, key, max_pending=4096)
    gate = Gate(chunks(100, 1000, pad=40), before=3)  # its lease, epoch 1, taken by the compaction
    errors: list[Exception] = []
    async with anyio.create_task_group() as group:
        group.start_soon(replace_into, paused, gate, errors)
        await gate.reached.wait()
        await monitor.delete(f"{{{key}}}:lease", f"{{{key}}}:epoch")  # lost: epoch 1 is issued again
        async with RedisStreamStorage(redis_url, key) as other:
            await other.write(records(20, 1))
        assert await monitor.get(f"{{{key}}}:epoch") == b"1"
        gate.go.set()
    assert [type(error) for error in errors] == [StorageError]
    assert "is gone, cut short or another's (taken" in str(errors[0])
    assert "the journal is the old one, unchanged" in str(errors[0])
    assert not await monitor.exists(f"{{{key}}}:next")  # its pieces did not write it again
    assert not await monitor.exists(f"{{{key}}}:lease")  # nor take the lease that was free
    await paused.close()
    async with RedisStreamStorage(redis_url, key) as reader:
        assert await numbers(reader) == [20]


async def test_a_next_generation_lost_before_the_switch_is_not_switched_in(
    redis_url: str, key: str, monitor: redis.Redis
) -> None:
    async with RedisStreamStorage(redis_url, key, max_pending=4096) as storage:
        await storage.write(records(0, 10))
        await storage.flush()
        for damage in ("deleted", "its tail lost"):
            gate = Gate(chunks(100, 1000, pad=40), before=10)
            errors: list[Exception] = []
            async with anyio.create_task_group() as group:
                group.start_soon(replace_into, storage, gate, errors)
                await gate.reached.wait()
                if damage == "deleted":  # an operator's cleanup, a failover to a replica that lagged
                    await monitor.delete(f"{{{key}}}:next")
                else:
                    last_id = (await monitor.xrevrange(f"{{{key}}}:next", count=1))[0][0]
                    await monitor.xdel(f"{{{key}}}:next", last_id)
                gate.go.set()
            assert [type(error) for error in errors] == [StorageError], damage
            assert "is gone, cut short or another's (incomplete" in str(errors[0])
            assert "YOINKSTAGE" not in str(errors[0])
            assert "the journal is the old one" in str(errors[0])
            assert await numbers(storage) == list(range(10)), damage  # not renamed away
            assert not await monitor.exists(f"{{{key}}}:generation")
        await storage.write(records(10, 1))
    async with RedisStreamStorage(redis_url, key) as reader:
        assert await numbers(reader) == list(range(11))


# -- writes during a compaction --------------------------------------------------------------------


async def flush_during(
    storage: RedisStreamStorage, first: int, flushes: int, per_flush: int, pad: int = 40
) -> None:
    """Flush while a compaction is paused: a storage that held writes until its switch would wait."""
    with anyio.fail_after(10):
        for n in range(first, first + flushes * per_flush, per_flush):
            await storage.write(records(n, per_flush, pad=pad))
            await storage.flush()


async def test_flushes_during_a_compaction_are_in_redis_at_once_and_follow_the_snapshot_after_it(
    redis_url: str, key: str, monitor: redis.Redis
) -> None:
    storage = RedisStreamStorage(redis_url, key, max_pending=4096, entry_bytes=512)
    await storage.write(records(0, 10))
    await storage.flush()
    gate = Gate(chunks(100, 1000, pad=40), before=5)
    errors: list[Exception] = []
    async with anyio.create_task_group() as group:
        group.start_soon(replace_into, storage, gate, errors)
        await gate.reached.wait()
        await flush_during(storage, 5000, flushes=20, per_flush=30)  # 600 records, ~100 entries
        async with RedisStreamStorage(redis_url, key) as reader:  # another process, as it were
            assert await numbers(reader) == [*range(10), *range(5000, 5600)]  # durable, in the journal
        gate.go.set()
    assert not errors
    expected = [*range(100, 1100), *range(5000, 5600)]
    assert await numbers(storage) == expected
    await storage.write(records(9000, 1))
    await storage.close()
    async with RedisStreamStorage(redis_url, key) as reader:
        assert await numbers(reader) == [*expected, 9000]
    assert not await monitor.exists(f"{{{key}}}:next")


async def test_a_carry_whose_answer_was_lost_is_retried_and_adds_nothing_twice(
    redis_url: str, key: str, monitor: redis.Redis
) -> None:
    proxy = DroppingProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    try:
        storage = RedisStreamStorage(proxy.url, key, max_pending=4096, entry_bytes=512)
        await storage.write(records(0, 10))
        await storage.flush()
        gate = Gate(chunks(100, 100), before=1)
        errors: list[Exception] = []
        async with anyio.create_task_group() as group:
            group.start_soon(replace_into, storage, gate, errors)
            await gate.reached.wait()
            await flush_during(storage, 5000, flushes=10, per_flush=30)
            proxy.drop_reply_to = b"size = size + #fields[i]"  # the next carry's
            gate.go.set()
        assert not errors
        assert proxy.drop_reply_to is None, "no carry was sent"
        await storage.close()
        async with RedisStreamStorage(redis_url, key) as reader:
            assert await numbers(reader) == [*range(100, 200), *range(5000, 5300)]
        tags = [fields[b"b"] for _, fields in await monitor.xrange(key) if b"b" in fields]
        assert len(tags) == len(set(tags)), "an entry carried twice (readers drop the repeat)"
    finally:
        proxy.stop()


async def test_a_compaction_ends_though_flushes_outpace_its_copy(redis_url: str, key: str) -> None:
    """One entry copied per script, and tasks flushing flat out: the copy with writes going on is
    bounded, and the rest is copied with them held, so the compaction ends."""
    storage = RedisStreamStorage(redis_url, key, max_pending=64, entry_bytes=64)
    await storage.write(records(0, 10))
    await storage.flush()
    gate = Gate(chunks(100, 10), before=1)
    errors: list[Exception] = []
    flushed: list[int] = []
    replaced, stop = anyio.Event(), anyio.Event()

    async def compact() -> None:
        await replace_into(storage, gate, errors)
        replaced.set()

    async def flat_out(first: int) -> None:
        for n in itertools.count(first):
            if stop.is_set():
                return
            await storage.write(records(n, 1))
            await storage.flush()
            flushed.append(n)

    async with anyio.create_task_group() as group:
        group.start_soon(compact)
        await gate.reached.wait()
        for task in range(1, 5):
            group.start_soon(flat_out, 10_000 * task)
        while len(flushed) < 50:
            await anyio.sleep(0.01)
        gate.go.set()
        try:
            with anyio.fail_after(20):
                await replaced.wait()
        finally:
            stop.set()
    assert not errors
    expected = sorted(flushed)
    await storage.close()
    async with RedisStreamStorage(redis_url, key) as reader:
        got = await numbers(reader)
    assert got[:10] == list(range(100, 110))
    assert sorted(got[10:]) == expected


async def test_a_carry_script_copies_about_max_pending_bytes_however_large_the_entries(
    redis_url: str, key: str
) -> None:
    """A line longer than entry_bytes is an entry of its own: the copy counts bytes, not entries."""
    storage = RedisStreamStorage(redis_url, key, max_pending=512 << 10, entry_bytes=64 << 10)
    copies: list[int] = []
    run = storage._generations._run

    async def recording(script: str, *args: Any, **kwargs: Any) -> list[Any]:
        results = await run(script, *args, **kwargs)
        if script == CARRY:
            (answer,) = results
            copies.append(answer[0] if isinstance(answer, list) else answer)  # how many it copied
        return results

    storage._generations._run = recording  # type: ignore[method-assign]
    await storage.write(records(0, 10))
    await storage.flush()
    gate = Gate(chunks(100, 10), before=1)
    errors: list[Exception] = []
    async with anyio.create_task_group() as group:
        group.start_soon(replace_into, storage, gate, errors)
        await gate.reached.wait()
        await flush_during(storage, 5000, flushes=12, per_flush=1, pad=256 << 10)  # 12 entries of 256 KiB
        gate.go.set()
    assert not errors
    assert sum(copies) == 12
    assert max(copies) == 2, f"entries of 256 KiB copied per script: {copies}"
    await storage.close()
    async with RedisStreamStorage(redis_url, key) as reader:
        assert await numbers(reader) == [*range(100, 110), *range(5000, 5012)]


async def test_a_writer_taken_over_during_its_compaction_switches_nothing_and_loses_no_flush(
    redis_url: str, key: str, monitor: redis.Redis
) -> None:
    first = RedisStreamStorage(redis_url, key, max_pending=4096)
    await first.write(records(0, 10))
    await first.flush()
    gate = Gate(chunks(100, 1000, pad=40), before=5)
    errors: list[Exception] = []
    async with anyio.create_task_group() as group:
        group.start_soon(replace_into, first, gate, errors)
        await gate.reached.wait()
        await flush_during(first, 5000, flushes=3, per_flush=10)
        await monitor.delete(f"{{{key}}}:lease")  # paused past its lease...
        async with RedisStreamStorage(redis_url, key) as second:  # ...and another took over
            await second.write(records(7000, 1))
        gate.go.set()
    assert [type(error) for error in errors] == [ConcurrentWriterError]
    with pytest.raises(ConcurrentWriterError):
        await flush_during(first, 6000, flushes=1, per_flush=1)
    await first.close()
    assert not await monitor.exists(f"{{{key}}}:generation")
    async with RedisStreamStorage(redis_url, key) as reader:
        assert await numbers(reader) == [*range(10), *range(5000, 5030), 7000]


# -- readers during a switch ---------------------------------------------------------------------


async def test_a_reader_on_another_connection_during_switches_finishes_the_journal_it_began(
    redis_url: str, key: str
) -> None:
    writer = RedisStreamStorage(redis_url, key, entry_bytes=256)
    await writer.write(records(0, 2000))
    await writer.flush()
    reader = RedisStreamStorage(redis_url, key, page_size=4)  # many pages
    items = reader.read()
    seen = [await items.__anext__()]
    await writer.replace(chunks(10_000, 50))  # switched while the read is under way...
    await writer.write(records(10_050, 1))
    await writer.replace(chunks(20_000, 50))  # ...twice
    seen += [item async for item in items]
    assert [orjson.loads(line)["n"] for item in seen for line in item.splitlines()] == list(range(2000))
    assert await numbers(reader) == list(range(20_000, 20_050))  # a read begun now sees the new one
    await writer.close()
    await reader.close()


async def test_a_read_outlasting_the_old_journal_raises_rather_than_mix_in_the_new_one(
    redis_url: str, key: str
) -> None:
    writer = RedisStreamStorage(redis_url, key, entry_bytes=256, retired_ttl=0.2)
    await writer.write(records(0, 2000))
    await writer.flush()
    reader = RedisStreamStorage(redis_url, key, page_size=4)
    items = reader.read()
    seen = [await items.__anext__()]
    await writer.replace(chunks(10_000, 50))
    await anyio.sleep(0.5)  # the old journal is deleted retired_ttl after the switch
    with pytest.raises(StorageError, match="was compacted while this read was under way") as caught:
        seen += [item async for item in items]
    assert "nothing of the new journal was mixed in: read again" in str(caught.value)
    got = [orjson.loads(line)["n"] for item in seen for line in item.splitlines()]
    assert got == list(range(len(got)))
    await writer.close()
    await reader.close()


# -- crashes -------------------------------------------------------------------------------------


SNAPSHOT_SIZE = 2000  # records in each snapshot the child writes, ~240 KiB in ~30 pieces
CHILD = """
import sys, anyio, orjson
from yoink.storage import RedisStreamStorage
from yoink.storage._redis_scripts import CARRY

url, key, mode = sys.argv[1], sys.argv[2], sys.argv[3]
SIZE = int(sys.argv[4])

async def snapshot(number, stall_after=None):
    for start in range(0, SIZE, 100):
        if start == stall_after:
            print("staged", flush=True)
            await anyio.sleep(3600)
        first = number * 100_000 + start
        yield "".join('{"n":%d,"pad":"%s"}\\n' % (n, "p" * 100) for n in range(first, first + 100))

async def main():
    storage = RedisStreamStorage(url, key, lease_ttl=1.0, max_pending=8 << 10, entry_bytes=2048)
    text = "".join([item async for item in storage.read()])  # a resume reads first
    current = orjson.loads(text.partition("\\n")[0])["n"] // 100_000 if text else 0
    print("ready", flush=True)
    if mode == "stall":
        await storage.replace(snapshot(current + 1, stall_after=SIZE // 2))
    while True:
        current += 1
        await storage.replace(snapshot(current))
        print("switched", current, flush=True)

anyio.run(main)
"""


def start_child(redis_url: str, key: str, mode: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD, redis_url, key, mode, str(SNAPSHOT_SIZE)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline() == "ready\n"
    return process


def killed(process: subprocess.Popen[str]) -> list[str]:
    process.kill()
    process.wait()
    assert process.stdout is not None
    lines = process.stdout.read().split("\n")[:-1]  # a line the kill cut short ends in no newline
    process.stdout.close()
    return lines


async def lease_expired(monitor: redis.Redis, key: str) -> None:
    with anyio.fail_after(10):
        while await monitor.exists(f"{{{key}}}:lease"):
            await anyio.sleep(0.05)


def snapshot_number(numbers: list[int]) -> int:
    """Which snapshot the journal is, checking that it is one whole."""
    number = numbers[0] // 100_000 if numbers else 0
    first = number * 100_000
    expected = list(range(first, first + SNAPSHOT_SIZE)) if number else list(range(10))
    assert numbers == expected, f"not one whole journal: {len(numbers)} records from {numbers[:1]}"
    return number


async def test_a_writer_killed_mid_compaction_leaves_the_old_journal_and_the_next_writer_clears_its_pieces(
    redis_url: str, key: str, monitor: redis.Redis
) -> None:
    async with RedisStreamStorage(redis_url, key) as storage:
        await storage.write(records(0, 10))
    process = start_child(redis_url, key, "stall")
    assert process.stdout is not None
    assert process.stdout.readline() == "staged\n"
    assert await monitor.xlen(f"{{{key}}}:next") > 5  # half the snapshot is in, in pieces
    killed(process)
    async with RedisStreamStorage(redis_url, key) as reader:  # readers never look at it
        assert await numbers(reader) == list(range(10))
    assert not await monitor.exists(f"{{{key}}}:generation")
    await lease_expired(monitor, key)
    async with RedisStreamStorage(redis_url, key) as writer:
        await writer.write(records(10, 1))
    assert not await monitor.exists(f"{{{key}}}:next")
    assert not await monitor.exists(f"{{{key}}}:next:owner")
    async with RedisStreamStorage(redis_url, key) as reader:
        assert await numbers(reader) == list(range(11))


async def test_writers_killed_at_random_moments_of_compactions_leave_one_journal_whole(
    redis_url: str, key: str, monitor: redis.Redis
) -> None:
    async with RedisStreamStorage(redis_url, key) as storage:
        await storage.write(records(0, 10))
    rng = random.Random(16)
    switched, half_written = 0, 0
    for _ in range(8):
        process = start_child(redis_url, key, "loop")
        await anyio.sleep(rng.uniform(0.0, 0.4))
        acknowledged = [int(line.split()[1]) for line in killed(process) if line.startswith("switched")]
        half_written += bool(await monitor.exists(f"{{{key}}}:next"))
        async with RedisStreamStorage(redis_url, key) as reader:
            number = snapshot_number(await numbers(reader))
        if acknowledged:  # the last switch it saw returned, or the one after it went through
            assert number in (acknowledged[-1], acknowledged[-1] + 1)
        switched = max(switched, number)
        await lease_expired(monitor, key)
    assert switched > 0, "no compaction went through between the kills"
    assert half_written > 0, "no kill came while a snapshot was being written"
    async with RedisStreamStorage(redis_url, key) as writer:
        await writer.write(records(1, 1))
    assert not await monitor.exists(f"{{{key}}}:next")


async def test_redis_killed_during_compactions_keeps_the_old_journal_or_the_new_one_whole(
    tmp_path: Path, key: str
) -> None:
    server = RedisServer(tmp_path / "aof", appendonly=True)  # appendfsync always
    rng = random.Random(16)
    outcomes: list[str] = []
    size, per_chunk = 3000, 100

    async def snapshot(first: int, kill_at: int | None) -> AsyncIterator[str]:
        for number, start in enumerate(range(first, first + size, per_chunk)):
            if number == kill_at:
                server.kill()
            yield records(start, per_chunk, pad=60)
        if kill_at == size // per_chunk:  # after the last piece: before the switch
            server.kill()

    async def kill_after(delay: float) -> None:
        await anyio.sleep(delay)
        server.kill()

    try:
        storage = RedisStreamStorage(server.url, key, lease_ttl=60, max_pending=16 << 10)
        await storage.write(records(0, 10))
        await storage.flush()
        started = time.monotonic()
        await storage.replace(snapshot(100_000, None))
        duration = time.monotonic() - started  # how long one takes, for the kills at random times
        expected = list(range(100_000, 100_000 + size))
        for round_ in range(2, 12):
            first = round_ * 100_000
            async with anyio.create_task_group() as group:
                if round_ % 2:  # at a random instant of the compaction
                    group.start_soon(kill_after, rng.uniform(0.0, duration))
                    kill_at = None
                else:  # between two of its commands, one of them the switch
                    kill_at = rng.choice([0, 1, size // per_chunk // 2, size // per_chunk])
                try:
                    await storage.replace(snapshot(first, kill_at))
                except StorageError:
                    outcomes.append("failed")
                else:
                    outcomes.append("switched")
            server.start()
            got = await numbers(storage)
            new = list(range(first, first + size))
            assert got in (expected, new), f"round {round_}: not one whole journal ({len(got)} records)"
            if outcomes[-1] == "switched":
                assert got == new, f"round {round_}: a replace() that returned was lost"
            expected = got
        await storage.replace(chunks(7, 1))  # clears what a failed one left
        await storage.close()
        monitor = redis.from_url(server.url)
        assert not await monitor.exists(f"{{{key}}}:next")
        await monitor.aclose()
        assert outcomes.count("failed") >= 4, outcomes
    finally:
        server.stop()


# -- retries and size ------------------------------------------------------------------------------


async def test_a_switch_whose_answer_was_lost_is_retried_and_reports_success(
    redis_url: str, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = DroppingProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    try:
        async with RedisStreamStorage(proxy.url, key, max_pending=100) as storage:
            await storage.write(records(0, 10))
            await storage.flush()

            async def snapshot() -> AsyncIterator[str]:
                async for chunk in chunks(100, 100, per_chunk=25):  # each sent as it comes
                    yield chunk
                    if chunk.startswith('{"n":125}'):
                        proxy.drop_next_reply = True  # the next command sends the piece from 150
                proxy.drop_reply_to = b"'RENAME', KEYS[4]"  # the switch's

            with caplog.at_level(logging.WARNING, logger="yoink"):
                await storage.replace(snapshot())
            assert proxy.drop_reply_to is None
            assert not proxy.drop_next_reply
            assert "answer was lost" not in caplog.text  # the retried script knew it had switched
            assert await numbers(storage) == list(range(100, 200))  # the piece sent twice, read once
            monitor = redis.from_url(redis_url)
            assert await monitor.xlen(key) == 4  # four pieces of one entry, the one sent twice added once
            await monitor.aclose()
            token = f"{storage._lease.writer}:1"
            assert await storage._generations.abandon(token), "a compaction that switched is told so, kept"
            assert await numbers(storage) == list(range(100, 200))
    finally:
        proxy.stop()


async def test_a_switch_whose_outcome_cannot_be_learnt_says_so(redis_url: str, key: str) -> None:
    proxy = DroppingProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    try:
        storage = RedisStreamStorage(proxy.url, key, max_pending=10)
        await storage.write(records(0, 10))
        await storage.flush()

        async def snapshot() -> AsyncIterator[str]:
            yield records(100, 10)  # sent as it comes
            proxy.cut = True  # the retries cannot reach Redis...
            proxy.drop_reply_to = b"'RENAME', KEYS[4]"  # ...after the switch runs and its answer is lost

        with pytest.raises(StorageError) as caught:
            await storage.replace(snapshot())
        assert "could not tell whether the compaction's switch went through" in str(caught.value)
        assert "the journal is the old one or the new one, whole" in str(caught.value)
        async with RedisStreamStorage(redis_url, key) as reader:
            assert await numbers(reader) == list(range(100, 110))  # here, it went through
        await storage.close()
    finally:
        proxy.stop()


def test_a_50_mb_snapshot_goes_through_in_bounded_pieces(redis_url: str, key: str) -> None:
    code = (
        "import sys, resource, anyio\n"
        "from yoink.storage import RedisStreamStorage\n"
        'LINE = \'{"n":%d,"url":"https://example.com/%d","pad":"' + "p" * 400 + "\"}\\n'\n"
        "async def snapshot():\n"
        "    for first in range(0, 110_000, 2000):\n"
        "        yield ''.join(LINE % (n, n) for n in range(first, first + 2000))\n"
        "async def main():\n"
        "    async with RedisStreamStorage(sys.argv[1], sys.argv[2]) as storage:\n"
        "        await storage.write(LINE % (-1, -1))\n"
        "        await storage.flush()\n"
        "        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "        await storage.replace(snapshot())\n"
        "        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
        "anyio.run(main)\n"
    )

    async def commandstats() -> dict[str, int]:
        client = redis.from_url(redis_url)
        stats = await client.info("commandstats")
        await client.aclose()
        return {name: value["calls"] for name, value in stats.items()}

    before = anyio.run(commandstats)
    result = subprocess.run(
        [sys.executable, "-c", code, redis_url, key], capture_output=True, text=True, check=True
    )
    after = anyio.run(commandstats)
    growth_kib = int(result.stdout)
    scripts = after.get("cmdstat_eval", 0) - before.get("cmdstat_eval", 0)

    async def check() -> None:
        async with RedisStreamStorage(redis_url, key) as reader:
            count, size = 0, 0
            async for item in reader.read():
                size += len(item.encode())
                count += item.count("\n")
        client = redis.from_url(redis_url)
        await client.delete(key, f"{{{key}}}:old:0")  # the session's server keeps no 50 MB around
        await client.aclose()
        assert count == 110_000
        assert size > 50_000_000

    anyio.run(check)
    assert scripts >= 7, f"{scripts} scripts: the snapshot went in pieces of about max_pending (8 MiB)"
    assert growth_kib < 24 * 1024, f"a 50 MB snapshot grew the writer's peak memory by {growth_kib} KiB"


def test_retired_ttl_is_an_option_of_the_uri_kept_by_a_pickled_storage() -> None:
    storage = RedisStreamStorage.from_uri("redis://localhost/0?key=crawl&retired_ttl=60")
    assert pickle.loads(pickle.dumps(storage))._options.retired_ttl == 60.0
    with pytest.raises(ValueError, match="retired_ttl must be positive"):
        RedisStreamStorage("redis://localhost/0", "crawl", retired_ttl=0)
