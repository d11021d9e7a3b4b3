"""Shared fixtures: the tiny SD 1.x and SDXL pairs and the shapes pair, saved as diffusers folders and loaded through
the same code as a real checkpoint."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from diffusers import DiffusionPipeline, EulerDiscreteScheduler

from hybrid_sd.pairs import ModelPair, load_pair, preset
from hybrid_sd.presets import PairSpec
from tests.serving import LoopThread

# Any skip but those marked may_skip fails the run (skip_policy.py).
pytest_plugins = ["skip_policy"]

# The random-weight tiny pairs of both architectures, and the trained shapes pair shipped in the package.
FAMILIES = {"sd1": "tiny-sd1", "sdxl": "tiny-sdxl", "shapes": "shapes"}


@pytest.fixture(scope="session", autouse=True)
def model_home(tmp_path_factory) -> str:
    """Build the tiny pairs once per session, in a folder of the test run's own."""
    home = str(tmp_path_factory.mktemp("hybrid-sd-home"))
    previous = os.environ.get("HYBRID_SD_HOME")
    os.environ["HYBRID_SD_HOME"] = home
    yield home
    if previous is None:
        os.environ.pop("HYBRID_SD_HOME")
    else:
        os.environ["HYBRID_SD_HOME"] = previous


@pytest.fixture(scope="session")
def pair_specs(model_home) -> dict[str, PairSpec]:
    return {family: preset(name) for family, name in FAMILIES.items()}


@pytest.fixture(scope="session")
def pairs(pair_specs) -> dict[str, ModelPair]:
    return {family: load_pair(spec) for family, spec in pair_specs.items()}


OTHER_GUIDANCE_SCALE = 3.0
OTHER_TIMESTEP_POWER = 1.5


@pytest.fixture(scope="session")
def other_defaults_spec(pair_specs, tmp_path_factory) -> PairSpec:
    """The tiny SD 1.x pair with an edge whose own size (32 px, the cloud's is 64) and scheduler (Euler,
    the cloud's is PLMS) differ from the cloud's, and a guidance scale (3, not 7.5) and timestep spacing (power
    1.5) of its own: what a request leaves unset must resolve alike on every path."""
    spec = pair_specs["sd1"]
    edge = DiffusionPipeline.from_pretrained(spec.edge)
    edge.unet.register_to_config(sample_size=edge.unet.config.sample_size // 2)
    edge.scheduler = EulerDiscreteScheduler.from_config(edge.scheduler.config)
    folder = tmp_path_factory.mktemp("other-defaults-edge")
    edge.save_pretrained(folder)
    return dataclasses.replace(
        spec, edge=str(folder), guidance_scale=OTHER_GUIDANCE_SCALE, timestep_power=OTHER_TIMESTEP_POWER
    )


def load_reference(path: str) -> DiffusionPipeline:
    """diffusers' own pipeline for a tiny model folder, on the CPU in float32."""
    return DiffusionPipeline.from_pretrained(path, safety_checker=None, dtype=torch.float32)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread than synchronising several (and never wait on a busy core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def loop():
    """An event loop on a thread of its own, for the servers a module's tests run (tests/serving.py)."""
    thread = LoopThread()
    yield thread
    thread.close()
