"""Crop geometry: overlap rejection sampling of RandomResizedCrop boxes and overlap boxes (spec section 2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from funai_common.transforms import random_resized_crop_params


def _as_sizes(crop_sizes: Sequence[int] | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    sizes = torch.as_tensor(crop_sizes, dtype=like.dtype, device=like.device)
    if sizes.shape[-1] != like.shape[-2]:
        raise ValueError(f"crop_sizes has {sizes.shape[-1]} entries but crop_boxes has {like.shape[-2]} crops")
    return sizes


def _to_frame(boxes: torch.Tensor, frame: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Map absolute xyxy ``boxes`` into the resized frame of crop ``frame`` (xyxy) of output ``size`` pixels."""
    origin = torch.cat([frame[..., :2], frame[..., :2]], -1)
    extent = torch.cat([frame[..., 2:] - frame[..., :2]] * 2, -1)
    return size.unsqueeze(-1) * (boxes - origin) / extent


def intersect(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection of xyxy boxes (broadcasting); empty intersections have x2 < x1 or y2 < y1."""
    return torch.cat([torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])], -1)


def overlap_boxes(
    crop_boxes: torch.Tensor, crop_sizes: Sequence[int] | torch.Tensor, num_global: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersections of each global crop with every crop, in both crops' resized frames.

    crop_boxes: (..., C, 4) absolute xyxy (x = column) in original-image pixels, global crops first.
    crop_sizes: the C square output sizes (pixels), shape (C,) or (..., C).
    Returns ``(boxes_in_global (..., num_global, C, 4), boxes_in_crop (..., C, num_global, 4))``: entry [g, c] of
    the first is ``size_g * (I_gc - g.x1y1) / g.wh`` and entry [c, g] of the second ``size_c * (I_gc - c.x1y1) / c.wh``
    with I_gc the absolute intersection.
    """
    boxes = torch.as_tensor(crop_boxes)
    if not torch.is_floating_point(boxes):
        boxes = boxes.to(torch.get_default_dtype())
    if boxes.shape[-1] != 4 or boxes.dim() < 2:
        raise ValueError(f"crop_boxes must have shape (..., C, 4), got {tuple(boxes.shape)}")
    num_crops = boxes.shape[-2]
    if not 0 < num_global <= num_crops:
        raise ValueError(f"num_global must be in 1..{num_crops}, got {num_global}")
    sizes = _as_sizes(crop_sizes, boxes).expand(boxes.shape[:-1])
    glob = boxes[..., :num_global, :].unsqueeze(-2)  # (..., G, 1, 4)
    inter = intersect(glob, boxes.unsqueeze(-3))  # (..., G, C, 4)
    in_global = _to_frame(inter, glob, sizes[..., :num_global].unsqueeze(-1))
    inter_t = inter.transpose(-3, -2)  # (..., C, G, 4)
    in_crop = _to_frame(inter_t, boxes.unsqueeze(-2), sizes.unsqueeze(-1))
    return in_global, in_crop


def box_area(box: torch.Tensor) -> torch.Tensor:
    """Area of xyxy boxes, 0 where empty."""
    return (box[..., 2] - box[..., 0]).clamp(min=0) * (box[..., 3] - box[..., 1]).clamp(min=0)


def random_resized_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> list[int]:
    """torchvision RandomResizedCrop.get_params as an xyxy box, drawn from ``generator`` (10 tries, then centre)."""
    top, left, h, w = random_resized_crop_params(width, height, scale, ratio, generator)
    return [left, top, left + w, top + h]


def sample_crop_boxes(
    width: int,
    height: int,
    num_global: int = 2,
    num_local: int = 4,
    global_scale: tuple[float, float] = (0.25, 1.0),
    local_scale: tuple[float, float] = (0.05, 0.25),
    min_intersection: float = 0.01,
    max_tries: int = 1000,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Multi-crop boxes (num_global + num_local, 4) xyxy with overlap rejection sampling.

    Every crop after the first is redrawn until its intersection with every global crop drawn so far exceeds
    ``min_intersection`` of the image area (twice that for the second global crop, as in the reference).
    """
    area = float(width * height)
    boxes: list[list[int]] = []
    for idx in range(num_global + num_local):
        scale = global_scale if idx < num_global else local_scale
        threshold = (2 * min_intersection if idx == 1 else min_intersection) * area
        for _ in range(max_tries):
            box = random_resized_box(width, height, scale, generator=generator)
            globals_so_far = torch.tensor(boxes[:num_global], dtype=torch.float64).reshape(-1, 4)
            inter = box_area(intersect(torch.tensor(box, dtype=torch.float64), globals_so_far))
            if bool((inter > threshold).all()):
                break
        else:
            raise RuntimeError(
                f"could not sample crop {idx} overlapping the global crops by > {threshold:.0f} px^2 "
                f"in a {width}x{height} image after {max_tries} tries"
            )
        boxes.append(box)
    return torch.tensor(boxes, dtype=torch.float32)
