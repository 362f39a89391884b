"""Passwords and keys never appear in a repr, a log line, an exception message or the CLI's output."""

from __future__ import annotations

import logging
import os
import sys
import traceback
import uuid
from pathlib import Path

import anyio
import pytest

from tests.redis_server import RedisServer
from tests.s3 import MotoServer
from yoink import CheckpointManager, StorageError

PASSWORD = "pw-" + uuid.uuid4().hex  # nowhere else in the process, so any sighting is a leak
SECRET_KEY = "sk-" + uuid.uuid4().hex
YOINK = str(Path(sys.executable).with_name("yoink"))


async def cli(*args: str) -> str:
    """What the yoink command prints, on stdout and stderr."""
    result = await anyio.run_process([YOINK, *args], check=False, env=dict(os.environ))
    return result.stdout.decode() + result.stderr.decode()


def everything_said(exc: BaseException) -> str:
    """The exception with its chain, as a traceback would print it."""
    return "".join(traceback.format_exception(exc)) + repr(exc)


async def test_a_redis_password_never_shows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = RedisServer(tmp_path / "redis", extra=("--requirepass", PASSWORD))
    said = []
    try:
        with caplog.at_level(logging.DEBUG):
            for password in (PASSWORD, "wrong-" + PASSWORD):
                uri = f"redis://:{password}@127.0.0.1:{server.port}/0?key=secrets"
                manager = CheckpointManager.from_uri(uri, flush_interval=None)
                said += [repr(manager), repr(manager.storage), str(manager)]
                try:
                    await manager.append({"n": 1})
                    await manager.flush()
                except StorageError as exc:
                    said.append(everything_said(exc))
                finally:
                    try:
                        await manager.close()
                    except StorageError as exc:
                        said.append(everything_said(exc))
            unreachable = f"redis://:{PASSWORD}@127.0.0.1:1/0?key=secrets"
            for args in (["cat", unreachable], ["--debug", "stats", unreachable], ["verify", uri]):
                said.append(await cli(*args))
        said.append(caplog.text)
    finally:
        server.stop()
    assert any("refused the credentials" in text for text in said)  # the wrong password was tried
    assert not [text for text in said if PASSWORD in text]


async def test_an_aws_secret_key_never_shows(
    bucket: str,
    moto: MotoServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from moto import settings

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto checks signatures now
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.url)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    said = []
    with caplog.at_level(logging.DEBUG):
        manager = CheckpointManager.from_uri(f"s3://{bucket}/secrets.jsonl", flush_interval=None)
        said += [repr(manager), repr(manager.storage)]
        await manager.append({"n": 1})
        with pytest.raises(StorageError) as caught:
            await manager.flush()
        said.append(everything_said(caught.value))
        with pytest.raises(StorageError) as caught:
            await manager.close()
        said.append(everything_said(caught.value))
        said.append(await cli("--debug", "verify", f"s3://{bucket}/secrets.jsonl"))
        said.append(caplog.text)
    assert "rejected the AWS credentials" in said[2]
    assert not [text for text in said if SECRET_KEY in text]
