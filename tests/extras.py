"""A test that needs an optional package is skipped without it, and fails under ``CI=true``.

yoink's extras (s3, redis, fsspec) and moto are optional: the suite runs with any of them installed,
and what cannot run is skipped with the reason. Under ``CI=true`` every extra is installed, so a
missing one fails the run instead. tests/conftest.py loads this plugin, which applies the rule where a
missing package shows:

- a test module whose import fails for want of an optional package is skipped whole;
- a test, or a fixture of it, that raises :class:`~yoink.MissingDependencyError` or a
  ``ModuleNotFoundError`` of an optional package is skipped;
- a test marked ``@pytest.mark.needs("aiohttp")`` is skipped without that package: for a test whose
  subprocess imports it, where the first two cannot see it.

Otherwise a test needs no guard: it imports the package, or asks for the backend, as usual.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Generator, Iterable
from pathlib import Path
from typing import NoReturn

import pytest

from yoink import MissingDependencyError

CI = os.environ.get("CI") == "true"
EXTRAS = {  # the optional packages a test may import, and what installs them
    "aioboto3": "the s3 extra",
    "aiobotocore": "the s3 extra",
    "boto3": "the s3 extra",
    "botocore": "the s3 extra",
    "redis": "the redis extra",
    "fsspec": "the fsspec extra",
    "moto": "the test extra",
    "aiohttp": "the examples extra",
}


def missing(reason: str) -> NoReturn:
    """Skip the test for want of what ``reason`` names; under CI=true, fail it."""
    if CI:
        pytest.fail(f"{reason} (under CI=true, every extra and server must be there)")
    pytest.skip(reason)


def lacking(error: BaseException | None) -> str | None:
    """What is missing, when ``error`` was raised because an optional package is not installed.

    None for any other error, and for one that names a package which is installed: that is a bug to
    see, not a missing extra.
    """
    cause = error.__cause__ if isinstance(error, MissingDependencyError) else error
    if not isinstance(cause, ModuleNotFoundError) or not cause.name:
        return None
    package = cause.name.partition(".")[0]
    if package not in EXTRAS or importlib.util.find_spec(package) is not None:
        return None
    return str(error) if error is not cause else f"{package} is not installed ({EXTRAS[package]})"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs(*packages): skipped without these packages (tests/extras.py)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers("needs"):
        for package in marker.args:
            if importlib.util.find_spec(package) is None:
                missing(f"{package} is not installed ({EXTRAS.get(package, 'scripts/install installs it')})")


class _Module(pytest.Module):
    """A test module that is skipped, not an error, when an optional package it imports is missing."""

    def collect(self) -> Iterable[pytest.Item | pytest.Collector]:
        try:
            return super().collect()
        except pytest.Collector.CollectError as error:
            reason = lacking(error.__cause__)  # the ImportError that the import raised
            if reason is None or CI:
                raise
            pytest.skip(f"{self.path.name}: {reason}", allow_module_level=True)


def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.Module:
    return _Module.from_parent(parent, path=module_path)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if CI or not report.failed or call.excinfo is None or report.when not in ("setup", "call"):
        return report
    reason = lacking(call.excinfo.value)
    if reason is not None:
        path, line, _ = item.reportinfo()
        report.outcome = "skipped"
        report.longrepr = (str(path), (line or 0) + 1, reason)
    return report
