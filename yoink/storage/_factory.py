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
import math
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar
from urllib.parse import unquote

from yoink._exceptions import MissingDependencyError, UnknownSchemeError
from yoink.storage._base import CheckpointStorage

__all__ = ["StorageFactory", "journal_identity", "redact", "take_uri_options"]

logger = logging.getLogger("yoink")

ENTRY_POINT_GROUP = "yoink.storage"
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")
_PREFIX = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")  # a scheme without "//", or a Windows drive
_COLON_HINT = "a file whose name holds a colon is written as a path, as in ./name:1.jsonl"
# Query parameters whose values redact() hides.
_SECRET_NAME = re.compile(
    r"pass|pwd|secret|token|credential|auth|signature|^sig$|^sas|[_-]key$", re.IGNORECASE
)


@dataclass(frozen=True)
class _Entry:
    target: type[CheckpointStorage] | str
    install_hint: str | None = None


_S3 = _Entry("yoink.storage._s3:S3Storage", "the 's3' extra: pip install 'yoink[s3]'")
_REDIS = _Entry("yoink.storage._redis:RedisStreamStorage", "the 'redis' extra: pip install 'yoink[redis]'")

_FSSPEC = _Entry("yoink.storage._fsspec:FsspecStorage", "the 'fsspec' extra: pip install 'yoink[fsspec]'")
FSSPEC_PREFIX = "fsspec+"  # fsspec+<protocol>://... reaches any fsspec protocol
_FSSPEC_SCHEMES = ("abfs", "abfss", "adl", "az", "ftp", "gcs", "gs", "hdfs", "sftp", "webhdfs")

_BUILTIN: dict[str, _Entry] = {
    **dict.fromkeys(_FSSPEC_SCHEMES, _FSSPEC),
    FSSPEC_PREFIX: _FSSPEC,
    "file": _Entry("yoink.storage._local:LocalFileStorage"),
    "memory": _Entry("yoink.storage._memory:MemoryStorage"),
    "redis": _REDIS,
    "rediss": _REDIS,
    "s3": _S3,
    "unix": _REDIS,
}


class StorageFactory:
    """Turns a URI into the storage backend registered for its scheme.

    >>> StorageFactory.from_uri("./crawl.jsonl")              # LocalFileStorage
    >>> StorageFactory.from_uri("file:///var/lib/run.jsonl")  # LocalFileStorage
    >>> StorageFactory.from_uri("memory://test-run")          # MemoryStorage
    >>> StorageFactory.from_uri("s3://bucket/key.jsonl")      # S3Storage, with yoink[s3]
    >>> StorageFactory.from_uri("redis://localhost/0?key=k")  # RedisStreamStorage, with yoink[redis]
    >>> StorageFactory.from_uri("gs://bucket/key.jsonl")      # FsspecStorage, with yoink[fsspec]

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
            backend = _import_backend(scheme, entry)
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


def _import_backend(scheme: str, entry: _Entry) -> type[CheckpointStorage]:
    path = str(entry.target)
    module_name, _, attribute = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if entry.install_hint is None:
            raise
        if exc.name == module_name:  # the backend itself, not a package it needs
            raise MissingDependencyError(
                f"{scheme}:// URIs need a yoink with that backend ({module_name} is missing from this "
                f"install); it comes with {entry.install_hint.replace('pip install', 'pip install -U')}"
            ) from exc
        raise MissingDependencyError(
            f"{scheme}:// URIs need {entry.install_hint} (module {exc.name!r} is missing)"
        ) from exc
    try:
        backend = functools.reduce(getattr, attribute.split("."), module)
    except AttributeError:
        raise ImportError(
            f"the backend for {scheme}:// is registered as {path!r}, which does not exist"
        ) from None
    if not (isinstance(backend, type) and issubclass(backend, CheckpointStorage)):
        raise TypeError(f"the backend for {scheme}:// ({path!r}) is not a CheckpointStorage subclass")
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


# -- URIs: secrets, query options, identity ------------------------------------------------------


def redact(uri: str) -> str:
    """``uri`` with its secrets as ``***``: a userinfo password, and the values of query parameters
    named like secrets (``password``, ``secret``, ``token``, ``sas_token``, ``account_key``, ...).

    >>> redact("redis://:hunter2@host/0?key=k&password=hunter2")
    'redis://:***@host/0?key=k&password=***'
    """
    head, sep, rest = uri.partition("://")
    if sep:
        end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
        user, at, host = rest[:end].rpartition("@")
        if at and ":" in user:
            rest = f"{user.partition(':')[0]}:***@{host}{rest[end:]}"
        uri = head + sep + rest
    base, question, query = uri.partition("?")
    if not question:
        return uri
    query, hash_, fragment = query.partition("#")
    pieces = []
    for piece in query.split("&"):
        name, equals, _ = piece.partition("=")
        pieces.append(f"{name}=***" if equals and _SECRET_NAME.search(unquote(name)) else piece)
    return f"{base}?{'&'.join(pieces)}{hash_}{fragment}"


def secrets_in(uri: str) -> list[str]:
    """The secrets :func:`redact` hides in ``uri``, as written and percent-decoded."""
    found = []
    _, sep, rest = uri.partition("://")
    if sep:
        end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
        user, at, _ = rest[:end].rpartition("@")
        if at and ":" in user:
            found.append(user.partition(":")[2])
    for piece in uri.partition("?")[2].partition("#")[0].split("&"):
        name, equals, value = piece.partition("=")
        if equals and _SECRET_NAME.search(unquote(name)):
            found.append(value)
    return [text for secret in found if secret for text in {secret, unquote(secret)}]


def query_pairs(query: str) -> list[tuple[str, str, str]]:
    """``(name, value, as written)`` for each parameter of a query, percent-decoded, never
    form-decoded: a ``+`` stays a ``+`` (``?key=c++`` names ``c++``)."""
    pairs = []
    for piece in query.split("&"):
        if piece:
            name, _, value = piece.partition("=")
            pairs.append((unquote(name), unquote(value), piece))
    return pairs


def take_uri_options(
    backend: type[CheckpointStorage],
    uri: str,
    *,
    keep: Callable[[str], bool] = lambda name: False,
    others: str = "",
    shown: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """Take ``backend``'s own options out of ``uri``'s query, converted to the constructor's types.

    Returns ``uri`` without them (the rest of its query as written) and the options. A parameter
    that is not an option of the backend stays in the URI if ``keep(name)``; otherwise it is a
    ``ValueError`` that names the options the URI takes (``others`` names what ``keep`` accepts).
    Errors show ``shown`` (by default ``uri``), redacted.
    """
    shown = shown or uri
    base, question, rest = uri.partition("?")
    if not question:
        return uri, {}
    query, hash_, fragment = rest.partition("#")
    accepted = uri_option_types(backend)
    options: dict[str, Any] = {}
    left = []
    for name, value, piece in query_pairs(query):
        if name in accepted:
            if name in options:
                raise ValueError(f"{name} is given twice in {redact(shown)}; give it once")
            options[name] = _convert(name, value, accepted[name], shown)
        elif keep(name):
            left.append(piece)
        else:
            known = ", ".join(accepted) or "none"
            raise ValueError(
                f"unknown option {name!r} in {redact(shown)}; {backend.__name__} takes {known}{others}"
            )
    if left:
        return f"{base}?{'&'.join(left)}{hash_}{fragment}", options
    return f"{base}{hash_}{fragment}", options


@functools.cache
def uri_option_types(backend: type[CheckpointStorage]) -> dict[str, tuple[Any, Any]]:
    """The options a URI may give ``backend``: its constructor's keywords with defaults (after the
    path or URI), as ``name: (type, default)``."""
    parameters = list(inspect.signature(backend).parameters.values())[1:]
    hints = typing.get_type_hints(backend.__init__)
    return {
        p.name: (hints.get(p.name, str), p.default)
        for p in parameters
        if p.default is not p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _convert(name: str, text: str, typed: tuple[Any, Any], uri: str) -> Any:
    hint, default = typed
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if type(None) in members and text.lower() == "none":
        return None
    kinds = []
    for member in members:
        if member is type(None):
            kinds.append("none")
            continue
        kind, value = _parse_as(member, text)
        kinds.append(kind)
        if value is not _WRONG:
            return value
    if not any(kind for kind in kinds if kind != "none"):
        raise ValueError(f"{name} cannot be given in a URI ({redact(uri)}); pass it as a keyword option")
    example = f", as in {name}={str(default).lower() if isinstance(default, bool) else default}"
    shown = "***" if _SECRET_NAME.search(name) else repr(text)
    raise ValueError(
        f"bad option in {redact(uri)}: {name}={shown} is not {' or '.join(k for k in kinds if k)}"
        f"{example if default is not None else ''}"
    )


_WRONG = object()
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _parse_as(hint: Any, text: str) -> tuple[str, Any]:
    """A description of ``hint`` for an error, and ``text`` as one (or ``_WRONG``); '' if no text can be."""
    if typing.get_origin(hint) is typing.Literal:
        values = typing.get_args(hint)
        return "one of " + ", ".join(map(repr, values)), text if text in values else _WRONG
    if hint is bool:
        lowered = text.lower()
        return "true or false", True if lowered in _TRUE else False if lowered in _FALSE else _WRONG
    if hint is int:
        try:
            return "a whole number", int(text)
        except ValueError:
            return "a whole number", _WRONG
    if hint is float:
        try:
            value = float(text)
        except ValueError:
            return "a number", _WRONG
        return "a number", value if math.isfinite(value) else _WRONG
    if hint is str or typing.get_origin(hint) is os.PathLike or hint is os.PathLike:
        return "text", text
    return "", _WRONG


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
