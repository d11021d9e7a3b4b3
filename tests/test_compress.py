"""``hybrid-sd compress quantize``: a low-bit edge UNet that the engine loads, whose half of the split is
deterministic and equals diffusers' loop with the same quantized UNet swapped in at k."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from hybrid_sd.cli import main
from hybrid_sd.pairs import load_pair, preset
from hybrid_sd.pipeline import HybridPipeline
from hybrid_sd.request import GenerationRequest
from hybrid_sd.state import HybridState
from tests.conftest import load_reference
from tests.reference import reference_run


@pytest.fixture(scope="module")
def quantized_pair(tmp_path_factory, pairs):
    out = tmp_path_factory.mktemp("w8a8")
    assert main(["compress", "quantize", "--unet", preset("shapes").edge, "--out", str(out)]) == 0
    return load_pair(dataclasses.replace(preset("shapes"), edge=str(out))), out


def test_card_reports_the_packed_weights(quantized_pair):
    card = json.loads((quantized_pair[1] / "card.json").read_text())
    assert card["mode"] == "W8A8" and card["quantized_layers"] > 20
    assert card["weight_bytes_fp16"] / card["weight_bytes_packed"] > 1.9


@pytest.mark.parametrize("switch_step", [0, 3, 6])
def test_split_with_a_quantized_edge_equals_one_loop_switched_at_k(quantized_pair, switch_step):
    pair = quantized_pair[0]
    assert type(pair.edge.pipe.unet.conv_in).__name__ == "QuantConv2d"
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


def test_the_quantized_edge_half_is_deterministic(quantized_pair):
    pair = quantized_pair[0]
    request = HybridPipeline(pair).check_inputs(
        GenerationRequest("a large green diamond", switch_step=2, num_inference_steps=6, seed=9)
    )
    handoff = pair.cloud.denoise(pair.cloud.begin(request), 2).to_bytes()
    first, second = (pair.edge.denoise(HybridState.from_bytes(handoff), 6).latents for _ in range(2))
    assert torch.equal(first, second)


def test_bad_bit_width_is_refused_naming_the_field(tmp_path, capsys):
    assert (
        main(
            [
                "compress",
                "quantize",
                "--unet",
                preset("shapes").edge,
                "--weight-bits",
                "9",
                "--out",
                str(tmp_path / "bad"),
            ]
        )
        == 2
    )
    assert "weight_bits" in capsys.readouterr().err
