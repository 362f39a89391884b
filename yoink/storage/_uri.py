"""What a URI says besides its scheme: the secrets it holds, and the options in its query.

A backend takes its constructor's options from its URI's query, converted to the constructor's types
(:func:`take_uri_options`), and never shows a secret a URI holds (:func:`redact`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import unquote

from yoink._compat import Self
from yoink.storage._base import CheckpointStorage

__all__ = ["Options", "query_pairs", "redact", "secrets_in", "take_uri_options", "uri_option_types"]

# Query parameters whose values redact() hides.
_SECRET_NAME = re.compile(
    r"pass|pwd|secret|token|credential|auth|signature|^sig$|^sas|[_-]key$", re.IGNORECASE
)


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


@dataclasses.dataclass(frozen=True)
class Options:
    """A backend's options, as a frozen dataclass whose fields all have defaults."""

    def merge(self, from_uri: Mapping[str, Any]) -> Self:
        """These options, with those the URI's query gave (:func:`take_uri_options`).

        An option given both ways is a ``ValueError``, unless the keyword's value is the default.
        """
        defaults = type(self)()
        for name in from_uri:
            if getattr(self, name) != getattr(defaults, name):
                raise ValueError(f"{name} is given both in the URI and as an option; give it once")
        return dataclasses.replace(self, **from_uri)

    def changed(self) -> dict[str, Any]:
        """The options that are not their defaults: what a pickled storage keeps."""
        defaults = type(self)()
        return {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if getattr(self, field.name) != getattr(defaults, field.name)
        }
