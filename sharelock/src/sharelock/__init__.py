"""ShareLock: a CLIP-like dual encoder from a frozen vision model and a frozen language model.

Only a small text projection head is trained, on cached features, with a fixed-temperature symmetric InfoNCE loss.
"""

from sharelock.losses import LOGIT_SCALE, clip_loss
from sharelock.models import ProjectionHead, ShareLock, load_model

__all__ = ["LOGIT_SCALE", "ProjectionHead", "ShareLock", "clip_loss", "load_model"]
__version__ = "0.1.0"
