"""A backend that a package adds to yoink by entry point alone: tinyplugin://NAME."""

from __future__ import annotations

from typing import Any

from yoink.storage import MemoryStorage


class TinyStorage(MemoryStorage):
    @classmethod
    def from_uri(cls, uri: str, **options: Any) -> TinyStorage:
        return cls(uri.partition("://")[2], **options)
