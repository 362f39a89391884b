"""The reliability suite's kill -9 loop and zombie writers in their long setting, as tables.

    .venv/bin/python benchmarks/reliability_report.py [--kills 200] [--pauses 20]
    (or scripts/reliability-report)

For each backend (a local file; S3 in both layouts, through moto's server; Redis, on a
redis-server started here; fsspec, on a local file), writers are killed with SIGKILL at random
moments, --kills times; after each kill the journal is replayed. The table counts, over all
kills, the records whose flush had returned (acknowledged), and of those the ones lost, the ones
replayed twice, and the replays that met a corrupt line.

Then, --pauses times per backend that fences writers (Redis, S3 in both layouts, fsspec), a writer
is paused with SIGSTOP while another, on "another machine", takes the journal over and writes; the
paused one is let go and tries to flush. The second table counts the pauses, the takeovers, the
paused writers refused, and records lost, duplicated or reordered (the paused writer's after the
new one's).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

import boto3
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.reliability.killing import Journal, Outcome, Takeover, kill_loop, take_over_from_a_paused_writer
from tests.servers.redis import RedisServer
from tests.servers.s3 import MotoServer


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=200, help="kills per backend")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--pauses", type=int, default=20, help="zombie writers per backend")
    parser.add_argument(
        "--only", nargs="*", help="backends to run (local, s3-object, s3-segments, redis, fsspec)"
    )
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else time.time_ns() % (1 << 32)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    for name, value in {"AWS_ACCESS_KEY_ID": "report", "AWS_SECRET_ACCESS_KEY": "report"}.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    rows: list[tuple[str, Outcome, float]] = []
    zombies: list[tuple[str, list[Takeover], float]] = []
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        moto, server = MotoServer(), RedisServer(root / "redis")
        os.environ["AWS_ENDPOINT_URL"] = moto.url
        bucket = f"report-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=moto.url).create_bucket(Bucket=bucket)
        client = redis.Redis.from_url(server.url)

        def lease_gone() -> None:
            while client.exists("{report}:lease"):
                time.sleep(0.05)

        journals = [
            Journal("local", str(root / "local.jsonl"), {}, pause=0.15),
            Journal("s3-object", f"s3://{bucket}/report.jsonl", {"stage_dir": str(root / "s1")}, pause=0.6),
            Journal(
                "s3-segments",
                f"s3://{bucket}/report?layout=segments",
                {"stage_dir": str(root / "s2"), "merge_after": 4},
                pause=0.6,
            ),
            Journal(
                "redis", f"{server.url}?key=report", {"lease_ttl": 1.0}, pause=0.3, before_start=lease_gone
            ),
            Journal(
                "fsspec", f"fsspec+file://{root}/report.jsonl", {"stage_dir": str(root / "s3")}, pause=0.3
            ),
        ]

        def zombie_lease_gone() -> None:
            while client.exists("{zombie}:lease"):
                time.sleep(0.05)

        paused = [
            (
                Journal("redis", f"{server.url}?key=zombie", {"lease_ttl": 1.0}, 0.3, zombie_lease_gone),
                {"lease_ttl": 1.0},
            ),
            (
                Journal("s3-object", f"s3://{bucket}/zombie.jsonl", {"stage_dir": str(root / "z1")}, 0.3),
                {"stage_dir": str(root / "z1b")},
            ),
            (
                Journal(
                    "s3-segments",
                    f"s3://{bucket}/zombie?layout=segments",
                    {"stage_dir": str(root / "z2"), "merge_after": 2},
                    0.3,
                ),
                {"stage_dir": str(root / "z2b"), "merge_after": 2},
            ),
            (
                Journal("fsspec", f"fsspec+file://{root}/zombie.jsonl", {"stage_dir": str(root / "z3")}, 0.3),
                {"stage_dir": str(root / "z3b")},
            ),
        ]
        try:
            for journal in journals:
                if args.only and journal.name not in args.only:
                    continue
                print(f"{journal.name}: {args.kills} kills ...", file=sys.stderr, flush=True)
                started = time.monotonic()
                outcome = kill_loop(journal, args.kills, random.Random(seed))
                rows.append((journal.name, outcome, time.monotonic() - started))
            for journal, elsewhere in paused:
                if (args.only and journal.name not in args.only) or not args.pauses:
                    continue
                print(f"{journal.name}: {args.pauses} paused writers ...", file=sys.stderr, flush=True)
                started, rng = time.monotonic(), random.Random(seed)
                outcomes = []
                for pause in range(args.pauses):
                    if journal.name == "s3-object":  # moto ignores If-Match on a multipart upload's
                        # completion, which a journal past 5 MiB uses (S3 honours it): a new object
                        # a pause keeps every round on the small-object path, whose PUT moto checks
                        journal = dataclasses.replace(journal, uri=f"s3://{bucket}/zombie-{pause}.jsonl")
                    outcome = take_over_from_a_paused_writer(
                        journal, elsewhere, rng, stopped=2.0, records=300
                    )
                    outcomes.append(outcome)
                zombies.append((journal.name, outcomes, time.monotonic() - started))
        finally:
            client.close()
            server.stop()
            moto.stop()

    print(f"yoink reliability report: kill -9 at random moments (seed {seed})")
    header = ("backend", "kills", "acknowledged", "lost", "duplicated", "corrupt", "time")
    print("{:<12} {:>6} {:>13} {:>6} {:>11} {:>8} {:>8}".format(*header))
    for name, outcome, seconds in rows:
        print(
            f"{name:<12} {outcome.kills:>6} {len(outcome.acknowledged):>13,} {len(outcome.lost):>6} "
            f"{len(outcome.duplicated):>11} {outcome.corrupt:>8} {seconds:>7.0f}s"
        )
    if zombies:
        print("\nzombie writers: paused (SIGSTOP) while another machine took over, then let go (SIGCONT)")
        header = ("backend", "pauses", "takeovers", "refused", "lost", "duplicated", "reordered", "time")
        print("{:<12} {:>6} {:>9} {:>8} {:>6} {:>11} {:>10} {:>8}".format(*header))
    for name, outcomes, seconds in zombies:
        refused = sum(1 for o in outcomes if o.zombie_refused)
        lost = sum(len(o.lost) for o in outcomes)
        duplicated = sum(len(o.duplicated) for o in outcomes)
        reordered = sum(1 for o in outcomes if o.reordered)
        takeovers = sum(1 for o in outcomes if o.taken_over)
        print(
            f"{name:<12} {len(outcomes):>6} {takeovers:>9} {refused:>8} {lost:>6} {duplicated:>11} "
            f"{reordered:>10} {seconds:>7.0f}s"
        )
    failures = [f"{name}: {failure}" for name, outcome, _ in rows for failure in outcome.failures]
    for failure in failures[:20]:
        print(f"  {failure}")
    bad = any(
        outcome.lost or outcome.duplicated or outcome.corrupt or outcome.failures for _, outcome, _ in rows
    ) or any(
        o.lost or o.duplicated or o.reordered or not o.zombie_refused
        for _, outcomes, _ in zombies
        for o in outcomes
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
