"""Distillation on the trained shapes pair (and the tiny SDXL pair): the teacher's trajectories, a pruned
student fine-tuned on them with BK-SDM's output and feature losses, and a tiny VAE distilled from the VAE."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from diffusers import AutoencoderTiny, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor

from compression.distill import (
    DistillConfig,
    TeacherTrajectories,
    TinyVaeConfig,
    collect_trajectories,
    default_tiny,
    distill_tiny_vae,
    distill_unet,
    distillation_losses,
    feature_blocks,
    matching_blocks,
)
from compression.prune import Calibration, measure_significance, prune_channels, remove_blocks
from hybrid_sd.denoiser import Denoiser
from hybrid_sd.lowbit import dequantize_model
from hybrid_sd.pairs import ModelPair, load_pair, load_pipeline, preset
from hybrid_sd.schedulers import power_timesteps

PROMPTS = ["a red circle", "a blue square on the left", "a green triangle", "two yellow circles"]
HELD_OUT = ["a yellow square", "a red triangle on the right"]
STEPS = 5
GUIDANCE = 7.5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes() -> ModelPair:
    return load_pair(preset("shapes"))


@pytest.fixture(scope="module")
def edge_data(shapes) -> TeacherTrajectories:
    """The edge UNet's own generations: the teacher of the pruned students."""
    return collect_trajectories(shapes.edge.pipe, PROMPTS, STEPS, GUIDANCE, seed=0)


@pytest.fixture(scope="module")
def held_out(shapes) -> Calibration:
    """Rows of other prompts and noise than the training data, a few of every step."""
    data = collect_trajectories(shapes.edge.pipe, HELD_OUT, STEPS, GUIDANCE, seed=1)
    return data.batch(list(range(0, len(data), 2)))


def relative_distance(student: UNet2DConditionModel, teacher: UNet2DConditionModel, inputs: Calibration) -> float:
    expected = inputs.run(teacher)
    return ((inputs.run(student) - expected).norm() / expected.norm()).item()


def test_trajectories_record_every_unet_call(shapes, edge_data):
    pipe = shapes.edge.pipe
    prompts = len(PROMPTS)
    rows = 2 * prompts  # classifier-free guidance: unconditional rows, then conditional ones
    assert len(edge_data) == STEPS * rows and edge_data.prompts == PROMPTS
    assert edge_data.inputs.sample.shape == (STEPS * rows, 4, 16, 16)
    assert edge_data.step.tolist() == [step for step in range(STEPS) for _ in range(rows)]
    assert torch.equal(edge_data.inputs.timestep.view(STEPS, rows)[:, 0], pipe.scheduler.timesteps.long())
    conditional, unconditional = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    embeddings = edge_data.inputs.encoder_hidden_states.view(STEPS, rows, *conditional.shape[1:])
    assert torch.equal(embeddings[:, :prompts], unconditional.expand(STEPS, -1, -1, -1))
    assert torch.equal(embeddings[:, prompts:], conditional.expand(STEPS, -1, -1, -1))
    samples = edge_data.inputs.sample.view(STEPS, rows, 4, 16, 16)
    assert torch.equal(samples[:, :prompts], samples[:, prompts:])  # one latent per prompt, twice
    assert not torch.equal(samples[0], samples[1])
    # Step 0 sees the seeded initial noise (DPM-Solver's scale_model_input is the identity).
    noise = randn_tensor((prompts, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(samples[0, prompts:], noise * pipe.scheduler.init_noise_sigma)
    assert edge_data.final_latents.shape == (prompts, 4, 16, 16)
    assert not torch.equal(edge_data.final_latents, samples[-1, prompts:])


def test_trajectories_at_a_timestep_power_sample_its_timesteps(shapes):
    """A pair served at a timestep_power is distilled and calibrated on the timesteps it serves."""
    data = collect_trajectories(shapes.edge.pipe, PROMPTS[:1], STEPS, GUIDANCE, seed=0, timestep_power=2.0)
    assert data.inputs.timestep.view(STEPS, 2)[:, 0].tolist() == power_timesteps(STEPS, 2.0)
    own = type(shapes.edge.pipe.scheduler).from_config(shapes.edge.pipe.scheduler.config)
    own.set_timesteps(STEPS)
    assert power_timesteps(STEPS, 2.0) != own.timesteps.tolist()


def test_distillation_brings_a_pruned_student_to_its_teacher(shapes, edge_data, held_out):
    teacher = dequantize_model(shapes.edge.pipe.unet)  # the shipped edge's UNet in float, to prune and train
    teacher_state = {key: value.clone() for key, value in teacher.state_dict().items()}
    probe = edge_data.batch([0, len(edge_data) - 1])
    student, _ = prune_channels(teacher, 0.6, probe, significance=measure_significance(teacher, probe))
    config = DistillConfig(steps=60, batch_size=8, lr=1e-4, warmup_steps=3)
    blocks = matching_blocks(teacher, student, held_out)
    assert blocks == feature_blocks(teacher)  # channel pruning keeps every block's output shape
    with torch.no_grad():
        before = {
            name: loss.item() for name, loss in distillation_losses(teacher, student, held_out, blocks, config).items()
        }
    distance_before = relative_distance(student, teacher, held_out)

    stats = distill_unet(teacher, student, edge_data, config)

    with torch.no_grad():
        after = {
            name: loss.item() for name, loss in distillation_losses(teacher, student, held_out, blocks, config).items()
        }
    assert after["loss"] < 0.7 * before["loss"]
    assert after["output"] < 0.85 * before["output"] and after["feature"] < 0.7 * before["feature"]
    assert relative_distance(student, teacher, held_out) < 0.93 * distance_before
    assert stats["steps"] == 60 and stats["blocks"] == blocks
    assert stats["final_loss"] < 0.7 * stats["first_loss"]
    assert stats["final_loss"] == pytest.approx(stats["final_output_loss"] + stats["final_feature_loss"])
    assert not student.training and next(student.parameters()).dtype == torch.float32
    assert all(torch.equal(value, teacher_state[key]) for key, value in teacher.state_dict().items())


def test_from_step_distils_on_the_steps_after_it_alone(shapes, edge_data):
    """The rows of loop iterations >= from_step, and a distillation that sees those alone: the same student as
    one on the cut data, another than one on every step."""
    late = edge_data.from_step(STEPS - 2)
    rows = (edge_data.step >= STEPS - 2).nonzero().flatten()
    assert len(late) == 2 * 2 * len(PROMPTS) and late.step.tolist() == edge_data.step[rows].tolist()
    assert torch.equal(late.inputs.sample, edge_data.inputs.sample[rows])
    assert torch.equal(late.inputs.timestep, edge_data.inputs.timestep[rows])
    assert edge_data.from_step(0) is edge_data
    with pytest.raises(ValueError, match="from_step"):
        edge_data.from_step(STEPS)

    teacher = dequantize_model(shapes.edge.pipe.unet)
    probe = edge_data.batch([0])
    pruned, _ = prune_channels(teacher, 0.6, probe, significance=measure_significance(teacher, probe))

    def distilled(data: TeacherTrajectories, from_step: int) -> dict[str, torch.Tensor]:
        student = copy.deepcopy(pruned)
        config = DistillConfig(steps=3, batch_size=4, lr=1e-3, warmup_steps=0, feature_weight=0, from_step=from_step)
        distill_unet(teacher, student, data, config)
        return student.state_dict()

    on_late = distilled(edge_data, STEPS - 2)
    assert all(torch.equal(value, on_late[key]) for key, value in distilled(late, 0).items())
    assert not all(torch.equal(value, on_late[key]) for key, value in distilled(edge_data, 0).items())


def test_sdxl_trajectories_carry_added_conditions_and_train_a_block_removed_student():
    pipe = load_pipeline(preset("tiny-sdxl").cloud, torch.float32)
    data = collect_trajectories(pipe, ["a cat", "a dog"], steps=2, guidance_scale=5.0, seed=0)
    added = data.inputs.added_cond_kwargs
    assert set(added) == {"text_embeds", "time_ids"} and all(len(value) == len(data) == 8 for value in added.values())
    student = remove_blocks(pipe.unet, layers_per_block=1)
    config = DistillConfig(steps=10, batch_size=4, lr=1e-3, warmup_steps=1)
    blocks = matching_blocks(pipe.unet, student, data.inputs)
    assert "mid_block" not in blocks and len(blocks) == len(feature_blocks(student))  # BK-SDM: no mid block
    with torch.no_grad():
        before = distillation_losses(pipe.unet, student, data.inputs, blocks, config)["loss"].item()
    stats = distill_unet(pipe.unet, student, data, config)
    with torch.no_grad():
        after = distillation_losses(pipe.unet, student, data.inputs, blocks, config)["loss"].item()
    assert stats["blocks"] == blocks and after < 0.8 * before


def test_feature_distillation_needs_a_block_of_the_teachers_shape(shapes, edge_data):
    """The shapes pair's two UNets have different widths: no block output matches."""
    teacher, student = shapes.cloud.pipe.unet, dequantize_model(shapes.edge.pipe.unet)
    assert matching_blocks(teacher, student, edge_data.batch([0])) == []
    with pytest.raises(ValueError, match="feature_weight"):
        distill_unet(teacher, student, edge_data, DistillConfig(steps=1, batch_size=2))
    stats = distill_unet(teacher, student, edge_data, DistillConfig(steps=2, batch_size=2, feature_weight=0))
    assert stats["blocks"] == [] and stats["final_feature_loss"] == 0 and stats["final_output_loss"] > 0


@pytest.mark.parametrize(
    "field, value",
    [
        ("steps", 0),
        ("steps", True),
        ("batch_size", 2.0),
        ("lr", 0),
        ("lr", math.nan),
        ("warmup_steps", -1),
        ("from_step", -1),
        ("from_step", 1.5),
        ("feature_weight", -1.0),
        ("output_weight", math.inf),
        ("seed", "0"),
    ],
)
def test_bad_distill_config_is_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        DistillConfig(**{field: value})


def test_distill_config_needs_a_loss():
    with pytest.raises(ValueError, match="output_weight and feature_weight"):
        DistillConfig(output_weight=0, feature_weight=0)


@pytest.mark.parametrize(
    "field, value",
    [
        ("steps", 0),
        ("batch_size", -2),
        ("lr", -1e-3),
        ("warmup_steps", 1.5),
        ("seed", None),
        ("encoder", 1),
        ("latent_noise", -0.1),
    ],
)
def test_bad_tiny_vae_config_is_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TinyVaeConfig(**{field: value})


def small_tiny(seed: int = 0) -> AutoencoderTiny:
    """A TAESD-architecture autoencoder for the shapes VAE (4x), narrower than the shipped one."""
    torch.manual_seed(seed)
    return AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8),
        decoder_block_out_channels=(16, 16, 16),
        num_encoder_blocks=(1, 1, 1),
        num_decoder_blocks=(1, 1, 1),
        latent_channels=4,
    )


@pytest.mark.parametrize("encoder", [False, True])
def test_tiny_vae_learns_the_vae_through_the_engines_decode(shapes, encoder):
    cloud = shapes.cloud
    # The cloud's own generations: latents the VAE decodes and encodes back (the compressed edge's, five steps
    # from noise, are not yet images the VAE's encoder returns to).
    latents = collect_trajectories(cloud.pipe, PROMPTS, STEPS, GUIDANCE, seed=0).final_latents
    tiny = small_tiny()
    encoder_state = {key: value.clone() for key, value in tiny.encoder.state_dict().items()}
    edge = Denoiser(type(cloud.pipe).from_pipe(cloud.pipe), "distilled tiny VAE")
    edge.pipe.vae = tiny
    images = cloud.decode(latents).clamp(-1, 1)

    def errors() -> tuple[float, float]:
        with torch.no_grad():
            decoded = edge.decode(latents)
            assert decoded.shape == images.shape == (len(latents), 3, 64, 64)
            return (decoded - images).abs().mean().item(), (
                tiny.encode(images).latents - latents
            ).square().mean().item()

    decoder_before, encoder_before = errors()
    config = TinyVaeConfig(steps=120, batch_size=4, lr=3e-3, warmup_steps=3, encoder=encoder)
    trained, stats = distill_tiny_vae(cloud.pipe.vae, latents, config, tiny=tiny)
    decoder_after, encoder_after = errors()

    assert trained is tiny and not tiny.training
    assert decoder_after < 0.3 * decoder_before
    assert stats["final_loss"] < 0.5 * stats["first_loss"]
    if encoder:
        assert encoder_after < 0.6 * encoder_before and "final_encoder_loss" in stats
    else:
        assert all(torch.equal(value, encoder_state[key]) for key, value in tiny.encoder.state_dict().items())


def test_default_tiny_vae_matches_the_vae_and_a_wrong_one_is_refused(shapes, edge_data):
    vae = shapes.cloud.pipe.vae
    with torch.no_grad():
        assert default_tiny(vae).decode(edge_data.final_latents[:1]).sample.shape == (
            1,
            3,
            64,
            64,
        )  # 4x, not TAESD's 8x
    eight_times = AutoencoderTiny(
        encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4, latent_channels=4
    )
    with pytest.raises(ValueError, match="decodes"):
        distill_tiny_vae(vae, edge_data.final_latents, TinyVaeConfig(steps=1), tiny=eight_times)
    with pytest.raises(ValueError, match="latent channels"):
        distill_tiny_vae(vae, edge_data.final_latents, TinyVaeConfig(steps=1), tiny=AutoencoderTiny(latent_channels=3))
