"""Density-map figures (matplotlib, PNG)."""

from __future__ import annotations

from pathlib import Path

import torch

from funai_common.transforms import IMAGENET_MEAN, IMAGENET_STD


def to_display(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) normalised (or [0, 1]) image on any device and in any float dtype -> (H, W, 3) float32 CPU tensor in
    [0, 1] for imshow."""
    image = image.detach().float().cpu()  # first: the mean/std below are CPU tensors, numpy has no bfloat16
    if image.min() < 0 or image.max() > 1:
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        image = image * std + mean
    return image.clamp(0, 1).permute(1, 2, 0)


def save_density_figure(
    path: str | Path,
    image: torch.Tensor,
    density: torch.Tensor,
    count: float,
    gt: float | None = None,
    boxes_xyxy: torch.Tensor | None = None,
    title: str = "",
    gt_density: torch.Tensor | None = None,
    gt_points: torch.Tensor | None = None,
) -> None:
    """Image with exemplar boxes | predicted density overlay, predicted (and true) count in the title | when
    ``gt_density`` ((H, W) at the image's size) or ``gt_points`` ((n, 2) xy pixels) is given, the ground-truth dot
    density with the annotated points marked, since sigma-1 blobs are hard to see at figure size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    shown = to_display(image).numpy()
    if tuple(density.shape) != shown.shape[:2]:
        density = torch.nn.functional.interpolate(
            density[None, None].float(), size=tuple(shown.shape[:2]), mode="bilinear", align_corners=False
        )[0, 0]
    density = density.detach().float().cpu().clamp_min(0).numpy()
    truth = gt_density is not None or gt_points is not None
    fig, axes = plt.subplots(1, 3 if truth else 2, figsize=(15 if truth else 10, 4.5))
    axes[0].imshow(shown)
    for x1, y1, x2, y2 in [] if boxes_xyxy is None else boxes_xyxy.tolist():
        axes[0].add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="yellow", linewidth=2))
    axes[0].set_title(title or "image + exemplars")
    axes[1].imshow(shown.mean(-1), cmap="gray")
    axes[1].imshow(density, cmap="jet", alpha=0.55)
    label = f"count {count:.1f}" + (f" (gt {gt:.0f})" if gt is not None else "")
    axes[1].set_title(label)
    if truth:
        axes[2].imshow(shown.mean(-1), cmap="gray")
        if gt_density is not None:
            axes[2].imshow(gt_density.detach().float().cpu().numpy(), cmap="jet", alpha=0.55)
        title = "annotated objects (dots, sigma 1)"
        if gt_points is not None and len(gt_points):
            xy = gt_points.detach().cpu().numpy()
            axes[2].scatter(xy[:, 0], xy[:, 1], s=14, marker="+", c="red", linewidths=1)
            axes[2].set_xlim(-0.5, shown.shape[1] - 0.5)
            axes[2].set_ylim(shown.shape[0] - 0.5, -0.5)
            title = f"annotated objects: {len(xy)} points"
        axes[2].set_title(title)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
