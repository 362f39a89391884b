"""StorageFactory: from a URI to a storage backend.

Backends are registered by URI scheme, as a class or as a dotted path that is imported only when a
URI of that scheme is first used, so ``import yoink`` never imports aioboto3 or redis. Third-party
packages add schemes through the ``yoink.storage`` entry-point group::

    [project.entry-points."yoink.storage"]
    gs = "yoink_gcs:GCSStorage"
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import os
import re
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar

from yoink._exceptions import MissingDependencyError, UnknownSchemeError
from yoink.storage._base import CheckpointStorage
from yoink.storage._uri import query_pairs, redact

__all__ = ["StorageFactory", "check_uri_scheme", "journal_identity", "load_backend"]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "yoink.storage"
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")
_PREFIX = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")  # a scheme without "//", or a Windows drive
_COLON_HINT = "a file whose name holds a colon is written as a path, as in ./name:1.jsonl"


@dataclass(frozen=True)
class _Entry:
    target: type[CheckpointStorage] | str
    install_hint: str | None = None


def _extra(name: str) -> str:
    return f"the {name!r} extra: pip install 'yoink-checkpoint[{name}]'"


S3 = _Entry("yoink.storage._s3:S3Storage", _extra("s3"))
REDIS = _Entry("yoink.storage._redis:RedisStreamStorage", _extra("redis"))
FSSPEC = _Entry("yoink.storage._fsspec:FsspecStorage", _extra("fsspec"))
FSSPEC_PREFIX = "fsspec+"  # fsspec+<protocol>://... reaches any fsspec protocol
_FSSPEC_SCHEMES = ("abfs", "abfss", "adl", "az", "ftp", "gcs", "gs", "hdfs", "sftp", "webhdfs")

_BUILTIN: dict[str, _Entry] = {
    **dict.fromkeys(_FSSPEC_SCHEMES, FSSPEC),
    FSSPEC_PREFIX: FSSPEC,
    "file": _Entry("yoink.storage._local:LocalFileStorage"),
    "memory": _Entry("yoink.storage._memory:MemoryStorage"),
    "redis": REDIS,
    "rediss": REDIS,
    "s3": S3,
    "unix": REDIS,
}


class StorageFactory:
    """Turns a URI into the storage backend registered for its scheme.

    >>> StorageFactory.from_uri("./crawl.jsonl")              # LocalFileStorage
    >>> StorageFactory.from_uri("file:///var/lib/run.jsonl")  # LocalFileStorage
    >>> StorageFactory.from_uri("memory://test-run")          # MemoryStorage
    >>> StorageFactory.from_uri("s3://bucket/key.jsonl")      # S3Storage (the s3 extra)
    >>> StorageFactory.from_uri("redis://localhost/0?key=k")  # RedisStreamStorage (redis extra)
    >>> StorageFactory.from_uri("gs://bucket/key.jsonl")      # FsspecStorage (fsspec extra)

    The registry is shared by the process and changed only through :meth:`register` and
    :meth:`unregister`.
    """

    _registry: ClassVar[dict[str, _Entry]] = dict(_BUILTIN)
    _plugins_loaded: ClassVar[bool] = False

    def __init__(self) -> None:
        raise TypeError("StorageFactory is used through its class methods, e.g. StorageFactory.from_uri(uri)")

    @classmethod
    def from_uri(cls, uri: str | os.PathLike[str], **options: Any) -> CheckpointStorage:
        """Return a new storage for ``uri``; ``options`` go to the backend's constructor.

        The built-in backends also take their options in the URI's query
        (``redis://host/0?key=k&lease_ttl=5``), converted to the constructor's types; an option
        given both there and as a keyword is a ``ValueError``.

        Raises :class:`~yoink.UnknownSchemeError` for a scheme nobody registered (``gopher://x``,
        ``gopher:x``), ``ValueError`` for what is neither a path nor a URI (``file:run.jsonl``,
        ``C:\\run.jsonl``) or for a bad option in the URI, :class:`~yoink.MissingDependencyError`
        when the backend's extra is not installed, and ``TypeError`` for an option the backend does
        not take.
        """
        uri = os.fspath(uri)
        if not isinstance(uri, str) or not uri:
            raise ValueError(f"a checkpoint URI or path is needed, got {uri!r}")
        backend = cls.resolve(check_uri_scheme(uri))
        _check_options(backend, options)
        if "://" in uri:
            twice = sorted(options.keys() & {name for name, _, _ in query_pairs(uri.partition("?")[2])})
            if twice:
                raise ValueError(
                    f"{', '.join(twice)} given both in the URI ({redact(uri)}) and as a keyword option; "
                    "give each option once"
                )
        return backend.from_uri(uri, **options)

    @classmethod
    def resolve(cls, scheme: str) -> type[CheckpointStorage]:
        """Return the backend class registered for ``scheme``, importing it if needed."""
        cls._load_plugins()
        scheme = scheme.lower()
        if scheme.startswith(FSSPEC_PREFIX) and scheme not in cls._registry:
            scheme = FSSPEC_PREFIX
        entry = cls._registry.get(scheme)
        if entry is None:
            known = ", ".join(
                f"{name}<protocol>://" if name == FSSPEC_PREFIX else f"{name}://" for name in cls.schemes()
            )
            raise UnknownSchemeError(
                f"no storage backend for {scheme}:// URIs; known schemes: {known} "
                "(a plain path is a local file; add one with StorageFactory.register; "
                f"{_COLON_HINT})"
            )
        if isinstance(entry.target, str):
            backend = load_backend(entry, needs=f"{scheme}:// URIs need", name=f"the backend for {scheme}://")
            cls._registry[scheme] = _Entry(backend, entry.install_hint)
            return backend
        return entry.target

    @classmethod
    def register(cls, scheme: str, target: type[CheckpointStorage] | str, *, replace: bool = False) -> None:
        """Use ``target`` for URIs of ``scheme``.

        ``target`` is a :class:`CheckpointStorage` subclass or the dotted path of one
        (``"package.module:ClassName"``), imported on first use. Registering a scheme that is taken
        raises ``ValueError`` unless ``replace=True``.

        >>> StorageFactory.register("sqlite", SQLiteStorage)
        >>> StorageFactory.register("gs", "yoink_gcs:GCSStorage")
        """
        cls._load_plugins()
        name = scheme.lower().removesuffix("://")
        if not _SCHEME.fullmatch(name):
            raise ValueError(
                f"{scheme!r} is not a URI scheme (a letter, then letters, digits, '+', '-' or '.')"
            )
        if isinstance(target, str):
            if not re.fullmatch(r"[\w.]+(:[\w.]+)?", target) or "." not in target.replace(":", "."):
                raise ValueError(f"{target!r} is not a dotted path such as 'package.module:ClassName'")
        elif not (isinstance(target, type) and issubclass(target, CheckpointStorage)):
            raise TypeError(
                f"a backend is a CheckpointStorage subclass or a dotted path to one, got {target!r}"
            )
        if name in cls._registry and not replace:
            raise ValueError(
                f"{name}:// is already registered to {_describe(cls._registry[name])}; "
                "pass replace=True to replace it"
            )
        cls._registry[name] = _Entry(target)

    @classmethod
    def unregister(cls, scheme: str) -> None:
        """Remove ``scheme`` from the registry; ``KeyError`` if it is not registered."""
        cls._load_plugins()
        name = scheme.lower().removesuffix("://")
        if name not in cls._registry:
            raise KeyError(f"{name}:// is not registered")
        del cls._registry[name]

    @classmethod
    def schemes(cls) -> tuple[str, ...]:
        """The registered schemes, sorted."""
        cls._load_plugins()
        return tuple(sorted(cls._registry))

    @classmethod
    def _load_plugins(cls) -> None:
        if cls._plugins_loaded:
            return
        cls._plugins_loaded = True
        for point in entry_points(group=ENTRY_POINT_GROUP):
            name = point.name.lower()
            if name in cls._registry:
                logger.warning(
                    "ignoring entry point %r of %s for %s://: the scheme is taken by %s",
                    point.value,
                    point.dist.name if point.dist else "an unknown distribution",
                    name,
                    _describe(cls._registry[name]),
                )
                continue
            cls._registry[name] = _Entry(point.value)


def _describe(entry: _Entry) -> str:
    target = entry.target
    return target if isinstance(target, str) else f"{target.__module__}:{target.__qualname__}"


def load_backend(entry: _Entry, *, needs: str, name: str) -> type[CheckpointStorage]:
    """Import the backend ``entry`` names. Errors say what ``needs`` it (``"s3:// URIs need"``) and
    call it ``name`` (``"the backend for s3://"``)."""
    path = str(entry.target)
    module_name, _, attribute = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if entry.install_hint is None:
            raise
        if exc.name == module_name:  # the backend itself, not a package it needs
            raise MissingDependencyError(
                f"{needs} a yoink with that backend ({module_name} is missing from this install); "
                f"it comes with {entry.install_hint.replace('pip install', 'pip install -U')}"
            ) from exc
        missing = f"module {exc.name!r} is missing"
        raise MissingDependencyError(f"{needs} {entry.install_hint} ({missing})") from exc
    try:
        backend = functools.reduce(getattr, attribute.split("."), module)
    except AttributeError:
        raise ImportError(f"{name} is registered as {path!r}, which does not exist") from None
    if not (isinstance(backend, type) and issubclass(backend, CheckpointStorage)):
        raise TypeError(f"{name} ({path!r}) is not a CheckpointStorage subclass")
    return backend


def _check_options(backend: type[CheckpointStorage], options: dict[str, Any]) -> None:
    if not options:
        return
    parameters = list(inspect.signature(backend).parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return
    kind = inspect.Parameter
    if parameters and parameters[0].kind in (kind.POSITIONAL_ONLY, kind.POSITIONAL_OR_KEYWORD):
        parameters = parameters[1:]  # the path or URI, which from_uri passes itself
    accepted = [p.name for p in parameters if p.kind in (kind.POSITIONAL_OR_KEYWORD, kind.KEYWORD_ONLY)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"{backend.__name__} does not take the option(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(accepted) or 'none'}"
        )


def check_uri_scheme(uri: str) -> str:
    """The scheme of ``uri``; ``file`` for a path. Refuses what is neither a path nor a URI."""
    head, sep, _ = uri.partition("://")
    if sep and _SCHEME.fullmatch(head.lower()):
        return head.lower()
    prefix = _PREFIX.match(uri)
    if prefix is None:
        return "file"
    scheme = prefix.group(1).lower()
    if len(scheme) == 1:
        raise ValueError(
            f"{uri!r} looks like a Windows path; yoink's local journals are POSIX paths, such as "
            f"./run.jsonl or /abs/run.jsonl ({_COLON_HINT})"
        )
    if scheme == "file":
        return scheme  # LocalFileStorage.from_uri says how a file URI is written
    StorageFactory.resolve(scheme)  # an unknown scheme: UnknownSchemeError
    raise ValueError(f"{redact(uri)!r} is not a URI: {scheme} URIs are written {scheme}://...; {_COLON_HINT}")


def journal_identity(storage: CheckpointStorage) -> tuple[Any, ...] | None:
    """What tells two storages' journals apart, however their URIs were spelt; None if unknown."""
    from yoink.storage._local import LocalFileStorage
    from yoink.storage._memory import MemoryStorage

    if isinstance(storage, LocalFileStorage):
        return ("file", os.path.realpath(storage.path))
    if isinstance(storage, MemoryStorage):
        return ("memory", storage.name)
    identity = getattr(storage, "_journal_id", None)  # set by the other built-in backends
    return tuple(identity) if identity is not None else None
