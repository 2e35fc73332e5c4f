"""In CI (the environment variable CI is set, as `.ci/run` runs), a skipped test fails the run.

The parity tests skip themselves through `pytest.importorskip` when torch, diffusers or
transformers are missing, which a plain `pip install -e .` allows. In CI that would hide that they
never ran, so every skip (of a test or of a whole module at collection) is listed at the end and
the run exits with the "tests failed" status.
"""

from __future__ import annotations

import os

import pytest

INSTALL_HINT = 'install the test extras: pip install torch==2.13.0 && pip install -e ".[dev]"'

_skips: list[tuple[str, str]] = []  # (test or module id, reason)
FIRST_MODULES = ("tests/test_fit_multihost.py",)


def _in_ci() -> bool:
  return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _record(report) -> None:
  if report.skipped and not hasattr(report, "wasxfail"):
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    _skips.append((report.nodeid, reason.removeprefix("Skipped: ")))


def pytest_configure(config):
  config.addinivalue_line(
    "markers",
    "real_files(env): needs files a user downloads (named by the environment variable env); "
    "deselected, not skipped, when it is unset",
  )


def pytest_collection_modifyitems(config, items):
  """Tests of real downloaded model files run only where the files are: deselect the rest."""
  keep, drop = [], []
  for item in items:
    marker = item.get_closest_marker("real_files")
    (drop if marker and not os.environ.get(marker.args[0]) else keep).append(item)
  if drop:
    config.hook.pytest_deselected(items=drop)
  # The longest module (one test of ~2-5 minutes) first, so that under pytest-xdist it does not
  # start last and run alone at the end. Modules stay contiguous (their fixtures are shared).
  keep.sort(key=lambda item: item.nodeid.split("::")[0] not in FIRST_MODULES)
  items[:] = keep


def pytest_runtest_logreport(report):
  _record(report)


def pytest_collectreport(report):
  _record(report)


def pytest_terminal_summary(terminalreporter):
  if _in_ci() and _skips:
    terminalreporter.section("skipped tests fail in CI", sep="=", red=True, bold=True)
    for nodeid, reason in _skips:
      terminalreporter.line(f"SKIPPED (a failure in CI) {nodeid}: {reason}", red=True)
    terminalreporter.line(f"{len(_skips)} skipped: {INSTALL_HINT}", red=True, bold=True)


def pytest_sessionfinish(session, exitstatus):
  if _in_ci() and _skips and exitstatus == pytest.ExitCode.OK:
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
