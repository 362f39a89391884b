"""A griffe extension that reads yoink's docstrings, written for Sphinx, as Markdown for mkdocstrings.

yoink's docstrings use three pieces of reStructuredText that Markdown renders badly:

- cross-reference roles (``:class:`~yoink.CheckpointManager```, ``:meth:`flush```) become links
  into the API reference, through mkdocs-autorefs; a target the site does not document (a private
  helper) is shown as code, without a link and without a warning;
- a paragraph ending in ``::`` and the indented block after it become a code block;
- doctest lines (``>>> ...``) become a ``pycon`` code block instead of nested block quotes.

The docstrings stay as they are, so they still read well in an editor, ``help()`` and Sphinx.
mkdocs.yml loads this file through mkdocstrings' ``extensions`` option.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(class|meth|func|attr|mod|exc|data|obj):`(~?)([\w.]+)`")
_FENCE = "```"


def _members(scope: griffe.Object) -> dict[str, Any]:
    """The names a docstring of ``scope`` can refer to: a class's inherited members too."""
    return dict(scope.all_members) if isinstance(scope, griffe.Class) else dict(scope.members)


def _resolve(obj: griffe.Object, target: str) -> str:
    """The full path of ``target`` as Sphinx would find it from ``obj``; ``target`` if unknown.

    A method that a backend overrides without a docstring of its own is documented by the base
    class that declares it, so a reference to it points there.
    """
    if target.startswith("yoink.") or target == "yoink":
        return target
    head, _, rest = target.partition(".")
    scope: griffe.Object | None = obj
    while scope is not None and head not in _members(scope):
        scope = scope.parent
    if scope is None:
        return target
    member = _members(scope)[head]
    if not rest and isinstance(scope, griffe.Class) and not member.docstring:
        for base in [scope, *scope.mro()]:
            declared = base.members.get(head)
            if declared is not None and not declared.is_alias and declared.docstring:
                return str(declared.path)
    path = member.target_path if member.is_alias else member.path
    return f"{path}.{rest}" if rest else str(path)


def _roles(obj: griffe.Object, text: str) -> str:
    def link(match: re.Match[str]) -> str:
        role, short, target = match.groups()
        title = target.rsplit(".", 1)[-1] if short else target
        if role in ("meth", "func"):
            title += "()"
        identifier = html.escape(_resolve(obj, target), quote=True)
        return f'<autoref identifier="{identifier}" optional><code>{html.escape(title)}</code></autoref>'

    return _ROLE.sub(link, text)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _blocks(text: str) -> str:
    """Turn ``::`` literal blocks and doctest lines into fenced code blocks."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith(">>>"):
            indent = line[: _indent(line)]
            out += ["", f"{indent}{_FENCE}pycon"]
            while i < len(lines) and lines[i].strip().startswith((">>>", "...")):
                out.append(lines[i])
                i += 1
            out += [f"{indent}{_FENCE}", ""]
            continue
        if stripped.endswith("::") and not stripped.startswith(".."):
            intro = line.rstrip()[:-2].rstrip()
            if intro.strip():
                out.append(intro + ":")
            i += 1
            while i < len(lines) and not lines[i].strip():
                i += 1
            base = _indent(line)
            block: list[str] = []
            while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
                block.append(lines[i])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            if block:
                cut = min(_indent(b) for b in block if b.strip())
                out += ["", f"{line[:base]}{_FENCE}text"]
                out += [f"{line[:base]}{b[cut:]}" if b.strip() else "" for b in block]
                out += [f"{line[:base]}{_FENCE}", ""]
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


def _convert(obj: griffe.Object) -> None:
    if obj.docstring is not None:
        obj.docstring.value = _roles(obj, _blocks(obj.docstring.value))
    for member in obj.members.values():
        if not member.is_alias:
            _convert(member)  # type: ignore[arg-type]


class SphinxMarkup(griffe.Extension):
    """Converts the docstrings of a package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        _convert(pkg)
