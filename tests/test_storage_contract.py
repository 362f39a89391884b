"""yoink.testing.StorageContract, run against every built-in backend."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.servers.s3 import MotoServer
from yoink.storage import LocalFileStorage, MemoryStorage, RedisStreamStorage, S3Storage
from yoink.testing import StorageContract


@pytest.mark.usefixtures("async_backend")
class TestLocalFileStorage(StorageContract):
    @pytest.fixture
    def storage(self, tmp_path: Path) -> LocalFileStorage:
        return LocalFileStorage(tmp_path / "journal.jsonl")


@pytest.mark.usefixtures("async_backend")
class TestMemoryStorage(StorageContract):
    @pytest.fixture
    def storage(self) -> MemoryStorage:
        return MemoryStorage(f"contract-{uuid.uuid4()}")


class TestS3StorageObject(StorageContract):
    @pytest.fixture
    def storage(self, bucket: str, moto: MotoServer, tmp_path: Path) -> S3Storage:
        return S3Storage(f"s3://{bucket}/journal.jsonl", stage_dir=tmp_path / "stage", endpoint_url=moto.url)


class TestS3StorageSegments(StorageContract):
    @pytest.fixture
    def storage(self, bucket: str, moto: MotoServer, tmp_path: Path) -> S3Storage:
        uri = f"s3://{bucket}/journal?layout=segments"
        return S3Storage(uri, stage_dir=tmp_path / "stage", endpoint_url=moto.url, merge_after=4)


class TestRedisStreamStorage(StorageContract):
    @pytest.fixture
    def storage(self, redis_url: str) -> RedisStreamStorage:
        return RedisStreamStorage(redis_url, f"contract-{uuid.uuid4()}", lease_ttl=5)


BROKEN_BACKEND = '''
import uuid
import pytest
from yoink.storage import MemoryStorage
from yoink.testing import StorageContract


class ForgetfulStorage(MemoryStorage):
    """Reads back only the first write: it breaks ordering and read-your-writes."""

    async def read(self):
        async for item in super().read():
            yield item
            return


class TestForgetfulStorage(StorageContract):
    refuses_a_second_writer = False

    @pytest.fixture
    def storage(self):
        return ForgetfulStorage(f"forgetful-{uuid.uuid4()}")  # a new journal, however often it runs
'''


def test_a_backend_that_breaks_a_promise_is_told_which(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_forgetful=BROKEN_BACKEND)
    result = pytester.runpytest(
        "-p",
        "asyncio",
        "-o",
        "asyncio_mode=strict",
        "-o",
        "asyncio_default_fixture_loop_scope=function",
        "-q",
    )
    result.assert_outcomes(passed=13, failed=11, skipped=2)
    result.stdout.fnmatch_lines(["*promise broken: read() yields every write, in order*"])
    result.stdout.fnmatch_lines(["*promise broken: a reopened journal is appended to*"])


HALF_WRITING_BACKEND = '''
import asyncio
import uuid
import pytest
from yoink.storage import MemoryStorage
from yoink.testing import StorageContract


class HalfWritingStorage(MemoryStorage):
    """Stores a write in two steps with an await between: a cancellation can leave half of it."""

    async def write(self, data):
        half = data.index("\\n", len(data) // 2) + 1 if len(data) > 1000 else len(data)
        await super().write(data[:half])
        await asyncio.sleep(0.001)
        await super().write(data[half:])


class TestHalfWritingStorage(StorageContract):
    @pytest.fixture
    def storage(self):
        return HalfWritingStorage(f"half-{uuid.uuid4()}")  # a new journal, however often it runs
'''


def test_a_backend_that_a_cancellation_cuts_in_half_is_told_so(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_half=HALF_WRITING_BACKEND)
    result = pytester.runpytest(
        "-p", "asyncio", "-o", "asyncio_mode=strict", "-o", "asyncio_default_fixture_loop_scope=function",
        "-q", "-k", "cancelled",
    )  # fmt: skip
    result.assert_outcomes(passed=1, failed=1, deselected=24)
    result.stdout.fnmatch_lines(["*promise broken: a cancelled write is whole or absent*"])


PIECEMEAL_BACKEND = '''
import uuid
import pytest
from yoink.storage import MemoryStorage
from yoink.testing import StorageContract


class PiecemealStorage(MemoryStorage):
    """Replaces its journal piece by piece as the text comes: a failure part-way leaves a mix."""

    async def replace(self, text):
        self._check_open()
        journal = self._journals[self._name] = []
        async for chunk in text:
            journal.append(chunk)


class TestPiecemealStorage(StorageContract):
    refuses_a_second_writer = False

    @pytest.fixture
    def storage(self):
        return PiecemealStorage(f"piecemeal-{uuid.uuid4()}")
'''


def test_a_backend_whose_replace_is_not_atomic_is_told_so(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_piecemeal=PIECEMEAL_BACKEND)
    result = pytester.runpytest(
        "-p", "asyncio", "-o", "asyncio_mode=strict", "-o", "asyncio_default_fixture_loop_scope=function",
        "-q", "-k", "replace",
    )  # fmt: skip
    result.assert_outcomes(passed=4, failed=4, skipped=1, deselected=17)
    result.stdout.fnmatch_lines(
        ["*promise broken: a replace() that raises leaves the old journal untouched*"]
    )
    result.stdout.fnmatch_lines(
        ["*promise broken: a cancelled replace() leaves the old journal or the new one*"]
    )


CARRYING_NOTHING_BACKEND = '''
import uuid
import pytest
from yoink.storage import MemoryStorage
from yoink.testing import StorageContract


class CarryingNothingStorage(MemoryStorage):
    """Says it takes writes during replace(), but swaps in the new text alone, and reads on past
    what was there when its read began."""

    writes_during_replace = True

    async def replace(self, text):
        self._check_open()
        journal = [chunk async for chunk in text]
        self._journals[self._name] = journal

    async def read(self):
        items = self._journals.get(self._name, [])
        index = 0
        while index < len(items):
            yield items[index]
            index += 1


class TestCarryingNothingStorage(StorageContract):
    refuses_a_second_writer = False

    @pytest.fixture
    def storage(self):
        return CarryingNothingStorage(f"carrying-nothing-{uuid.uuid4()}")
'''


def test_a_backend_that_drops_writes_made_during_replace_is_told_so(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_carrying_nothing=CARRYING_NOTHING_BACKEND)
    result = pytester.runpytest(
        "-p", "asyncio", "-o", "asyncio_mode=strict", "-o", "asyncio_default_fixture_loop_scope=function",
        "-q", "-k", "during or first_item",
    )  # fmt: skip
    # passed: a read under way during replace(), and a failed replace(), which swaps nothing
    result.assert_outcomes(passed=2, failed=2, deselected=22)
    result.stdout.fnmatch_lines(
        ["*promise broken: what is written during replace() follows the new journal, in order*"]
    )
    result.stdout.fnmatch_lines(
        ["*promise broken: with writes_during_replace, read() yields only what was written before*"]
    )
