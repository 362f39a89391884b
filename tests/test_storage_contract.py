"""The promises of CheckpointStorage's docstrings, held by every built-in backend."""

from __future__ import annotations

import anyio
import pytest

from tests.conftest import OpenStorage, read_text
from yoink import CheckpointLockedError, StorageClosedError


async def test_reads_back_what_was_written_in_order(open_storage: OpenStorage) -> None:
    async with open_storage() as storage:
        for i in range(100):
            await storage.write(f'{{"i":{i}}}\n')
        await storage.flush()
        assert await read_text(storage) == "".join(f'{{"i":{i}}}\n' for i in range(100))


async def test_read_sees_writes_that_were_not_flushed(open_storage: OpenStorage) -> None:
    async with open_storage() as storage:
        await storage.write('{"a":1}\n')
        assert await read_text(storage) == '{"a":1}\n'


async def test_a_new_storage_reads_what_a_closed_one_flushed(open_storage: OpenStorage) -> None:
    async with open_storage() as storage:
        await storage.write('{"a":1}\n{"b":2}\n')
        await storage.flush()
    async with open_storage() as storage:
        assert await read_text(storage) == '{"a":1}\n{"b":2}\n'
        await storage.write('{"c":3}\n')
    async with open_storage() as storage:
        assert await read_text(storage) == '{"a":1}\n{"b":2}\n{"c":3}\n'


async def test_items_are_whole_lines(open_storage: OpenStorage) -> None:
    line = '{"pad":"' + "x" * 1000 + '"}\n'
    async with open_storage() as storage:
        for _ in range(3000):  # several read chunks' worth
            await storage.write(line)
        items = [item async for item in storage.read()]
    lines = [text for item in items for text in item.removesuffix("\n").split("\n")]
    assert lines == [line.removesuffix("\n")] * 3000


async def test_unicode_round_trips(open_storage: OpenStorage) -> None:
    text = '{"t":"naïve café ✓ 日本語 🚀"}\n'
    async with open_storage() as storage:
        await storage.write(text)
        await storage.flush()
    async with open_storage() as storage:
        assert await read_text(storage) == text


async def test_a_large_write_round_trips(open_storage: OpenStorage) -> None:
    text = "".join(f'{{"i":{i},"pad":"{"y" * 100}"}}\n' for i in range(100_000))
    async with open_storage() as storage:
        await storage.write(text)
        await storage.flush()
        assert await read_text(storage) == text


async def test_empty_writes_and_empty_flushes_change_nothing(open_storage: OpenStorage) -> None:
    async with open_storage() as storage:
        await storage.write("")
        await storage.flush()
        assert await read_text(storage) == ""


async def test_exists_only_after_the_first_write(open_storage: OpenStorage) -> None:
    async with open_storage() as storage:
        assert not await storage.exists()
        assert [item async for item in storage.read()] == []
        await storage.write('{"a":1}\n')
        await storage.flush()
        assert await storage.exists()


async def test_write_and_flush_after_close_raise_and_close_twice_is_safe(open_storage: OpenStorage) -> None:
    storage = open_storage()
    await storage.write('{"a":1}\n')
    await storage.close()
    await storage.close()
    with pytest.raises(StorageClosedError, match="closed"):
        await storage.write('{"b":2}\n')
    with pytest.raises(StorageClosedError):
        await storage.flush()
    async with open_storage() as reopened:
        assert await read_text(reopened) == '{"a":1}\n'


async def test_concurrent_writes_never_interleave(open_storage: OpenStorage) -> None:
    async def writer(storage_: object, n: int) -> None:
        for j in range(20):
            await storage_.write("".join(f'{{"w":{n},"j":{j},"k":{k}}}\n' for k in range(50)))  # type: ignore[attr-defined]

    async with open_storage() as storage:
        async with anyio.create_task_group() as tg:
            for n in range(50):
                tg.start_soon(writer, storage, n)
        lines = (await read_text(storage)).splitlines()
    assert len(lines) == 50 * 20 * 50
    # Each write's 50 lines stay together and in order.
    for start in range(0, len(lines), 50):
        block = lines[start : start + 50]
        assert block == [block[0].replace('"k":0}', f'"k":{k}}}') for k in range(50)]


async def test_a_second_writer_is_refused_and_loses_nothing(open_storage: OpenStorage) -> None:
    async with open_storage() as first:
        await first.write('{"first":1}\n')
        second = open_storage()
        with pytest.raises(CheckpointLockedError, match="one writer at a time"):
            await second.write('{"second":1}\n')
        await second.close()
        await first.write('{"first":2}\n')
        await first.flush()
    async with open_storage() as third:  # the lock went with close()
        await third.write('{"third":1}\n')
        assert await read_text(third) == '{"first":1}\n{"first":2}\n{"third":1}\n'
