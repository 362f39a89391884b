"""The examples run as the README says: a job killed with SIGKILL resumes and loses nothing."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.servers import free_port

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
    run_again = int(result.stdout.split("jobs run again after the kill:")[1].split()[0])
    listed = int(result.stdout.split("of them listed as interrupted:")[1].split()[0])
    assert listed == run_again  # every job run twice was one the resumed ledger listed


@pytest.mark.needs("aiohttp")
def test_the_crawl_demo_kills_a_crawl_and_the_resume_fetches_again_only_what_the_ledger_lists(
    tmp_path: Path,
) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "crawl_demo.py"), "--pages", "400", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "killed (exit status -9)" in result.stdout
    assert "recorded pages fetched again:             0" in result.stdout
    assert "pages never fetched:                      0" in result.stdout
    before = int(result.stdout.split("pages fetched before the kill:")[1].split()[0].replace(",", ""))
    assert 0 < before < 801
    twice = int(result.stdout.split("pages fetched twice in all:")[1].split()[0])
    in_flight = int(result.stdout.split("in flight at the kill, not recorded done:")[1].split()[0])
    listed = result.stdout.split("of which the ledger listed as interrupted:")[1].split()
    assert twice == in_flight <= 16  # only pages under way at the kill, at most one per worker
    assert int(listed[0]) == twice  # each of them listed by the ledger itself
    assert int(listed[3].rstrip(")")) <= 16  # "(it listed N)": the claims under way, one per worker


@pytest.mark.needs("aiohttp")
@pytest.mark.parametrize("backend", ["s3", "redis"])
def test_the_crawler_runs_on_s3_and_redis_checkpoints(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    if backend == "s3":
        bucket = request.getfixturevalue("bucket")
        monkeypatch.setenv("AWS_ENDPOINT_URL", request.getfixturevalue("moto").url)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        checkpoint = f"s3://{bucket}/crawl.jsonl"
    else:
        checkpoint = f"{request.getfixturevalue('redis_url')}?key=crawl-{tmp_path.name}"
    port = free_port()
    site = subprocess.Popen(
        [
            sys.executable,
            str(EXAMPLES / "crawler_site.py"),
            "--pages",
            "100",
            "--port",
            str(port),
            "--log",
            str(tmp_path / "served.log"),
            "--delay",
            "0",
        ]
    )
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        crawl = [
            sys.executable,
            str(EXAMPLES / "crawler.py"),
            f"http://127.0.0.1:{port}/",
            "--checkpoint",
            checkpoint,
        ]
        result = subprocess.run(crawl, capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[-1] == "finished 201 0 201"
        again = subprocess.run(crawl, capture_output=True, text=True, timeout=120, check=False)
        resumed = [line for line in again.stdout.splitlines() if line.startswith("resumed ")]
        assert resumed[0].startswith("resumed 201 0 ")  # nothing left to fetch (progress may come first)
        assert again.stdout.splitlines()[-1] == "finished 0 0 201"
    finally:
        site.terminate()
        site.wait()
