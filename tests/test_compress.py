"""``hybrid-sd compress``: each action writes an edge bundle that the engine and the edge worker load; a
quantized bundle's half of the split is deterministic and equals diffusers' loop with the same quantized
UNet swapped in at k; W8A8 on the oneDNN kernels matches float within its bound and round-trips exactly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from compression.card import unet_cost
from compression.prune.calibration import Calibration
from compression.quantize import calibrate
from hybrid_sd.bundle import bundle_spec, read_bundle
from hybrid_sd.cli import main
from hybrid_sd.lowbit import QuantConfig, dequantize_model, quantize_model
from hybrid_sd.lowbit.onednn import OneDnnConv2d, OneDnnLinear
from hybrid_sd.lowbit.storage import save_quantized_unet
from hybrid_sd.pairs import load_pair, load_unet, preset
from hybrid_sd.pipeline import HybridPipeline
from hybrid_sd.presets import EMBEDDED_PRESETS
from hybrid_sd.request import GenerationRequest
from hybrid_sd.shapes_pair.evaluate import evaluate
from hybrid_sd.shapes_pair.model_card import write_model_card
from hybrid_sd.wire import state_from_payload, state_payload
from tests.conftest import load_reference
from tests.reference import reference_run

SAMPLING = ["--prompts", "shapes:2", "--sampling-steps", "4"]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, pairs) -> dict:
    """One bundle per action, each built on the one before, as a user chains them."""
    root = tmp_path_factory.mktemp("bundles")
    paths = {name: root / name for name in ("w8a8", "pruned", "distilled", "onednn", "tiny", "export")}
    commands = {
        "w8a8": ["quantize", "--out", paths["w8a8"]],
        "pruned": ["prune", "--budget", "0.7", "--calibration-rows", "4", *SAMPLING, "--out", paths["pruned"]],
        "distilled": [
            "distill",
            "--edge-bundle",
            paths["pruned"],
            "--teacher",
            "edge",
            "--train-steps",
            "6",
            "--batch-size",
            "4",
            "--from-step",
            "1",  # the steps after a switch at 1 of 4
            *SAMPLING,
            "--out",
            paths["distilled"],
        ],
        "onednn": [
            "quantize",
            "--edge-bundle",
            paths["distilled"],
            "--kernel",
            "onednn",
            "--max-error",
            "0.5",
            "--min-speedup",
            "0",  # every layer within the error bound, whatever its speed on these small shapes
            *SAMPLING,
            "--out",
            paths["onednn"],
        ],
        "tiny": ["tiny-vae", "--edge-bundle", paths["onednn"], "--train-steps", "4", *SAMPLING, "--out", paths["tiny"]],
        "export": [
            "export",
            "--edge-bundle",
            paths["tiny"],
            "--switch-steps",
            "0,2",
            *SAMPLING,
            "--out",
            paths["export"],
        ],
    }
    for name, command in commands.items():
        assert main(["compress", *map(str, command)]) == 0, name
    return paths


def test_each_action_writes_a_bundle_that_records_its_history(bundles, pairs):
    expected = {
        "w8a8": ["quantize"],
        "pruned": ["prune"],
        "distilled": ["prune", "distill"],
        "onednn": ["prune", "distill", "quantize"],
        "tiny": ["prune", "distill", "quantize", "tiny-vae"],
        "export": ["prune", "distill", "quantize", "tiny-vae", "export"],
    }
    macs = {}
    for name, history in expected.items():
        bundle = read_bundle(bundles[name])
        assert [step["action"] for step in bundle.history] == history
        assert bundle.card["history"] == history
        assert bundle.card["unet_bytes"] == sum(path.stat().st_size for path in bundle.unet.rglob("*.safetensors"))
        macs[name] = bundle.card["macs_per_unet_step"]
    # Quantization keeps the multiply-accumulates; pruning cuts them, and the later actions keep its architecture.
    assert macs["w8a8"] == unet_cost(dequantize_model(pairs["shapes"].edge.pipe.unet))["macs_per_unet_step"]
    assert 0 < macs["pruned"] < macs["w8a8"]
    assert {macs[name] for name in ("distilled", "onednn", "tiny", "export")} == {macs["pruned"]}


def test_the_cards_report_what_each_action_did(bundles, pairs):
    source_params = sum(p.numel() for p in dequantize_model(pairs["shapes"].edge.pipe.unet).parameters())
    pruned = read_bundle(bundles["pruned"]).card
    assert pruned["params"] <= 0.7 * source_params and pruned["unet_params"] == pruned["params"]
    distilled_bundle = read_bundle(bundles["distilled"])
    distilled = distilled_bundle.card["distillation"]
    assert distilled["steps"] == 6 and distilled["final_loss"] > 0
    # No --guidance: the teacher generates at the guidance the pair serves at (the shapes pair's 5, not 7.5).
    assert distilled_bundle.history[-1]["guidance"] == pairs["shapes"].cloud.default_guidance_scale == 5
    assert distilled_bundle.history[-1]["from_step"] == 1
    w8a8 = read_bundle(bundles["w8a8"]).card
    assert w8a8["mode"] == "W8A8" and w8a8["quantized_layers"] > 20
    assert w8a8["weight_bytes_fp16"] / w8a8["weight_bytes_packed"] > 1.9
    onednn = read_bundle(bundles["onednn"])
    choices = json.loads((onednn.path / "calibration.json").read_text())
    assert {choice["name"] for choice in choices} == set(onednn.card["kept_in_float"]) | {
        choice["name"] for choice in choices if choice["quantized"]
    }
    assert all(choice["reason"] for choice in choices if not choice["quantized"])
    assert all(choice["low"] <= choice["high"] for choice in choices)  # every layer ran in calibration
    tiny = read_bundle(bundles["tiny"])
    assert tiny.vae is not None and tiny.vae_latent_space == pairs["shapes"].cloud.latent_space
    assert (tiny.path / "calibration.json").read_text() == (onednn.path / "calibration.json").read_text()
    quality = read_bundle(bundles["export"]).card["quality"]["by_switch_step"]
    assert set(quality) == {"0", "2"}
    for row in quality.values():
        assert 0 <= row["adherence_compressed"] <= 1 and row["frechet_distance_reference"] >= 0
        assert 0 < row["ssim_vs_uncompressed"] <= 1


@pytest.mark.parametrize("name", ["w8a8", "onednn"])
@pytest.mark.parametrize("switch_step", [0, 3, 6])
def test_split_with_a_quantized_bundle_equals_one_loop_switched_at_k(bundles, name, switch_step):
    pair = load_pair(bundle_spec(preset("shapes"), bundles[name]))
    assert type(pair.edge.pipe.unet.down_blocks[0].resnets[0].conv1).__name__ in ("QuantConv2d", "OneDnnConv2d")
    assert not read_bundle(bundles[name]).card["kept_in_float"]
    request = GenerationRequest(
        "a small red circle above a large blue square",
        switch_step=switch_step,
        num_inference_steps=6,
        seed=5,
        scheduler="dpm++2m",
    )
    result = HybridPipeline(pair)(request)
    expected = reference_run(
        load_reference(preset("shapes").cloud), result.request, pair.cloud.pipe.unet, pair.edge.pipe.unet, switch_step
    )
    assert torch.equal(result.latents, expected)


def test_the_quantized_edge_half_is_deterministic(bundles):
    pair = load_pair(bundle_spec(preset("shapes"), bundles["export"]))
    request = HybridPipeline(pair).check_inputs(
        GenerationRequest("a large green diamond", switch_step=2, num_inference_steps=6, seed=9)
    )
    handoff = state_payload(pair.cloud.denoise(pair.cloud.begin(request), 2))
    first, second = (pair.edge.denoise(state_from_payload(handoff), 6).latents for _ in range(2))
    assert torch.equal(first, second)


def test_generate_and_serve_take_a_bundle(bundles, tmp_path, capsys):
    out, latents = tmp_path / "bundle.png", tmp_path / "latents.safetensors"
    command = ["generate", "--prompt", "a large red circle", "--steps", "4", "--seed", "1"]
    assert (
        main([*command, "--edge-bundle", str(bundles["export"]), "--out", str(out), "--latents-out", str(latents)]) == 0
    )
    # What the bundle's pair computes in-process for the same request (its edge half is deterministic).
    pair = load_pair(bundle_spec(preset("shapes"), bundles["export"]))
    expected = HybridPipeline(pair)(GenerationRequest("a large red circle", num_inference_steps=4, seed=1))
    assert torch.equal(load_file(latents)["latents"], expected.latents)
    with Image.open(out) as image:
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (64, 64))
        assert np.array_equal(np.asarray(image), np.asarray(expected.image))
    assert main(["serve", "edge", "--bundle", str(bundles["export"]), "--check"]) == 0
    assert str(bundles["export"] / "unet") in capsys.readouterr().out
    assert main([*command, "--edge-bundle", str(tmp_path), "--out", str(out)]) == 2
    assert "bundle" in capsys.readouterr().err


def test_a_pair_folder_with_an_edge_bundle_is_served_measured_and_described(bundles, tmp_path):
    """A trained pair's folder whose edge is a bundle (``edge/``): ``--pair FOLDER`` serves it, the evaluation
    costs it from the bundle's card, and the model card lists how it was made."""
    folder = tmp_path / "pair"
    shutil.copytree(EMBEDDED_PRESETS["shapes"] / "cloud", folder / "cloud")
    for name in ("training.json", "serving.json"):
        shutil.copy(EMBEDDED_PRESETS["shapes"] / name, folder)
    shutil.copytree(bundles["tiny"], folder / "edge")
    out, latents = tmp_path / "image.png", tmp_path / "latents.safetensors"
    command = ["generate", "--prompt", "a large red circle", "--steps", "4", "--seed", "1", "--pair", str(folder)]
    assert main([*command, "--out", str(out), "--latents-out", str(latents)]) == 0
    pair = load_pair(bundle_spec(preset("shapes"), bundles["tiny"]))  # the same models, named the other way
    expected = HybridPipeline(pair)(GenerationRequest("a large red circle", num_inference_steps=4, seed=1))
    assert torch.equal(load_file(latents)["latents"], expected.latents)

    evaluation = evaluate(folder, tmp_path / "sweep", prompts=2, num_inference_steps=4, switch_steps=(0, 2, 4))
    card = read_bundle(bundles["tiny"]).card
    assert evaluation["costs"]["small_unet"] == {"flops": 2 * card["macs_per_unet_step"], "params": card["unet_params"]}
    assert set(evaluation["bytes"]) == {"cloud", "edge/unet", "edge/vae"}
    history = evaluation["edge_bundle"]["history"]
    assert [step["action"] for step in history] == ["prune", "distill", "quantize", "tiny-vae"]
    assert all(step["seconds"] > 0 for step in history) and history[-1]["width"] == 64
    text = write_model_card(folder).read_text()
    assert "## Compression" in text and f"{card['quantized_layers']} of its layers run W8A8" in text
    assert all(f"| {step['action']} |" in text for step in history)


def test_a_calibrated_unet_saved_and_loaded_gives_equal_outputs(pairs, tmp_path):
    unet = dequantize_model(pairs["shapes"].edge.pipe.unet)
    calls = [Calibration.random(unet, batch_size=2, seed=seed) for seed in range(3)]
    report, choices = calibrate(unet, calls, QuantConfig(8, 8, kernel="onednn"), max_error=0.5, min_speedup=0.0)
    assert report.quantized == [choice.name for choice in choices] and not report.kept
    assert all(module.static for module in unet.modules() if isinstance(module, OneDnnConv2d | OneDnnLinear))
    save_quantized_unet(unet, QuantConfig(8, 8, kernel="onednn"), report, tmp_path)
    loaded = load_unet(str(tmp_path), torch.float32)
    probe = Calibration.random(unet, batch_size=2, seed=7)
    assert torch.equal(probe.run(unet), probe.run(loaded))


def test_calibration_keeps_layers_that_would_be_harmed(pairs):
    unet = dequantize_model(pairs["shapes"].edge.pipe.unet)
    calls = [Calibration.random(unet, batch_size=2, seed=0)]
    report, choices = calibrate(unet, calls, QuantConfig(8, 8, kernel="onednn"), max_error=1e-6, min_speedup=0.0)
    assert not report.quantized and len(report.kept) == len(choices)
    assert all(reason.startswith("error") for reason in report.kept.values())


@pytest.mark.parametrize("static", [False, True])
def test_onednn_layers_match_float_within_bound(static):
    torch.manual_seed(0)
    layers = [nn.Linear(96, 80), nn.Conv2d(48, 64, 3, padding=1), nn.Conv2d(48, 32, 1), nn.Conv2d(32, 32, 3, 2, 1)]
    inputs = [torch.randn(3, 7, 96), torch.randn(2, 48, 12, 12), torch.randn(2, 48, 9, 9), torch.randn(1, 32, 10, 10)]
    for layer, x in zip(layers, inputs, strict=True):
        model = nn.Sequential(layer)
        quantize_model(model, QuantConfig(8, 8, kernel="onednn"))
        if static:
            model[0].set_input_range(x.min().item(), x.max().item())
        expected, actual = layer(x), model(x)
        assert actual.shape == expected.shape
        assert ((actual - expected).norm() / expected.norm()).item() < 0.02


def test_onednn_kernel_is_w8a8_only():
    with pytest.raises(ValueError, match="kernel"):
        QuantConfig(4, 8, kernel="onednn")
    with pytest.raises(ValueError, match="kernel"):
        QuantConfig(8, 8, kernel="cuda")


def test_bad_bit_width_is_refused_naming_the_field(tmp_path, capsys):
    command = ["compress", "quantize", "--weight-bits", "9", "--out", str(tmp_path / "bad")]
    assert main(command) == 2
    assert "weight_bits" in capsys.readouterr().err


def test_an_action_needing_prompts_says_so(tmp_path, capsys):
    assert main(["compress", "prune", "--budget", "0.5", "--out", str(tmp_path / "p")]) == 2
    assert "--prompts" in capsys.readouterr().err


def test_an_existing_folder_that_is_not_a_bundle_is_never_overwritten(tmp_path, capsys):
    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    assert main(["compress", "quantize", "--out", str(tmp_path)]) == 2
    assert "out" in capsys.readouterr().err and keep.read_text() == "mine"


def test_a_quantized_bundle_is_not_distilled_or_quantized_again(bundles, tmp_path, capsys):
    for action in (["distill", *SAMPLING], ["quantize"]):
        command = ["compress", *action, "--edge-bundle", str(bundles["w8a8"]), "--out", str(tmp_path / "x")]
        assert main(command) == 2
        assert "quantized UNet" in capsys.readouterr().err
