"""``hybrid-sd train-shapes`` resumes: a stage stopped part-way continues from its checkpoint to the weights
an uninterrupted run reaches, finished stages are loaded rather than rerun, and a checkpoint folder is
only continued with the settings it was started with."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline
from safetensors.torch import load_file

from hybrid_sd.cli import main
from hybrid_sd.shapes_pair import pair_models
from hybrid_sd.shapes_pair.checkpoints import Checkpoints
from hybrid_sd.shapes_pair.train_config import SCHEDULES, TrainConfig
from hybrid_sd.shapes_pair.train_pair import LatentBatches, Run, train
from hybrid_sd.shapes_pair.training_loop import batch_at, optimizer_with_schedule, run_steps, step_generator

TINY = TrainConfig(
    images=64,
    batch_size=8,
    vae_crop_steps=2,
    vae_full_steps=1,
    large_steps=3,
    small_steps=2,
    tiny_steps=2,
    warmup_steps=1,
)
STEPS, STOP_AT = 8, 5


class StopTraining(Exception):
    """What stops the first run part-way, as a killed process would."""


def regression_stage(checkpoint, stop_at: int | None = None):
    """A small MLP fitted with EMA through ``run_steps``; stops before step ``stop_at``. Returns the module."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    parameters = list(model.parameters())
    optimizer, schedule = optimizer_with_schedule(parameters, 1e-2, STEPS, warmup=2)
    from diffusers.training_utils import EMAModel

    ema = EMAModel(parameters, decay=0.9)

    def loss_fn(step: int) -> torch.Tensor:
        if step == stop_at:
            raise StopTraining
        x = torch.randn(8, 4, generator=step_generator(0, step))
        return ((model(x) - x.sum(1, keepdim=True)) ** 2).mean()

    run_steps("fit", STEPS, loss_fn, optimizer, schedule, ema, parameters, model, checkpoint)
    return model


def started(folder) -> Checkpoints:
    """Checkpoints in ``folder`` at every step, the folder claimed for a run."""
    checkpoints = Checkpoints(folder, every_s=0)
    checkpoints.start(TINY, resume=False)
    return checkpoints


def test_a_stage_stopped_part_way_resumes_to_the_uninterrupted_weights(tmp_path):
    uninterrupted = regression_stage(started(tmp_path / "a").stage("fit"))
    checkpoint = started(tmp_path / "b").stage("fit")
    with pytest.raises(StopTraining):
        regression_stage(checkpoint, stop_at=STOP_AT)
    assert torch.load(checkpoint.path, weights_only=True)["step"] == STOP_AT
    resumed = regression_stage(checkpoint)
    for name, value in uninterrupted.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert torch.load(checkpoint.path, weights_only=True)["step"] == STEPS


def test_batches_are_epochs_of_permutations_fixed_by_the_step():
    indices = torch.cat([batch_at(20, 4, step, seed=3) for step in range(5)])
    assert sorted(indices.tolist()) == list(range(20))  # one epoch: every item once
    assert not torch.equal(batch_at(20, 4, 5, seed=3), batch_at(20, 4, 0, seed=3))  # the next: a new order
    assert torch.equal(batch_at(20, 4, 7, seed=3), batch_at(20, 4, 7, seed=3))


def test_a_resumed_run_loads_finished_stages_and_retrains_the_rest_identically(tmp_path):
    checkpoints = Checkpoints(tmp_path / "checkpoints", every_s=0)
    record = train(tmp_path / "first", TINY, checkpoints=checkpoints)
    assert {name: stage.get("samples") for name, stage in record["stages"].items()} == {
        "render": None,
        "vae": 24,
        "large": 24,
        "small": 16,
        "tiny": 16,
    }
    for stage in ("small", "tiny"):  # as if the run had stopped after the large stage
        (checkpoints.folder / f"{stage}.pt").unlink()
    train(tmp_path / "resumed", TINY, checkpoints=checkpoints, resume=True)
    for part in ("cloud/unet", "cloud/text_encoder", "cloud/vae", "edge-unet", "edge-vae"):
        (first,) = (tmp_path / "first" / part).glob("*.safetensors")
        (again,) = (tmp_path / "resumed" / part).glob("*.safetensors")
        first_weights, again_weights = load_file(first), load_file(again)
        assert all(torch.equal(first_weights[name], again_weights[name]) for name in first_weights), part


def test_a_checkpoint_folder_is_only_continued_with_its_own_settings(tmp_path):
    checkpoints = Checkpoints(tmp_path / "checkpoints")
    checkpoints.start(TINY, resume=False)
    with pytest.raises(ValueError, match="--checkpoints: .* holds a run already; pass --resume"):
        checkpoints.start(TINY, resume=False)
    with pytest.raises(ValueError, match=r"--resume: .* other settings: \['large_lr'\]"):
        checkpoints.start(dataclasses.replace(TINY, large_lr=1e-3), resume=True)
    checkpoints.start(TINY, resume=True)
    # A run started before a setting existed used its default: it resumes with that, not with another value.
    run_file = tmp_path / "checkpoints" / "run.json"
    started = json.loads(run_file.read_text())
    del started["text_encoder"]
    run_file.write_text(json.dumps(started))
    checkpoints.start(TINY, resume=True)
    with pytest.raises(ValueError, match=r"other settings: \['text_encoder'\]"):
        checkpoints.start(dataclasses.replace(TINY, text_encoder="t5"), resume=True)
    with pytest.raises(ValueError, match="--resume: needs --checkpoints"):
        Checkpoints(None).start(TINY, resume=True)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--device", "cuda:7"], "cuda:7"),
        (["--checkpoint-minutes", "0"], "--checkpoint-minutes"),
        (["--precision", "fp8"], "--precision"),
        (["--cloud-only"], "--sweep-out: not with --cloud-only"),
    ],
)
def test_train_shapes_refuses_bad_run_options_naming_them(tmp_path, capsys, flags, message):
    command = ["train-shapes", "--out", str(tmp_path / "pair"), "--sweep-out", str(tmp_path / "sweep"), *flags]
    try:
        code = main(command)
    except SystemExit as exit:  # argparse's own refusal of a choice
        code = exit.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "pair" / "training.json").exists()


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_the_schedule_decides_the_target_and_the_weights_and_is_saved_with_the_pair(schedule, tmp_path):
    """Zero terminal SNR: the last timestep holds no signal, the UNet predicts v and that step keeps weight 1;
    Stable Diffusion's: some signal is left, the UNet predicts the noise. Either way the latents are what the
    noisy batch and the target give back, and the pair's sampler carries the schedule."""
    run = Run(dataclasses.replace(TINY, schedule=schedule), torch.device("cpu"), Checkpoints())
    means = torch.randn(16, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ids = torch.zeros(16, 32, dtype=torch.long)
    data = LatentBatches(run, means, torch.zeros_like(means), ids, ids[:1], scaling_factor=1.0, seed=0)
    noisy, timesteps, _, target = data.at(0)
    alpha = data.noise_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    zero_snr = SCHEDULES[schedule].get("rescale_betas_zero_snr", False)
    if zero_snr:
        latents = alpha.sqrt() * noisy - (1 - alpha).sqrt() * target
    else:
        latents = (noisy - (1 - alpha).sqrt() * target) / alpha.sqrt()
    torch.testing.assert_close(latents, means[batch_at(16, TINY.batch_size, 0, 0)], atol=1e-4, rtol=1e-4)
    last_alpha = data.noise_scheduler.alphas_cumprod[-1].item()
    weights = data.weights(torch.tensor([0, 999]))
    assert (last_alpha == 0.0) == zero_snr and weights[1].item() == 1.0
    assert 0 < weights[0].item() < 0.01  # the least noisy step (SNR 1175 or more): Min-SNR-5 caps its weight

    out = tmp_path / "trained"
    flags = ["--images", "64", "--batch-size", "8", "--vae-crop-steps", "1", "--vae-full-steps", "1"]
    flags += ["--large-steps", "1", "--warmup-steps", "1", "--schedule", schedule]
    assert main(["train-shapes", "--cloud-only", "--out", str(out), *flags]) == 0
    saved = DPMSolverMultistepScheduler.from_pretrained(out / "cloud" / "scheduler").config
    assert {name: saved[name] for name in SCHEDULES[schedule]} == SCHEDULES[schedule]


def test_the_cosine_schedule_keeps_more_signal_where_the_switch_step_falls():
    """At t = 600, where a 20-step trailing sampler hands over after 8 steps, the cosine schedule keeps SNR
    0.52 against Stable Diffusion's 0.15 (both rescaled to zero terminal SNR), and both end at zero."""
    snr = {}
    for name in ("zero-terminal-snr", "cosine-zero-terminal-snr"):
        alphas = DDPMScheduler(**SCHEDULES[name]).alphas_cumprod
        snr[name] = alphas / (1 - alphas)
        assert snr[name][-1] == 0
    assert snr["cosine-zero-terminal-snr"][600] > 3 * snr["zero-terminal-snr"][600]


@pytest.mark.parametrize(("kind", "sees_what_follows"), [("clip", False), ("t5", True)])
def test_the_text_encoder_kind_decides_whether_a_word_sees_the_relation_after_it(kind, sees_what_follows, tmp_path):
    """CLIP's encoder is causal: the first shape's words encode the same whatever relation follows them. T5's
    is bidirectional: they encode the relation too. Either way the pair loads as a StableDiffusionPipeline."""
    out = tmp_path / "trained"
    flags = ["--images", "64", "--batch-size", "8", "--vae-crop-steps", "1", "--vae-full-steps", "1"]
    flags += ["--large-steps", "1", "--warmup-steps", "1", "--text-encoder", kind]
    assert main(["train-shapes", "--cloud-only", "--out", str(out), *flags]) == 0
    pipeline = StableDiffusionPipeline.from_pretrained(out / "cloud", safety_checker=None, dtype=torch.float32)
    assert type(pipeline.text_encoder).__name__ == {"clip": "CLIPTextModel", "t5": "T5EncoderModel"}[kind]
    embeddings = {
        relation: pipeline.encode_prompt(f"a large red circle {relation} a small blue square", "cpu", 1, False)[0]
        for relation in ("above", "below")
    }
    first_shape = slice(1, 5)  # BOS, then "a large red circle"
    same = torch.equal(embeddings["above"][0, first_shape], embeddings["below"][0, first_shape])
    assert same != sees_what_follows
    assert not torch.equal(embeddings["above"][0, 5], embeddings["below"][0, 5])  # the relation's own token


@pytest.mark.parametrize("frozen", [True, False])
def test_a_frozen_text_encoder_ships_as_initialised(frozen, tmp_path):
    """--freeze-text-encoder trains the large UNet alone: the pair's text encoder is the seeded initialisation,
    weight for weight; without it the encoder trains with the UNet."""
    out = tmp_path / "trained"
    flags = ["--images", "64", "--batch-size", "8", "--vae-crop-steps", "1", "--vae-full-steps", "1"]
    flags += ["--large-steps", "2", "--warmup-steps", "1"] + (["--freeze-text-encoder"] if frozen else [])
    assert main(["train-shapes", "--cloud-only", "--out", str(out), *flags]) == 0
    tokenizer = pair_models.build_tokenizer()
    torch.manual_seed(TrainConfig.seed + 1)  # as train() seeds the encoder and the large UNet
    initial = pair_models.build_text_encoder("clip", len(tokenizer)).to(torch.float16).state_dict()
    trained = load_file(out / "cloud" / "text_encoder" / "model.safetensors")
    assert all(torch.equal(trained[name], initial[name]) for name in trained) == frozen
    record = json.loads((out / "training.json").read_text())
    assert record["config"]["freeze_text_encoder"] == frozen
