"""DAVIS-2017 semi-supervised video object segmentation by label propagation of frozen patch features (the DINO
protocol: first-frame labels propagated through a queue of recent frames with top-k affinities in a local
neighbourhood), and the J (region IoU) & F (boundary F-measure) metrics."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from dora.augment import normalize
from funai_common.datasets import open_image

logger = logging.getLogger(__name__)

VOID = 255  # DAVIS label of pixels left unannotated: never an object
DAVIS_LAYOUT = (
    "<root>/JPEGImages/480p/<video>/00000.jpg, <root>/Annotations/480p/<video>/00000.png, <root>/ImageSets/2017/val.txt"
)


def jaccard(pred: np.ndarray, gt: np.ndarray) -> float:
    """Region similarity J: IoU of two boolean masks (1 when both are empty)."""
    union = np.logical_or(pred, gt).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, gt).sum() / union)


def _boundary(mask: np.ndarray) -> np.ndarray:
    """One-pixel boundary of a boolean mask (pixels of the mask with a 4-neighbour outside it)."""
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(2, 1), border_value=0)


def boundary_f(pred: np.ndarray, gt: np.ndarray, bound_th: float = 0.008) -> float:
    """Contour accuracy F: F-measure of boundary precision / recall, matching within a tolerance of
    ``bound_th`` x image diagonal pixels (DAVIS convention)."""
    tol = max(1, math.ceil(bound_th * math.hypot(*gt.shape)))
    pb, gb = _boundary(pred.astype(bool)), _boundary(gt.astype(bool))
    if pb.sum() == 0 and gb.sum() == 0:
        return 1.0
    if pb.sum() == 0 or gb.sum() == 0:
        return 0.0
    disk = np.hypot(*np.mgrid[-tol : tol + 1, -tol : tol + 1]) <= tol
    gb_dil = ndimage.binary_dilation(gb, structure=disk)
    pb_dil = ndimage.binary_dilation(pb, structure=disk)
    precision = (pb & gb_dil).sum() / pb.sum()
    recall = (gb & pb_dil).sum() / gb.sum()
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


def neighbourhood_mask(h: int, w: int, size: int, device: str | torch.device | None = None) -> torch.Tensor:
    """(h*w, h*w) bool on ``device``: source patch within ``size`` patches (Chebyshev) of the target patch; size 0 =
    everything."""
    if size <= 0:
        return torch.ones(h * w, h * w, dtype=torch.bool, device=device)
    yy, xx = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    yy, xx = yy.flatten(), xx.flatten()
    return ((yy[:, None] - yy[None]).abs() <= size) & ((xx[:, None] - xx[None]).abs() <= size)


def propagate(
    target: torch.Tensor,
    sources: torch.Tensor,
    source_labels: torch.Tensor,
    grid: tuple[int, int],
    topk: int = 5,
    neighbourhood: int = 12,
    temperature: float = 0.1,
) -> torch.Tensor:
    """Labels of one frame from context frames.

    target (P, D) and sources (M, P, D) L2-normalised patch features, source_labels (M, P, C) soft labels.
    Affinity exp(<t, s> / temperature) restricted to the spatial neighbourhood, the top-k over all context
    patches kept and normalised. Returns (P, C).
    """
    m, p, _ = sources.shape
    aff = torch.exp(torch.einsum("pd,mqd->pmq", target, sources) / temperature)  # (P, M, P)
    aff = aff * neighbourhood_mask(*grid, neighbourhood, aff.device).unsqueeze(1).to(aff.dtype)
    aff = aff.reshape(p, m * p)
    vals, idx = aff.topk(min(topk, m * p), dim=1)
    weights = vals / vals.sum(dim=1, keepdim=True).clamp_min(1e-12)
    labels = source_labels.reshape(m * p, -1)
    return (weights.unsqueeze(-1) * labels[idx]).sum(1)


def label_propagation(
    features: list[torch.Tensor],
    first_labels: torch.Tensor,
    grid: tuple[int, int],
    n_last_frames: int = 7,
    topk: int = 5,
    neighbourhood: int = 12,
    temperature: float = 0.1,
) -> list[torch.Tensor]:
    """Propagate first-frame labels (P, C) through the video. features: per frame (P, D) (normalised inside).
    Context of frame t: frame 0 and the last ``n_last_frames`` predictions. Returns (P, C) per frame."""
    feats = [F.normalize(f.float(), dim=-1) for f in features]
    out = [first_labels.float()]
    queue: list[tuple[torch.Tensor, torch.Tensor]] = []
    for t in range(1, len(feats)):
        ctx_f = torch.stack([feats[0]] + [f for f, _ in queue])
        ctx_l = torch.stack([out[0]] + [lab for _, lab in queue])
        lab = propagate(feats[t], ctx_f, ctx_l, grid, topk, neighbourhood, temperature)
        out.append(lab)
        queue.append((feats[t], lab))
        if len(queue) > n_last_frames:
            queue.pop(0)
    return out


def labels_to_mask(labels: torch.Tensor, grid: tuple[int, int], patch: int, size: tuple[int, int]) -> np.ndarray:
    """(P, C) patch labels -> (H, W) object ids: bilinear upsampling by the patch size, each channel min-max
    rescaled to [0, 1] (DINO's ``norm_mask``; a constant channel becomes 0), argmax, nearest resize."""
    h, w = grid
    lab = labels.t().reshape(1, -1, h, w).float()
    lab = F.interpolate(lab, scale_factor=patch, mode="bilinear", align_corners=False)[0]
    lo = lab.amin(dim=(1, 2), keepdim=True)
    span = lab.amax(dim=(1, 2), keepdim=True) - lo
    lab = torch.where(span > 0, (lab - lo) / span.clamp_min(1e-12), torch.zeros_like(lab))
    ids = lab.argmax(0).to(torch.uint8).cpu().numpy()
    return np.asarray(Image.fromarray(ids).resize((size[1], size[0]), Image.NEAREST))


def davis_frame_size(width: int, height: int, short_side: int, patch_size: int) -> tuple[int, int]:
    """(w, h) a DAVIS frame is resized to, DINO's ``read_frame`` rule: the shorter side (the height of a square frame)
    becomes ``short_side``, the other is scaled with it and rounded down to a multiple of 64 (854 x 480 -> 832 x 480);
    both are then multiples of ``patch_size`` (a side under 64 px, never at 480p, to a multiple of the patch)."""
    short, long = (width, height) if height > width else (height, width)
    s = int(short_side) // patch_size * patch_size
    scaled = int(short_side * long / short)
    scaled = scaled // 64 * 64 if scaled >= 64 else scaled // patch_size * patch_size
    if s <= 0 or scaled <= 0:
        raise ValueError(f"davis short_side={short_side} gives no {patch_size} px patch for {width} x {height} frames")
    return (s, scaled) if height > width else (scaled, s)


def read_davis_video(root: Path, video: str, resolution: str = "480p"):
    """Frame paths and the first-frame annotation (H, W) uint8 object ids of one DAVIS video."""
    frames = sorted((root / "JPEGImages" / resolution / video).glob("*.jpg"))
    annos = sorted((root / "Annotations" / resolution / video).glob("*.png"))
    if not frames or not annos:
        raise FileNotFoundError(f"DAVIS video {video!r} missing under {root} (layout: {DAVIS_LAYOUT})")
    return frames, annos


def evaluate_davis(
    patch_features: Callable[[torch.Tensor], torch.Tensor],
    root: str | Path,
    patch_size: int,
    split: str = "val",
    resolution: str = "480p",
    short_side: int = 480,
    n_last_frames: int = 7,
    topk: int = 5,
    neighbourhood: int = 12,
    temperature: float = 0.1,
    max_videos: int | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """J&F on DAVIS-2017 (``<root>/ImageSets/2017/<split>.txt``). ``patch_features(image (1, 3, H, W)) ->
    (1, h*w, D)`` with H, W multiples of ``patch_size``. First and last frames are excluded from the metrics, as in
    the DAVIS evaluation. Returns {"J&F-Mean", "J-Mean", "F-Mean", "per_video": {...}}."""
    root = Path(root)
    list_file = root / "ImageSets" / "2017" / f"{split}.txt"
    if not list_file.is_file():
        raise FileNotFoundError(f"{list_file} not found (DAVIS-2017 layout: {DAVIS_LAYOUT})")
    videos = [v.strip() for v in list_file.read_text().split() if v.strip()][:max_videos]
    js, fs, per_video = [], [], {}
    for video in tqdm(videos, desc="davis"):
        frames, annos = read_davis_video(root, video, resolution)
        first = np.asarray(Image.open(annos[0]))
        if first.ndim != 2:
            raise ValueError(
                f"{annos[0]} has {first.shape[-1]} channels; expected a single-channel (palette) PNG of object ids"
            )
        first = np.where(first == VOID, 0, first)  # void pixels are background, as in davis2017-evaluation
        num_obj = int(first.max())
        feats, grid = [], None
        for fp in frames:
            img = open_image(fp, name=f"DAVIS frame {fp}")
            w, h = davis_frame_size(*img.size, short_side, patch_size)
            x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().unsqueeze(0)
            # DINO resizes with cv2's bilinear (half-pixel centres, no antialias) to uint8
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=False)
            x = x[0].round().clamp(0, 255) / 255
            with torch.no_grad():
                feats.append(patch_features(normalize(x).unsqueeze(0).to(device))[0].float())  # propagated there
            grid = (h // patch_size, w // patch_size)
        small = np.asarray(Image.fromarray(first).resize((grid[1], grid[0]), Image.NEAREST))
        first_labels = F.one_hot(torch.from_numpy(small.astype(np.int64)).flatten(), num_obj + 1).float()
        first_labels = first_labels.to(feats[0].device)  # where patch_features put the features
        labels = label_propagation(feats, first_labels, grid, n_last_frames, topk, neighbourhood, temperature)
        vj = {obj: [] for obj in range(1, num_obj + 1)}
        vf = {obj: [] for obj in range(1, num_obj + 1)}
        for t in range(1, min(len(frames), len(annos)) - 1):
            gt = np.asarray(Image.open(annos[t]))
            pred = labels_to_mask(labels[t], grid, patch_size, gt.shape)
            for obj in vj:
                vj[obj].append(jaccard(pred == obj, gt == obj))
                vf[obj].append(boundary_f(pred == obj, gt == obj))
        # DAVIS averages each object over its frames, then over all objects of all videos
        obj_j = [float(np.mean(v)) for v in vj.values() if v]
        obj_f = [float(np.mean(v)) for v in vf.values() if v]
        per_video[video] = {
            "J": float(np.mean(obj_j)) if obj_j else None,  # None: no frame to score (written as null)
            "F": float(np.mean(obj_f)) if obj_f else None,
        }
        js += obj_j
        fs += obj_f
    if not js:
        raise ValueError(
            f"no DAVIS frame to score in the {len(videos)} videos of {list_file}: each video needs an object in its "
            "first annotation and at least 3 annotated frames (the first and last are not scored)"
        )
    j, f = float(np.mean(js)) * 100, float(np.mean(fs)) * 100
    return {"J&F-Mean": (j + f) / 2, "J-Mean": j, "F-Mean": f, "per_video": per_video}
