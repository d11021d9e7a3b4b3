"""Image quality metrics for real checkpoints: FID, CLIP score, LPIPS, PSNR and SSIM.

Every model weight comes from a local path given by the caller; a missing one is a ValueError that names
the argument (``fid_weights``, ``clip_model``, ``lpips_weights``), never a download.
"""

from hybrid_sd.metrics.clip_score import ClipScore
from hybrid_sd.metrics.fid import frechet_inception_distance, load_fid
from hybrid_sd.metrics.lpips import Lpips
from hybrid_sd.metrics.pixel import psnr, ssim

__all__ = ["ClipScore", "Lpips", "frechet_inception_distance", "load_fid", "psnr", "ssim"]
