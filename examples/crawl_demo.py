"""Watch a crawl die from kill -9 and resume from its checkpoint: what scripts/demo runs.

    python examples/crawl_demo.py [--pages 3000] [--kill-at 0.4] [--dir demo-run]

Serves a generated site on 127.0.0.1 (examples/crawler_site.py), starts the crawler
(examples/crawler.py) with a local-file ledger, kills it with SIGKILL part-way through, starts it
again, and compares what the site served with what the ledger recorded done, and with the pages the
resumed ledger listed as interrupted. The crawler's log (its failed attempts) goes to crawler.log.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from yoink import CheckpointManager

HERE = Path(__file__).parent
PROBE = "/missing/demo-probe"  # a request of the demo's own, to see that the site is answering


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def served(log: Path) -> list[str]:
    """The paths the site answered for good (200 or 404), in order; a 503 is not an answer."""
    lines = log.read_text().splitlines() if log.exists() else []
    paths = [line.split(" ", 1)[1] for line in lines if not line.startswith("503 ")]
    return [path for path in paths if path != PROBE]


def wait_for_answers(start: str, log: Path, delay: float, timeout: float = 30.0) -> None:
    """Wait until the site has answered (and logged) the requests under way at the kill.

    The site answers a request within 1.5 times ``delay``. Once it has answered a request of our
    own, sent after the kill, it has read every request the crawler sent; its log then stops
    growing once their answers are logged. Waited for: the log unchanged for ten times the
    longest answer.
    """
    deadline = time.monotonic() + timeout
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # not through $http_proxy
    try:
        direct.open(start.rstrip("/") + PROBE, timeout=timeout).close()
    except urllib.error.HTTPError as exc:  # the 404 it was asked for
        exc.close()
    quiet = 10 * 1.5 * delay
    size, since = log.stat().st_size, time.monotonic()
    while time.monotonic() - since < quiet:
        if time.monotonic() > deadline:
            raise SystemExit(f"the demo site still logs answers {timeout:.0f} s after the kill")
        time.sleep(quiet / 10)
        if log.stat().st_size != size:
            size, since = log.stat().st_size, time.monotonic()


def path(url: str) -> str:
    return urlsplit(url).path or "/"


async def recorded(checkpoint: Path) -> tuple[set[str], int]:
    """The pages the journal holds a "done" record of, and its number of "fail" records: read as
    plain records, not through a ledger."""
    done, failed = set(), 0
    async with CheckpointManager.from_uri(checkpoint, read_only=True) as journal:
        async for record in journal.replay():
            if record.get("$ledger") == "done":  # {"key": url}, or {"keys": [...]} once compacted
                done.update(path(url) for url in record.get("keys", [record.get("key")]))
            failed += record.get("$ledger") == "fail"
    return done, failed


@dataclass
class Run:
    status: int
    resumed: str = ""  # what the ledger held when the crawler opened it
    interrupted: list[str] = field(default_factory=list)  # pages the ledger listed as in flight


def crawl(start: str, checkpoint: Path, log: Path, pages: int, kill_at: int | None) -> Run:
    """Run the crawler, relaying its progress; SIGKILL it once ``kill_at`` pages are done."""
    command = [sys.executable, str(HERE / "crawler.py"), start, "--checkpoint", str(checkpoint)]
    with log.open("a") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
    assert process.stdout is not None
    run, shown = Run(status=0), 0.0
    for line in process.stdout:
        kind, *values = line.split()
        if kind == "resumed":
            done, pending, seconds = int(values[0]), int(values[1]), float(values[2])
            run.resumed = (
                f"{done:,} pages done and {pending:,} links to visit, rebuilt in {seconds * 1000:.1f} ms"
            )
            print(f"    resumed from the ledger: {run.resumed}", flush=True)
        elif kind == "interrupted":
            run.interrupted.append(path(values[0]))
        elif kind == "progress":
            done = int(values[0])
            if time.monotonic() - shown > 0.5:
                print(f"    {done:5,} of {pages:,} pages done, {int(values[1]):,} links waiting", flush=True)
                shown = time.monotonic()
            if kill_at is not None and done >= kill_at:
                os.kill(process.pid, signal.SIGKILL)
                break
        elif kind == "finished":
            print(f"    finished: {int(values[2]):,} pages done", flush=True)
    process.wait()
    process.stdout.close()
    run.status = process.returncode
    if run.status not in (0, -signal.SIGKILL):
        raise SystemExit(f"the crawler failed (exit status {run.status}):\n{log.read_text()[-3000:]}")
    return run


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pages", type=int, default=3000, help="pages on the generated site")
    parser.add_argument(
        "--kill-at", type=float, default=0.4, help="the fraction done when the crawl is killed"
    )
    parser.add_argument("--dir", default="demo-run", help="where the checkpoint and the site's log go")
    args = parser.parse_args()

    directory = Path(args.dir)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    checkpoint, log = directory / "crawl.jsonl", directory / "served.log"
    crawler_log = directory / "crawler.log"
    total = 2 * args.pages + 1  # the home page, each page, and each page's one broken link
    port, delay = free_port(), 0.02
    site_options = ["--pages", str(args.pages), "--port", str(port), "--log", str(log), "--delay", str(delay)]
    site = subprocess.Popen([sys.executable, str(HERE / "crawler_site.py"), *site_options])
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or site.poll() is not None:
                    raise SystemExit("the demo site did not start") from None
                time.sleep(0.05)
        start = f"http://127.0.0.1:{port}/"
        print(f"yoink crawl demo: a site of {args.pages:,} pages at {start}, checkpoint {checkpoint}\n")

        print("1. crawling, to be killed with SIGKILL part-way through", flush=True)
        first = crawl(start, checkpoint, crawler_log, total, kill_at=int(total * args.kill_at))
        print(f"    killed (exit status {first.status})\n", flush=True)
        wait_for_answers(start, log, delay)  # the site finishes answering the requests under way
        before = served(log)
        done_before, _ = asyncio.run(recorded(checkpoint))

        print("2. the same command again: it resumes from the ledger", flush=True)
        second = crawl(start, checkpoint, crawler_log, total, kill_at=None)
        after = served(log)[len(before) :]
        done, failed = asyncio.run(recorded(checkpoint))
    finally:
        site.terminate()
        site.wait()

    counts = collections.Counter(before + after)
    twice = {page for page, count in counts.items() if count > 1}
    recorded_again = done_before & set(after)
    in_flight = (set(before) - done_before) & set(after)
    listed = set(second.interrupted)
    shown = " ".join(sorted(listed, key=_in_order)) or "none"
    missing = total - len(done)
    print(
        f"""
what happened
    pages fetched before the kill:            {len(set(before)):,} ({len(done_before):,} of them done)
    pages fetched after the restart:          {len(set(after)):,}
    recorded pages fetched again:             {len(recorded_again)}
    pages fetched twice in all:               {len(twice)}
      of which in flight at the kill, not recorded done: {len(in_flight)}
      of which the ledger listed as interrupted: {len(twice & listed)} (it listed {len(listed)})
    pages never fetched:                      {missing}
    failed attempts recorded:                 {failed} (the site's 503s, in crawler.log too)
    the resume rebuilt its state:             {second.resumed}

the pages the resumed ledger listed as interrupted (claimed, and not done, at the kill):
{textwrap.fill(shown, initial_indent="    ", subsequent_indent="    ")}
"""
    )
    print(
        "A page being fetched when the process died was not recorded done, so it is fetched again,\n"
        "and the resumed ledger lists it in `interrupted`: a page it lists may also have been claimed\n"
        "without reaching the site. No page recorded done is fetched again. `yoink stats` shows the\n"
        f"ledger's progress:  .venv/bin/yoink stats {checkpoint}"
    )
    return 1 if recorded_again or missing or twice != in_flight or not twice <= listed else 0


def _in_order(page: str) -> tuple[str, int]:
    """/page/9 before /page/10."""
    head, _, number = page.rpartition("/")
    return (head, int(number)) if number.isdigit() else (page, -1)


if __name__ == "__main__":
    sys.exit(main())
