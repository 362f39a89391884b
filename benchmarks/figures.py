"""Measures and draws the figures of docs/performance.md, with bench_local's and bench_s3's code.

    .venv/bin/python benchmarks/figures.py            # both figures, into docs/figures/
    .venv/bin/python benchmarks/figures.py --quick    # smaller sizes, for a smoke run

- replay.png: replay throughput and peak memory growth against the journal's size, on the local
  backend. Each journal is written once (bench_local.write_journal) and replayed in --repeat fresh
  processes (bench_local.replay_rate); the best rate and the largest memory growth are kept.
- s3-flush.png: one 1,000-record flush onto a journal of growing size, against moto's server in
  its own process (bench_s3's measurements): bytes on the wire, counted by a proxy, for the object
  layout and for the naive design (download the whole object, append, upload it again); and
  the flush's time for both layouts and the naive design.

The numbers drawn are written to docs/figures/figures.json, with the machine they came from.
Needs the dev and docs extras (aiofiles, moto, matplotlib): pip install -e ".[dev,docs]".
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_local
import bench_s3

FIGURES = Path(__file__).resolve().parent.parent / "docs" / "figures"
MiB = 1 << 20


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


async def replay_once(path: str, n: int) -> dict[str, float]:
    """Replay a journal of ``n`` records in this (fresh) process: records/s and peak memory growth."""
    before = peak_rss()
    rate = await bench_local.replay_rate(path, n)
    return {"records_per_second": rate, "growth_bytes": peak_rss() - before}


def replay_figures(sizes: list[int], repeat: int, directory: str) -> list[dict[str, float]]:
    rows = []
    for n in sizes:
        path = os.path.join(directory, f"replay-{n}.jsonl")
        bench_local.write_journal(path, n)
        runs = []
        for _ in range(repeat):
            out = subprocess.run(
                [sys.executable, __file__, "--replay-once", path, str(n)],
                capture_output=True,
                text=True,
                check=True,
            )
            runs.append(json.loads(out.stdout))
        rows.append(
            {
                "records": n,
                "journal_bytes": os.path.getsize(path),
                "records_per_second": max(run["records_per_second"] for run in runs),
                "growth_bytes": max(run["growth_bytes"] for run in runs),
            }
        )
        os.unlink(path)
        print(f"  replay, {n:,} records: {rows[-1]}", file=sys.stderr)
    return rows


def s3_figures(sizes_mib: list[float]) -> list[dict[str, float]]:
    rows = []
    with bench_s3.moto_server() as endpoint:
        for mib in sizes_mib:
            flush = bench_s3.measure(endpoint, "object_flush_bytes", mib)
            segments = bench_s3.measure(endpoint, "segments_flush_seconds", mib)
            rows.append({"journal_mib": mib, **flush, "segments_seconds": segments["median_seconds"]})
            print(f"  S3, {mib:g} MiB: {rows[-1]}", file=sys.stderr)
    return rows


def pyplot() -> Any:
    """matplotlib's pyplot, drawing to files only; imported here, so a measuring process does not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot


def draw_replay(rows: list[dict[str, float]], machine: str) -> None:
    plt = pyplot()

    records = [row["records"] for row in rows]
    fig, (rate, memory) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    rate.plot(records, [row["records_per_second"] / 1e6 for row in rows], "o-")
    rate.set(
        xscale="log",
        ylim=(0, None),
        xlabel="records in the journal",
        ylabel="million records/s",
        title="Replay throughput",
    )
    memory.plot(records, [row["growth_bytes"] / MiB for row in rows], "o-", color="tab:orange")
    memory.plot(
        records, [row["journal_bytes"] / MiB for row in rows], ":", color="grey", label="the journal's size"
    )
    memory.set(
        xscale="log",
        yscale="log",
        xlabel="records in the journal",
        ylabel="MiB",
        title="Peak memory growth during replay",
    )
    memory.legend()
    labels = [f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1000}k" for n in records]
    for axes in (rate, memory):
        axes.set_xticks(records, labels=labels, minor=False)
        axes.minorticks_off()
    fig.suptitle(f"yoink, local file backend: best of fresh processes ({machine})", fontsize=9)
    fig.savefig(FIGURES / "replay.png", dpi=100, metadata={"Software": None})
    plt.close(fig)


def draw_s3(rows: list[dict[str, float]], machine: str) -> None:
    plt = pyplot()

    size = [row["journal_mib"] for row in rows]
    fig, (wire, seconds) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    wire.plot(size, [row["yoink_bytes"] / MiB for row in rows], "o-", label="yoink, layout=object")
    wire.plot(
        size, [row["reference_bytes"] / MiB for row in rows], "s-", label="download, append, upload again"
    )
    wire.plot(size, [row["new_bytes"] / MiB for row in rows], ":", color="grey", label="the new records")
    wire.axvline(5, color="lightgrey", label="5 MiB: S3 copies larger objects")
    wire.set(
        xscale="log",
        yscale="log",
        xlabel="journal size before the flush (MiB)",
        ylabel="MiB on the wire",
        title="Bytes sent and received by one flush",
    )
    wire.legend(fontsize=7, loc="upper left")
    seconds.plot(size, [row["yoink_seconds"] * 1000 for row in rows], "o-", label="yoink, layout=object")
    seconds.plot(
        size,
        [row["segments_seconds"] * 1000 for row in rows],
        "^-",
        label="yoink, layout=segments (median of 30)",
    )
    seconds.plot(
        size, [row["reference_seconds"] * 1000 for row in rows], "s-", label="download, append, upload again"
    )
    seconds.set(
        xscale="log",
        yscale="log",
        xlabel="journal size before the flush (MiB)",
        ylabel="ms",
        title="Time of one flush",
    )
    seconds.legend(fontsize=8)
    for axes in (wire, seconds):
        axes.set_xticks(size, labels=[f"{mib:g}" for mib in size], minor=False)
        axes.minorticks_off()
    fig.suptitle(f"A 1,000-record flush to moto's S3 server over loopback ({machine})", fontsize=9)
    fig.savefig(FIGURES / "s3-flush.png", dpi=100, metadata={"Software": None})
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per replay size")
    parser.add_argument("--replay-once", nargs=2, metavar=("PATH", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.replay_once:
        path, n = args.replay_once
        print(json.dumps(asyncio.run(replay_once(path, int(n)))))
        return

    replay_sizes = (
        [10_000, 100_000] if args.quick else [10_000, 30_000, 100_000, 300_000, 1_000_000, 3_000_000]
    )
    s3_sizes = [1, 8] if args.quick else [1, 4, 16, 64]
    machine = f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"
    load_before = os.getloadavg()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
        replay = replay_figures(replay_sizes, args.repeat, directory)
    s3 = s3_figures(s3_sizes)
    FIGURES.mkdir(parents=True, exist_ok=True)
    draw_replay(replay, machine)
    draw_s3(s3, machine)
    data: dict[str, Any] = {
        "command": "benchmarks/figures.py" + (" --quick" if args.quick else ""),
        "date": datetime.date.today().isoformat(),
        "machine": machine,
        "load_average_before": [round(load, 2) for load in load_before],  # other work on the machine
        "seconds": round(time.perf_counter() - start, 1),
        "replay": replay,
        "s3_flush": s3,
    }
    (FIGURES / "figures.json").write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {FIGURES}/replay.png, s3-flush.png and figures.json in {data['seconds']} s")


if __name__ == "__main__":
    main()
