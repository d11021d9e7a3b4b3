"""Pruning on tiny UNets: BK-SDM block removal, significance, channel and head pruning and width
pruning to a budget, and save/load through the project's loader."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor

from compression.prune import (
    PRUNING_FILE,
    Calibration,
    find_units,
    load_pruned_unet,
    measure_significance,
    prune_channels,
    prune_widths,
    remove_blocks,
    save_pruned,
)
from compression.prune.cost import module_macs, unit_costs
from compression.prune.units import masked
from hybrid_sd.bundle import bundle_spec, read_bundle
from hybrid_sd.cli import main
from hybrid_sd.lowbit import QuantConfig, quantize_model
from hybrid_sd.lowbit.storage import save_quantized_unet
from hybrid_sd.pairs import load_pair, load_unet, preset
from hybrid_sd.pipeline import HybridPipeline
from hybrid_sd.request import GenerationRequest

BUDGET = 0.6
# Below what channel and head pruning reach on the tiny UNet; its few channels per group make the
# width pruner's steps coarse, so it may land this far under.
WIDTH_BUDGET, WIDTH_SLACK = 0.3, 0.7


def tiny_unet(family: str, seed: int = 0) -> UNet2DConditionModel:
    """SD 1.x- or SDXL-architecture UNet with a few channels; SDXL's one norm group leaves only heads to prune."""
    torch.manual_seed(seed)
    common = dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    if family == "sd1":
        return UNet2DConditionModel(**common, cross_attention_dim=32, norm_num_groups=8).eval()
    return UNet2DConditionModel(
        **common,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,
        norm_num_groups=1,
    ).eval()


def relative_change(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    return tiny_unet("sd1")


@pytest.fixture(scope="module")
def calibration(unet) -> Calibration:
    return Calibration.random(unet, batch_size=4)


@pytest.fixture(scope="module")
def significance(unet, calibration) -> dict[str, float]:
    return measure_significance(unet, calibration)


def test_block_removal_is_bk_sdm_small_with_teacher_weights(unet, calibration):
    student = remove_blocks(unet, layers_per_block=1)
    assert student.config.layers_per_block == 1 and student.config.mid_block_type is None
    assert student.mid_block is None
    assert [len(block.resnets) for block in student.down_blocks] == [1, 1]
    assert [len(block.resnets) for block in student.up_blocks] == [2, 2]
    assert calibration.run(student).shape == calibration.run(unet).shape
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in unet.parameters())
    teacher = unet.state_dict()
    state = student.state_dict()
    # Down blocks keep their first pair; up blocks their first and last (BK-SDM's copy_weight_from_teacher).
    for student_key, teacher_key in (
        ("down_blocks.1.resnets.0.conv1.weight", "down_blocks.1.resnets.0.conv1.weight"),
        ("down_blocks.1.attentions.0.proj_in.weight", "down_blocks.1.attentions.0.proj_in.weight"),
        ("up_blocks.0.resnets.1.conv1.weight", "up_blocks.0.resnets.2.conv1.weight"),
        ("up_blocks.0.attentions.1.proj_out.weight", "up_blocks.0.attentions.2.proj_out.weight"),
        ("up_blocks.1.resnets.0.conv_shortcut.weight", "up_blocks.1.resnets.0.conv_shortcut.weight"),
        ("conv_out.weight", "conv_out.weight"),
    ):
        assert torch.equal(state[student_key], teacher[teacher_key]), student_key
    assert not any(key.startswith("mid_block.") for key in state)


def test_block_removal_per_block_and_keeping_the_mid_block(unet, calibration, tmp_path):
    student = remove_blocks(unet, layers_per_block=(2, 1), remove_mid_block=False)
    assert [len(block.resnets) for block in student.up_blocks] == [2, 3]
    assert torch.equal(student.mid_block.resnets[0].conv1.weight, unet.mid_block.resnets[0].conv1.weight)
    # A standard diffusers config: no extension, and diffusers loads it on its own.
    path = save_pruned(student, tmp_path / "edge-unet")
    assert not (path / PRUNING_FILE).exists()
    for loaded in (UNet2DConditionModel.from_pretrained(path), load_unet(str(path), torch.float32)):
        assert torch.equal(calibration.run(loaded), calibration.run(student))


@pytest.mark.parametrize("layers_per_block", [0, 3, (1, 1, 1)])
def test_bad_layers_per_block_is_refused_naming_it(unet, layers_per_block):
    with pytest.raises(ValueError, match="layers_per_block"):
        remove_blocks(unet, layers_per_block=layers_per_block)


def test_significance_measures_how_far_the_output_moves(unet, calibration, significance):
    units = {unit.name: unit for unit in find_units(unet)}
    assert set(significance) == set(units)
    most = max(significance, key=significance.get)
    least = min(significance, key=significance.get)
    reference = calibration.run(unet)
    moves = {}
    for name in (most, least):
        with masked(unet, [units[name]]):
            moves[name] = relative_change(calibration.run(unet), reference)
    assert moves[most] > moves[least]
    assert moves[most] == pytest.approx(significance[most])
    assert torch.equal(calibration.run(unet), reference)  # the mask is undone


@pytest.mark.parametrize("metric", ["params", "macs"])
def test_budget_is_met_within_one_unit(unet, calibration, significance, metric):
    pruned, report = prune_channels(unet, BUDGET, calibration, metric=metric, significance=significance)
    assert calibration.run(pruned).shape == calibration.run(unet).shape
    macs = module_macs(unet, calibration) if metric == "macs" else None
    largest_unit = max(unit_costs(unet, find_units(unet), macs).values())
    before, after = (
        (report.params_before, report.params_after) if metric == "params" else (report.macs_before, report.macs_after)
    )
    assert after <= BUDGET * before < after + largest_unit
    assert any(":group" in name for name in report.removed) and any(":head" in name for name in report.removed)


def test_removing_units_matches_their_significance(unet, calibration, significance):
    """Physically pruning the least significant unit moves the output as much as masking it did."""
    pruned, report = prune_channels(unet, 0.999, calibration, significance=significance)
    assert len(report.removed) == 1
    moved = relative_change(calibration.run(pruned), calibration.run(unet))
    assert moved == pytest.approx(significance[report.removed[0]], rel=1e-3, abs=1e-6)


def test_full_budget_is_the_identity(unet, calibration, significance):
    pruned, report = prune_channels(unet, 1.0, calibration, significance=significance)
    assert report.removed == [] and report.params_after == report.params_before
    assert torch.equal(calibration.run(pruned), calibration.run(unet))


@pytest.mark.parametrize("budget", [0, 0.0, -0.5, 1.5, float("nan")])
def test_bad_budget_is_refused_naming_it(unet, calibration, budget):
    with pytest.raises(ValueError, match="budget"):
        prune_channels(unet, budget, calibration)


def test_unreachable_budget_is_refused_naming_it(unet, calibration, significance):
    with pytest.raises(ValueError, match="budget 0.01 is out of reach"):
        prune_channels(unet, 0.01, calibration, significance=significance)


def test_bad_metric_is_refused_naming_it(unet, calibration):
    with pytest.raises(ValueError, match="metric"):
        prune_channels(unet, 0.5, calibration, metric="latency")


def assert_quantized_round_trip(pruned, calibration: Calibration, folder, version: int) -> None:
    """A W8A8 copy of ``pruned`` saves with a version ``version`` pruning.json and loads to equal outputs."""
    quantized = copy.deepcopy(pruned)
    config = QuantConfig(8, 8)
    save_quantized_unet(quantized, config, quantize_model(quantized, config), folder)
    assert json.loads((folder / PRUNING_FILE).read_text())["version"] == version
    assert torch.equal(calibration.run(load_unet(str(folder), torch.float32)), calibration.run(quantized))


def test_pruned_unet_saves_and_loads_through_the_project_loader(unet, calibration, significance, tmp_path):
    pruned, _ = prune_channels(unet, BUDGET, calibration, significance=significance)
    expected = calibration.run(pruned)
    bare = save_pruned(pruned, tmp_path / "edge-unet")
    in_pipeline = save_pruned(pruned, tmp_path / "edge" / "unet")
    assert (bare / PRUNING_FILE).is_file()
    for path in (bare, tmp_path / "edge"):
        assert torch.equal(calibration.run(load_unet(str(path), torch.float32)), expected)
    half = load_pruned_unet(in_pipeline, torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16
    assert json.loads((bare / PRUNING_FILE).read_text())["version"] == 1  # units alone need no more
    assert_quantized_round_trip(pruned, calibration, tmp_path / "w8a8", version=1)


def test_sdxl_student_blocks_removed_then_heads_pruned(tmp_path):
    teacher = tiny_unet("sdxl")
    calibration = Calibration.random(teacher, batch_size=2)
    student = remove_blocks(teacher, layers_per_block=1)
    pruned, report = prune_channels(student, 0.9, calibration)
    assert report.params_after <= 0.9 * report.params_before
    assert all(":head" in name for name in report.removed)  # one norm group: heads only
    path = save_pruned(pruned, tmp_path / "edge-unet")
    assert torch.equal(calibration.run(load_unet(str(path), torch.float32)), calibration.run(pruned))


@pytest.fixture(scope="module")
def width_pruned(unet, calibration):
    return prune_widths(unet, WIDTH_BUDGET, calibration)


def test_width_pruning_reaches_a_budget_the_unit_pruner_cannot(unet, calibration, significance, width_pruned):
    with pytest.raises(ValueError, match="out of reach"):
        prune_channels(unet, WIDTH_BUDGET, calibration, metric="macs", significance=significance)
    pruned, report = width_pruned
    assert WIDTH_SLACK * WIDTH_BUDGET * report.macs_before < report.macs_after <= WIDTH_BUDGET * report.macs_before
    assert report.params_after < report.params_before and 0 < report.ratio < 1
    output = calibration.run(pruned)
    assert output.shape == calibration.run(unet).shape and torch.isfinite(output).all()
    # The image side keeps its channels; the residual stream does not.
    assert pruned.conv_in.in_channels == pruned.conv_out.out_channels == unet.config.in_channels
    assert pruned.conv_in.out_channels < unet.conv_in.out_channels


def test_width_pruned_attentions_keep_heads_and_their_trained_softmax_scale(unet, width_pruned, calibration):
    pruned, _ = width_pruned
    pairs = [(module, dict(unet.named_modules())[name]) for name, module in pruned.named_modules()]
    attentions = [(new, old) for new, old in pairs if isinstance(new, Attention)]
    assert any(new.to_q.out_features < old.to_q.out_features for new, old in attentions)
    for new, old in attentions:
        assert new.heads == old.heads and new.to_q.out_features % new.heads == 0
        assert new.scale == (new.to_q.out_features // new.heads) ** -0.5
    # The default processor scales by the head dim and the classic one by attn.scale: both agree.
    classic = copy.deepcopy(pruned)
    classic.set_attn_processor(AttnProcessor())
    torch.testing.assert_close(calibration.run(classic), calibration.run(pruned), rtol=1e-4, atol=1e-5)


def test_width_pruning_to_a_parameter_budget(unet, calibration):
    pruned, report = prune_widths(unet, 0.5, calibration, metric="params")
    assert WIDTH_SLACK * 0.5 * report.params_before < report.params_after <= 0.5 * report.params_before
    assert report.params_after == sum(p.numel() for p in pruned.parameters())


def test_full_width_budget_is_the_identity(unet, calibration):
    pruned, report = prune_widths(unet, 1.0, calibration)
    assert report.ratio == 0 and report.macs_after == report.macs_before
    assert torch.equal(calibration.run(pruned), calibration.run(unet))


@pytest.mark.parametrize(
    ("budget", "metric", "named"), [(0, "macs", "budget"), (1.5, "macs", "budget"), (0.5, "latency", "metric")]
)
def test_bad_width_arguments_are_refused_naming_them(unet, calibration, budget, metric, named):
    with pytest.raises(ValueError, match=named):
        prune_widths(unet, budget, calibration, metric=metric)


def test_unreachable_width_budget_is_refused_naming_it(unet, calibration):
    with pytest.raises(ValueError, match="budget 0.001 is out of reach"):
        prune_widths(unet, 0.001, calibration)


def test_width_pruned_unet_saves_loads_and_quantizes(width_pruned, calibration, tmp_path):
    pruned, _ = width_pruned
    path = save_pruned(pruned, tmp_path / "edge-unet")
    assert json.loads((path / PRUNING_FILE).read_text())["version"] == 2
    assert torch.equal(calibration.run(load_unet(str(path), torch.float32)), calibration.run(pruned))
    assert_quantized_round_trip(pruned, calibration, tmp_path / "w8a8", version=2)


def test_sdxl_unet_width_pruned_saves_and_loads(tmp_path):
    teacher = tiny_unet("sdxl")
    calibration = Calibration.random(teacher, batch_size=2)
    pruned, report = prune_widths(teacher, 0.5, calibration, metric="params")
    assert report.params_after <= 0.5 * report.params_before
    path = save_pruned(pruned, tmp_path / "edge-unet")
    assert torch.equal(calibration.run(load_unet(str(path), torch.float32)), calibration.run(pruned))


def test_prune_widths_on_the_command_line_makes_a_bundle_the_engine_runs(tmp_path):
    out = tmp_path / "bundle"
    command = ["compress", "prune", "--pair", "tiny-sd1", "--source", "cloud", "--metric", "macs", "--budget", "0.2"]
    command += [
        "--widths",
        "--calibration-rows",
        "2",
        "--prompts",
        "shapes:1",
        "--sampling-steps",
        "2",
        "--out",
        str(out),
    ]
    assert main(command) == 0
    bundle = read_bundle(out)
    assert bundle.history[-1]["widths"] is True and 0 < bundle.history[-1]["width_ratio"] < 1
    assert bundle.card["macs"] <= 0.2 * bundle.card["source_macs"]
    pair = load_pair(bundle_spec(preset("tiny-sd1"), out))
    result = HybridPipeline(pair)(GenerationRequest("a red circle", switch_step=1, num_inference_steps=2, seed=1))
    assert result.image is not None
