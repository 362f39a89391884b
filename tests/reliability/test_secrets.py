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

from tests.servers.redis import RedisServer
from tests.servers.s3 import MotoServer
from yoink import CheckpointManager, StorageError, YoinkError

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


async def test_no_command_shows_a_redis_password_in_any_form_on_success_or_failure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer(tmp_path / "redis", extra=("--requirepass", PASSWORD))
    local = tmp_path / "local.jsonl"
    local.write_text('{"n":1}\n')
    said = []
    try:
        host = f"127.0.0.1:{server.port}"
        for uri in (  # every way a Redis URI carries a password
            f"redis://:{PASSWORD}@{host}/0?key=userinfo",
            f"redis://default:{PASSWORD}@{host}/0?key=user-and-password",
            f"redis://{host}/0?key=query&password={PASSWORD}",
        ):
            twin = uri.replace("127.0.0.1", "localhost")  # the same journal, spelt otherwise
            for args in (
                ["verify", uri],  # no journal yet
                ["copy", str(local), uri],
                ["copy", "--append", str(local), uri],
                ["cat", uri],
                ["stats", uri],
                ["verify", uri],
                ["copy", str(local), uri],  # already holds records
                ["copy", uri, twin],  # one journal
                ["copy", uri, str(tmp_path / f"{len(said)}.jsonl")],
                ["verify", uri.replace("key=", "lease_ttl=abc&key=")],
                ["verify", uri.replace("key=", "lease_tll=5&key=")],
                ["--debug", "stats", uri.replace(str(server.port), "1")],
            ):
                said.append(await cli(*args))
            with caplog.at_level(logging.DEBUG):
                first = CheckpointManager.from_uri(uri, flush_interval=None)
                second = CheckpointManager.from_uri(twin, flush_interval=None)
                said += [repr(first), repr(first.storage), str(second)]
                await first.append({"n": 2})
                await first.flush()
                await second.append({"n": 3})
                with pytest.raises(StorageError) as caught:
                    await second.flush()  # CheckpointLockedError
                said.append(everything_said(caught.value))
                with pytest.raises(StorageError) as caught:
                    await second.close()  # its record is still refused
                said.append(everything_said(caught.value))
                await first.close()
        said.append(caplog.text)
    finally:
        server.stop()
    assert sum("clean, 2 records" in text for text in said) == 3  # the success paths ran
    assert sum("already holds 2 records" in text for text in said) == 3
    assert sum("is held by another writer" in text for text in said) == 6
    assert not [text for text in said if PASSWORD in text]


async def test_fsspec_credentials_in_the_uri_or_storage_options_never_show(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from yoink.storage import FsspecStorage

    said = []
    with caplog.at_level(logging.DEBUG, logger="yoink"):  # fsspec's own debug log names its paths
        for uri, options in (
            (f"sftp://user:{PASSWORD}@127.0.0.1:1/run.jsonl", {}),
            ("sftp://127.0.0.1:1/run.jsonl", {"storage_options": {"password": PASSWORD}}),
            (f"fsspec+memory://bucket/run.jsonl?sas_token={PASSWORD}", {}),
        ):
            try:
                storage = FsspecStorage(uri, stage_dir=tmp_path / "stage", **options)
            except YoinkError as exc:  # sftp needs paramiko
                said.append(everything_said(exc))
            else:
                said += [repr(storage), str(CheckpointManager(storage))]
                await storage.write('{"n":1}\n')
                await storage.flush()
                said.append(str([item async for item in storage.read()]))
                await storage.close()
            if not options:
                for command in ("cat", "stats", "verify"):
                    said.append(await cli(command, uri))
                said.append(await cli("copy", uri, uri.replace("run", "out")))
    said.append(caplog.text)
    assert not [text for text in said if PASSWORD in text]
