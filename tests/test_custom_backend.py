"""examples/custom_backend.py keeps the contract, and a plugin package adds a scheme by entry point."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from yoink.storage import StorageFactory
from yoink.testing import StorageContract

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PLUGIN = Path(__file__).resolve().parent / "plugin_package"

spec = importlib.util.spec_from_file_location("custom_backend", EXAMPLES / "custom_backend.py")
assert spec is not None
assert spec.loader is not None
custom_backend = importlib.util.module_from_spec(spec)
sys.modules["custom_backend"] = custom_backend  # so that its storages pickle
spec.loader.exec_module(custom_backend)
StorageFactory.unregister("sqlite")  # the example registers it for itself; other tests see the defaults


class TestSQLiteStorage(StorageContract):
    @pytest.fixture
    def storage(self, tmp_path: Path) -> object:
        return custom_backend.SQLiteStorage(str(tmp_path / "journal.db"))


def test_the_example_runs_and_resumes(tmp_path: Path) -> None:
    database = tmp_path / "jobs.db"
    for expected in ("0 jobs were done already", "10 jobs were done already"):
        result = subprocess.run(
            [sys.executable, str(EXAMPLES / "custom_backend.py"), str(database)],
            capture_output=True,
            text=True,
            check=True,
        )
        assert expected in result.stdout


def test_a_plugin_package_adds_its_scheme_through_the_entry_point(tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(target),
            str(PLUGIN),
        ],
        check=True,
        capture_output=True,
    )
    code = (
        "import anyio\n"
        "from yoink import CheckpointManager, StorageFactory\n"
        "assert 'tinyplugin' in StorageFactory.schemes()\n"
        "async def main():\n"
        "    async with CheckpointManager.from_uri('tinyplugin://run-1') as manager:\n"
        "        await manager.append({'n': 1})\n"
        "        print(type(manager.storage).__module__, [r async for r in manager.replay()])\n"
        "anyio.run(main)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "yoink_tinyplugin [{'n': 1}]"
