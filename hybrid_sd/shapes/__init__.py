"""The "shapes" captioned image dataset and its deterministic prompt-adherence scorer."""

from hybrid_sd.shapes.adherence import AdherenceScore, parse_caption, score, score_batch
from hybrid_sd.shapes.dataset import Scene, Shape, ShapesDataset, caption, render, sample_scene, vocabulary

__all__ = [
    "AdherenceScore",
    "Scene",
    "Shape",
    "ShapesDataset",
    "caption",
    "parse_caption",
    "render",
    "sample_scene",
    "score",
    "score_batch",
    "vocabulary",
]
