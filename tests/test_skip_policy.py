"""The skip policy (tests/skip_policy.py) on a throwaway suite: an unmarked skip fails the run."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

SUITE = """
import pytest

def test_runs():
    assert True

@pytest.mark.may_skip
@pytest.mark.skipif(True, reason="needs a GPU")
def test_needs_hardware():
    pass

{extra}
"""


def run_suite(pytester: pytest.Pytester, extra: str = "") -> pytest.RunResult:
    pytester.makepyfile(SUITE.format(extra=extra))
    return pytester.runpytest("-p", "skip_policy")


def test_marked_skips_pass(pytester):
    result = run_suite(pytester)
    result.assert_outcomes(passed=1, skipped=1)
    assert result.ret == pytest.ExitCode.OK


def test_an_unmarked_skip_fails_the_run_and_is_named(pytester):
    result = run_suite(pytester, 'def test_missing_tool():\n    pytest.skip("docker-compose is not on PATH")\n')
    result.assert_outcomes(passed=1, skipped=2)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*test_missing_tool: *docker-compose is not on PATH*"])
    assert "test_needs_hardware" not in result.stdout.str().split("skip policy")[-1]
