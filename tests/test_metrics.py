"""Quality metrics for real checkpoints, on small random models the tests build and save themselves."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from hybrid_sd.metrics import ClipScore, Lpips, frechet_inception_distance, psnr, ssim
from hybrid_sd.metrics.inception import FIDInceptionV3
from hybrid_sd.tiny_models import build_tokenizer

SIZE = 64


def random_images(count: int, seed: int) -> list[Image.Image]:
    """Smooth random RGB images (upsampled noise), so that noise added later changes their structure."""
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((SIZE, SIZE), Image.BILINEAR)
        for _ in range(count)
    ]


def add_noise(images: list[Image.Image], std: float, seed: int = 1) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    noisy = [np.asarray(image, dtype=np.float64) + rng.normal(0, std, (SIZE, SIZE, 3)) for image in images]
    return [Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)) for array in noisy]


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory):
    """A random Inception whose batch-norm statistics are set from random images, so that its features
    have unit scale (a freshly initialised one gives features near 0 and FIDs near float precision)."""
    torch.manual_seed(0)
    network = FIDInceptionV3()
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a cumulative average over the calibration batch
    torch.nn.Module.train(network, True)  # FIDInceptionV3.train() itself stays in eval mode
    with torch.no_grad():
        network(torch.randint(0, 256, (8, 3, SIZE, SIZE), dtype=torch.uint8))
    path = tmp_path_factory.mktemp("fid") / "inception.pth"
    torch.save(network.state_dict(), path)
    return path


def test_fid_is_zero_for_one_set_and_grows_with_noise(fid_weights):
    # 192 features: the 2048 of standard FID cost ~20 s per FID here (eigenvalues of a 2048x2048 matrix).
    real = random_images(6, seed=0)
    same = frechet_inception_distance(real, real, fid_weights, feature=192)
    slight, heavy = (frechet_inception_distance(real, add_noise(real, std), fid_weights, 192) for std in (8, 64))
    assert abs(same) < 1e-3 * slight
    assert 0 < slight < heavy


def test_fid_network_gives_the_requested_features(fid_weights):
    images = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8)
    for feature in (64, 192, 768, 2048):
        assert FIDInceptionV3.from_file(fid_weights, feature)(images).shape == (2, feature)
    with pytest.raises(ValueError, match="feature must be one of"):
        FIDInceptionV3(feature=1000)


def test_fid_refuses_missing_or_foreign_weights(tmp_path):
    images = random_images(2, seed=0)
    with pytest.raises(ValueError, match="fid_weights: no file at"):
        frechet_inception_distance(images, images, tmp_path / "missing.pth")
    foreign = tmp_path / "foreign.pth"
    torch.save({"weight": torch.zeros(1)}, foreign)
    with pytest.raises(ValueError, match="fid_weights: .* does not fit"):
        frechet_inception_distance(images, images, foreign)


@pytest.fixture(scope="module")
def lpips_weights(tmp_path_factory):
    """A random AlexNet in torchvision's checkpoint layout (``features.*`` and ``classifier.*``)."""
    from hybrid_sd.metrics.lpips import alexnet_features

    torch.manual_seed(0)
    state = {f"features.{key}": value for key, value in alexnet_features().state_dict().items()}
    state["classifier.1.weight"] = torch.zeros(4096, 9216)  # ignored, as in the real file
    path = tmp_path_factory.mktemp("lpips") / "alexnet.pth"
    torch.save(state, path)
    return path


def test_lpips_is_zero_for_identical_images_and_grows_with_noise(lpips_weights):
    lpips = Lpips.from_file(lpips_weights)
    images = random_images(3, seed=0)
    assert lpips.score(images, images) == [0.0, 0.0, 0.0]
    slight, heavy = (lpips.score(add_noise(images, std), images) for std in (8, 64))
    assert all(0 < low < high for low, high in zip(slight, heavy, strict=True))


def test_lpips_refuses_a_missing_file(tmp_path):
    with pytest.raises(ValueError, match="lpips_weights: no file at"):
        Lpips.from_file(tmp_path / "alexnet.pth")


def test_psnr_and_ssim_against_a_reference():
    reference = random_images(1, seed=0)[0]
    assert psnr(reference, reference) == math.inf
    assert ssim(reference, reference) == pytest.approx(1.0)
    slight, heavy = (add_noise([reference], std)[0] for std in (8, 64))
    assert psnr(slight, reference) > psnr(heavy, reference) > 0
    assert 1.0 > ssim(slight, reference) > ssim(heavy, reference)
    # Additive Gaussian noise of std s gives PSNR about 20 log10(255 / s) (a little more: clipping).
    assert psnr(slight, reference) == pytest.approx(20 * math.log10(255 / 8), abs=0.5)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A random tiny CLIP model with its tokenizer and image processor, saved as transformers saves one."""
    tokenizer = build_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_clip_score_matches_the_model_features(clip_folder):
    scorer = ClipScore(clip_folder)
    images, prompts = random_images(2, seed=0), ["a large red circle", "a small blue square above a triangle"]
    scores = scorer(images, prompts)
    model, processor = CLIPModel.from_pretrained(clip_folder), CLIPProcessor.from_pretrained(clip_folder)
    for image, prompt, score in zip(images, prompts, scores, strict=True):
        with torch.no_grad():
            image_embeds = model.get_image_features(**processor(images=image, return_tensors="pt")).pooler_output
            text_embeds = model.get_text_features(**processor(text=prompt, return_tensors="pt")).pooler_output
        cosine = float((image_embeds / image_embeds.norm()) @ (text_embeds / text_embeds.norm()).T)
        assert 0.0 <= score <= 100.0 and math.isfinite(score)
        assert score == pytest.approx(max(100 * cosine, 0.0), abs=1e-3)


def test_clip_score_refuses_a_missing_or_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="clip_model: no folder at"):
        ClipScore(tmp_path / "missing")
    with pytest.raises(ValueError, match="clip_model: .* has no config.json"):
        ClipScore(tmp_path)
