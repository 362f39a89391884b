"""The examples run as the README says: a job killed with SIGKILL resumes and loses nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_the_demo_kills_a_job_and_the_resume_neither_loses_nor_duplicates(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "crash_and_resume.py"), "--jobs", "800", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "killed with SIGKILL (exit status -9)" in result.stdout
    assert "jobs recorded twice:           0" in result.stdout
    assert "jobs missing:                  0" in result.stdout
    before = int(result.stdout.split("jobs done before the kill:")[1].split()[0])
    assert 0 < before < 800
