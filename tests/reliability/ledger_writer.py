"""A job for crash tests of the ledger: claim and do items with many tasks until killed, or done.

Usage: python tests/reliability/ledger_writer.py URI SEED [OPTIONS_JSON]

OPTIONS_JSON's ``"items"`` is the size of the job (``ITEMS`` if not given), ``"rate"`` the most
claims a second its tasks make (``RATE``), so that a run does about as much work in a second on
any machine while its backend keeps up, and ``"work"`` how long an item's work takes on average
(``WORK`` seconds). The other options go to ``Ledger.open``.

The job is a crawl over the keys ``0 .. items - 1``: it adds the first ``SEEDS``, and item ``k``
finds its children ``k*BRANCHING+1 ..`` (like a page's links), so the rest are added while the
work runs. Some items fail on their first attempt (``fails``), a few on every attempt, until they
are given up. The same keys, failures and fingerprint on every run, whatever
its seed; the seed chooses the number of tasks, the order, the batch size and whether to compact.

It prints, each line flushed as it happens (the outside world that sees what was done twice):

- ``resumed D``, ``known K`` and ``interrupted k k ...`` together, first: the items done when it
  opened the ledger, all the items it knew, and those it reports in flight when the last writer
  stopped;
- ``claiming k`` before a claim, ``ran k A`` first thing in its body (attempt A; the "start" is
  durable by then), ``exited k A done`` or ``exited k A failed`` once the claim's ``async with``
  has exited (the verdict is durable by then);
- ``compacted`` after each compaction that returned, ``finished D F`` when no work is left
  (D items done, F given up), and ``crashed ...`` if the job died of an error instead.

A done item's result is ``{"run": SEED, "attempt": A}``: the journal says which attempt did it.
"""

from __future__ import annotations

import json
import random
import sys
from typing import Any

import anyio

from yoink import Ledger

ITEMS = 1000
RATE = 500
WORK = 0.005
SEEDS = 10
BRANCHING = 3
MAX_ATTEMPTS = 5  # an attempt cut by a kill is no failure: only the items that always fail are given up


def fingerprint(items: int) -> dict[str, Any]:
    return {"job": "ledger-kill9", "items": items}


def children(key: int, items: int) -> range:
    return range(key * BRANCHING + 1, min(key * BRANCHING + BRANCHING + 1, items))


def always_fails(key: int) -> bool:
    return key % 97 == 40  # one in a job of 50 items


def fails(key: int, attempt: int) -> bool:
    """Whether the body raises on this attempt: a few keys always, one in seven the first time."""
    return always_fails(key) or (key % 7 == 3 and attempt == 1)


def say(*words: object) -> None:
    """Print a line in one write: a kill leaves it whole or unwritten (print writes word by word
    when stdout is unbuffered)."""
    sys.stdout.write(" ".join(map(str, words)) + "\n")
    sys.stdout.flush()


async def main(uri: str, seed: int, options: dict[str, Any]) -> None:
    rng = random.Random(seed)
    items, rate, work = options.pop("items", ITEMS), options.pop("rate", RATE), options.pop("work", WORK)
    tasks = rng.choice([1, 4, 8, 16])
    async with Ledger.open(
        uri,
        fingerprint=fingerprint(items),
        max_attempts=MAX_ATTEMPTS,
        order=rng.choice(["fifo", "lifo"]),
        batch_bytes=rng.choice([256, 4096, 65536]),
        **options,
    ) as ledger:
        interrupted = " ".join(str(key) for key in ledger.interrupted)
        opened = f"resumed {ledger.progress.done}\nknown {len(ledger)}\ninterrupted {interrupted}"
        say(opened.rstrip())  # one write: all three lines, or none
        await ledger.add(range(min(SEEDS, items)))

        start = anyio.current_time()

        async def paced() -> None:
            """Wait for the next of the job's starts, ``1 / rate`` after the one before."""
            nonlocal start
            mine = start = max(start + 1 / rate, anyio.current_time())
            await anyio.sleep_until(mine)

        async def task(task_rng: random.Random) -> None:
            async for key in ledger.pending():
                assert isinstance(key, int)
                await paced()  # with one task, no other claim's flush makes the last "done" durable
                say("claiming", key)
                async with ledger.claim(key) as item:
                    say("ran", key, item.attempt)
                    found = children(key, items)
                    if found:
                        await ledger.add(found)
                    await anyio.sleep(task_rng.uniform(0, 2 * work))  # the work itself
                    if fails(key, item.attempt):
                        raise RuntimeError(f"{key} fails on attempt {item.attempt}")
                    item.result = {"run": seed, "attempt": item.attempt}
                say("exited", key, item.attempt, "failed" if item.error else "done")

        every = rng.choice([0.03, 0.3])  # compactions back to back, or one that stands for a while

        async def compact_now_and_then() -> None:
            while True:
                await anyio.sleep(rng.uniform(0, every))
                await ledger.compact()
                say("compacted")

        async with anyio.create_task_group() as job:
            if rng.random() < 0.5:
                job.start_soon(compact_now_and_then)
            async with anyio.create_task_group() as workers:
                for _ in range(tasks):
                    workers.start_soon(task, random.Random(rng.random()))
            job.cancel_scope.cancel()
        progress = ledger.progress
        say("finished", progress.done, progress.failed)


if __name__ == "__main__":
    arguments = sys.argv[1:] + ["{}"][len(sys.argv) - 3 :]
    try:
        anyio.run(main, arguments[0], int(arguments[1]), json.loads(arguments[2]))
    except BaseException as exc:
        say("crashed", repr(exc).replace("\n", " "))
        raise
