"""``hybrid-sd generate``: files written, the JSON it prints, and errors for bad input; ``--help`` of every command
answers without loading a model library."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from hybrid_sd.cli import build_parser, main
from hybrid_sd.pipeline import HybridPipeline
from hybrid_sd.request import GenerationRequest
from hybrid_sd.results import STAGES


def test_generate_writes_image_latents_and_json(tmp_path, capsys, pairs):
    out, latents_out = tmp_path / "image.png", tmp_path / "latents.safetensors"
    code = main(
        [
            "generate",
            "--prompt",
            "a blue circle",
            "--negative-prompt",
            "blurry",
            "--switch-step",
            "2",
            "--steps",
            "5",
            "--seed",
            "42",
            "--scheduler",
            "dpm++2m",
            "--timestep-power",
            "1.5",
            "--out",
            str(out),
            "--latents-out",
            str(latents_out),
            "--json",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["seed"] == 42 and summary["switch_step"] == 2
    assert summary["unet_evaluations"] == {"cloud": 2, "edge": 3}
    assert summary["handoff_bytes"] > 0
    assert tuple(summary["timings_s"]) == STAGES
    assert PIL.Image.open(out).size == (64, 64)
    # the default pair
    asked = dict(switch_step=2, num_inference_steps=5, seed=42, scheduler="dpm++2m", timestep_power=1.5)
    expected = HybridPipeline(pairs["shapes"])(GenerationRequest("a blue circle", "blurry", **asked))
    assert torch.equal(load_file(latents_out)["latents"], expected.latents)


def test_explicit_models_and_bad_input(tmp_path, capsys, pair_specs):
    spec = pair_specs["sdxl"]
    out = tmp_path / "xl.png"
    args = [
        "generate",
        "--prompt",
        "a square",
        "--steps",
        "3",
        "--seed",
        "1",
        "--out",
        str(out),
        "--cloud-model",
        spec.cloud,
        "--edge-model",
        spec.edge,
    ]
    assert main(args) == 0 and out.exists()
    assert main([*args, "--width", "60"]) == 2
    assert "width must be a multiple of 8" in capsys.readouterr().err
    assert main([*args, "--switch-step", "9"]) == 2
    assert "switch_step must be in [0, 3], got 9" in capsys.readouterr().err
    assert main([*args, "--pair", "tiny-sd1"]) == 2
    assert "--pair cannot be combined" in capsys.readouterr().err


def test_console_script_runs_as_a_process(tmp_path, model_home, capsys):
    """The image and the JSON are what was asked for, the image is not blank, and the same seed in another
    process (this one) gives the same pixels."""
    asked = ["--prompt", "a large red circle above a small blue square", "--steps", "4", "--switch-step", "1"]
    asked += ["--seed", "5", "--width", "64", "--height", "48", "--json"]
    out = tmp_path / "p.png"
    done = subprocess.run(
        [sys.executable, "-m", "hybrid_sd.cli", "generate", *asked, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert {key: summary[key] for key in ("seed", "switch_step", "num_inference_steps", "width", "height")} == {
        "seed": 5,
        "switch_step": 1,
        "num_inference_steps": 4,
        "width": 64,
        "height": 48,
    }
    assert summary["unet_evaluations"] == {"cloud": 1, "edge": 3}
    pixels = image_pixels(out)
    assert pixels.shape == (48, 64, 3)
    assert pixels.std() > 10, "the image is blank"
    again = tmp_path / "again.png"
    assert main(["generate", *asked, "--out", str(again)]) == 0
    assert json.loads(capsys.readouterr().out)["seed"] == 5
    assert np.array_equal(image_pixels(again), pixels)


def image_pixels(path) -> np.ndarray:
    """The RGB pixels of an image file, 0-255."""
    return np.asarray(PIL.Image.open(path).convert("RGB"), dtype=np.float32)


def test_generate_writes_the_format_the_suffix_names_and_refuses_others_up_front(tmp_path, capsys):
    args = ["generate", "--prompt", "a small red circle", "--steps", "2", "--seed", "3", "--out"]
    assert main([*args, str(tmp_path / "image.jpg")]) == 0
    assert PIL.Image.open(tmp_path / "image.jpg").format == "JPEG"
    assert main([*args, str(tmp_path / "image.gif")]) == 2
    assert "--out must end in one of" in capsys.readouterr().err
    assert not (tmp_path / "image.gif").exists()


def command_paths(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """``path`` and every command below it in ``parser``'s tree of subcommands (serve, serve edge, ...)."""
    paths = [path]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                paths += command_paths(subparser, (*path, name))
    return paths


HEAVY_LIBRARIES = ("torch", "diffusers", "transformers", "ray")
HELP_PROBE = f"""
import json, sys
from hybrid_sd.cli import main
try:
    main(sys.argv[1:] + ["--help"])
except SystemExit as exit:
    assert exit.code == 0, exit.code
print(json.dumps([name for name in {HEAVY_LIBRARIES!r} if name in sys.modules]))
"""


@pytest.mark.parametrize("command", command_paths(build_parser()), ids=lambda command: " ".join(command) or "-")
def test_help_loads_no_model_library(command):
    """``hybrid-sd [COMMAND...] --help`` answers without torch, diffusers, transformers or Ray, for every command
    (those of the entry points too)."""
    done = subprocess.run([sys.executable, "-c", HELP_PROBE, *command], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    *help_text, loaded = done.stdout.splitlines()
    assert help_text[0].startswith(" ".join(["usage: hybrid-sd", *command]))
    assert json.loads(loaded) == []
