"""compact(key=...) folds a large journal in a worker process, with real processes throughout.

The worker gives the snapshot and the errors that folding on the event loop gives; a worker that
dies is an error that keeps the journal, and the manager appends on; a worker never outlives its
parent, killed or closed. Workers are found in /proc: children of the parent whose command line
names ``yoink._fold_worker``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import io
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from tests.helpers import random_seed
from yoink import CheckpointManager, Compaction, CorruptCheckpointError, StorageError, _fold
from yoink._records import MAX_LINE_BYTES, OnCorrupt
from yoink.storage import CheckpointStorage, LocalFileStorage, MemoryStorage

pytestmark = pytest.mark.usefixtures("async_backend")

WORKER = b"yoink._fold_worker"  # in every worker's command line
ALWAYS, NEVER = 0, 1 << 62  # WORKER_FROM_BYTES: fold every journal in a worker, or none


def workers_of(parent: int) -> list[int]:
    """The worker processes of ``parent`` that are running (not zombies)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _stat(int(entry))[1:] == ("running", parent):
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if WORKER in cmdline:
                found.append(int(entry))
    return found


def keepers_of(worker: int) -> list[int]:
    """The keeper processes of a worker that are running (their command line names the module's file)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _stat(int(entry))[1:] == ("running", worker):
            with contextlib.suppress(OSError):
                if b"_fold_keeper.py" in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
    return found


async def a_keeper_of(worker: int) -> int:
    """Wait for the keeper of ``worker`` to have said it is ready (it has written to its pipe)."""
    with anyio.fail_after(60):
        while True:
            for pid in keepers_of(worker):
                with contextlib.suppress(OSError, IndexError, ValueError):
                    io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
                    if int(io["wchar"]) > 0:
                        return pid
            await anyio.sleep(0.001)


def _stat(pid: int) -> tuple[int, str, int]:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return pid, "gone", 0
    return pid, "zombie" if fields[0] in "ZX" else "running", int(fields[1])


def running(pid: int) -> bool:
    return _stat(pid)[1] == "running"


def read_position(pid: int, path: Path) -> int:
    """How far process ``pid`` has read the file at ``path`` (0 if it has it open nowhere)."""
    target = os.path.realpath(path)
    try:
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    for fd in descriptors:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
                return int(info.split("pos:", 1)[1].split()[0])
        except (OSError, IndexError, ValueError):
            continue
    return 0


async def a_worker_of(parent: int, reading: Path | None = None) -> int:
    """Wait for a worker of ``parent``; with ``reading``, until it has read part of that file."""
    with anyio.fail_after(60):
        while True:
            for pid in workers_of(parent):
                if reading is None or read_position(pid, reading) > 0:
                    return pid
            await anyio.sleep(0.001)


def big_journal(records: int, keys: int = 1000) -> str:
    """A journal of about 100 bytes a record, as yoink writes it: over WORKER_FROM_BYTES for 200,000."""
    return b"".join(
        orjson.dumps({"k": f"key-{n % keys}", "n": n, "pad": "p" * 60}) + b"\n" for n in range(records)
    ).decode()


class Journal:
    """One journal on a backend, written as raw text (as another tool could), reopened at will."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        self.kind = kind
        self.path = tmp_path / "journal.jsonl"
        self._name = f"worker-{tmp_path.name}"
        self._stage = tmp_path / "stage"

    def storage(self) -> CheckpointStorage:
        if self.kind == "local":
            return LocalFileStorage(self.path)
        if self.kind == "memory":
            return MemoryStorage(self._name)
        from yoink.storage import FsspecStorage

        return FsspecStorage(f"fsspec+file://{self.path}", stage_dir=self._stage)

    async def write(self, text: str) -> None:
        """Make the journal ``text``, whatever it held."""
        if self.kind == "memory":
            async with self.storage() as storage:

                async def whole() -> AsyncIterator[str]:
                    yield text

                await storage.replace(whole())
        else:
            self.path.write_bytes(text.encode("utf-8", "surrogateescape"))

    async def text(self) -> str:
        async with self.storage() as storage:
            return "".join([item async for item in storage.read()])


@pytest.fixture(params=["local", "memory", "fsspec"])
def journal(request: pytest.FixtureRequest, tmp_path: Path) -> Journal:
    """A local journal (the worker reads the file), or a journal of another backend (it is piped)."""
    if request.param == "fsspec":
        pytest.importorskip("fsspec")
    return Journal(request.param, tmp_path)


class Outcome:
    """What compact(key=...) did to a journal: its result or error, the journal after, the warnings."""

    def __init__(
        self, result: Compaction | None, error: BaseException | None, text: str, warnings: list[str]
    ):
        self.result, self.error, self.text, self.warnings = result, error, text, warnings

    def snapshot(self) -> tuple[dict[str, Any] | None, str]:
        """The header without its time, and the records' text: what two compactions must share."""
        first, _, rest = self.text.partition("\n")
        if not first.startswith('["$yoink"'):
            return None, self.text
        header = json.loads(first)[1]["compaction"]
        del header["at"]
        return header, rest


async def compact_with(
    journal: Journal,
    text: str,
    worker_from: int,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    *,
    on_corrupt: OnCorrupt = "raise",
) -> Outcome:
    """Write ``text`` as the journal and compact it by "k", in a worker or not (``worker_from``)."""
    await journal.write(text)
    monkeypatch.setattr(_fold, "WORKER_FROM_BYTES", worker_from)
    caplog.clear()
    result = error = None
    with caplog.at_level(logging.DEBUG, logger="yoink"):
        async with CheckpointManager(journal.storage(), on_corrupt=on_corrupt) as checkpoint:
            try:
                result = await checkpoint.compact(key="k")
            except (CorruptCheckpointError, StorageError) as exc:
                error = exc
    folded_there = any("in worker process" in r.getMessage() for r in caplog.records)
    assert folded_there == (worker_from == ALWAYS), "the fold did not run where it was meant to"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    return Outcome(result, error, await journal.text(), warnings)


def random_journal(rng: random.Random, records: int, *, corrupt: bool) -> str:
    """Records of every JSON type of key, some without it, in the spacing of other tools; with
    ``corrupt``, bad lines among them; and, at random, a torn last line."""
    keys: list[Any] = [
        *range(30),
        *(float(n) for n in range(10)),
        True,
        False,
        None,
        *(str(n) for n in range(10)),
        "ünïcödé ☃",
        "\u2028",
        [1],
        [1.0],
        {"a": 1, "b": [2]},
        {"b": [2], "a": 1},  # the same object as the one before, as JSON tells them apart
        2**70,
        -(2**70),
    ]
    lines = []
    for n in range(records):
        record: dict[str, Any] = {"n": n, "pad": "é" * rng.randrange(0, 40) + "x" * rng.randrange(0, 300)}
        if rng.random() < 0.9:
            record["k"] = rng.choice(keys)
        if rng.random() < 0.5:
            record = dict(reversed(list(record.items())))
        style = rng.random()
        if style < 0.8:
            line = json.dumps(record, separators=(",", ":"), ensure_ascii=False)
        elif style < 0.9:
            line = json.dumps(record)  # another tool's spacing, ASCII escapes
        else:
            line = " " + json.dumps(record, indent=None, separators=(" , ", " : ")) + " \r"
        lines.append(line)
        if rng.random() < 0.01:
            lines.append(rng.choice(["", "   "]))  # blank lines are no records, and no corruption
        if corrupt and rng.random() < 0.005:
            lines.append(rng.choice(["not json", "[1,2]", '{"k":', '"a string"', "NaN", "{\udcff}"]))
    lines.append('{"k":[' + "[" * 900 + "]" * 900 + '],"deep":true}')  # parsed by the json module
    text = "\n".join(lines) + "\n"
    if rng.random() < 0.5:
        text += '{"k": 1, "n": "torn'  # a write torn by a crash: left out of the snapshot
    return text


@pytest.mark.parametrize("corrupt", [False, True], ids=["clean", "corrupt-skipped"])
async def test_a_worker_folds_a_random_journal_into_the_same_snapshot_as_the_event_loop(
    journal: Journal, corrupt: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(random_seed())
    text = random_journal(rng, rng.randrange(5_000, 20_000), corrupt=corrupt)
    on_corrupt: OnCorrupt = "skip" if corrupt else "raise"
    here = await compact_with(journal, text, NEVER, monkeypatch, caplog, on_corrupt=on_corrupt)
    there = await compact_with(journal, text, ALWAYS, monkeypatch, caplog, on_corrupt=on_corrupt)
    assert here.error is None, here.error
    assert there.error is None, there.error
    assert here.result is not None
    assert there.result is not None
    assert here.snapshot() == there.snapshot(), "the worker's snapshot differs from the event loop's"
    assert 0 < (here.result.records or 0) < (here.result.records_before or 0), "the test compacted nothing"
    assert dataclasses.replace(there.result, at=here.result.at) == here.result, "the worker's counts differ"
    assert there.warnings == here.warnings, "the worker's log records differ from the event loop's"


async def test_a_corrupt_line_raises_the_same_error_from_a_worker_and_the_journal_is_kept(
    journal: Journal, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    good = big_journal(3000)
    text = good + "not json\n" + good
    here = await compact_with(journal, text, NEVER, monkeypatch, caplog)
    there = await compact_with(journal, text, ALWAYS, monkeypatch, caplog)
    assert isinstance(here.error, CorruptCheckpointError)
    assert isinstance(there.error, CorruptCheckpointError), there.error
    assert (there.error.line, there.error.offset) == (here.error.line, here.error.offset) == (3001, len(good))
    assert str(there.error) == str(here.error)
    assert there.text == text, "the journal changed although its compaction failed"
    async with CheckpointManager(journal.storage()) as checkpoint:
        await checkpoint.append({"k": "after"})
    assert (await journal.text()).endswith("not json\n" + good + '{"k":"after"}\n')


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["local", "fsspec"])
async def test_a_line_too_long_to_read_raises_the_same_error_from_a_worker(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The local worker meets the line in the file; the fsspec storage meets it in this process,
    # and tells the worker where it is.
    if kind == "fsspec":
        pytest.importorskip("fsspec")
    journal = Journal(kind, tmp_path)
    good = big_journal(2000)
    text = good + '{"long":"' + "x" * MAX_LINE_BYTES + '"}\n' + good
    here = await compact_with(journal, text, NEVER, monkeypatch, caplog)
    there = await compact_with(journal, text, ALWAYS, monkeypatch, caplog)
    assert isinstance(here.error, CorruptCheckpointError)
    assert isinstance(there.error, CorruptCheckpointError), there.error
    assert (there.error.line, there.error.offset) == (here.error.line, here.error.offset) == (2001, len(good))
    assert str(there.error) == str(here.error)
    assert journal.path.stat().st_size == len(text), "the journal changed although its compaction failed"


@pytest.mark.parametrize("victim", ["worker", "keeper"])
@pytest.mark.parametrize("kind", ["local", "memory"])
async def test_a_worker_or_keeper_killed_mid_fold_is_a_clear_error_the_journal_is_kept_and_appending_goes_on(
    kind: str, victim: str, tmp_path: Path
) -> None:
    """A worker hands the keeping of the last line per key to a keeper process of its own: either
    killed, the compaction fails with the error that says so, and leaves no process behind."""
    journal = Journal(kind, tmp_path)
    text = big_journal(250_000)  # over WORKER_FROM_BYTES: folded in a worker as it stands
    assert len(text) > _fold.WORKER_FROM_BYTES
    await journal.write(text)
    failure: list[BaseException] = []
    async with CheckpointManager(journal.storage()) as checkpoint:
        async with anyio.create_task_group() as tasks:

            async def compact() -> None:
                try:
                    await checkpoint.compact(key="k")
                except StorageError as exc:
                    failure.append(exc)

            tasks.start_soon(compact)
            # The local worker has read part of the journal; the piped one is being sent it.
            worker = await a_worker_of(os.getpid(), journal.path if kind == "local" else None)
            killed = worker if victim == "worker" else await a_keeper_of(worker)
            os.kill(killed, signal.SIGKILL)
        assert failure, f"the compaction succeeded although its {victim} was killed"
        message = str(failure[0])
        assert f"{victim} process (pid {killed}) was killed by SIGKILL before" in message, message
        assert message.endswith("the journal is unchanged"), message
        assert await journal.text() == text
        await checkpoint.append({"k": "after", "n": -1})
        await checkpoint.flush()
        assert await journal.text() == text + '{"k":"after","n":-1}\n', "appending did not go on"
        result = await checkpoint.compact(key="k")  # and the next compaction, with a worker of its own
    assert (result.records_before, result.records) == (250_001, 1001)
    assert not workers_of(os.getpid()), "a worker outlived its compaction"


async def test_a_worker_killed_mid_fold_leaves_no_keeper_behind(tmp_path: Path) -> None:
    journal = Journal("memory", tmp_path)
    await journal.write(big_journal(250_000))
    async with CheckpointManager(journal.storage()) as checkpoint, anyio.create_task_group() as tasks:

        async def compact() -> None:
            with pytest.raises(StorageError, match="worker process .* was killed by SIGKILL"):
                await checkpoint.compact(key="k")

        tasks.start_soon(compact)
        worker = await a_worker_of(os.getpid())
        keeper = await a_keeper_of(worker)
        os.kill(worker, signal.SIGKILL)
    with anyio.fail_after(10):
        while running(keeper):
            await anyio.sleep(0.01)


@pytest.mark.parametrize("async_backend", ["asyncio"], indirect=True)  # no event loop of its own to vary
def test_a_keeper_that_cannot_be_started_is_a_warning_and_the_worker_keeps_the_lines_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where no keeper can be started, a worker folds as it did before keepers: the same frames."""
    from yoink import _fold_worker

    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python-here"))
    with caplog.at_level(logging.WARNING, logger="yoink._fold_worker"):
        assert _fold_worker._Keeper.start() is None
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["cannot start a keeper process"]
    monkeypatch.undo()

    path = tmp_path / "journal.jsonl"
    path.write_text(random_journal(random.Random(random_seed()), 5000, corrupt=False))
    config = {"key": "k", "on_corrupt": "raise", "source": "journal", "parent": os.getpid()}
    frames = b"".join(
        [
            _fold.frame(_fold.CONFIG, json.dumps(config).encode()),
            _fold.frame(_fold.ITEM, path.read_bytes()),
            _fold.frame(_fold.END),
        ]
    )
    run = "import sys; sys.path.insert(0, sys.argv[1]); from yoink import _fold_worker as w; {}; w.main()"
    outputs = []
    for patch in ["pass", "w._Keeper.start = staticmethod(lambda: None)"]:
        out = subprocess.run(
            [sys.executable, "-c", run.format(patch), str(Path(_fold.__file__).parent.parent)],
            input=frames,
            capture_output=True,
            check=True,
        ).stdout
        outputs.append(out)
    assert outputs[0] == outputs[1], "a worker without a keeper sent other frames than with one"
    stream, kinds = io.BytesIO(outputs[0]), []
    while (received := _fold.read_frame(stream.read)) is not None:
        kinds.append(received[0])
    assert _fold.COUNTS in kinds, kinds
    assert _fold.TEXT in kinds, kinds
    assert kinds[-1] == _fold.END, kinds


async def test_close_waits_for_a_worker_whose_caller_stopped_waiting_and_leaves_no_process(
    tmp_path: Path,
) -> None:
    journal = Journal("local", tmp_path)
    await journal.write(big_journal(250_000))
    checkpoint = CheckpointManager(journal.storage())
    with anyio.CancelScope() as scope:

        async def cancel_once_a_worker_reads() -> None:
            await a_worker_of(os.getpid(), journal.path)
            scope.cancel()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(cancel_once_a_worker_reads)
            await checkpoint.compact(key="k")
            pytest.fail("compact() returned before its worker had read the journal: the test proved nothing")
    assert workers_of(os.getpid()), "the compaction stopped with its caller"
    await checkpoint.close()  # waits for the compaction, and so for its worker
    assert not workers_of(os.getpid()), "a worker outlived close()"
    assert (await journal.text()).count("\n") == 1001, "close() did not wait for the compaction to swap"


async def test_without_a_worker_to_start_a_large_journal_is_folded_on_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    journal = Journal("local", tmp_path)
    await journal.write(big_journal(1000))
    monkeypatch.setattr(_fold, "WORKER_FROM_BYTES", ALWAYS)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python-here"))
    with caplog.at_level(logging.WARNING, logger="yoink._fold"):
        async with CheckpointManager(journal.storage()) as checkpoint:
            result = await checkpoint.compact(key="k")
    assert result.records == 1000
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        f"cannot start a worker process to fold {journal.storage()!r}"
    ]


PARENT = """
import sys
import anyio
from yoink import CheckpointManager
from yoink.storage import LocalFileStorage, MemoryStorage

async def main(kind, path):
    if kind == "local":
        storage = LocalFileStorage(path)
    else:
        storage = MemoryStorage("journal")
        with open(path) as file:
            await storage.write(file.read())
    async with CheckpointManager(storage) as checkpoint:
        await checkpoint.compact(key="k")
    print("compacted", flush=True)

anyio.run(main, *sys.argv[1:])
"""


@pytest.mark.parametrize("async_backend", ["asyncio"], indirect=True)  # no event loop of its own to vary
@pytest.mark.parametrize("keeper", ["running", "stopped"])
@pytest.mark.parametrize("kind", ["local", "memory"])
def test_a_parent_killed_mid_fold_leaves_no_worker_behind(kind: str, keeper: str, tmp_path: Path) -> None:
    """Nor a keeper: one stopped with SIGSTOP would never see its pipe end, and the worker kills it."""
    path = tmp_path / "journal.jsonl"
    text = big_journal(400_000)
    path.write_text(text)
    parent = subprocess.Popen([sys.executable, "-c", PARENT, kind, str(path)], stdout=subprocess.PIPE)
    try:
        worker = anyio.run(a_worker_of, parent.pid, path if kind == "local" else None)
        keepers = [anyio.run(a_keeper_of, worker)]
        if keeper == "stopped":
            os.kill(keepers[0], signal.SIGSTOP)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while (running(worker) or any(map(running, keepers))) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not running(worker), f"worker {worker} outlived its parent, killed with SIGKILL"
        assert not [pid for pid in keepers if running(pid)], f"keeper {keepers} outlived its worker"
    finally:
        parent.kill()
        parent.wait()
        assert parent.stdout is not None
        parent.stdout.close()
        for pid in keepers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert path.read_text() == text, "the journal changed under a compaction killed mid-fold"


@pytest.mark.parametrize("async_backend", ["asyncio"], indirect=True)  # no event loop of its own to vary
def test_a_worker_and_its_keeper_import_nothing_from_the_jobs_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``python -c`` puts the working directory first on the path, before the standard library: a
    job's own struct.py, select.py or orjson.py there made every fold in a worker fail."""
    for name in ("struct", "select", "orjson", "runpy"):
        (tmp_path / f"{name}.py").write_text(
            f"raise SystemExit('{name}.py of the working directory imported')\n"
        )
    monkeypatch.chdir(tmp_path)
    journal = Journal("local", tmp_path / "journals")
    (tmp_path / "journals").mkdir()
    text = big_journal(3000)
    outcome = anyio.run(compact_with, journal, text, ALWAYS, monkeypatch, caplog)
    assert outcome.error is None, outcome.error
    assert outcome.warnings == [], outcome.warnings  # no keeper that could not start either
    assert outcome.result is not None
    assert (outcome.result.records_before, outcome.result.records) == (3000, 1000)


JOB_OF_ITS_OWN = """
import sys
sys.path.insert(0, sys.argv[1])  # the job's libraries, where it put them: none of the interpreter's
import anyio
from yoink import CheckpointManager, _fold
from yoink.storage import LocalFileStorage

async def main(path):
    _fold.WORKER_FROM_BYTES = 0
    async with CheckpointManager(LocalFileStorage(path)) as checkpoint:
        result = await checkpoint.compact(key="k")
    print(result.records_before, result.records)

anyio.run(main, sys.argv[2])
"""


@pytest.mark.parametrize("async_backend", ["asyncio"], indirect=True)  # no event loop of its own to vary
def test_a_job_whose_libraries_are_on_its_own_path_folds_in_a_worker_and_keeper(tmp_path: Path) -> None:
    """yoink and orjson where the job put them (``pip install --target``), an interpreter without
    them: the worker finds them beside yoink, and the keeper where the worker found orjson (it
    failed to import it, and every compaction failed)."""
    import anyio as anyio_module

    vendor = tmp_path / "vendor"
    vendor.mkdir()
    for module in ("yoink", "orjson", "anyio", "sniffio", "idna", "typing_extensions", "exceptiongroup"):
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            continue
        origin = Path(spec.origin)
        source = origin.parent if origin.name == "__init__.py" else origin
        (vendor / source.name).symlink_to(source)
    assert anyio_module.__file__ is not None
    bare = tmp_path / "bare"
    subprocess.run(
        [getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(bare)],
        check=True,
    )
    python = bare / "bin" / "python"
    check = subprocess.run([python, "-c", "import orjson"], capture_output=True)
    assert check.returncode != 0, "the bare interpreter has orjson: the test proves nothing"
    path = tmp_path / "journal.jsonl"
    path.write_text(big_journal(3000))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    job = subprocess.run(
        [python, "-c", JOB_OF_ITS_OWN, str(vendor), str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert job.returncode == 0, job.stderr
    assert job.stdout.split() == ["3000", "1000"], job.stdout
    assert "keeper" not in job.stderr, job.stderr  # it started, and kept


@pytest.mark.parametrize(
    "item",
    [
        "".join(f'{{"n": {i}, "pad": "{"p" * (i % 97)}"}}\n' for i in range(5000)),  # many pieces
        '{"n": 1}\n' + '{"long": "' + "x" * 200_000 + '"}\n' + '{"n": 2}\n',  # a line longer than a piece
        '{"n": 1}\n' * 20_000 + '{"torn": ',  # a torn tail kept: no newline at the end
        '{"n": 1}\n',
        "",
    ],
)
def test_a_fold_decodes_an_item_in_pieces_of_whole_lines(item: str) -> None:
    """A fold decodes at most a piece's records at a time (a file is read a mebibyte an item):
    pieces of whole lines, about PIECE characters, that make up the item again."""
    pieces = list(_fold._pieces(item))
    PIECE = _fold.PIECE
    assert "".join(pieces) == item
    assert all(piece.endswith("\n") for piece in pieces[:-1])
    assert all(len(piece) <= PIECE + max(map(len, piece.splitlines(True))) for piece in pieces)
    if len(item) > 2 * PIECE and max(map(len, item.splitlines())) < PIECE:
        assert len(pieces) >= len(item) // (2 * PIECE)  # not one piece for the whole item


@pytest.mark.parametrize("worker_from", [ALWAYS, NEVER], ids=["worker", "here"])
async def test_a_kept_record_is_written_as_it_was_read_where_its_line_is_known(
    journal: Journal, worker_from: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The fold keeps a kept record's line (a third of the dict's memory), so the snapshot holds it
    as it was, spacing and all. Where the decoder read a piece line by line (a blank line in it, an
    integer beyond 64 bits), it cannot tell lines from records and they are written as yoink would."""
    lines = ['{"k": "a", "n": 1}', '{"k":"b","n":2}', '{"k": "a",  "n": 3}', '{"k": "c"}']
    outcome = await compact_with(journal, "\n".join(lines) + "\n", worker_from, monkeypatch, caplog)
    assert outcome.snapshot()[1] == "\n".join(lines[1:]) + "\n"

    canonical = '{"k":"b","n":2}\n{"k":"a","n":3}\n{"k":"c"}\n'
    with_a_blank = "\n".join([lines[0], "", *lines[1:]]) + "\n"
    outcome = await compact_with(journal, with_a_blank, worker_from, monkeypatch, caplog)
    assert outcome.snapshot()[1] == canonical
    with_a_long_integer = "\n".join([*lines[:3], '{"k": "c", "n": 18446744073709551616}']) + "\n"
    outcome = await compact_with(journal, with_a_long_integer, worker_from, monkeypatch, caplog)
    assert outcome.snapshot()[1] == canonical.replace('{"k":"c"}', '{"k":"c","n":18446744073709551616}')


@pytest.mark.parametrize("kind", ["local", "memory"])
async def test_records_flushed_while_a_worker_folds_a_corrupt_journal_stay_in_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Appends are written and flushed while the worker folds (the storage carries them); the fold
    then meets a corrupt line: the old journal stays, with them."""
    monkeypatch.setattr(_fold, "WORKER_FROM_BYTES", ALWAYS)
    name = f"corrupt-{random.random()}"
    storage = {
        "local": lambda: LocalFileStorage(tmp_path / "corrupt.jsonl"),
        "memory": lambda: MemoryStorage(name),
    }[kind]
    old = "".join(f'{{"k":{n % 10},"n":{n}}}\n' for n in range(50_000)) + 'not json\n{"k":1,"n":-1}\n'
    async with storage() as writer:
        await writer.write(old)
    raised: list[CorruptCheckpointError] = []
    compacting = True
    async with CheckpointManager(storage(), flush_interval=None) as checkpoint:

        async def compact() -> None:
            nonlocal compacting
            try:
                await checkpoint.compact(key="k")
            except CorruptCheckpointError as exc:
                raised.append(exc)
            compacting = False

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(compact)
            await anyio.sleep(0.05)
            await checkpoint.append({"k": "during", "n": 1})
            await checkpoint.flush()
            flushed_during = compacting
    assert raised, "the corrupt line was not found"
    assert flushed_during, "the flush returned after the compaction: the test proved nothing"
    assert "".join([item async for item in storage().read()]) == old + '{"k":"during","n":1}\n'


@pytest.mark.parametrize("kind", ["local", "memory"])
async def test_a_record_flushed_during_a_workers_fold_of_a_small_journal_is_not_folded_in_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """The fold is bounded only once its read has begun: a journal of one item, sent to a worker,
    is read before appends go on, so a record appended after the call is carried, not folded in."""
    monkeypatch.setattr(_fold, "WORKER_FROM_BYTES", ALWAYS)
    storage = {"local": lambda: LocalFileStorage(tmp_path / "small.jsonl"), "memory": MemoryStorage}[kind]()
    async with CheckpointManager(storage, flush_interval=None) as checkpoint:
        await checkpoint.append({"k": "a", "n": 1})
        await checkpoint.flush()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(functools.partial(checkpoint.compact, key="k"))
            with anyio.fail_after(30):
                while not checkpoint._carried:  # appends are written again: the fold is bounded
                    await anyio.sleep(0.001)
            await checkpoint.append({"k": "b", "n": 2})
            await checkpoint.flush()
        assert [record async for record in checkpoint.replay()] == [{"k": "a", "n": 1}, {"k": "b", "n": 2}]
