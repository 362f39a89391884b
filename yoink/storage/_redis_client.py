"""RedisStreamStorage's connection to Redis: what its URL names, the waits a write may add, and the
edge where redis-py's errors end.

Every command runs inside :func:`translated`, which turns redis-py's exceptions into yoink's (or into
:class:`Refused`, the append script's refusal, which the storage acts on); :class:`Waits` turns the
replies of ``WAIT`` and ``WAITAOF`` into an error when they fall short. Messages name the server as
host and port, never with a password.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as redis
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import (
    URL_QUERY_ARGUMENT_PARSERS,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from yoink._exceptions import StorageError
from yoink.storage._uri import query_pairs, redact

__all__ = [
    "Refused",
    "Waits",
    "connect",
    "server_identity",
    "server_of",
    "split_key",
    "translated",
    "url_options",
]

_REFUSAL = re.compile(r"\bYOINK(LEASE|FENCED|STAGE) ([^\s'\",)]+)")


class Refused(Exception):
    """A script refused: a newer epoch exists (``fenced``), another holds the lease (``LEASE``), or a
    compaction's next generation is not this one's to write or switch (``STAGE``)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.fenced = kind == "FENCED"
        self.detail = detail


async def connect(url: str, *, wait_aof: bool) -> redis.Redis:
    """A client for ``url`` that has answered a PING (and, with ``wait_aof``, knows WAITAOF)."""
    client = redis.from_url(
        url,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        socket_connect_timeout=5,
    )
    where = server_of(url)
    try:
        with translated(where, "PING"):
            await client.ping()
            if wait_aof:
                await _check_waitaof(client, where)
    except BaseException:
        await client.aclose()
        raise
    return client


async def _check_waitaof(client: redis.Redis, where: str) -> None:
    version = (await client.info("server"))["redis_version"]
    if tuple(int(part) for part in str(version).split(".")[:2]) < (7, 2):
        raise StorageError(f"wait_aof=True needs WAITAOF, from Redis 7.2; the server at {where} is {version}")


@contextlib.contextmanager
def translated(where: str, command: str) -> Iterator[None]:
    """Turn redis-py's exceptions inside the block into yoink's; ``where`` is :func:`server_of`'s."""
    try:
        yield
    except AuthenticationError as exc:
        raise StorageError(f"Redis at {where} refused the credentials (AUTH)") from exc
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise StorageError(
            f"cannot reach Redis at {where} ({type(exc).__name__}); what was not flushed is kept"
        ) from exc
    except ResponseError as exc:
        message = str(exc)
        # The script's refusal, wherever redis-py put it: a pipeline's error quotes the command
        # (the script's source, where the marker is followed by a quote) before the reply.
        refusals = _REFUSAL.findall(message)
        if refusals:
            kind, detail = refusals[-1]
            raise Refused(kind, detail) from None
        raise StorageError(f"Redis at {where} refused {command}: {message}") from exc
    except RedisError as exc:
        raise StorageError(f"Redis {command} at {where} failed: {type(exc).__name__}") from exc


@dataclass(frozen=True)
class Waits:
    """What a write waits for once Redis has applied it: ``replicas`` replicas (``WAIT``) and, with
    ``aof``, the append-only file (``WAITAOF``), each for at most ``ms`` milliseconds."""

    replicas: int
    aof: bool
    ms: int

    def add_to(self, pipe: Pipeline) -> None:
        """Queue the waits in ``pipe``, after the write."""
        if self.replicas:
            pipe.execute_command("WAIT", self.replicas, self.ms)
        if self.aof:
            pipe.execute_command("WAITAOF", 1, self.replicas, self.ms)

    def check(self, replies: list[Any], owner: object) -> None:
        """Raise if the replicas or the append-only file did not confirm the write in time;
        ``replies`` are the pipeline's, the write's first; ``owner`` is the storage."""
        if self.replicas:
            acked = replies[1]
            if acked < self.replicas:
                raise StorageError(
                    f"{owner!r}: only {acked} of {self.replicas} replicas acknowledged the flush "
                    f"within {self.ms / 1000:g} s; it is on the primary"
                )
        if self.aof:
            local, replicas_done = replies[-1]
            if local < 1 or replicas_done < self.replicas:
                raise StorageError(
                    f"{owner!r}: the append-only file did not confirm the flush within "
                    f"{self.ms / 1000:g} s (local {local}, replicas {replicas_done}); it is in memory"
                )


def split_key(uri: str) -> tuple[str, str]:
    """``uri`` without its ``key=`` parameter, and the stream key that names (percent-decoded). A
    URI that does not name one key is refused with an example that does."""
    pairs = query_pairs(urlsplit(uri).query)
    keys = [value for name, value, _ in pairs if name == "key"]
    others = [piece for name, _, piece in pairs if name != "key"]
    if len(keys) != 1 or not keys[0]:
        example = uri.partition("?")[0] + "?" + "&".join([*others, "key=crawl-42"])
        raise ValueError(
            f"a Redis URI names the stream in its query, once, as in {redact(example)!r}; got {redact(uri)!r}"
        )
    rest = "&".join(others)
    return uri.partition("?")[0] + (f"?{rest}" if rest else ""), keys[0]


def server_of(url: str) -> str:
    """The server, as messages name it: ``host:port``, or a socket's path."""
    parts = urlsplit(url)
    if parts.scheme.lower() == "unix":
        return parts.path
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"


def server_identity(url: str) -> tuple[Any, ...]:
    """The server and the database, however the URL spelt them."""
    found = parse_url(url)
    if "path" in found:
        where: tuple[Any, ...] = ("unix", os.path.realpath(found["path"]))
    else:
        host = str(found.get("host", "localhost")).lower().strip("[]")
        host = "localhost" if host in ("127.0.0.1", "::1") else host
        where = (host, int(found.get("port", 6379)))
    return (*where, int(found.get("db", 0)))


@functools.cache
def url_options(scheme: str) -> frozenset[str]:
    """The query parameters redis-py's ``from_url`` takes for ``scheme``: those it parses itself,
    and the connection's parameters that take text (``password``, ``client_name``, ...)."""
    connection = {"unix": UnixDomainSocketConnection, "rediss": SSLConnection}.get(scheme, Connection)
    names = set(URL_QUERY_ARGUMENT_PARSERS)
    for cls in connection.__mro__:
        init = vars(cls).get("__init__")
        if init is None:
            continue
        for parameter in inspect.signature(init).parameters.values():
            hint = parameter.annotation
            texts = hint is str or str in typing.get_args(hint)
            if texts and not parameter.name.startswith("orig_"):
                names.add(parameter.name)
    return frozenset(names - {"host", "port", "path"})  # the URI's own parts
