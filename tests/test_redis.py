"""RedisStreamStorage against a real redis-server: URIs, the lease, retries, crashes and errors.

The storage contract itself runs against Redis in test_storage_contract.py.
"""

from __future__ import annotations

import logging
import pickle
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import anyio
import orjson
import pytest
import redis.asyncio as redis

from tests.servers.proxy import DroppingProxy
from tests.servers.redis import RedisServer
from yoink import (
    CheckpointLockedError,
    CheckpointManager,
    ConcurrentWriterError,
    StorageError,
    StorageFactory,
)
from yoink.storage import RedisStreamStorage
from yoink.testing._contract import _text as read_text


@pytest.fixture
def key() -> str:
    return f"journal-{uuid.uuid4().hex[:12]}"


def records(first: int, count: int) -> str:
    return "".join(f'{{"n":{n}}}\n' for n in range(first, first + count))


async def numbers(storage: RedisStreamStorage) -> list[int]:
    return [orjson.loads(line)["n"] for line in (await read_text(storage)).splitlines()]


# -- round trips and URIs ----------------------------------------------------------------------


async def test_manager_round_trip_through_the_factory(redis_url: str, key: str) -> None:
    uri = f"{redis_url}?key={key}"
    written = [{"n": n, "t": "naïve ✓ 日本"} for n in range(5000)]
    async with CheckpointManager.from_uri(uri, flush_interval=None, batch_bytes=4096) as manager:
        assert isinstance(manager.storage, RedisStreamStorage)
        await manager.append_many(written[:2500])
        await manager.flush()
        await manager.append_many(written[2500:])
    async with CheckpointManager.from_uri(uri) as manager:
        assert [record async for record in manager.replay()] == written
        assert await manager.exists()


async def test_a_flush_is_one_round_trip_whatever_the_number_of_blocks(redis_url: str, key: str) -> None:
    storage = RedisStreamStorage(redis_url, key, entry_bytes=1024, max_pending=1 << 30)
    await storage.write(records(0, 1))  # takes the lease
    for first in range(1, 20_000, 1000):
        await storage.write(records(first, 1000))
    monitor = redis.from_url(redis_url)
    before = await monitor.info("commandstats")
    await storage.flush()
    after = await monitor.info("commandstats")

    def calls(stats: dict[str, dict[str, int]], command: str) -> int:
        return stats.get(f"cmdstat_{command}", {}).get("calls", 0)

    blocks = await monitor.xlen(key)
    assert blocks > 100
    assert calls(after, "eval") - calls(before, "eval") == 1  # one request; the XADDs run inside it
    assert calls(after, "xadd") - calls(before, "xadd") == blocks
    assert await numbers(storage) == list(range(20_001))
    await storage.close()
    await monitor.aclose()


async def test_a_unix_socket_uri(tmp_path: Path, key: str) -> None:
    socket_path = tmp_path / "redis.sock"
    server = RedisServer(
        tmp_path / "unix", extra=("--unixsocket", str(socket_path), "--unixsocketperm", "700")
    )
    try:
        uri = f"unix://{socket_path}?db=2&key={key}"
        async with CheckpointManager.from_uri(uri) as manager:
            await manager.append({"n": 0})
        async with CheckpointManager.from_uri(uri) as manager:
            assert [record async for record in manager.replay()] == [{"n": 0}]
        async with CheckpointManager.from_uri(f"unix://{socket_path}?db=0&key={key}") as other_db:
            assert not await other_db.exists()
    finally:
        server.stop()


async def test_a_password_uri_works_and_the_password_never_shows(
    tmp_path: Path, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer(tmp_path / "auth", extra=("--requirepass", "s3cret-pass"))
    try:
        good = f"redis://:s3cret-pass@127.0.0.1:{server.port}/0?key={key}"
        async with StorageFactory.from_uri(good) as storage:
            await storage.write(records(0, 1))
            assert "s3cret-pass" not in repr(storage)
            assert (
                repr(storage) == f"RedisStreamStorage('redis://:***@127.0.0.1:{server.port}/0', key={key!r})"
            )
        wrong = StorageFactory.from_uri(f"redis://:wrong-pass@127.0.0.1:{server.port}/0?key={key}")
        with pytest.raises(
            StorageError, match=f"Redis at 127.0.0.1:{server.port} refused the credentials"
        ) as caught:
            await wrong.write(records(1, 1))
        await wrong.close()
        assert "wrong-pass" not in str(caught.value) + repr(wrong) + caplog.text
    finally:
        server.stop()


def test_rediss_uris_connect_with_tls(key: str) -> None:
    storage = StorageFactory.from_uri(f"rediss://:pw@cache.example.com:6380/1?key={key}")
    assert isinstance(storage, RedisStreamStorage)
    assert repr(storage) == f"RedisStreamStorage('rediss://:***@cache.example.com:6380/1', key={key!r})"
    pool = redis.from_url(storage._url).connection_pool
    assert pool.connection_class.__name__ == "SSLConnection"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        (
            "redis://localhost:6379/0",
            r"names the stream in its query, once, as in 'redis://localhost:6379/0\?key=crawl-42'",
        ),
        ("redis://:pw@localhost/0?key=", r"as in 'redis://:\*\*\*@localhost/0\?key=crawl-42'"),
        ("redis://localhost/0?key=a&key=b", "once"),
        ("unix:///run/redis.sock?db=0", r"'unix:///run/redis.sock\?db=0&key=crawl-42'"),
    ],
)
def test_a_uri_without_a_key_shows_a_correct_one(uri: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        StorageFactory.from_uri(uri)
    assert ":pw@" not in str(caught.value)


async def test_an_unreachable_server_is_named_by_host_and_port(key: str) -> None:
    storage = RedisStreamStorage("redis://:hunter2@127.0.0.1:1/0", key)
    with pytest.raises(StorageError, match=r"cannot reach Redis at 127.0.0.1:1") as caught:
        await storage.write(records(0, 1))
    assert "hunter2" not in str(caught.value)
    await storage.close()


# -- one writer at a time ----------------------------------------------------------------------


LEASE_TTL = 3.0  # long enough that a stall of the loaded test machine does not outlast it

WRITER = """
import sys, anyio
from yoink.storage import RedisStreamStorage
async def main():
    storage = RedisStreamStorage(sys.argv[1], sys.argv[2], lease_ttl=float(sys.argv[3]))
    await storage.write('{"n":0}\\n')
    await storage.flush()
    print("leased", flush=True)
    await anyio.sleep(3600)
anyio.run(main)
"""


@pytest.fixture
def killed_writer(redis_url: str, key: str) -> tuple[float, float]:
    """A writer with a LEASE_TTL lease, kill -9-ed once it flushed; gives when it started and died.

    Its lease was last taken or renewed between the two, so it expires LEASE_TTL after one of them.
    """
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, redis_url, key, str(LEASE_TTL)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    assert process.stdout.readline() == "leased\n"
    process.kill()
    process.wait()
    process.stdout.close()
    return started, time.monotonic()


async def test_after_a_writer_is_killed_a_new_one_gets_in_once_its_lease_expires(
    redis_url: str, key: str, killed_writer: tuple[float, float]
) -> None:
    started, killed = killed_writer
    storage = RedisStreamStorage(redis_url, key)
    assert await numbers(storage) == [0]  # a resume replays first
    before = time.monotonic()
    with pytest.raises(
        CheckpointLockedError,
        match=r"its lease '\{journal-\w+\}:lease' expires in \d+\.\d s if that writer has crashed",
    ) as caught:
        await storage.write(records(1, 1))
    after = time.monotonic()
    shown = re.search(r"expires in (\d+\.\d) s", str(caught.value))
    assert shown is not None
    # What was left of the lease when Redis was asked, to the tenth of a second the message shows
    latest = min(LEASE_TTL, killed + LEASE_TTL - before)
    assert started + LEASE_TTL - after - 0.05 <= float(shown[1]) <= latest + 0.05
    await anyio.sleep(max(0.0, killed + LEASE_TTL + 0.1 - time.monotonic()))
    await storage.write(records(1, 1))
    await storage.flush()
    assert await numbers(storage) == [0, 1]
    await storage.close()


async def test_the_lease_is_renewed_while_the_writer_is_open_and_released_by_close(
    redis_url: str, key: str
) -> None:
    first = RedisStreamStorage(redis_url, key, lease_ttl=LEASE_TTL)
    await first.write(records(0, 1))
    monitor = redis.from_url(redis_url)
    renewals, left = 0, LEASE_TTL * 1000
    with anyio.fail_after(10 * LEASE_TTL):  # renewed every third of its lifetime, with no flush
        while renewals < 3:
            await anyio.sleep(0.05)
            now = await monitor.pttl(f"{{{key}}}:lease")
            assert now > 0, "the lease expired while its writer was open"
            renewals += now > left  # the time left went up: renewed
            left = now
    await monitor.aclose()
    second = RedisStreamStorage(redis_url, key, lease_ttl=LEASE_TTL)
    with pytest.raises(CheckpointLockedError, match="is held by another writer"):
        await second.write(records(1, 1))
    await first.close()
    await second.write(records(1, 1))
    await second.close()
    async with RedisStreamStorage(redis_url, key) as reader:
        assert await numbers(reader) == [0, 1]


async def stream_length(redis_url: str, key: str) -> int:
    monitor = redis.from_url(redis_url)
    try:
        return int(await monitor.xlen(key))
    finally:
        await monitor.aclose()


async def test_a_second_manager_flushing_while_the_first_holds_the_lease_is_refused_and_keeps_its_records(
    redis_url: str, key: str
) -> None:
    uri = f"{redis_url}?key={key}"
    first = CheckpointManager.from_uri(uri, flush_interval=None)
    await first.append({"n": 0})
    await first.flush()
    second = CheckpointManager.from_uri(uri, flush_interval=None)
    await second.append({"n": 100})
    with pytest.raises(CheckpointLockedError) as caught:
        await second.flush()
    assert type(caught.value) is CheckpointLockedError
    assert await stream_length(redis_url, key) == 1  # nothing of the refused flush
    await first.close()
    await second.flush()  # the refused records were kept: they go in once the lease is free
    await second.close()
    async with CheckpointManager.from_uri(uri) as reader:
        assert [record["n"] async for record in reader.replay()] == [0, 100]


async def test_a_writer_whose_expired_lease_another_took_is_fenced_and_keeps_its_records(
    redis_url: str, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    first = RedisStreamStorage(redis_url, key)
    await first.write(records(0, 1))
    await first.flush()
    await first.write(records(1, 1))  # pending when its lease runs out
    monitor = redis.from_url(redis_url)
    await monitor.delete(f"{{{key}}}:lease")  # the first writer was paused past its lease
    second = RedisStreamStorage(redis_url, key)
    await second.write(records(100, 1))
    await second.flush()
    with pytest.raises(ConcurrentWriterError, match="another writer took the journal over") as caught:
        await first.flush()
    assert type(caught.value) is ConcurrentWriterError
    assert await monitor.xlen(key) == 2  # nothing of the refused flush was written
    assert await numbers(first) == [0, 100, 1]  # its record is kept, still pending

    await second.close()  # the lease is free now, but a newer epoch has written
    assert not await monitor.exists(f"{{{key}}}:lease")
    with pytest.raises(ConcurrentWriterError):
        await first.flush()
    with pytest.raises(ConcurrentWriterError):
        await first.write(records(2, 1))
    with pytest.raises(ConcurrentWriterError):
        await first.close()
    assert not await monitor.exists(f"{{{key}}}:lease")  # never taken again
    assert "closed with 8 bytes that were never flushed" in caplog.text
    async with RedisStreamStorage(redis_url, key) as reader:
        assert await numbers(reader) == [0, 100]
    await monitor.aclose()


async def test_a_writer_without_fencing_holding_the_lease_refuses_a_flush_with_checkpoint_locked(
    redis_url: str, key: str
) -> None:
    storage = RedisStreamStorage(redis_url, key, wait_replicas=1, wait_timeout=0.1)
    await storage.write(records(0, 1))
    monitor = redis.from_url(redis_url)
    await monitor.set(f"{{{key}}}:lease", "older-yoink", px=30_000)  # took it without an epoch
    with pytest.raises(
        CheckpointLockedError, match=r"another writer \(older-yoink\) took the lease"
    ) as caught:
        await storage.flush()  # the script's error comes back through a pipeline
    assert type(caught.value) is CheckpointLockedError
    assert await monitor.xlen(key) == 0
    await monitor.delete(f"{{{key}}}:lease")
    with pytest.raises(StorageError, match="only 0 of 1 replicas"):
        await storage.flush()  # its epoch is still the newest: it takes the free lease again
    assert await numbers(storage) == [0]
    await storage.close()
    await monitor.aclose()


async def test_a_replaced_writer_stops_renewing_its_lease_and_its_next_write_is_refused(
    redis_url: str, key: str
) -> None:
    first = RedisStreamStorage(redis_url, key, lease_ttl=0.3)
    await first.write(records(0, 1))
    await first.flush()
    monitor = redis.from_url(redis_url)
    await monitor.incr(f"{{{key}}}:epoch")  # a newer writer's epoch, issued while the lease was renewed
    with anyio.fail_after(10):  # the renewal sees it, stops, and the lease expires
        while await monitor.exists(f"{{{key}}}:lease"):
            await anyio.sleep(0.05)
    with pytest.raises(ConcurrentWriterError, match=r"lease was epoch 1\) while"):
        await first.write(records(1, 1))
    assert not await monitor.exists(f"{{{key}}}:lease")
    await first.close()  # nothing pending: nothing to refuse
    await monitor.aclose()


async def test_an_early_send_refused_by_the_fence_undoes_that_write_alone(redis_url: str, key: str) -> None:
    storage = RedisStreamStorage(redis_url, key, max_pending=1000)
    await storage.write(records(0, 1))
    await storage.flush()
    await storage.write(records(1, 1))
    monitor = redis.from_url(redis_url)
    await monitor.incr(f"{{{key}}}:epoch")
    with pytest.raises(ConcurrentWriterError):
        await storage.write(records(2, 200))  # over max_pending: sent early, and refused
    assert await numbers(storage) == [0, 1]  # the earlier pending record is kept, the refused write undone
    assert await monitor.xlen(key) == 1
    with pytest.raises(ConcurrentWriterError):
        await storage.close()
    await monitor.aclose()


async def test_a_lost_epoch_key_is_never_issued_again_and_the_paused_writer_is_refused(
    redis_url: str, key: str
) -> None:
    paused = RedisStreamStorage(redis_url, key)
    await paused.write(records(0, 1))
    await paused.flush()
    await paused.write(records(1, 1))  # pending while it is paused
    monitor = redis.from_url(redis_url)
    # a failover to a replica that lagged, a lost append-only file, an operator's cleanup
    await monitor.delete(f"{{{key}}}:lease", f"{{{key}}}:epoch")
    async with RedisStreamStorage(redis_url, key) as other:
        await other.write(records(100, 1))
    assert [fields[b"e"] for _, fields in await monitor.xrange(key)] == [b"1", b"2"]  # above the stream's
    with pytest.raises(ConcurrentWriterError, match=r"epoch 2; this writer's lease was epoch 1"):
        await paused.flush()
    assert await monitor.xlen(key) == 2
    assert await numbers(paused) == [0, 100, 1]  # its record is kept, still pending
    with pytest.raises(ConcurrentWriterError):
        await paused.close()
    await monitor.aclose()


async def test_a_writer_whose_epoch_key_is_gone_is_refused_and_the_next_writer_gets_a_newer_epoch(
    redis_url: str, key: str
) -> None:
    first = RedisStreamStorage(redis_url, key)
    await first.write(records(0, 1))
    await first.flush()
    monitor = redis.from_url(redis_url)
    await monitor.delete(f"{{{key}}}:epoch")  # it cannot tell whether another writer took over since
    await first.write(records(1, 1))
    with pytest.raises(ConcurrentWriterError, match=r"'\{journal-\w+\}:epoch' is gone from Redis"):
        await first.flush()
    with pytest.raises(ConcurrentWriterError):
        await first.close()
    async with RedisStreamStorage(redis_url, key) as second:
        await second.write(records(1, 1))
    assert await monitor.get(f"{{{key}}}:epoch") == b"2"
    async with RedisStreamStorage(redis_url, key) as reader:
        assert await numbers(reader) == [0, 1]
    await monitor.aclose()


async def test_an_epoch_issued_twice_lets_only_the_first_of_its_writers_flush(
    redis_url: str, key: str
) -> None:
    paused = RedisStreamStorage(redis_url, key)
    await paused.write(records(0, 1))  # epoch 1, nothing in the stream carries it yet
    monitor = redis.from_url(redis_url)
    await monitor.delete(f"{{{key}}}:lease", f"{{{key}}}:epoch")
    other = RedisStreamStorage(redis_url, key)
    await other.write(records(100, 1))  # issued epoch 1 again: no entry told Redis otherwise
    await other.flush()
    await other.close()
    with pytest.raises(ConcurrentWriterError, match="wrote with this writer's epoch 1"):
        await paused.flush()
    assert await monitor.xlen(key) == 1
    with pytest.raises(ConcurrentWriterError):
        await paused.close()
    await monitor.aclose()


async def test_a_writer_whose_journal_moved_on_since_its_first_read_is_refused_and_keeps_its_records(
    redis_url: str, key: str
) -> None:
    uri = f"{redis_url}?key={key}"
    async with CheckpointManager.from_uri(uri) as first:
        await first.append({"n": 0})
    stale = CheckpointManager.from_uri(uri, flush_interval=None)
    assert [record["n"] async for record in stale.replay()] == [0]  # then it is paused
    async with CheckpointManager.from_uri(uri) as other:  # takes over, writes and closes
        assert [record["n"] async for record in other.replay()] == [0]
        await other.append({"n": 1})
    await stale.append({"n": 100})
    with pytest.raises(ConcurrentWriterError, match="changed since this storage first read it") as caught:
        await stale.flush()
    assert type(caught.value) is ConcurrentWriterError
    assert await stream_length(redis_url, key) == 2  # nothing of the stale writer's
    monitor = redis.from_url(redis_url)
    assert not await monitor.exists(f"{{{key}}}:lease")  # and it took no lease
    await monitor.aclose()
    with pytest.raises(ConcurrentWriterError):  # its replay hands its records over first: refused again
        assert [record["n"] async for record in stale.replay()]
    with pytest.raises(ConcurrentWriterError):
        await stale.close()
    async with CheckpointManager.from_uri(uri) as fresh:  # a writer that replays now gets in
        assert [record["n"] async for record in fresh.replay()] == [0, 1]
        await fresh.append({"n": 2})
    async with CheckpointManager.from_uri(uri) as reader:
        assert [record["n"] async for record in reader.replay()] == [0, 1, 2]


async def test_entries_carry_the_writers_epoch_and_streams_without_epochs_still_replay(
    redis_url: str, key: str
) -> None:
    monitor = redis.from_url(redis_url)
    await monitor.xadd(key, {"w": "old-writer", "b": 0, "d": records(0, 2)})  # written before fencing
    await monitor.xadd(key, {"w": "old-writer", "b": 0, "d": records(0, 2)})  # ...and its retry
    await monitor.xadd(key, {"d": records(2, 1)})  # and before block numbers
    async with RedisStreamStorage(redis_url, key) as storage:
        assert await numbers(storage) == [0, 1, 2]
        await storage.write(records(3, 1))
        await storage.flush()
        assert await numbers(storage) == [0, 1, 2, 3]
    async with RedisStreamStorage(redis_url, key) as storage:
        await storage.write(records(4, 1))
    entries = await monitor.xrange(key)
    assert [fields.get(b"e") for _, fields in entries] == [None, None, None, b"1", b"2"]
    async with RedisStreamStorage(redis_url, key) as reader:
        assert await numbers(reader) == [0, 1, 2, 3, 4]
    await monitor.aclose()


# -- retries, crashes and durability -------------------------------------------------------------


async def test_a_flush_retried_after_a_dropped_reply_is_not_replayed_twice(
    redis_url: str, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = DroppingProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    try:
        async with RedisStreamStorage(proxy.url, key) as storage:
            await storage.write(records(0, 3))
            await storage.flush()
            await storage.write(records(3, 3))
            proxy.drop_next_reply = True  # Redis runs the flush; the client never hears so, and retries
            await storage.flush()
            assert not proxy.drop_next_reply
            monitor = redis.from_url(redis_url)
            assert await monitor.xlen(key) == 3  # the retried block is in the stream twice...
            await monitor.aclose()
            assert await numbers(storage) == list(range(6))  # ...and replayed once
    finally:
        proxy.stop()


def test_a_million_records_replay_in_bounded_memory(redis_url: str, key: str) -> None:
    async def fill() -> None:
        async with CheckpointManager.from_uri(f"{redis_url}?key={key}", flush_interval=None) as manager:
            for first in range(0, 1_000_000, 100_000):
                await manager.append_many(
                    {"n": n, "url": f"https://example.com/{n}"} for n in range(first, first + 100_000)
                )
                await manager.flush()

    anyio.run(fill)
    code = (
        "import sys, resource, anyio\n"
        "from yoink import CheckpointManager\n"
        "async def main():\n"
        "    async with CheckpointManager.from_uri(sys.argv[1]) as manager:\n"
        "        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "        count = 0\n"
        "        async for _ in manager.replay():\n"
        "            count += 1\n"
        "        print(count, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
        "anyio.run(main)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, f"{redis_url}?key={key}"], capture_output=True, text=True, check=True
    )
    count, growth_kib = map(int, result.stdout.split())
    assert count == 1_000_000
    assert growth_kib < 32 * 1024, f"replay grew peak memory by {growth_kib} KiB (the journal is ~50 MB)"


async def test_redis_killed_and_restarted_loses_no_flushed_record_and_repeats_none(
    tmp_path: Path, key: str
) -> None:
    server = RedisServer(tmp_path / "aof", appendonly=True)
    acknowledged: list[int] = []
    errors: list[str] = []
    try:
        async with RedisStreamStorage(server.url, key, lease_ttl=60) as storage:
            n = 0
            for round_ in range(60):
                if round_ in (20, 40):
                    server.kill()
                    if round_ == 20:
                        server.start()  # back at once: the client's retries carry the flush over
                if round_ == 45:
                    server.start()  # after five flushes that failed
                batch = list(range(n, n + 50))
                n += 50
                await storage.write(records(batch[0], 50))
                try:
                    await storage.flush()
                except StorageError as exc:
                    errors.append(str(exc))
                    continue
                acknowledged.extend(batch)
            await storage.flush()
            acknowledged = list(range(n))  # the last flush covered everything still pending
    finally:
        pass
    try:
        assert errors, "the server was down for five flushes: some must have failed"
        assert all(f"cannot reach Redis at 127.0.0.1:{server.port}" in e for e in errors), errors
        async with RedisStreamStorage(server.url, key) as reader:
            replayed = await numbers(reader)
        assert replayed == acknowledged
    finally:
        server.stop()


async def test_waiting_for_replicas_that_do_not_answer_is_an_error_not_a_silent_pass(
    redis_url: str, key: str
) -> None:
    async with RedisStreamStorage(redis_url, key, wait_replicas=1, wait_timeout=0.1) as storage:
        await storage.write(records(0, 1))
        with pytest.raises(StorageError, match="only 0 of 1 replicas acknowledged the flush within 0.1 s"):
            await storage.flush()
        assert await numbers(storage) == [0]  # on the primary, and not sent again


async def test_waitaof_on_a_server_without_it_is_refused_at_open(redis_url: str, key: str) -> None:
    monitor = redis.from_url(redis_url)
    version = (await monitor.info("server"))["redis_version"]
    await monitor.aclose()
    storage = RedisStreamStorage(redis_url, key, wait_aof=True)
    if tuple(int(p) for p in str(version).split(".")[:2]) >= (7, 2):
        await storage.write(records(0, 1))
        await storage.flush()  # the server has WAITAOF: it is used
    else:
        with pytest.raises(
            StorageError, match=f"wait_aof=True needs WAITAOF, from Redis 7.2; .* is {version}"
        ):
            await storage.write(records(0, 1))
    await storage.close()


# -- keys, pickling --------------------------------------------------------------------------


def test_the_lease_the_epoch_and_compactions_keys_share_the_streams_cluster_slot() -> None:
    def keys(storage: RedisStreamStorage) -> list[str]:
        named = storage._keys
        return [named.lease, named.epoch, named.next, named.next_owner, named.generation, named.retired(3)]

    assert keys(RedisStreamStorage("redis://h/0", "{run-42}:journal")) == [
        "{run-42}:journal:lease",
        "{run-42}:journal:epoch",
        "{run-42}:journal:next",
        "{run-42}:journal:next:owner",
        "{run-42}:journal:generation",
        "{run-42}:journal:old:3",
    ]
    assert keys(RedisStreamStorage("redis://h/0", "journal")) == [
        "{journal}:lease",
        "{journal}:epoch",
        "{journal}:next",
        "{journal}:next:owner",
        "{journal}:generation",
        "{journal}:old:3",
    ]


async def test_a_pickled_storage_keeps_url_key_and_options_not_its_connection(
    redis_url: str, key: str
) -> None:
    storage = RedisStreamStorage(redis_url, key, lease_ttl=7)
    await storage.write(records(0, 1))
    await storage.flush()
    copy = pickle.loads(pickle.dumps(storage))
    assert (copy._url, copy.key, copy._lease.ms, copy._client) == (redis_url, key, 7000, None)
    await storage.close()
    async with copy:
        assert await numbers(copy) == [0]


async def test_no_log_line_names_a_password(
    redis_url: str, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = redis_url.replace("redis://", "redis://:not-a-real-password@")  # the server ignores it
    with caplog.at_level(logging.DEBUG, logger="yoink"):
        async with RedisStreamStorage(url, key) as storage:
            await storage.write(records(0, 1))
    assert "not-a-real-password" not in caplog.text
