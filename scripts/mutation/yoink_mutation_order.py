"""A pytest plugin for ``scripts/mutate``: run a mutant's tests quickest first.

mutmut runs the tests that call a mutated function, with ``-x``, in no particular order. Sorted
by the time each took in mutmut's clean run, a killed mutant costs about its quickest failing
test rather than whichever came first (a kill -9 loop, a fuzzer). With ``YOINK_MUTATION_QUICK``
set to a number of seconds, the tests slower than that are left out: ``scripts/mutate`` runs such
a quick pass first, then gives the mutants that survived it every test.

It acts only while mutmut runs a mutant (``MUTANT_UNDER_TEST`` names one): the clean run that
times the tests and learns which test calls what is left whole.
"""

from __future__ import annotations

import json
import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "__mutmut_" not in os.environ.get("MUTANT_UNDER_TEST", ""):
        return
    try:
        with open("mutmut-stats.json") as file:  # mutmut runs the tests in mutants/
            durations: dict[str, float] = json.load(file)["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return
    items.sort(key=lambda item: durations.get(item.nodeid, 0.0))
    quick = os.environ.get("YOINK_MUTATION_QUICK")
    if not quick:
        return
    keep = [item for item in items if durations.get(item.nodeid, 0.0) <= float(quick)] or items[:1]
    left_out = items[len(keep) :]  # sorted: the slow ones are last
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = keep
