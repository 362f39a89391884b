"""Tests that any storage backend can inherit: ``class TestMyStorage(StorageContract): ...``.

Needs pytest and pytest-asyncio (``pip install 'yoink-checkpoint[test]'``); the rest of yoink does not.
"""

from __future__ import annotations

from yoink.testing._contract import StorageContract

__all__ = ["StorageContract"]
