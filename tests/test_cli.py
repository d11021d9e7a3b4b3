"""``hybrid-sd generate``: files written, the JSON it prints, and errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import PIL.Image
import torch
from safetensors.torch import load_file

from hybrid_sd.cli import main
from hybrid_sd.pipeline import HybridPipeline
from hybrid_sd.request import GenerationRequest


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
    assert {"cloud_denoise", "edge_denoise", "decode", "total"} <= set(summary["timings_s"])
    assert PIL.Image.open(out).size == (64, 64)
    expected = HybridPipeline(pairs["shapes"])(  # the default pair
        GenerationRequest("a blue circle", "blurry", switch_step=2, num_inference_steps=5, seed=42, scheduler="dpm++2m")
    )
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


def test_console_script_runs_as_a_process(tmp_path, model_home):
    out = tmp_path / "p.png"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "hybrid_sd.cli",
            "generate",
            "--prompt",
            "x",
            "--steps",
            "2",
            "--out",
            str(out),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["num_inference_steps"] == 2
    assert out.exists()


def test_generate_writes_the_format_the_suffix_names_and_refuses_others_up_front(tmp_path, capsys):
    args = ["generate", "--prompt", "a small red circle", "--steps", "2", "--seed", "3", "--out"]
    assert main([*args, str(tmp_path / "image.jpg")]) == 0
    assert PIL.Image.open(tmp_path / "image.jpg").format == "JPEG"
    assert main([*args, str(tmp_path / "image.gif")]) == 2
    assert "--out must end in one of" in capsys.readouterr().err
    assert not (tmp_path / "image.gif").exists()
