from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from yoink.storage import CheckpointStorage, LocalFileStorage, MemoryStorage

OpenStorage = Callable[[], CheckpointStorage]


@pytest.fixture(params=["local", "memory"])
def open_storage(request: pytest.FixtureRequest, tmp_path: Path) -> OpenStorage:
    """Opens a new storage on one journal each call, as a restarted process would."""
    if request.param == "local":
        path = tmp_path / "journal.jsonl"
        return lambda: LocalFileStorage(path)
    name = f"test-{uuid.uuid4()}"
    return lambda: MemoryStorage(name)


async def read_text(storage: CheckpointStorage) -> str:
    """The journal's text, with each item's missing final newline restored."""
    items = [item async for item in storage.read()]
    return "".join(item if item.endswith("\n") else item + "\n" for item in items)
