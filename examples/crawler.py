"""A resumable asynchronous web crawler on a yoink work ledger.

    python examples/crawler.py http://127.0.0.1:8765/ --checkpoint ./crawl.jsonl --max-pages 3000

Any journal URI works: a path, ``s3://bucket/crawl.jsonl``, ``redis://localhost/0?key=crawl``.
Kill it at any moment and start it again: the ledger knows which pages are done (never fetched
again), which links are still to visit, and which pages were being fetched when the process died
(fetched again, and listed on an ``interrupted`` line). Needs aiohttp.

Each URL is a key of the ledger: added when a link to it is first found, claimed by one of the
workers, and done with the page's HTTP status as its result. A fetch that fails (a connection
error, a timeout, a 5xx) fails its claim, and the ledger tries the page again later, until it
has failed three times. The ledger's journal compacts itself to the crawl's live state as it grows.

It prints a line for each of these, for examples/crawl_demo.py to read:
``resumed DONE PENDING SECONDS``, then ``interrupted URL`` for each page in flight at the last stop;
``progress DONE PENDING`` four times a second; ``finished FETCHED FAILED DONE`` at the end.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urldefrag, urljoin, urlsplit

import aiohttp
import anyio

from yoink import FingerprintMismatchError, Ledger, NotALedgerError

HREF = re.compile(rb"""href\s*=\s*["']([^"'#][^"']*|#[^"']*)["']""", re.IGNORECASE)


@dataclass
class CrawlConfig:
    start_urls: list[str] = field(default_factory=lambda: ["http://127.0.0.1:8765/"])
    max_pages: int = 10_000  # pages fetched in all (done or given up), across restarts
    concurrency: int = 16
    timeout: float = 10.0
    same_site: bool = True  # follow links to the start URLs' sites only

    def fingerprint(self) -> dict[str, object]:
        """What makes two runs the same crawl: where it starts and which links it follows.

        The page budget and the concurrency are left out, so a crawl can be resumed with a larger
        budget; ``v`` is the link extraction's version, raised when it changes what is followed.
        """
        return {"start_urls": self.start_urls, "same_site": self.same_site, "v": 1}


async def crawl(ledger: Ledger, config: CrawlConfig) -> int:
    """Crawl until no link is left or the budget is spent; the number of pages this run fetched."""
    sites = {urlsplit(url)[:2] for url in config.start_urls}
    timeout = aiohttp.ClientTimeout(total=config.timeout)
    fetched = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal fetched
        async for url in ledger.pending():
            progress = ledger.progress
            if progress.done + progress.failed + progress.running >= config.max_pages:
                break  # the budget is spent; the page stays pending for a later run
            async with ledger.claim(url) as page:
                if page.attempt > 1:  # the ledger retries a failed page: wait a little first
                    await anyio.sleep(min(0.05 * 2**page.attempt, 2.0))
                async with session.get(url) as response:
                    if response.status >= 500:
                        response.raise_for_status()
                    body = await response.read() if response.status == 200 else b""
                await ledger.add(links(url, body, sites if config.same_site else None))
                page.result = response.status
                fetched += 1

    async with aiohttp.ClientSession(timeout=timeout) as session, anyio.create_task_group() as group:
        for _ in range(config.concurrency):
            group.start_soon(worker, session)
    return fetched


def links(base: str, body: bytes, sites: set[tuple[str, str]] | None) -> list[str]:
    """The http(s) links of a page, without fragments; only those to ``sites``, unless None."""
    found = []
    for match in HREF.finditer(body):
        link, _ = urldefrag(urljoin(base, match[1].decode("utf-8", "replace")))
        parts = urlsplit(link)
        if parts.scheme in ("http", "https") and (sites is None or parts[:2] in sites):
            found.append(link)
    return found


async def main(start: str, checkpoint_uri: str, max_pages: int, concurrency: int) -> None:
    config = CrawlConfig(start_urls=[start], max_pages=max_pages, concurrency=concurrency)
    started = time.perf_counter()
    async with Ledger.open(checkpoint_uri, fingerprint=config.fingerprint()) as ledger:
        await ledger.add(config.start_urls)  # known already after a restart: ignored
        progress = ledger.progress
        print(f"resumed {progress.done} {progress.pending} {time.perf_counter() - started:.6f}", flush=True)
        for url in ledger.interrupted:  # fetched again: a page with side effects would check them
            print(f"interrupted {url}", flush=True)
        async with anyio.create_task_group() as group:

            async def report() -> None:
                while True:
                    await anyio.sleep(0.25)
                    print(f"progress {ledger.progress.done} {ledger.progress.pending}", flush=True)

            group.start_soon(report)
            fetched = await crawl(ledger, config)
            group.cancel_scope.cancel()
        print(f"finished {fetched} {ledger.progress.failed} {ledger.progress.done}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("start", help="the URL to start from")
    parser.add_argument("--checkpoint", default="crawl.jsonl", help="a path or any yoink URI")
    parser.add_argument("--max-pages", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    logging.basicConfig(format="crawler: %(levelname)s: %(message)s")  # the ledger's failed attempts
    try:
        anyio.run(main, args.start, args.checkpoint, args.max_pages, args.concurrency)
    except (FingerprintMismatchError, NotALedgerError) as exc:  # the journal is not this crawl's
        sys.exit(f"crawler: {exc}")
