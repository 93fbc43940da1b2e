"""Pictures of predicted (red) and ground-truth (green) boxes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402


def box_figure(
    images: Sequence[torch.Tensor],
    titles: Sequence[str],
    preds: Sequence[Sequence[float]],
    gts: Sequence[Sequence[float] | None],
    path: str | Path,
    cols: int = 4,
) -> Path:
    """Grid of images (3, S, S) in [0, 1] with pred (red, solid) and GT (green, dashed) xyxy boxes; saves a PNG."""
    n = len(images)
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title, pred, gt in zip(axes.flat, images, titles, preds, gts):
        ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
        if gt is not None:
            ax.add_patch(Rectangle((gt[0], gt[1]), gt[2] - gt[0], gt[3] - gt[1], fill=False, ec="lime", lw=2, ls="--"))
        ax.add_patch(Rectangle((pred[0], pred[1]), pred[2] - pred[0], pred[3] - pred[1], fill=False, ec="red", lw=2))
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def loss_figure(losses: Sequence[float], path: str | Path) -> Path:
    """Training loss per step."""
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
