"""Model pairs: loading from diffusers folders, presets, and refusing pairs that cannot hand over."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny

from hybrid_sd.pairs import embedded_spec, load_pair, preset
from hybrid_sd.pipeline import HybridPipeline
from hybrid_sd.presets import EMBEDDED_PRESETS, PRESETS, PairSpec
from hybrid_sd.request import GenerationRequest
from hybrid_sd.schedulers import power_timesteps
from hybrid_sd.tiny_models import build_tiny_pipeline


def test_tiny_pair_loads_from_folders(pairs, pair_specs):
    pair = pairs["sd1"]
    assert pair.cloud.name == pair_specs["sd1"].cloud
    assert isinstance(pair.cloud.pipe.vae, AutoencoderKL)
    assert isinstance(pair.edge.pipe.vae, AutoencoderTiny)
    assert pair.edge.pipe.unet.num_parameters() < pair.cloud.pipe.unet.num_parameters() / 2
    # Saved separately but identical: the fingerprint sees they are the same encoder.
    assert pair.cloud.text_encoder_id == pair.edge.text_encoder_id
    assert pairs["sdxl"].edge.latent_space == "sdxl"


def test_presets_name_the_public_checkpoints():
    assert PRESETS["sd14-hybrid-224m"].edge == "cqyan/hybrid-sd-224m"
    assert PRESETS["sdxl-koala-700m"].edge_vae == "madebyollin/taesdxl"
    with pytest.raises(ValueError, match="pair must be one of"):
        preset("no-such-pair")


def test_pair_from_different_latent_spaces_is_refused_naming_both(pair_specs):
    spec = PairSpec(pair_specs["sd1"].cloud, pair_specs["sdxl"].edge)
    with pytest.raises(ValueError) as error:
        load_pair(spec)
    assert pair_specs["sd1"].cloud in str(error.value) and pair_specs["sdxl"].edge in str(error.value)
    assert "different latent spaces (sd1 and sdxl)" in str(error.value)


def test_edge_decoder_for_another_latent_space_is_refused(pair_specs):
    spec = PairSpec(pair_specs["sd1"].cloud, pair_specs["sd1"].edge, pair_specs["sd1"].edge_vae, "sdxl")
    with pytest.raises(ValueError, match="the edge decoder is for the sdxl latent space"):
        load_pair(spec)


def test_edge_with_a_vae_of_another_scaling_factor_is_refused(pair_specs, tmp_path):
    pipe = build_tiny_pipeline("sd1", "small")
    pipe.vae.register_to_config(scaling_factor=0.5)
    pipe.save_pretrained(tmp_path / "edge")
    with pytest.raises(ValueError, match=r"denoise in different latent spaces \(sd1 and custom-0.5\)"):
        load_pair(PairSpec(pair_specs["sd1"].cloud, str(tmp_path / "edge")))


def test_unet_only_edge_runs_on_the_cloud_text_encoders(pair_specs, tmp_path):
    build_tiny_pipeline("sd1", "small").unet.save_pretrained(tmp_path / "small-unet")
    pair = load_pair(PairSpec(pair_specs["sd1"].cloud, str(tmp_path / "small-unet")))
    assert pair.edge.pipe.text_encoder is pair.cloud.pipe.text_encoder
    assert pair.edge.pipe.unet.config.block_out_channels == [32, 32]
    result = HybridPipeline(pair)(GenerationRequest("a square", switch_step=2, num_inference_steps=4, seed=0))
    assert result.unet_evaluations == {"cloud": 3, "edge": 2}  # PLMS: one warm-up evaluation


def test_shared_text_encoder_is_one_object(pair_specs):
    spec = pair_specs["sdxl"]
    pair = load_pair(PairSpec(spec.cloud, spec.edge, spec.edge_vae, "sdxl", edge_shares_text_encoder=True))
    assert pair.edge.pipe.text_encoder_2 is pair.cloud.pipe.text_encoder_2


def test_undeclared_tiny_decoder_is_assumed_with_a_warning(pair_specs, caplog):
    spec = pair_specs["sd1"]
    with caplog.at_level(logging.WARNING, logger="hybrid_sd.pairs"):
        load_pair(PairSpec(spec.cloud, spec.edge, spec.edge_vae))
    assert "cannot tell the latent space" in caplog.text


def test_bfloat16_pair_runs(pair_specs):
    pair = load_pair(pair_specs["sd1"], dtype=torch.bfloat16)
    result = HybridPipeline(pair)(GenerationRequest("a square", switch_step=1, num_inference_steps=2, seed=0))
    assert result.latents.dtype == torch.bfloat16
    assert torch.isfinite(result.latents.float()).all()


def test_a_trained_pairs_serving_json_sets_its_timestep_spacing(tmp_path):
    """``serving.json`` in a trained pair's folder is the pair's default timestep_power, as its requests resolve."""
    folder = tmp_path / "pair"
    shutil.copytree(EMBEDDED_PRESETS["shapes"], folder)
    assert embedded_spec(folder).timestep_power == 1.5  # the shipped pair's
    (folder / "serving.json").unlink()
    assert embedded_spec(folder).timestep_power is None
    (folder / "serving.json").write_text('{"timestep_power": 2}')
    spec = embedded_spec(folder)
    assert spec.timestep_power == 2
    pipeline = HybridPipeline.from_pair(spec)
    resolved = pipeline.check_inputs(GenerationRequest("a red circle", num_inference_steps=20))
    assert resolved.timestep_power == 2
    assert pipeline.cloud.begin(resolved).timesteps.tolist() == power_timesteps(20, 2)
    for text, field in [('{"timestep_power": 9}', "timestep_power must be in"), ('{"guidance": 1}', "may set")]:
        (folder / "serving.json").write_text(text)
        with pytest.raises(ValueError, match=f"serving.json: .*{field}"):
            embedded_spec(folder)
