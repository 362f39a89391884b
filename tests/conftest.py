"""Fixtures for every test: storages on each backend, the real servers behind them, trio runs.

Nothing here imports an optional package (aioboto3, redis, fsspec, moto) before a test asks for it:
a test that needs a missing one is skipped, or fails under CI=true (tests/extras.py).
"""

from __future__ import annotations

import functools
import inspect
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.servers.proxy import Proxy
from tests.servers.redis import RedisServer, redis_server_binary
from tests.servers.s3 import MotoServer
from yoink.storage import CheckpointStorage, LocalFileStorage, MemoryStorage

pytest_plugins = ["pytester", "tests.extras"]

OpenStorage = Callable[[], CheckpointStorage]
ASYNCIO_ONLY = {"s3-object", "s3-segments", "redis"}  # their clients run on asyncio alone


@pytest.fixture(params=["asyncio", "trio"])
def async_backend(request: pytest.FixtureRequest) -> str:
    """Runs a test under asyncio and under trio: ask for it with usefixtures("async_backend")."""
    return str(request.param)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run the trio variant of an async test under trio; pytest-asyncio runs the rest."""
    callspec = getattr(pyfuncitem, "callspec", None)
    if callspec is None or callspec.params.get("async_backend") != "trio":
        return None
    test = getattr(pyfuncitem.obj, "__wrapped__", pyfuncitem.obj)  # under pytest-asyncio's wrapper
    if not inspect.iscoroutinefunction(test):
        return None
    arguments = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    anyio.run(functools.partial(test, **arguments), backend="trio")
    return True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Under scripts/mutate, tell mutmut which functions this test's subprocesses ran.

    They wrote them to $YOINK_MUTATION_HITS (scripts/mutation/sitecustomize.py); mutmut then runs
    this test against those functions' mutants too. Elsewhere this does nothing.
    """
    yield
    hits = os.environ.get("YOINK_MUTATION_HITS")
    if not hits or os.environ.get("MUTANT_UNDER_TEST") != "stats":
        return
    from mutmut.stats import record_trampoline_hit

    for path in Path(hits).glob("*"):
        for name in set(path.read_text().split()):
            record_trampoline_hit(name)
        path.unlink()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave out trio runs on S3 and Redis: tests/test_cancellation.py checks that they refuse it."""
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        asyncio_only = any(value in ASYNCIO_ONLY for value in params.values() if isinstance(value, str))
        (drop if params.get("async_backend") == "trio" and asyncio_only else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(params=["local", "memory", "s3-object", "s3-segments", "redis"])
def open_storage(request: pytest.FixtureRequest, tmp_path: Path) -> OpenStorage:
    """Opens a new storage on one journal each call, as a restarted process would."""
    if request.param == "local":
        path = tmp_path / "journal.jsonl"
        return lambda: LocalFileStorage(path)
    if request.param.startswith("s3-"):
        from yoink.storage import S3Storage

        bucket = request.getfixturevalue("bucket")
        layout = request.param.removeprefix("s3-")
        endpoint = request.getfixturevalue("moto").url
        uri = f"s3://{bucket}/journal.jsonl"
        return lambda: S3Storage(uri, layout=layout, stage_dir=tmp_path / "stage", endpoint_url=endpoint)
    if request.param == "redis":
        from yoink.storage import RedisStreamStorage

        url, key = request.getfixturevalue("redis_url"), f"test-{uuid.uuid4()}"
        return lambda: RedisStreamStorage(url, key, lease_ttl=5)
    name = f"test-{uuid.uuid4()}"
    return lambda: MemoryStorage(name)


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoServer]:
    """moto's S3 server, shared by the session; each test gets its own bucket."""
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Test credentials, and no profile, config file or instance metadata from this machine."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def bucket(moto: MotoServer, aws_env: None) -> str:
    """A new, empty bucket on the moto server."""
    import boto3

    name = f"yoink-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def proxy(moto: MotoServer) -> Iterator[Proxy]:
    """A counting, fault-injecting proxy in front of the moto server."""
    server = Proxy(moto.port)
    yield server
    server.stop()


@pytest.fixture
def small_parts(monkeypatch: pytest.MonkeyPatch) -> int:
    """Lower S3's 5 MiB multipart minimum, in moto and in yoink, to keep multipart tests fast."""
    import moto.s3.models

    from yoink.storage import S3Storage

    size = 256 << 10
    monkeypatch.setattr(moto.s3.models, "S3_UPLOAD_PART_MIN_SIZE", size)
    monkeypatch.setattr(S3Storage, "min_part_size", size)
    return size


@pytest.fixture
def completes_are_conditional(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make moto honour If-Match on CompleteMultipartUpload, as S3 does (since 2024); moto ignores it.

    Without it, moto completes a multipart upload over an object another writer changed, so a
    test of the condition that fences a large upload could not fail.
    """
    from moto.s3.exceptions import PreconditionFailed
    from moto.s3.responses import S3Response

    original = S3Response._key_response_post

    def post(
        self: Any, request: Any, body: bytes, bucket_name: str, query: dict[str, Any], key_name: str
    ) -> Any:
        expected = request.headers.get("If-Match")
        if query.get("uploadId") and expected:
            existing = self.backend.get_object(bucket_name, key_name)
            if existing is None or existing.etag.strip('"') != expected.strip('"'):
                raise PreconditionFailed("If-Match")
        return original(self, request, body, bucket_name, query, key_name)

    monkeypatch.setattr(S3Response, "_key_response_post", post)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis for the session: $YOINK_TEST_REDIS_URL, or a redis-server started here.

    Without either, a Redis test is skipped, except under CI=true, where it fails.
    """
    if url := os.environ.get("YOINK_TEST_REDIS_URL"):
        yield url
        return
    if redis_server_binary() is None:
        from tests.extras import missing  # loaded first as a plugin, so that pytest rewrites it

        missing("redis-server is not installed and YOINK_TEST_REDIS_URL is not set")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server.url
    server.stop()
