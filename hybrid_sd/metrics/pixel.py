"""PSNR and SSIM of an image against a reference (torchmetrics' functional forms, RGB in [0, 1])."""

from __future__ import annotations

import torch
from PIL import Image
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from hybrid_sd.metrics.images import to_float

# torchmetrics sizes a Gaussian window from sigma (2 * int(3.5 sigma + 0.5) + 1) and ignores kernel_size:
# Wang et al.'s sigma 1.5 gives 11x11 (taps past +-3 weigh under 3%, so it is close to a 7x7 one). The map
# covers every pixel, the image reflect-padded at the borders, so a 64x64 image loses no positions.
SSIM_SIGMA = 1.5


def _pair(image: Image.Image, reference: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    pair = to_float([image, reference], "image and reference")
    return pair[:1], pair[1:]


def psnr(image: Image.Image, reference: Image.Image) -> float:
    """Peak signal-to-noise ratio in dB over the RGB channels, peak 1.0; ``inf`` for identical images."""
    preds, target = _pair(image, reference)
    return float(peak_signal_noise_ratio(preds, target, data_range=1.0))


def ssim(image: Image.Image, reference: Image.Image) -> float:
    """Structural similarity (Wang et al. 2004), the mean of the SSIM map over pixels and RGB channels:
    Gaussian window of sigma ``SSIM_SIGMA``, K1 = 0.01, K2 = 0.03, data range 1.0; 1.0 for identical images."""
    preds, target = _pair(image, reference)
    # data_range must be given: torchmetrics otherwise infers it from the images' own min and max.
    return float(structural_similarity_index_measure(preds, target, sigma=SSIM_SIGMA, data_range=1.0))
