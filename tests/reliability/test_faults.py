"""Faults under a writer: S3 that errs, resets and stalls at random; Redis killed and restarted.

Whatever happens, a record covered by a flush that returned is never lost, and no record is
replayed twice. A flush that cannot succeed raises StorageError (and keeps its records for the
next flush); nothing else escapes.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.helpers import random_seed
from tests.reliability.killing import LONG
from tests.servers.proxy import Fault, Proxy
from tests.servers.redis import RedisServer
from tests.servers.s3 import MotoServer
from yoink import CheckpointManager, StorageError
from yoink.storage import RedisStreamStorage, S3Storage
from yoink.testing._contract import _text as read_text

ROUNDS = 300 if LONG else 25


def records(first: int, count: int) -> list[dict[str, int]]:
    return [{"n": n} for n in range(first, first + count)]


async def write_through_faults(
    manager: CheckpointManager, first: int, rounds: int
) -> tuple[int, int, list[str]]:
    """Append 20 records and flush, ``rounds`` times, from record ``first``.

    Returns (records appended in all, records a returned flush covered, the errors of the others).
    """
    appended, acknowledged, errors = first, 0, []
    for _ in range(rounds):
        await manager.append_many(records(appended, 20))
        appended += 20
        try:
            await manager.flush()
        except StorageError as exc:  # anything else fails the test
            errors.append(str(exc))
        else:
            acknowledged = appended  # a flush covers everything appended before it
    return appended, acknowledged, errors


@pytest.mark.parametrize("attempts", [3, 1], ids=["retried", "not-retried"])
@pytest.mark.parametrize("layout", ["object", "segments"])
async def test_s3_errors_resets_and_stalls_lose_and_repeat_nothing(
    bucket: str, moto: MotoServer, tmp_path: Path, layout: str, attempts: int
) -> None:
    # Retried, the client absorbs most faults. Not retried, more of them reach the manager, and an
    # outage fails a flush for certain: its records must be kept, and flushed once.
    seed = random_seed()
    proxy = Proxy(moto.port)
    uri = f"s3://{bucket}/faults?layout={layout}"
    # The timeout stays short, for a stall must outlast it to be a fault and each stall costs the
    # test that long. On a loaded machine a slow answer from moto (in this process) times out too:
    # one more fault, which the storage must survive as it survives the others. The last flush,
    # which must succeed, is therefore tried until it does (a failed flush keeps its records).
    storage = S3Storage(
        uri,
        stage_dir=tmp_path / "stage",
        endpoint_url=proxy.url,
        timeout=1.0,
        max_attempts=attempts,
        merge_after=4,
    )
    try:
        proxy.chaos(0.2, random.Random(seed), stall=2.0)
        async with CheckpointManager(storage, flush_interval=None) as manager:
            appended, acknowledged, errors = await write_through_faults(manager, 0, ROUNDS)
            # Chaos is random, and the object layout makes few requests a flush: on until it struck.
            while sum(proxy.broken.values()) < 5 and appended < 20 * 10 * ROUNDS:
                appended, more, failed = await write_through_faults(manager, appended, 5)
                acknowledged, errors = max(acknowledged, more), errors + failed
            proxy.calm()
            if attempts == 1:
                # Chaos rarely fails a flush outright (the storage recognises a landed upload, and
                # more). An outage longer than the client's attempts does, every time.
                proxy.inject(Fault(500, "InternalError", times=1000))
                await manager.append_many(records(appended, 20))
                appended += 20
                with pytest.raises(StorageError):
                    await manager.flush()
                proxy.clear_faults()
            for attempt in range(5):  # what failed flushes kept goes now
                try:
                    await manager.flush()
                    break
                except StorageError as exc:
                    errors.append(str(exc))
                    assert attempt < 4, f"seed {seed}: the last flush failed five times: {errors[-5:]}"
    finally:
        proxy.stop()
    assert sum(proxy.broken.values()) >= 5, f"seed {seed}: {proxy.broken}"  # the faults did happen
    async with S3Storage(uri, stage_dir=tmp_path / "reader", endpoint_url=moto.url) as reader:
        replayed = [int(line[5:-1]) for line in (await read_text(reader)).splitlines()]
    assert set(range(acknowledged)) <= set(replayed), f"seed {seed}: acknowledged records lost"
    assert replayed == list(range(appended)), f"seed {seed}: records lost, repeated or reordered"
    print(f"seed {seed}: faults {dict(proxy.broken)}, {len(errors)} flushes failed of {ROUNDS}")


async def test_redis_killed_and_restarted_at_random_loses_and_repeats_nothing(tmp_path: Path) -> None:
    seed = random_seed()
    rng = random.Random(seed)
    server = RedisServer(tmp_path / "aof", appendonly=True)
    key = f"faults-{seed}"
    try:
        storage = RedisStreamStorage(server.url, key, lease_ttl=60)
        async with CheckpointManager(storage, flush_interval=None) as manager:
            appended, failed = 0, 0
            for _ in range(3 if not LONG else 20):
                appended, _, _ = await write_through_faults(manager, appended, rng.randint(5, 30))
                server.kill()  # at a random moment between flushes, with its AOF on
                appended, _, errors = await write_through_faults(manager, appended, rng.randint(1, 5))
                failed += len(errors)
                server.start()
            await manager.flush()
        assert failed, f"seed {seed}: the server was down for some flushes: they must have failed"
        async with RedisStreamStorage(server.url, key) as reader:
            replayed = [int(line[5:-1]) for line in (await read_text(reader)).splitlines()]
        assert replayed == list(range(appended)), f"seed {seed}: records lost, repeated or reordered"
    finally:
        server.stop()
