"""FUNGI: features from self-supervised per-sample gradients of frozen transformers (arXiv 2407.10964)."""

from fungi.extractor import FUNGIExtractor
from fungi.gradients import default_layer, per_sample_gradients
from fungi.losses import deepcluster_loss, dino_loss, kl_uniform_loss, simclr_loss
from fungi.projection import random_projection

__all__ = [
    "FUNGIExtractor",
    "deepcluster_loss",
    "default_layer",
    "dino_loss",
    "kl_uniform_loss",
    "per_sample_gradients",
    "random_projection",
    "simclr_loss",
]
__version__ = "0.1.0"
