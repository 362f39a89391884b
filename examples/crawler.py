"""A resumable asynchronous web crawler on a yoink checkpoint, as on the storage reference page.

    python examples/crawler.py http://127.0.0.1:8765/ --checkpoint ./crawl.jsonl --max-pages 3000

Any checkpoint URI works: a path, ``s3://bucket/crawl.jsonl``, ``redis://localhost/0?key=crawl``.
Kill it at any moment and start it again: it replays the checkpoint to rebuild the set of pages it
fetched and the frontier of links it found, and carries on without fetching a recorded page again.
A page that was being fetched when the process died had no record yet, so it is fetched again.

The checkpoint holds two kinds of record, in this order for each page:
``{"t": "seen", "url": ..., "from": ...}`` for each link found for the first time, then
``{"t": "done", "url": ..., "status": ..., "links": ...}`` for the page. The checkpoint is compacted
by ``url`` in the background as it grows (``CompactionPolicy``): a page's "done" record replaces its
"seen" one, so it stays the size of the crawl's state. Needs aiohttp.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urldefrag, urljoin, urlsplit

import aiohttp
import anyio

from yoink import CheckpointManager, CompactionPolicy

HREF = re.compile(rb"""href\s*=\s*["']([^"'#][^"']*|#[^"']*)["']""", re.IGNORECASE)


@dataclass
class CrawlConfig:
    start_urls: list[str] = field(default_factory=lambda: ["http://127.0.0.1:8765/"])
    max_pages: int = 10_000  # pages fetched in all, across restarts
    concurrency: int = 16
    retries: int = 3  # more attempts after a failed one (connection error, timeout, 5xx)
    timeout: float = 10.0
    same_site: bool = True  # follow links to the start URLs' sites only


@dataclass
class CrawlStats:
    resumed_pages: int = 0  # pages the checkpoint already held
    resumed_frontier: int = 0
    rebuild_seconds: float = 0.0
    fetched: int = 0  # pages fetched by this run
    failed: int = 0  # pages given up on after every retry


class Crawler:
    """Crawls from ``config.start_urls``, recording every page and every new link in the checkpoint."""

    def __init__(self, config: CrawlConfig, checkpoint_manager: CheckpointManager) -> None:
        self.config = config
        self.checkpoint = checkpoint_manager
        self.stats = CrawlStats()
        self.seen: set[str] = set()
        self.done: set[str] = set()
        self.frontier: deque[str] = deque()
        self._sites = {urlsplit(url)[:2] for url in config.start_urls}
        self._active = 0
        self._wake = anyio.Event()
        self._resumed = False

    async def resume(self) -> None:
        """Rebuild the seen set, the done set and the frontier from the checkpoint."""
        started = time.perf_counter()
        order: list[str] = []
        async for record in self.checkpoint.replay():
            if record["t"] == "seen":
                order.append(record["url"])
            else:
                self.done.add(record["url"])
        self.seen |= self.done  # a compacted checkpoint keeps a fetched page's "done" record alone
        for url in [*self.config.start_urls, *order]:
            if url not in self.seen:
                self.seen.add(url)
                if url not in self.done:
                    self.frontier.append(url)
        self.stats.resumed_pages = len(self.done)
        self.stats.resumed_frontier = len(self.frontier)
        self.stats.rebuild_seconds = time.perf_counter() - started
        self._resumed = True

    async def run(self) -> CrawlStats:
        """Resume (unless :meth:`resume` was called), then crawl until the frontier or the budget is spent."""
        if not self._resumed:
            await self.resume()
        timeout = aiohttp.ClientTimeout(total=self.config.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session, anyio.create_task_group() as tg:
            for _ in range(self.config.concurrency):
                tg.start_soon(self._worker, session)
        return self.stats

    async def _worker(self, session: aiohttp.ClientSession) -> None:
        while True:
            if not self.frontier:
                if self._active == 0 or self._budget() <= 0:
                    self._wake.set()  # nothing in flight can add work: every worker stops
                    return
                await self._wake.wait()
                continue
            if self._budget() <= 0:
                return
            url = self.frontier.popleft()
            self._active += 1
            try:
                await self._crawl(session, url)
            finally:
                self._active -= 1
                self._wake.set()
                self._wake = anyio.Event()

    def _budget(self) -> int:
        return self.config.max_pages - len(self.done) - self._active

    async def _crawl(self, session: aiohttp.ClientSession, url: str) -> None:
        status, body = await self._fetch(session, url)
        found = []
        for link in self._links(url, body):
            if link not in self.seen:
                self.seen.add(link)
                self.frontier.append(link)
                found.append({"t": "seen", "url": link, "from": url})
        # The links first, then the page: once the page's record is durable, so are its links.
        await self.checkpoint.append_many(
            [*found, {"t": "done", "url": url, "status": status, "links": len(found)}]
        )
        await self.checkpoint.flush()  # tasks flushing together share one write
        self.done.add(url)
        self.stats.fetched += 1
        self.stats.failed += status == 0

    async def _fetch(self, session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
        """GET with retries; (0, b"") when every attempt failed."""
        for attempt in range(self.config.retries + 1):
            try:
                async with session.get(url) as response:
                    body = await response.read()
                    if response.status < 500:
                        return response.status, body if response.status == 200 else b""
            except (aiohttp.ClientError, TimeoutError):
                pass
            await anyio.sleep(min(0.05 * 2**attempt, 2.0))
        return 0, b""

    def _links(self, base: str, body: bytes) -> list[str]:
        links = []
        for match in HREF.finditer(body):
            link, _ = urldefrag(urljoin(base, match[1].decode("utf-8", "replace")))
            parts = urlsplit(link)
            if parts.scheme in ("http", "https") and (not self.config.same_site or parts[:2] in self._sites):
                links.append(link)
        return links


async def main(start: str, checkpoint_uri: str, max_pages: int, concurrency: int) -> None:
    config = CrawlConfig(start_urls=[start], max_pages=max_pages, concurrency=concurrency)
    # Compacted by URL in the background as it grows: a page's last record stays, and a link not
    # yet fetched keeps its "seen" record, so a long crawl's checkpoint stays the size of its state.
    policy = CompactionPolicy(key="url")
    async with CheckpointManager.from_uri(checkpoint_uri, compact=policy) as checkpoint:
        crawler = Crawler(config=config, checkpoint_manager=checkpoint)
        async with anyio.create_task_group() as tg:

            async def report() -> None:
                while True:
                    await anyio.sleep(0.25)
                    print(f"progress {len(crawler.done)} {len(crawler.frontier)}", flush=True)

            tg.start_soon(report)
            await crawler.resume()
            print(
                f"resumed {crawler.stats.resumed_pages} {crawler.stats.resumed_frontier} "
                f"{crawler.stats.rebuild_seconds:.6f}",
                flush=True,
            )
            stats = await crawler.run()
            tg.cancel_scope.cancel()
    print(f"finished {stats.fetched} {stats.failed} {len(crawler.done)}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("start", help="the URL to start from")
    parser.add_argument("--checkpoint", default="crawl.jsonl", help="a path or any yoink URI")
    parser.add_argument("--max-pages", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    anyio.run(main, args.start, args.checkpoint, args.max_pages, args.concurrency)
    sys.exit(0)
