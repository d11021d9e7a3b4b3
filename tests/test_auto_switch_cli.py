"""``--switch-step auto``, ``--latency-target`` and ``--profile`` on the command line: what is refused, and how."""

from __future__ import annotations

import pytest

from hybrid_sd.cli import main
from tests.serving import free_port


def refusal(capsys, *args: str) -> str:
    """The one error line ``hybrid-sd ARGS`` exits with (code 2)."""
    assert main(list(args)) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def generate(tmp_path, *args: str) -> list[str]:
    return ["generate", "--prompt", "a red circle", "--steps", "4", "--out", str(tmp_path / "x.png"), *args]


def test_auto_needs_a_server(capsys, tmp_path):
    line = refusal(capsys, *generate(tmp_path, "--switch-step", "auto"))
    assert line.startswith("hybrid-sd: error: --switch-step auto needs --target: a gateway or edge worker chooses")


def test_a_latency_target_needs_auto(capsys, tmp_path):
    for switch in ([], ["--switch-step", "2"]):
        line = refusal(capsys, *generate(tmp_path, "--latency-target", "1", *switch))
        assert line == "hybrid-sd: error: --latency-target needs --switch-step auto"


def test_a_latency_target_must_be_positive(capsys, tmp_path):
    args = generate(tmp_path, "--switch-step", "auto", "--latency-target", "0", "--target", "127.0.0.1:1")
    assert refusal(capsys, *args) == "hybrid-sd: error: latency_target_s must be positive, got 0"


def test_a_switch_step_that_is_neither_a_number_nor_auto(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit:
        main(generate(tmp_path, "--switch-step", "soon"))
    assert exit.value.code == 2
    assert "--switch-step: must be an integer or 'auto', got 'soon'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    [["serve", "edge", "--check"], ["serve", "gateway", "--edge", "127.0.0.1:1", "--check"], ["cluster", "up"]],
)
def test_a_bad_profile_stops_a_server_at_startup(capsys, tmp_path, command):
    profile = tmp_path / "summary.json"
    profile.write_text('{"num_inference_steps": 4}')
    port = ["--port", str(free_port()), "--http-port", "0"]
    line = refusal(capsys, *command, *port, "--profile", str(profile))
    assert line.startswith(f"hybrid-sd: error: switch profile {profile}: not a sweep summary or pair evaluation")
