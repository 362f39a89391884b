"""The ``yoink`` command: look into a journal, check it, copy it to another backend.

    yoink cat URI            the records, as JSONL on stdout
    yoink stats URI          records, bytes, the first and last record, problems found; a
                             ledger's progress (done, failed, pending, interrupted)
    yoink verify URI         exit status 0 for a clean journal, 1 with each problem
    yoink copy SRC DST       stream a journal from one backend to another
    yoink compact URI --key FIELD   keep the last record for each value of FIELD

Every command but ``compact`` reads its journals read-only (a copy's destination aside): it takes
no lock or lease and writes nothing, not even a crashed writer's staged records. ``compact`` is a
writer: it takes the journal's lock or lease, and is refused while another writer holds it. URIs are those of
:class:`~yoink.StorageFactory`; S3 and Redis settings come from the usual
environment variables (``AWS_*``, ``AWS_ENDPOINT_URL``) and URI forms. Errors are one line on
stderr (exit status 1, or 2 for a usage error); ``--debug`` shows the traceback. A journal that does
not exist is an error (``no journal at URI``). URIs are shown with their secrets as ``***``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import anyio
import orjson

from yoink import __version__
from yoink._compaction import Compaction
from yoink._exceptions import CorruptCheckpointError, LedgerError, YoinkError
from yoink._ledger_state import DONE, FIELD, PENDING, LedgerState, Tries
from yoink._manager import CheckpointManager
from yoink._records import BadLine, JournalDecoder, Problem, TornTail
from yoink.storage import CheckpointStorage, StorageFactory
from yoink.storage._factory import journal_identity
from yoink.storage._uri import redact, secrets_in

__all__ = ["main"]

package_logger = logging.getLogger("yoink")  # every logger of yoink is under it; main() shows them


class UsageError(YoinkError):
    """The command line asks for what cannot be (a bad URI, a copy onto its source): exit status 2."""


class _Refused(YoinkError):
    """The command would have done something the user did not ask for, or found nothing to do it on."""


@contextlib.contextmanager
def _parsing() -> Iterator[None]:
    """Turn the errors of reading a URI and its options (and only those) into usage errors."""
    try:
        yield
    except ValueError as exc:  # UnknownSchemeError too; raised before any I/O, by URI parsing
        raise UsageError(str(exc)) from exc


def _storage(uri: str) -> CheckpointStorage:
    with _parsing():
        return StorageFactory.from_uri(uri)


def _manager(uri: str, **options: Any) -> CheckpointManager:
    with _parsing():
        return CheckpointManager.from_uri(uri, **options)


async def _require(journal: CheckpointStorage | CheckpointManager, uri: str) -> None:
    if not await journal.exists():
        raise _Refused(f"no journal at {redact(uri)}")


@dataclass
class Scan:
    records: int = 0
    bytes: int = 0
    first: dict[str, Any] | None = None
    last: dict[str, Any] | None = None
    problems: list[Problem] = field(default_factory=list)
    header: dict[str, Any] | None = None  # the journal's header line, if it has one
    compaction: Compaction | None = None  # the last compaction, as the header tells it
    ledger: LedgerState | None = None  # a ledger's state, folded, if the first record opens one
    not_a_ledger: str | None = None  # why the fold stopped, if it did


async def scan(storage: CheckpointStorage, uri: str, *, ledger: bool = False) -> Scan:
    """Read the whole journal once, skipping and noting every problem; with ``ledger``, fold the
    records of a journal whose first record opens a ledger into its state."""
    result = Scan()
    decoder = JournalDecoder(uri, on_corrupt="skip", on_problem=result.problems.append)
    async for records in decoder.batches(storage.read()):
        if records:
            if result.first is None:
                result.first = records[0]
                if ledger and result.first.get(FIELD) == "open":
                    result.ledger = LedgerState(uri, keep_results=False)  # counts, not results
            result.last = records[-1]
            result.records += len(records)
            if result.ledger is not None and result.not_a_ledger is None:
                try:
                    result.ledger.fold(records)
                except LedgerError as exc:  # the rest is still counted, and its problems noted
                    result.not_a_ledger = str(exc)
    left_out = sum(problem.left_out for problem in result.problems if isinstance(problem, TornTail))
    result.bytes = decoder.offset + left_out
    result.header = decoder.header
    if decoder.header is not None:
        result.compaction = Compaction.from_header(decoder.header)
    return result


async def cat(uri: str, skip_corrupt: bool, out: BinaryIO) -> int:
    on_corrupt = "skip" if skip_corrupt else "raise"
    async with _manager(uri, read_only=True, on_corrupt=on_corrupt) as manager:
        await _require(manager, uri)
        chunk: list[bytes] = []
        try:
            async for record in manager.replay():
                chunk.append(_jsonl(record))
                if len(chunk) == 1024:
                    out.write(b"".join(chunk))
                    chunk.clear()
        finally:  # the records before a corrupt line are written before the error
            out.write(b"".join(chunk))
            out.flush()
    return 0


async def stats(uri: str, max_attempts: int = 3) -> int:
    async with _storage(uri) as storage:
        await _require(storage, uri)
        result = await scan(storage, redact(uri), ledger=True)
    print(f"journal:  {redact(uri)}")
    print(f"records:  {result.records:,}")
    print(f"bytes:    {result.bytes:,}")
    print(f"first:    {_show(result.first)}")
    print(f"last:     {_show(result.last)}")
    print(f"compacted: {_compacted(result)}")
    torn = [problem for problem in result.problems if isinstance(problem, TornTail)]
    corrupt = [problem for problem in result.problems if isinstance(problem, BadLine)]
    print(f"torn tail: {torn[0] if torn else 'none'}")
    print(f"corrupt lines: {len(corrupt)}")
    for problem in corrupt[:10]:
        print(f"  {problem}")
    if len(corrupt) > 10:
        print(f"  ... and {len(corrupt) - 10} more (yoink verify lists them all)")
    if result.ledger is not None:
        _ledger_stats(result, len(corrupt), max_attempts)
    return 0


def _ledger_stats(result: Scan, corrupt: int, max_attempts: int) -> None:
    """A ledger's progress, as :class:`~yoink.Ledger` would find it, opened with ``max_attempts``."""
    state = result.ledger
    assert state is not None
    if result.not_a_ledger is not None:
        print(f"ledger:   not a valid ledger: {result.not_a_ledger}")
        return
    if corrupt:
        them = "it" if corrupt == 1 else "them"
        print(
            f"ledger:   not a valid ledger: {corrupt} corrupt line{'s' * (corrupt > 1)}, which Ledger.open "
            f"refuses unless given on_corrupt='skip'; the figures below leave {them} out"
        )
    else:
        print("ledger:   yes")
    done = failed = tried_before = 0
    given_up: list[str] = []
    for key, item in state.items.items():
        if item is DONE:
            done += 1
        elif type(item) is Tries and item.failures >= max_attempts:
            failed += 1
            if len(given_up) < 10:
                given_up.append(f"{_show(key)}: {_show(item.error or '')}")
        elif item is not PENDING:
            tried_before += 1
    fingerprint = "none given" if state.fingerprint is None else _show(state.fingerprint)
    print(f"  fingerprint: {fingerprint}")
    print(f"  items:       {len(state.items):,}")
    print(f"  done:        {done:,}")
    limit = f"{max_attempts} failed attempt{'s' * (max_attempts > 1)}"
    print(f"  failed:      {failed:,} (given up after {limit}; set with --max-attempts)")
    _some(given_up, failed)
    pending = len(state.items) - done - failed
    print(f"  pending:     {pending:,} (of which {tried_before:,} tried before)")
    interrupted = state.interrupted()
    stopped = "in flight when a writer stopped, or running now"
    print(f"  interrupted: {len(interrupted):,} (started, not ended: {stopped})")
    _some([_show(key) for key in interrupted[:10]], len(interrupted))


def _some(lines: list[str], total: int) -> None:
    """The first lines of a list of ``total``, indented, and how many more there are."""
    for line in lines:
        print(f"    {line}")
    if total > len(lines):
        print(f"    ... and {total - len(lines):,} more")


def _compacted(result: Scan) -> str:
    compaction = result.compaction
    if compaction is None:
        return "never" if result.header is None else "a header yoink does not know (not shown)"
    how = f"by key {compaction.key!r}" if compaction.key is not None else "to a snapshot"
    if compaction.records_before is None or compaction.records is None:
        return f"{compaction.at} {how}"
    before = f"{compaction.records_before:,} records"
    if compaction.bytes_before is not None:
        before += f" ({compaction.bytes_before:,} bytes)"
    return f"{compaction.at} {how}: {before} to {compaction.records:,}"


async def compact(uri: str, key: str) -> int:
    async with _manager(uri, flush_interval=None) as manager:
        await _require(manager, uri)
        result = await manager.compact(key=key)
    before = f"{result.records_before:,} records ({result.bytes_before:,} bytes)"
    print(f"{redact(uri)}: compacted by {key!r}: {before} to {result.records:,} ({result.bytes:,} bytes)")
    return 0


async def verify(uri: str) -> int:
    shown = redact(uri)
    async with _storage(uri) as storage:
        await _require(storage, uri)
        result = await scan(storage, shown)
    for problem in result.problems:
        print(f"{shown}: {problem}")
    if result.problems:
        return 1
    print(f"{shown}: clean, {result.records:,} records")
    return 0


async def copy(source: str, destination: str, append: bool, progress: bool) -> int:
    origin = _manager(source, read_only=True)
    target = _manager(destination, flush_interval=None)
    identity = journal_identity(origin.storage)  # None for a backend that cannot say: the URIs, then
    if (identity or source) == (journal_identity(target.storage) if identity else destination):
        raise UsageError(
            f"{redact(source)} and {redact(destination)} name one journal, which is both the source "
            "and the destination"
        )
    copied = 0
    async with target, origin:
        await _require(origin, source)
        if await target.exists() and not append:
            count = sum([1 async for _ in target.replay()])
            if count:
                raise _Refused(
                    f"{redact(destination)} already holds {count:,} records; pass --append to add to them"
                )
        started, shown = time.monotonic(), 0.0
        async for batch in _batches(origin.replay(), 4096):
            await target.append_many(batch)
            copied += len(batch)
            now = time.monotonic()
            if progress and now - shown > 0.2:
                rate = copied / max(now - started, 1e-9)
                print(f"\rcopied {copied:,} records ({rate:,.0f}/s)", end="", file=sys.stderr, flush=True)
                shown = now
        await target.flush()
    if progress:
        print(f"\rcopied {copied:,} records" + " " * 20, file=sys.stderr)
    return 0


async def _batches(records: AsyncIterator[dict[str, Any]], size: int) -> AsyncIterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    async for record in records:
        batch.append(record)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _jsonl(record: Any) -> bytes:
    """A record as one JSONL line; integers beyond 64 bits, which replay reads exactly, kept so."""
    try:
        return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:  # "Integer exceeds 64-bit range": json writes any int
        return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _show(record: Any) -> str:
    """A record (or any JSON value) on one line of at most 200 characters; None as "-"."""
    if record is None:
        return "-"
    text = _jsonl(record).decode().rstrip("\n")
    return text if len(text) <= 200 else text[:197] + "..."


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return value


def _field(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("the name of a record field, not empty")
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="yoink", description="Look into, check, copy and compact yoink journals."
    )
    parser.add_argument("--version", action="version", version=f"yoink {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and yoink's log")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    command = commands.add_parser("cat", help="write the records as JSONL to stdout")
    command.add_argument("uri")
    command.add_argument("--skip-corrupt", action="store_true", help="skip corrupt lines instead of stopping")
    command = commands.add_parser(
        "stats", help="count records and bytes, show the first and last, problems, and a ledger's progress"
    )
    command.add_argument("uri")
    command.add_argument(
        "--max-attempts",
        type=_positive,
        default=3,
        metavar="N",
        help="a ledger's limit, which its journal does not hold: an item tried N times is given up (3)",
    )
    command = commands.add_parser("verify", help="exit 0 if the journal is clean, else 1 with each problem")
    command.add_argument("uri")
    command = commands.add_parser("copy", help="copy a journal to another URI (any backend to any other)")
    command.add_argument("source")
    command.add_argument("destination")
    command.add_argument("--append", action="store_true", help="add to a destination that holds records")
    command.add_argument("--no-progress", action="store_true", help="no progress line, even on a terminal")
    command = commands.add_parser(
        "compact", help="keep the last record for each value of a field (a writer: takes the lock)"
    )
    command.add_argument("uri")
    command.add_argument(
        "--key", required=True, type=_field, metavar="FIELD", help="the record field that names a unit"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("yoink: %(levelname)s: %(message)s"))
    handler.setLevel(logging.DEBUG if args.debug else logging.ERROR)  # stats and verify report the rest
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.DEBUG if args.debug else logging.WARNING)
    try:
        if args.command == "cat":
            return anyio.run(cat, args.uri, args.skip_corrupt, sys.stdout.buffer)
        if args.command == "stats":
            return anyio.run(stats, args.uri, args.max_attempts)
        if args.command == "verify":
            return anyio.run(verify, args.uri)
        if args.command == "compact":
            return anyio.run(compact, args.uri, args.key)
        progress = sys.stderr.isatty() and not args.no_progress
        return anyio.run(copy, args.source, args.destination, args.append, progress)
    except BrokenPipeError:  # `yoink cat ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit either
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.debug:
            raise
        uris = [args.source, args.destination] if args.command == "copy" else [args.uri]
        message = _one_line(exc, [secret for uri in uris for secret in secrets_in(uri)])
        if isinstance(exc, CorruptCheckpointError):
            message = message.replace("on_corrupt='skip'", "yoink cat --skip-corrupt")
        if not isinstance(exc, (YoinkError, OSError)):  # not one of yoink's own errors: a bug
            print(
                f"yoink: internal error: {type(exc).__name__}: {message}\n"
                "yoink: this is a bug in yoink; run the command again with --debug for the traceback, "
                "and report it",
                file=sys.stderr,
            )
            return 1
        print(f"yoink: error: {message}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1


def _one_line(exc: BaseException, secrets: list[str]) -> str:
    """The error's message on one line, without the secrets of the command's URIs."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    for secret in sorted(secrets, key=len, reverse=True):
        message = message.replace(secret, "***")
    return message


if __name__ == "__main__":
    sys.exit(main())
