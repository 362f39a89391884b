"""The yoink command on journals that are odd but possible: lines nested too deeply to parse."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

YOINK = str(Path(sys.executable).with_name("yoink"))


def yoink(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [YOINK, *args], capture_output=True, text=True, input=stdin, env=os.environ, timeout=120
    )


@pytest.fixture
def deep(tmp_path: Path) -> Path:
    """A journal whose second line is over 4 MiB and nested 5,000 levels deep."""
    path = tmp_path / "deep.jsonl"
    line = '{"pad":"' + "p" * (5 << 20) + '","deep":' + "[" * 5000 + "]" * 5000 + "}"
    path.write_text(f'{{"n":0}}\n{line}\n{{"n":2}}\n')
    return path


def test_verify_reports_a_line_nested_too_deeply_as_corrupt_without_a_traceback(deep: Path) -> None:
    result = yoink("verify", str(deep))
    assert result.returncode == 1
    assert "line 2 (byte offset 8)" in result.stdout + result.stderr
    assert "nested too deeply" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "recursion" not in result.stderr


def test_cat_skip_corrupt_passes_a_line_nested_too_deeply(deep: Path) -> None:
    result = yoink("cat", "--skip-corrupt", str(deep))
    assert result.stdout == '{"n":0}\n{"n":2}\n'
    assert "Traceback" not in result.stderr
    stopped = yoink("cat", str(deep))
    assert (stopped.returncode, stopped.stdout) == (1, '{"n":0}\n')
    assert "line 2 (byte offset 8)" in stopped.stderr


def test_cat_writes_integers_beyond_64_bits_exactly(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    path.write_text('{"n":123456789012345678901234567890,"t":"✓"}\n{"n":-9223372036854775809}\n')
    result = yoink("cat", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == path.read_text()
