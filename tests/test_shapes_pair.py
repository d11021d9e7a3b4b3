"""The shipped shapes pair: it is the default, it is small, its card is its measurements, and its quality shows
the hybrid trade-off: large alone binds the captions, the edge alone is clearly worse, and the hybrid at 40%
recovers most of the gap."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import re
import shutil
import subprocess
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from hybrid_sd.bundle import read_bundle
from hybrid_sd.cli import main
from hybrid_sd.pairs import embedded_spec, load_pair, preset
from hybrid_sd.pipeline import HybridPipeline
from hybrid_sd.presets import DEFAULT_PAIR, EMBEDDED_PRESETS, PairSpec
from hybrid_sd.request import GenerationRequest
from hybrid_sd.shapes.adherence import score
from hybrid_sd.shapes_pair.evaluate import HeldoutSet, gap_recovered
from hybrid_sd.shapes_pair.model_card import write_model_card

PAIR_DIR = EMBEDDED_PRESETS["shapes"]
README = Path(__file__).parent.parent / "README.md"
MAKE_PAIR = Path(__file__).parent.parent / "scripts" / "make_shapes_pair.sh"
STEPS = 20
HYBRID_K = round(0.4 * STEPS)
PROMPTS = 64  # the committed evaluation's held-out captions (seed 0, DPM-Solver++, the pair's guidance: 5)
# Measured on the development machine (evaluation.json, the model card), every k decoded by the edge's tiny
# decoder, at the pair's timestep_power 1.5: overall adherence large alone 0.925 (colour 0.891, count 0.947),
# edge alone 0.700, hybrid at k = 8 0.899; FD 22.7, 31.6 and 24.4 (a second real sample: 6.0).
LARGE_AT_LEAST = {"overall": 0.85, "color": 0.80, "count": 0.90}  # issue 12's bar
EDGE_ADHERENCE_BELOW_LARGE_BY = 0.15
HYBRID_GAP_RECOVERED_AT_LEAST = 0.7  # in overall adherence and in FD
README_SEEDS, README_FULLY_RIGHT_AT_LEAST = range(10), 8  # issue 12's bar; measured: 8
# Other CPUs round differently; the images, and so the scores, may move a little.
ADHERENCE_TOLERANCE, FD_TOLERANCE = 0.03, 2.0


def test_shapes_is_the_default_pair_and_loads_with_its_latent_space(pairs):
    assert DEFAULT_PAIR == "shapes"
    pair = pairs["shapes"]
    assert pair.cloud.latent_space == pair.edge.latent_space == preset("shapes").edge_vae_latent_space
    assert pair.cloud.latent_space.startswith("custom-")
    assert type(pair.edge.pipe.vae).__name__ == "AutoencoderTiny"
    assert pair.cloud.default_guidance_scale == pair.edge.default_guidance_scale == 5.0  # not SD's 7.5
    assert pair.cloud.default_size == 64
    assert pair.cloud.default_timestep_power == pair.edge.default_timestep_power == 1.5  # its serving.json
    layers = {type(module).__name__ for module in pair.edge.pipe.unet.modules()}
    assert {"OneDnnLinear", "OneDnnConv2d"} & layers, layers  # served through the int8 layers where they pay


def test_the_edge_is_the_compress_chain_on_the_cloud_unet_at_a_fifth_of_its_macs():
    bundle = read_bundle(PAIR_DIR / "edge")
    assert [step["action"] for step in bundle.history] == ["prune", "distill", "distill", "quantize", "tiny-vae"]
    prune, distill, late = bundle.history[:3]
    assert prune["metric"] == "macs" and prune["budget"] <= 0.2 and prune["widths"]
    assert distill["teacher"] == late["teacher"] == "cloud" and all(step["seconds"] > 0 for step in bundle.history)
    assert distill["from_step"] == 0 and late["from_step"] == HYBRID_K  # then on the steps a hybrid leaves it
    costs = json.loads((PAIR_DIR / "evaluation.json").read_text())["costs"]
    assert costs["large_unet"]["flops"] / costs["small_unet"]["flops"] >= 5


def test_shipped_weights_fit_the_budget():
    total = sum(path.stat().st_size for path in PAIR_DIR.rglob("*.safetensors"))
    assert 5e6 < total <= 25e6, total


def test_model_card_is_written_from_the_committed_measurements(tmp_path):
    copy = tmp_path / "pair"
    copy.mkdir()
    for name in ("training.json", "evaluation.json"):
        shutil.copy(PAIR_DIR / name, copy / name)
    assert write_model_card(copy).read_text() == (PAIR_DIR / "README.md").read_text()


_worker_pipeline: HybridPipeline | None = None


def _start_worker() -> None:
    """A generating process: the shipped pair on one thread, so that no operation waits on a busy core."""
    global _worker_pipeline
    torch.set_num_threads(1)
    _worker_pipeline = HybridPipeline.from_pair("shapes")


def _generate(job: tuple[str, int]) -> Image.Image:
    caption, k = job
    return _worker_pipeline(GenerationRequest(caption, switch_step=k, num_inference_steps=STEPS, seed=0)).image


@pytest.fixture(scope="module")
def measured() -> dict[int, dict[str, float]]:
    """Overall adherence and FD of the large model alone, the small one alone and the hybrid at 40%.

    The 192 images come from one single-threaded process per core: requests this small gain little from
    intra-op threads, which stall whenever another process holds a core (seconds per image in a busy suite).
    """
    heldout = HeldoutSet(PROMPTS)
    ks = (0, HYBRID_K, STEPS)
    jobs = [(caption, k) for k in ks for caption in heldout.captions]
    spawn = multiprocessing.get_context("spawn")  # a clean process: no threads or servers forked mid-state
    with ProcessPoolExecutor(len(os.sched_getaffinity(0)), spawn, initializer=_start_worker) as pool:
        images = list(pool.map(_generate, jobs, chunksize=8))
    results = {}
    for index, k in enumerate(ks):
        scores = heldout.score(images[index * PROMPTS : (index + 1) * PROMPTS])
        results[k] = {"adherence": scores["adherence"]["overall"], "fd": scores["frechet_distance"]}
        results[k]["attributes"] = scores["adherence"]
    return results


def test_the_engine_reproduces_the_committed_evaluation(measured):
    committed = json.loads((PAIR_DIR / "evaluation.json").read_text())["switch_steps"]
    for k, values in measured.items():
        assert abs(values["adherence"] - committed[str(k)]["adherence"]["overall"]) <= ADHERENCE_TOLERANCE, k
        assert abs(values["fd"] - committed[str(k)]["frechet_distance"]) <= FD_TOLERANCE, k


def test_large_model_alone_binds_the_captions(measured):
    attributes = measured[STEPS]["attributes"]
    assert all(attributes[name] >= bar for name, bar in LARGE_AT_LEAST.items()), attributes


def test_edge_model_alone_is_clearly_worse(measured):
    edge, large = measured[0], measured[STEPS]
    assert edge["adherence"] <= large["adherence"] - EDGE_ADHERENCE_BELOW_LARGE_BY, measured
    assert edge["fd"] > large["fd"], measured


@pytest.mark.parametrize("metric", ["adherence", "fd"])
def test_hybrid_at_40_percent_recovers_most_of_the_gap(measured, metric):
    edge, hybrid, large = (measured[k][metric] for k in (0, HYBRID_K, STEPS))
    assert (hybrid - edge) / (large - edge) >= HYBRID_GAP_RECOVERED_AT_LEAST, measured  # FD: both negative


def test_the_readme_first_command_draws_what_it_says(pairs):
    """The README's first command's prompt at the default request (25 steps, switch 10, the pair's guidance and
    timestep power; in-process: the served path gives the same image, tests/test_serving.py) is right in every
    attribute by the scorer for at least 8 of seeds 0-9 (issue 12)."""
    prompt = re.search(r'cluster up --generate "([^"]+)"', README.read_text()).group(1)
    pipeline = HybridPipeline(pairs["shapes"])
    scores = [score(pipeline(GenerationRequest(prompt, seed=seed)).image, prompt) for seed in README_SEEDS]
    assert sum(found.overall == 1.0 for found in scores) >= README_FULLY_RIGHT_AT_LEAST, scores


def test_train_shapes_command_writes_a_pair_that_loads_and_its_card(tmp_path):
    out, sweep = tmp_path / "pair", tmp_path / "sweep"
    steps = ["--vae-crop-steps", "2", "--vae-full-steps", "1", "--large-steps", "2", "--small-steps", "2"]
    steps += ["--tiny-steps", "2", "--warmup-steps", "1"]
    code = main(
        ["train-shapes", "--out", str(out), "--sweep-out", str(sweep), "--images", "64", "--batch-size", "8"]
        + steps
        + ["--eval-prompts", "2"]
    )
    assert code == 0
    pair = load_pair(embedded_spec(out))
    result = HybridPipeline(pair)(GenerationRequest("a small red circle", num_inference_steps=4, seed=1))
    assert result.image.size == (64, 64)
    for path in out.rglob("*.safetensors"):  # the shipped pair's format: float16, as the card says
        with safe_open(path, "pt") as weights:
            assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"F16"}, path

    training = json.loads((out / "training.json").read_text())
    assert {name: stage.get("steps") for name, stage in training["stages"].items()} == {
        "render": None,
        "vae": 3,
        "large": 2,
        "small": 2,
        "tiny": 2,
    }
    assert training["config"]["images"] == 64 and training["config"]["batch_size"] == 8

    ks = [0, 4, 8, 12, 16, 20]
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["prompts"] == 2 and sorted(int(k) for k in evaluation["switch_steps"]) == ks
    with open(sweep / "results.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert sorted((int(row["prompt_index"]), int(row["switch_step"])) for row in rows) == [
        (index, k) for index in range(2) for k in ks
    ]
    card = (out / "README.md").read_text()
    assert "train-shapes" in card
    for k in ks:
        entry, at_k = evaluation["switch_steps"][str(k)], [row for row in rows if int(row["switch_step"]) == k]
        assert entry["cloud_unet_evaluations"] == k == int(at_k[0]["cloud_unet_evaluations"])
        overall = entry["adherence"]["overall"]
        assert overall == pytest.approx(sum(float(row["adherence"]) for row in at_k) / 2) and 0 <= overall <= 1
        assert entry["frechet_distance"] >= 0
        line = next(line for line in card.splitlines() if line.startswith(f"| {k} | "))
        assert f"| {overall:.3f} | {entry['frechet_distance']:.1f} | {k} |" in line, line
    for name in ("cloud", "edge-unet", "edge-vae"):
        assert evaluation["bytes"][name] == sum(path.stat().st_size for path in (out / name).rglob("*.safetensors"))
    with Image.open(sweep / "grid.png") as grid:
        assert grid.size == (32 + 64 * len(ks), 16 + 64 * 2)
    with Image.open(sweep / "adherence_fd_vs_k.png") as plot:
        assert plot.size == (1000, 400)


def test_a_cloud_only_run_writes_the_cloud_model_and_its_record_alone(tmp_path):
    out = tmp_path / "trained"
    steps = ["--vae-crop-steps", "2", "--vae-full-steps", "1", "--large-steps", "2", "--warmup-steps", "1"]
    assert main(["train-shapes", "--cloud-only", "--out", str(out), "--images", "64", "--batch-size", "8", *steps]) == 0
    assert sorted(path.name for path in out.iterdir()) == ["cloud", "training.json"]
    training = json.loads((out / "training.json").read_text())
    assert list(training["stages"]) == ["render", "vae", "large"] and training["stages"]["large"]["steps"] == 2
    pipeline = HybridPipeline.from_pair(PairSpec(str(out / "cloud"), str(out / "cloud")))  # what compress starts from
    assert pipeline(GenerationRequest("a small red circle", num_inference_steps=2, seed=1)).image.size == (64, 64)


@pytest.mark.may_skip
@pytest.mark.skipif(
    not os.environ.get("HYBRID_SD_RETRAIN"),
    reason="remakes the pair (about four and a half hours on 2 CPU cores); set HYBRID_SD_RETRAIN=1",
)
def test_remaking_the_pair_reproduces_the_committed_quality(tmp_path):
    subprocess.run(["bash", str(MAKE_PAIR), str(tmp_path)], check=True)
    committed = json.loads((PAIR_DIR / "evaluation.json").read_text())
    remade = json.loads((tmp_path / "pair" / "evaluation.json").read_text())
    for k, entry in committed["switch_steps"].items():
        assert abs(remade["switch_steps"][k]["adherence"]["overall"] - entry["adherence"]["overall"]) <= 0.06, k
    assert abs(gap_recovered(remade, 8) - gap_recovered(committed, 8)) <= 0.2
