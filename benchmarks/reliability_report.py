"""The reliability suite's kill -9 loop in its long setting, as a table per backend.

    .venv/bin/python benchmarks/reliability_report.py [--kills 200]     (or scripts/reliability-report)

For each backend (a local file; S3 in both layouts, through moto's server; Redis, on a
redis-server started here), writers are killed with SIGKILL at random moments, --kills times; after
each kill the journal is replayed. The table counts, over all kills, the records whose flush had
returned (acknowledged), and of those the ones lost, the ones replayed twice, and the replays that
met a corrupt line.
"""

from __future__ import annotations

import argparse
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

from tests.redis_server import RedisServer
from tests.reliability.killing import Journal, Outcome, kill_loop
from tests.s3 import MotoServer


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=200, help="kills per backend")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--only", nargs="*", help="backends to run (local, s3-object, s3-segments, redis)")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else time.time_ns() % (1 << 32)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    for name, value in {"AWS_ACCESS_KEY_ID": "report", "AWS_SECRET_ACCESS_KEY": "report"}.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    rows: list[tuple[str, Outcome, float]] = []
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
        ]
        try:
            for journal in journals:
                if args.only and journal.name not in args.only:
                    continue
                print(f"{journal.name}: {args.kills} kills ...", file=sys.stderr, flush=True)
                started = time.monotonic()
                outcome = kill_loop(journal, args.kills, random.Random(seed))
                rows.append((journal.name, outcome, time.monotonic() - started))
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
    failures = [f"{name}: {failure}" for name, outcome, _ in rows for failure in outcome.failures]
    for failure in failures[:20]:
        print(f"  {failure}")
    bad = any(
        outcome.lost or outcome.duplicated or outcome.corrupt or outcome.failures for _, outcome, _ in rows
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
