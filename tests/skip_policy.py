"""The suite's skip policy: on a machine set up by ``scripts/setup.sh`` every test runs, except those
marked ``may_skip`` (they need hardware or hours). Any other skip fails the run and names the test and
its reason, so a missing set-up step cannot pass as a green run.

A pytest plugin, loaded by ``conftest.py``; ``tests/test_skip_policy.py`` runs it on a throwaway suite.
"""

from __future__ import annotations

import pytest

MARKER = "may_skip"


class SkipPolicy:
    """Collects the skips of one session that are not marked ``may_skip``; they fail the session."""

    def __init__(self) -> None:
        self.unexpected: list[tuple[str, str]] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped and MARKER not in report.keywords:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.unexpected.append((report.nodeid, reason))

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.unexpected and exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.unexpected:
            return
        terminalreporter.section("skips the skip policy does not allow (tests/skip_policy.py)", red=True)
        for nodeid, reason in self.unexpected:
            terminalreporter.line(f"{nodeid}: {reason}")
        terminalreporter.line(
            f"only a test that needs hardware or hours may skip (mark it `{MARKER}`);"
            " the rest need `bash scripts/setup.sh`"
        )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}: the test may skip (it needs hardware or hours); no other may")
    config.pluginmanager.register(SkipPolicy(), "hybrid_sd_skip_policy")
