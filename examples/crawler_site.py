"""A generated web site for the crawler demo, served on 127.0.0.1, that logs every page it serves.

    python examples/crawler_site.py --pages 3000 --port 8765 --log served.log

Page i links to a handful of other pages (and to a page that does not exist, and to another site);
one page in 50 answers 503 the first time it is asked, so the crawler's retries are exercised. Each
answer takes a few milliseconds, like a real server. The log has one line per answered request:
``<status> <path>``.
"""

from __future__ import annotations

import argparse
import asyncio
import random

from aiohttp import web


def links(page: int, pages: int) -> list[str]:
    rng = random.Random(page)
    targets = {(page + 1) % pages, rng.randrange(pages), rng.randrange(pages), rng.randrange(pages)}
    hrefs = [f"/page/{target}" for target in sorted(targets)]
    hrefs += [f"/page/{page}#top", f"/missing/{page}", "https://elsewhere.example/", "mailto:web@example.com"]
    return hrefs


def build(pages: int, log_path: str, delay: float) -> web.Application:
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 (open for the server's life)
    failed_once: set[int] = set()

    async def page(request: web.Request) -> web.Response:
        await asyncio.sleep(delay * random.uniform(0.5, 1.5))
        number = int(request.match_info["number"])
        if not 0 <= number < pages:
            raise web.HTTPNotFound()
        if number % 50 == 7 and number not in failed_once:
            failed_once.add(number)
            log.write(f"503 {request.path}\n")
            return web.Response(status=503, text="busy, try again")
        body = "".join(f'<li><a href="{href}">{href}</a></li>' for href in links(number, pages))
        log.write(f"200 {request.path}\n")
        return web.Response(
            text=f"<html><h1>Page {number}</h1><ul>{body}</ul></html>", content_type="text/html"
        )

    async def missing(request: web.Request) -> web.Response:
        log.write(f"404 {request.path}\n")
        raise web.HTTPNotFound()

    async def home(request: web.Request) -> web.Response:
        log.write(f"200 {request.path}\n")
        return web.Response(text='<a href="/page/0">start</a>', content_type="text/html")

    app = web.Application()
    app.add_routes(
        [web.get("/", home), web.get("/page/{number}", page), web.get("/missing/{number}", missing)]
    )
    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pages", type=int, default=3000)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--log", required=True)
    parser.add_argument("--delay", type=float, default=0.005, help="seconds per answer, about")
    args = parser.parse_args()
    web.run_app(build(args.pages, args.log, args.delay), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
