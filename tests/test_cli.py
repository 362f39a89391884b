"""The yoink command, run through its installed entry point against local, S3 and Redis journals."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import anyio
import anyio.to_thread
import boto3
import orjson
import pytest
import redis

from tests.servers.s3 import MotoServer
from yoink import Ledger
from yoink.storage import LocalFileStorage

YOINK = str(Path(sys.executable).with_name("yoink"))
RECORDS = [{"n": n, "url": f"https://example.com/{n}", "t": "✓"} for n in range(1000)]


def yoink(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [YOINK, *args], capture_output=True, text=True, input=stdin, env=os.environ, timeout=120
    )


def jsonl(records: list[dict[str, object]]) -> str:
    return "".join(orjson.dumps(r).decode() + "\n" for r in records)


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    path = tmp_path / "journal.jsonl"
    path.write_text(jsonl(RECORDS))
    return path


@pytest.fixture
def corrupt(tmp_path: Path) -> Path:
    path = tmp_path / "corrupt.jsonl"
    path.write_text('{"n":0}\n{"n":1}\nnot json\n{"n":3}\n[4]\n{"n":5}\n{"n":6,"to')
    return path


@pytest.fixture
def s3_uri(bucket: str, moto: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.url)  # the usual variable, as a user would set it
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return f"s3://{bucket}/copied.jsonl"


def test_cat_writes_the_records_as_jsonl_and_nothing_else(journal: Path) -> None:
    result = yoink("cat", str(journal))
    assert result.returncode == 0, result.stderr
    assert result.stdout == jsonl(RECORDS)
    assert result.stderr == ""


def test_cat_into_a_pipe_that_closes_early_is_not_an_error(journal: Path) -> None:
    pipeline = subprocess.run(
        f"{YOINK} cat {journal} | head -n 3; echo status=${{PIPESTATUS[0]}} >&2",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
    )
    assert pipeline.stdout == jsonl(RECORDS[:3])
    assert pipeline.stderr.strip() == "status=0"


def test_cat_stops_at_corruption_with_one_line_and_the_records_before_it(corrupt: Path) -> None:
    result = yoink("cat", str(corrupt))
    assert result.returncode == 1
    assert result.stdout == '{"n":0}\n{"n":1}\n'
    assert result.stderr.count("\n") == 1
    assert "line 3 (byte offset 16) is not a JSON object" in result.stderr
    assert "yoink cat --skip-corrupt skips such lines" in result.stderr
    assert "Traceback" not in result.stderr
    skipped = yoink("cat", "--skip-corrupt", str(corrupt))
    assert skipped.returncode == 0
    assert [orjson.loads(line)["n"] for line in skipped.stdout.splitlines()] == [0, 1, 3, 5]


def test_stats_counts_and_shows_the_problems(journal: Path, corrupt: Path) -> None:
    result = yoink("stats", str(journal))
    assert result.returncode == 0
    assert "records:  1,000" in result.stdout
    assert f"bytes:    {journal.stat().st_size:,}" in result.stdout
    assert 'first:    {"n":0,"url":"https://example.com/0","t":"✓"}' in result.stdout
    assert '"n":999' in result.stdout.split("last:")[1]
    assert "torn tail: none" in result.stdout
    damaged = yoink("stats", str(corrupt))
    assert "records:  4" in damaged.stdout
    assert (
        "torn tail: line 7 (byte offset 45): a torn last line: 10 bytes without a newline" in damaged.stdout
    )
    assert "corrupt lines: 2" in damaged.stdout


def test_verify_exits_0_when_clean_and_1_with_each_problem(journal: Path, corrupt: Path) -> None:
    clean = yoink("verify", str(journal))
    assert (clean.returncode, clean.stdout) == (0, f"{journal}: clean, 1,000 records\n")
    damaged = yoink("verify", str(corrupt))
    assert damaged.returncode == 1
    problems = damaged.stdout.splitlines()
    assert len(problems) == 3
    assert problems[0].startswith(f"{corrupt}: line 3 (byte offset 16): a corrupt line: ")
    assert problems[1] == f"{corrupt}: line 5 (byte offset 33): a corrupt line: a JSON list, not an object"
    assert problems[2] == f"{corrupt}: line 7 (byte offset 45): a torn last line: 10 bytes without a newline"


def test_copy_goes_local_to_s3_to_redis_to_local(
    journal: Path, s3_uri: str, redis_url: str, tmp_path: Path
) -> None:
    redis_uri = f"{redis_url}?key=cli-{uuid.uuid4().hex[:8]}"
    back = tmp_path / "back.jsonl"
    for source, destination in ((str(journal), s3_uri), (s3_uri, redis_uri), (redis_uri, str(back))):
        result = yoink("copy", source, destination)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""  # no progress line when stderr is not a terminal
    assert back.read_text() == journal.read_text()
    assert yoink("verify", s3_uri).returncode == 0
    assert yoink("cat", redis_uri).stdout == jsonl(RECORDS)


def test_copy_refuses_a_destination_with_records_unless_told(journal: Path, tmp_path: Path) -> None:
    destination = tmp_path / "destination.jsonl"
    destination.write_text('{"kept":true}\n')
    refused = yoink("copy", str(journal), str(destination))
    assert refused.returncode == 1
    assert (
        refused.stderr
        == f"yoink: error: {destination} already holds 1 records; pass --append to add to them\n"
    )
    assert destination.read_text() == '{"kept":true}\n'
    appended = yoink("copy", "--append", str(journal), str(destination))
    assert appended.returncode == 0
    assert destination.read_text() == '{"kept":true}\n' + jsonl(RECORDS)


def test_corrupt_s3_and_redis_journals_are_found(
    bucket: str, s3_uri: str, redis_url: str, moto: MotoServer
) -> None:
    boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1").put_object(
        Bucket=bucket, Key="bad.jsonl", Body=b'{"n":0}\n{oops\n{"n":2}\n'
    )
    result = yoink("verify", f"s3://{bucket}/bad.jsonl")
    assert result.returncode == 1
    assert "line 2 (byte offset 8): a corrupt line" in result.stdout
    key = f"cli-bad-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_url)
    client.xadd(key, {"w": "0" * 16, "b": 0, "d": '{"n":0}\nnope\n'})
    client.xadd(key, {"w": "0" * 16, "b": 1, "d": '{"n":2}\n'})
    client.close()
    result = yoink("verify", f"{redis_url}?key={key}")
    assert result.returncode == 1
    assert "line 2 (byte offset 8): a corrupt line" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["cat", "gopher://x/y"], "no storage backend for gopher:// URIs"),
        (["cat", "redis://localhost/0"], "a Redis URI names the stream in its query"),
        (["copy", "/tmp/same.jsonl", "/tmp/same.jsonl"], "is both the source and the destination"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["cat"], "the following arguments are required: uri"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args: list[str], message: str) -> None:
    result = yoink(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_failure_is_one_line_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    unreachable = "redis://:hunter2@127.0.0.1:1/0?key=k"
    result = yoink("cat", unreachable)
    assert result.returncode == 1
    assert (
        result.stderr
        == "yoink: error: cannot reach Redis at 127.0.0.1:1 (ConnectionError); what was not flushed is kept\n"
    )
    debug = yoink("--debug", "cat", unreachable)
    assert "Traceback" in debug.stderr
    assert "hunter2" not in result.stderr + debug.stderr


def test_copy_shows_progress_on_a_terminal(journal: Path, tmp_path: Path) -> None:
    import pty

    controller, terminal = pty.openpty()
    try:
        result = subprocess.run(
            [YOINK, "copy", str(journal), str(tmp_path / "copy.jsonl")],
            stdout=subprocess.PIPE,
            stderr=terminal,
            env=os.environ,
            timeout=60,
            check=False,
        )
        os.close(terminal)
        shown = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the terminal's other side is closed: all is read
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(controller)
    assert result.returncode == 0
    assert b"copied 1,000 records" in shown


def _s3_state(bucket: str, moto: MotoServer) -> dict[str, str]:
    client = boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1")
    listing = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {item["Key"]: item["ETag"] for item in listing}


@pytest.mark.parametrize("layout", ["object", "segments"])
def test_read_commands_leave_an_s3_journal_and_a_crashed_writers_stage_untouched(
    bucket: str, moto: MotoServer, s3_uri: str, tmp_path: Path, layout: str
) -> None:
    uri = f"s3://{bucket}/job?layout={layout}"
    (tmp_path / "empty.jsonl").touch()
    written = yoink("copy", str(tmp_path / "empty.jsonl"), uri)  # an empty journal to start from
    assert written.returncode == 0, written.stderr
    stage = tmp_path / "cache" / "yoink" / "stage"  # the default stage, under XDG_CACHE_HOME
    child = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("s3_child.py")),
            "stage",
            uri,
            str(stage),
            moto.url,
            "50",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline() == "staged\n"
    child.kill()  # a crashed writer: 50 records staged on this machine, none uploaded
    child.wait()
    child.stdout.close()
    before = _s3_state(bucket, moto)
    staged = sorted(p.name for p in stage.rglob("*.jsonl"))
    assert staged, "the crashed writer left no stage"
    for command in (
        ["cat", uri],
        ["stats", uri],
        ["verify", uri],
        ["copy", uri, str(tmp_path / "out.jsonl")],
    ):
        result = yoink(*command)
        assert result.returncode == 0, (command, result.stderr)
        assert _s3_state(bucket, moto) == before, f"yoink {command[0]} changed the S3 journal"
        assert sorted(p.name for p in stage.rglob("*.jsonl")) == staged, f"yoink {command[0]} took the stage"
    # A reader shows the staged records, as the next writer on this machine would replay them.
    assert yoink("cat", uri).stdout == "".join(f'{{"n":{n}}}\n' for n in range(50))


def test_read_commands_leave_a_redis_journal_and_a_live_writers_lease_untouched(redis_url: str) -> None:
    key = f"cli-read-{uuid.uuid4().hex[:8]}"
    uri = f"{redis_url}?key={key}"
    client = redis.Redis.from_url(redis_url)
    client.xadd(key, {"w": "0123456789abcdef", "b": 0, "d": jsonl(RECORDS[:10])})
    client.set(f"{{{key}}}:lease", "another-writer", px=60_000)  # a writer holds the journal

    def state() -> tuple[object, ...]:
        return client.xlen(key), client.xinfo_stream(key)["last-generated-id"], client.get(f"{{{key}}}:lease")

    before = state()
    for command in (["cat", uri], ["stats", uri], ["verify", uri], ["copy", uri, f"memory://out-{key}"]):
        result = yoink(*command)
        assert result.returncode == 0, (command, result.stderr)
        now = (
            client.xlen(key),
            client.xinfo_stream(key)["last-generated-id"],
            client.get(f"{{{key}}}:lease"),
        )
        assert now == before, f"yoink {command[0]} changed the Redis journal or its lease"
    client.close()


@pytest.mark.parametrize("command", ["cat", "stats", "verify", "copy"])
def test_a_journal_that_does_not_exist_is_an_error_on_every_backend(
    command: str, tmp_path: Path, s3_uri: str, redis_url: str
) -> None:
    missing = [
        str(tmp_path / "missing.jsonl"),
        "memory://missing",
        f"{redis_url}?key=missing-{uuid.uuid4().hex[:8]}",
        s3_uri.replace("copied", "missing"),
        f"fsspec+file://{tmp_path}/missing-too.jsonl",
    ]
    for uri in missing:
        args = [command, uri] if command != "copy" else [command, uri, str(tmp_path / "out.jsonl")]
        result = yoink(*args)
        assert (result.returncode, result.stdout) == (1, ""), (uri, result.stderr)
        assert result.stderr == f"yoink: error: no journal at {uri}\n"
    assert not (tmp_path / "out.jsonl").exists()


def test_an_empty_journal_that_exists_is_clean(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").touch()
    result = yoink("verify", str(tmp_path / "empty.jsonl"))
    assert (result.returncode, result.stdout) == (0, f"{tmp_path / 'empty.jsonl'}: clean, 0 records\n")


def test_copy_refuses_one_local_journal_spelt_two_ways(journal: Path) -> None:
    before = journal.read_text()
    relative = os.path.relpath(journal)
    for source, destination in ((f"./{relative}", str(journal)), (str(journal), f"file://{journal}")):
        result = yoink("copy", "--append", source, destination)
        assert result.returncode == 2, result.stderr
        assert "name one journal, which is both the source and the destination" in result.stderr
    assert journal.read_text() == before


def test_copy_refuses_one_redis_key_spelt_two_ways(redis_url: str) -> None:
    key = f"cli-same-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_url)
    client.xadd(key, {"w": "0" * 16, "b": 0, "d": jsonl(RECORDS[:5])})
    port = redis_url.rpartition(":")[2].partition("/")[0]
    result = yoink("copy", "--append", f"{redis_url}?key={key}", f"redis://localhost:{port}?db=0&key={key}")
    assert result.returncode == 2, result.stderr
    assert "name one journal, which is both the source and the destination" in result.stderr
    assert client.xlen(key) == 1
    client.close()


def test_options_in_a_redis_uri_reach_the_storage_from_the_command_line(redis_url: str) -> None:
    key = f"cli-options-{uuid.uuid4().hex[:8]}"
    source = f"{redis_url}?key={key}&lease_ttl=5&page_size=3"
    client = redis.Redis.from_url(redis_url)
    client.xadd(key, {"w": "0" * 16, "b": 0, "d": jsonl(RECORDS[:5])})
    client.close()
    result = yoink("verify", source)
    assert (result.returncode, result.stdout) == (0, f"{source}: clean, 5 records\n"), result.stderr
    bad = yoink("verify", f"{redis_url}?key={key}&lease_ttl=abc")
    assert bad.returncode == 2
    assert "lease_ttl='abc' is not a number" in bad.stderr


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("file:relative.jsonl", "give the path itself, as in ./relative.jsonl"),
        ("C:\\runs\\a.jsonl", "looks like a Windows path"),
        ("gopher:x", "no storage backend for gopher:// URIs"),
    ],
)
def test_what_is_neither_a_path_nor_a_known_uri_is_a_usage_error(uri: str, message: str) -> None:
    result = yoink("verify", uri)
    assert result.returncode == 2
    assert message in result.stderr


def test_a_bug_is_an_internal_error_with_a_traceback_hint_not_a_usage_error(
    journal: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from yoink import cli

    async def broken(storage: object, uri: str, **options: object) -> None:
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(cli, "scan", broken)
    yoink_logger = logging.getLogger("yoink")  # main() sets up the log for a process: undo it after
    monkeypatch.setattr(yoink_logger, "handlers", list(yoink_logger.handlers))
    monkeypatch.setattr(yoink_logger, "level", yoink_logger.level)
    status = cli.main(["stats", str(journal)])
    said = capsys.readouterr().err
    assert status == 1
    assert said.startswith("yoink: internal error: TypeError: unsupported operand type(s)")
    assert "run the command again with --debug for the traceback" in said
    with pytest.raises(TypeError):
        cli.main(["--debug", "stats", str(journal)])


def test_compact_keeps_the_last_record_per_key_and_stats_tells_of_it(tmp_path: Path) -> None:
    path = tmp_path / "crawl.jsonl"
    path.write_text(jsonl([{"url": f"u{n % 10}", "n": n} for n in range(1000)]))
    size = path.stat().st_size
    result = yoink("compact", str(path), "--key", "url")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{path}: compacted by 'url': 1,000 records ({size:,} bytes) to 10 (")
    assert yoink("cat", str(path)).stdout == jsonl([{"url": f"u{n}", "n": 990 + n} for n in range(10)])
    stats = yoink("stats", str(path)).stdout
    assert "records:  10\n" in stats
    assert re.search(rf"compacted: \S+ by key 'url': 1,000 records \({size:,} bytes\) to 10\n", stats), stats


def test_stats_of_a_journal_never_compacted_says_so(journal: Path) -> None:
    assert "compacted: never\n" in yoink("stats", str(journal)).stdout


def test_compact_is_refused_while_another_writer_holds_the_journal(journal: Path) -> None:
    async def hold_and_compact() -> subprocess.CompletedProcess[str]:
        async with LocalFileStorage(journal) as writer:
            await writer.write('{"n":1000}\n')  # the writer's lock, held
            return await anyio.to_thread.run_sync(yoink, "compact", str(journal), "--key", "n")

    result = anyio.run(hold_and_compact)
    assert result.returncode == 1
    assert "open for writing elsewhere" in result.stderr
    assert journal.read_text() == jsonl(RECORDS) + '{"n":1000}\n'


def test_compact_needs_a_key_and_a_journal(tmp_path: Path) -> None:
    result = yoink("compact", str(tmp_path / "j.jsonl"))
    assert result.returncode == 2
    assert "--key" in result.stderr
    missing = yoink("compact", str(tmp_path / "j.jsonl"), "--key", "url")
    assert (missing.returncode, missing.stderr) == (
        1,
        f"yoink: error: no journal at {tmp_path / 'j.jsonl'}\n",
    )
    assert not (tmp_path / "j.jsonl").exists()
    (tmp_path / "j.jsonl").write_text('{"url": "a"}\n')
    empty = yoink("compact", str(tmp_path / "j.jsonl"), "--key", "")  # attack B6: "a bug in yoink", exit 1
    assert empty.returncode == 2, empty.stderr
    assert "argument --key: the name of a record field, not empty" in empty.stderr
    assert "bug" not in empty.stderr
    assert (tmp_path / "j.jsonl").read_text() == '{"url": "a"}\n'


def test_stats_of_a_header_yoink_does_not_know_says_so_and_does_not_fail(tmp_path: Path) -> None:
    path = tmp_path / "odd.jsonl"
    odd = {"at": "now", "key": "k", "records_before": "many", "bytes_before": None, "records": 1}
    path.write_text(orjson.dumps(["$yoink", {"compaction": odd}]).decode() + '\n{"n":1}\n')
    result = yoink("stats", str(path))
    assert result.returncode == 0, result.stderr
    assert "records:  1\n" in result.stdout
    assert "compacted: a header yoink does not know (not shown)\n" in result.stdout


LEDGER = [
    {"$ledger": "open", "v": 1, "fingerprint": {"site": "a"}},
    {"$ledger": "add", "keys": ["a", "b", "c", "d", "e", 7]},
    {"$ledger": "start", "key": "a", "attempt": 1},
    {"$ledger": "done", "key": "a", "result": 200},
    {"$ledger": "start", "key": "b", "attempt": 1},
    {"$ledger": "fail", "key": "b", "attempt": 1, "failures": 1, "error": "TimeoutError: slow 1"},
    {"$ledger": "start", "key": "b", "attempt": 2, "failures": 1},  # never ended: no failure
    {"$ledger": "start", "key": "b", "attempt": 3, "failures": 1},
    {"$ledger": "fail", "key": "b", "attempt": 3, "failures": 2, "error": "TimeoutError: slow 3"},
    {"$ledger": "start", "key": "b", "attempt": 4, "failures": 2},
    {"$ledger": "fail", "key": "b", "attempt": 4, "failures": 3, "error": "TimeoutError: slow 4"},
    {"$ledger": "start", "key": "c", "attempt": 1},  # never ended
    {"$ledger": "start", "key": "d", "attempt": 1},
    {"$ledger": "fail", "key": "d", "attempt": 1, "failures": 1, "error": "ConnectionError: refused"},
    {"$ledger": "start", "key": 7, "attempt": 1},  # never ended
]


def ledger_part(stats: str) -> str:
    """What ``yoink stats`` says of a ledger: its lines from "ledger:" on."""
    return stats[stats.index("\nledger:") + 1 :]


def test_stats_shows_a_ledgers_progress_its_given_up_items_and_its_interrupted_ones(tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_text(jsonl(LEDGER))
    result = yoink("stats", str(path))
    assert result.returncode == 0, result.stderr
    assert f"records:  {len(LEDGER)}\n" in result.stdout
    assert ledger_part(result.stdout) == (
        "ledger:   yes\n"
        '  fingerprint: {"site":"a"}\n'
        "  items:       6\n"
        "  done:        1\n"
        "  failed:      1 (given up after 3 failed attempts; set with --max-attempts)\n"
        '    "b": "TimeoutError: slow 4"\n'
        "  pending:     4 (of which 3 tried before)\n"
        "  interrupted: 2 (started, not ended: in flight when a writer stopped, or running now)\n"
        '    "c"\n'
        "    7\n"
    )


def test_stats_gives_up_on_a_ledgers_items_after_max_attempts_as_the_ledger_would(tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_text(jsonl(LEDGER))
    once = ledger_part(yoink("stats", "--max-attempts", "1", str(path)).stdout)
    assert "  failed:      2 (given up after 1 failed attempt; set with --max-attempts)\n" in once
    assert '    "d": "ConnectionError: refused"\n' in once
    assert "  pending:     3 (of which 2 tried before)\n" in once  # "c" and 7: no verdict, no failure
    assert "  failed:      0 " in yoink("stats", "--max-attempts", "4", str(path)).stdout
    refused = yoink("stats", "--max-attempts", "0", str(path))
    assert refused.returncode == 2
    assert "'0' is not a whole number of 1 or more" in refused.stderr


def test_stats_lists_the_first_ten_of_many_and_counts_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    started = [{"$ledger": "start", "key": n, "attempt": 1} for n in range(25)]
    path.write_text(jsonl([LEDGER[0], *started]))
    part = ledger_part(yoink("stats", str(path)).stdout)
    assert part.endswith("".join(f"    {n}\n" for n in range(10)) + "    ... and 15 more\n")
    assert "  fingerprint: " in part


def test_stats_of_a_ledger_with_a_corrupt_line_says_it_is_not_valid_and_counts_the_rest(
    tmp_path: Path,
) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_text(jsonl(LEDGER) + "not json\n" + jsonl([{"$ledger": "done", "key": "e"}]))
    result = yoink("stats", str(path))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    part = ledger_part(result.stdout)
    assert part.startswith(
        "ledger:   not a valid ledger: 1 corrupt line, which Ledger.open refuses unless given "
        "on_corrupt='skip'; the figures below leave it out\n"
    )
    assert "  done:        2\n" in part  # "e", after the corrupt line


@pytest.mark.parametrize(
    ("records", "message"),
    [
        (
            [*LEDGER[:4], {"url": "https://example.com/"}],
            'record 5 is not a ledger\'s: {"url":"https://example.com/"}',
        ),
        ([*LEDGER[:4], {"$ledger": "start", "key": "a"}], "record 5 is not a ledger's"),
        ([*LEDGER[:4], {"$ledger": "mystery"}], "record 5 is not a ledger's"),
        ([{"$ledger": "open", "v": 2}], "is a ledger of version 2, written by another yoink"),
    ],
    ids=["a-plain-record", "a-field-missing", "an-unknown-kind", "another-version"],
)
def test_stats_of_a_journal_that_opens_a_ledger_and_breaks_its_rules_says_it_is_not_valid(
    tmp_path: Path, records: list[dict[str, object]], message: str
) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_text(jsonl(records))
    result = yoink("stats", str(path))
    assert (result.returncode, result.stderr) == (0, "")
    assert f"records:  {len(records)}\n" in result.stdout
    part = ledger_part(result.stdout)
    assert part.startswith("ledger:   not a valid ledger: ")
    assert message in part
    assert part.count("\n") == 1  # no figures: the ledger would not open


def test_stats_of_a_journal_that_is_not_a_ledger_says_nothing_of_ledgers(journal: Path) -> None:
    result = yoink("stats", str(journal))
    assert result.returncode == 0
    assert "ledger" not in result.stdout


def test_stats_of_a_ledger_with_a_record_holding_a_huge_int_says_it_is_not_valid(tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_text(jsonl(LEDGER[:2]) + '{"$ledger":"add","keys":99999999999999999999999}\n')
    result = yoink("stats", str(path))
    assert (result.returncode, result.stderr) == (0, "")
    assert "ledger:   not a valid ledger: " in result.stdout


def test_stats_reads_a_ledger_beside_its_live_writer_and_after_it_compacts(tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"

    async def beside_a_writer() -> tuple[subprocess.CompletedProcess[str], bytes, bytes]:
        async with Ledger.open(path, fingerprint="job-1", max_attempts=2) as ledger:
            await ledger.add(["a", "b", "c"])
            async with ledger.claim("a") as item:
                item.result = 1
            async with ledger.claim("b"):
                raise ValueError("bad input")
            async with ledger.claim("c"):  # the writer holds the journal's lock, and "c" runs
                before = path.read_bytes()
                running = await anyio.to_thread.run_sync(yoink, "stats", "--max-attempts", "2", str(path))
                after = path.read_bytes()
            await ledger.compact()
        return running, before, after

    running, before, after = anyio.run(beside_a_writer)
    assert (running.returncode, running.stderr) == (0, "")
    assert before == after  # stats wrote nothing, beside a writer that holds the lock
    assert ledger_part(running.stdout) == (
        "ledger:   yes\n"
        '  fingerprint: "job-1"\n'
        "  items:       3\n"
        "  done:        1\n"
        "  failed:      0 (given up after 2 failed attempts; set with --max-attempts)\n"
        "  pending:     2 (of which 2 tried before)\n"
        "  interrupted: 1 (started, not ended: in flight when a writer stopped, or running now)\n"
        '    "c"\n'
    )
    compacted = yoink("stats", str(path)).stdout
    assert re.search(r"compacted: \S+ to a snapshot", compacted), compacted
    assert "  done:        2\n  failed:      0 " in ledger_part(compacted)
    assert "  pending:     1 (of which 1 tried before)\n" in ledger_part(compacted)
