"""A pytest plugin for ``scripts/mutate``: run a mutant's own tests first, then the others, quickest first.

mutmut runs the tests that call a mutated function, with ``-x``, in no particular order. The
tests of the mutated module come first (``OWN_TESTS``), each group sorted by the time its tests
took in mutmut's clean run: a killed mutant costs about its quickest failing test rather than
whichever came first (a kill -9 loop, a fuzzer), or the whole suite's quick tests. With
``YOINK_MUTATION_QUICK`` set to a number of seconds, the tests slower than that are left out, and
the mutant is given three times the time of the tests it runs (mutmut's own time-out counts them
all): ``scripts/mutate`` runs such a quick pass first, then gives the mutants that survived it
every test. In either pass, a test that takes ten times its clean run's time (plus 15 s) has
hung: the mutant is ended, as caught by a time-out.

It acts only while mutmut runs a mutant (``MUTANT_UNDER_TEST`` names one): the clean run that
times the tests and learns which test calls what is left whole.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import time
from collections.abc import Iterator

import pytest

# The test modules of each core module: a mutant's tests there run first, as they most likely kill it.
OWN_TESTS = {
    "_manager": ("test_manager", "test_cancellation"),
    "_records": ("test_records", "test_odd_journals"),
    "_json": ("test_records", "test_odd_journals"),
    "_lines": ("test_records", "test_odd_journals"),
    "_local": ("test_local", "test_local_faults", "test_local_compaction"),
    "_files": ("test_local", "test_local_faults", "test_local_compaction"),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    if "__mutmut_" not in mutant:
        return
    try:
        with open("mutmut-stats.json") as file:  # mutmut runs the tests in mutants/
            durations: dict[str, float] = json.load(file)["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return
    module = mutant.split(".x", 1)[0].rsplit(".", 1)[-1]  # yoink.storage._local.xǁ...: _local
    own = OWN_TESTS.get(module, ())

    def order(item: pytest.Item) -> tuple[bool, float]:
        test_module = item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")
        return test_module not in own, durations.get(item.nodeid, 0.0)

    items.sort(key=order)
    _durations.update(durations)
    quick = os.environ.get("YOINK_MUTATION_QUICK")
    if not quick:
        return
    keep = [item for item in items if durations.get(item.nodeid, 0.0) <= float(quick)] or items[:1]
    kept = set(map(id, keep))
    left_out = [item for item in items if id(item) not in kept]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = keep
    _give_up_after(3 * sum(durations.get(item.nodeid, 0.0) for item in keep) + 10)


def _give_up_after(seconds: float) -> None:
    """End a mutant's quick tests after ``seconds`` of CPU, as mutmut's time-out does.

    mutmut sets its time-out from every test of the mutated function, kill -9 loops included, so a
    mutant that makes a quick test spin would hold its worker for tens of minutes. The quick pass
    gives it three times its quick tests' time instead, and ends it with SIGXCPU, which mutmut
    counts as a time-out (caught), as it does its own. A test that hangs without spinning is
    ended by :func:`pytest_runtest_protocol`.
    """
    limit = int(time.process_time() + seconds) + 1
    soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if soft == resource.RLIM_INFINITY or limit < soft:
        resource.setrlimit(resource.RLIMIT_CPU, (limit, hard))


_durations: dict[str, float] = {}  # each test's time in mutmut's clean run, once a mutant is under test
HANG_FACTOR, HANG_SECONDS = 10, 15  # a test over 10 times its clean time, plus 15 s, hangs


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """End a mutant whose test hangs (a flush that waits for ever, asleep, using no CPU) after ten
    times the test's own time, not after the time of every test of the mutant (minutes)."""
    if not _durations:
        yield
        return
    signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGXCPU))
    signal.alarm(int(HANG_FACTOR * _durations.get(item.nodeid, 1.0) + HANG_SECONDS))
    try:
        yield
    finally:
        signal.alarm(0)
