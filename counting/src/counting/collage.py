"""Self-Collage sampler (spec b, "Self-Collage sampling"): object cut-outs from 2 clusters pasted on a background.

Every collage holds ``num_objects`` (20) objects: ``t`` ~ U{min_count .. num_objects-1} (3..19) from a target cluster
and ``num_objects - t`` from a different distractor cluster. Sizes are correlated (a per-collage mean, a +-30 %
spread), distractors are pasted first and targets last, with hard mask pastes. Labels: the target density map
(mass ``density_scaling`` per target), the all-object density map, boxes and up to ``max_shots`` exemplar crops.
All randomness comes from a numpy Generator seeded by (seed, epoch, index), so a sample does not depend on the
data-loader worker, and resuming a run reproduces its data exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from counting import DENSITY_SCALING
from counting.density import density_from_boxes
from counting.resize import resize_image, resize_mask, shorter_side_size
from funai_common.transforms import IMAGENET_MEAN, IMAGENET_STD


def normalize(image: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std normalisation of a (..., 3, H, W) tensor in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype).view(3, 1, 1)
    return (image - mean.to(image.device)) / std.to(image.device)


@dataclass
class CollageConfig:
    """Sampler settings; defaults are the reference's (S = 224)."""

    img_size: int = 224
    num_objects: int = 20
    min_count: int = 3
    object_size: int = 224
    size_min: int = 15
    size_max: int = 69
    size_spread: float = 0.3
    size_clamp_min: int = 5
    size_clamp_max: int = 220
    reference_size: int = 224
    hflip_prob: float = 0.5
    max_shots: int = 3
    exemplar_size: int = 64
    density_scaling: float = DENSITY_SCALING

    @classmethod
    def from_dict(cls, cfg: dict) -> CollageConfig:
        """A config from a mapping of field values (missing ones keep their defaults); unknown keys are a KeyError."""
        unknown = set(cfg) - set(cls.__dataclass_fields__)
        if unknown:
            raise KeyError(f"unknown collage keys {sorted(unknown)}; valid: {sorted(cls.__dataclass_fields__)}")
        return cls(**cfg)


def sample_sizes(rng: np.random.Generator, n: int, cfg: CollageConfig) -> list[int]:
    """Correlated object sizes: m ~ U_int[size_min, size_max], s_i = m + U_int[-d, d-1], d = max(int(0.3 m), 1),
    clamped to [5, 220] and scaled by img_size / 224 (truncated)."""
    mean = int(rng.integers(cfg.size_min, cfg.size_max + 1))
    spread = max(int(cfg.size_spread * mean), 1)
    sizes = mean + rng.integers(-spread, spread, size=n)
    sizes = np.clip(sizes, cfg.size_clamp_min, cfg.size_clamp_max)
    return [max(int(s * cfg.img_size / cfg.reference_size), 1) for s in sizes]


def cut_object(image: torch.Tensor, mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop image * mask to the mask's bounding box and resize: shorter side ``size``, longer side capped at size+1.

    An empty mask keeps the whole image. Bilinear without antialias (the reference's torchvision 0.14 tensor
    resize), mask nearest.
    """
    rows, cols = torch.where(mask)
    if len(rows) == 0:
        mask = torch.ones_like(mask)
        y0, y1, x0, x1 = 0, mask.shape[0], 0, mask.shape[1]
    else:
        y0, y1, x0, x1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    crop = image[:, y0:y1, x0:x1] * mask[y0:y1, x0:x1]
    out_size = shorter_side_size(y1 - y0, x1 - x0, size, size + 1)
    return resize_image(crop, out_size, antialias=False), resize_mask(mask[y0:y1, x0:x1], out_size)


class SelfCollageGenerator:
    """Builds self-collages from an object pool (``load(i) -> (image, mask)``, ``cluster_ids``) and backgrounds."""

    def __init__(self, objects, backgrounds, cfg: CollageConfig | None = None):
        self.objects, self.backgrounds = objects, backgrounds
        self.cfg = cfg or CollageConfig()
        ids = np.asarray(objects.cluster_ids)
        self.cluster_names, inverse = np.unique(ids, return_inverse=True)
        self.members = [np.flatnonzero(inverse == c) for c in range(len(self.cluster_names))]
        self.cluster_sizes = np.array([len(m) for m in self.members])
        if len(self.members) < 2:
            raise ValueError("the object pool needs at least 2 clusters")
        if self.cluster_sizes.max() < self.cfg.num_objects - 1:
            raise ValueError(
                f"no cluster has {self.cfg.num_objects - 1} objects (largest: {self.cluster_sizes.max()}); "
                "target counts up to num_objects-1 are impossible"
            )

    def choose_clusters(self, rng: np.random.Generator, count: int) -> tuple[int, int]:
        """A random target cluster with >= count members and a different one with >= num_objects - count."""
        targets = np.flatnonzero(self.cluster_sizes >= count)
        target = int(rng.choice(targets))
        others = np.flatnonzero(self.cluster_sizes >= self.cfg.num_objects - count)
        others = others[others != target]
        if len(others) == 0:
            raise ValueError(f"no distractor cluster with >= {self.cfg.num_objects - count} objects")
        return target, int(rng.choice(others))

    def load_object(self, rng: np.random.Generator, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Object ``index`` of the pool as image (3, s, s) and mask (s, s), s = object_size (aspect not kept), hflipped
        with probability ``hflip_prob``."""
        image, mask = self.objects.load(index)
        side = (self.cfg.object_size, self.cfg.object_size)
        image, mask = resize_image(image, side, antialias=False), resize_mask(mask, side)
        if rng.random() < self.cfg.hflip_prob:
            image, mask = image.flip(-1), mask.flip(-1)
        return image, mask

    def sample(self, rng: np.random.Generator, count: int | None = None) -> dict[str, torch.Tensor]:
        """One collage. Keys: image (3,S,S) normalised, density / density_all (S,S), boxes (N,4) target boxes in
        [0,1], last pasted first (the reference's order), padded with -1, all_boxes (N,4) pixel xyxy in paste order,
        is_target (N,), exemplars (max_shots,3,e,e) cut at the first boxes, count (target count), clusters (target,
        distractor ids), objects (N,) pool indices in paste order."""
        cfg, size = self.cfg, self.cfg.img_size
        if count is None:
            count = int(rng.integers(cfg.min_count, cfg.num_objects))
        target, distractor = self.choose_clusters(rng, count)
        target_ids = rng.choice(self.members[target], size=count, replace=False)
        distractor_ids = rng.choice(self.members[distractor], size=cfg.num_objects - count, replace=False)
        background = resize_image(self.backgrounds.load(int(rng.integers(len(self.backgrounds)))), (size, size))
        if rng.random() < cfg.hflip_prob:
            background = background.flip(-1)
        canvas = background.clone()
        sizes = sample_sizes(rng, cfg.num_objects, cfg)
        boxes, is_target, order = [], [], []
        # distractors first, targets last: targets may cover each other but never get covered by distractors
        for i, (index, flag) in enumerate(
            [(int(j), False) for j in distractor_ids] + [(int(j), True) for j in target_ids]
        ):
            image, mask = cut_object(*self.load_object(rng, index), sizes[i])
            h, w = mask.shape
            h, w = min(h, size), min(w, size)
            image, mask = image[:, :h, :w], mask[:h, :w]
            x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            region = canvas[:, y0 : y0 + h, x0 : x0 + w]
            canvas[:, y0 : y0 + h, x0 : x0 + w] = torch.where(mask, image, region)
            boxes.append([x0, y0, x0 + w, y0 + h])
            is_target.append(flag)
            order.append(index)
        all_boxes = torch.tensor(boxes, dtype=torch.float32)
        is_target_t = torch.tensor(is_target)
        # the reference flips its box list (copy_targets_last): target boxes, and so the exemplars, run from the
        # last-pasted target, which no later object covers, backwards
        target_boxes = all_boxes[is_target_t].flip(0)
        image = normalize(canvas)
        exemplars = torch.zeros(cfg.max_shots, 3, cfg.exemplar_size, cfg.exemplar_size)
        for k, (x0, y0, x1, y1) in enumerate(target_boxes[: cfg.max_shots].long().tolist()):
            exemplars[k] = resize_image(image[:, y0:y1, x0:x1], (cfg.exemplar_size, cfg.exemplar_size))
        padded = torch.full((cfg.num_objects, 4), -1.0)
        padded[:count] = target_boxes / size
        return {
            "image": image,
            "density": density_from_boxes(target_boxes, size, size, cfg.density_scaling),
            "density_all": density_from_boxes(all_boxes, size, size, cfg.density_scaling),
            "boxes": padded,
            "all_boxes": all_boxes,
            "is_target": is_target_t,
            "exemplars": exemplars,
            "count": torch.tensor(float(count)),
            "clusters": torch.tensor([int(self.cluster_names[target]), int(self.cluster_names[distractor])]),
            "objects": torch.tensor(order),
        }


class SelfCollageDataset(Dataset):
    """Collages indexed by ``epoch * samples_per_epoch + i``; sample i of epoch e uses a Generator seeded (seed, e, i).

    Encoding the epoch in the index keeps samples independent of worker processes and of persistent workers.
    """

    def __init__(self, generator: SelfCollageGenerator, samples_per_epoch: int = 10000, seed: int = 0):
        self.generator, self.samples_per_epoch, self.seed = generator, samples_per_epoch, seed

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        epoch, i = divmod(int(index), self.samples_per_epoch)
        return self.generator.sample(np.random.default_rng([self.seed, epoch, i]))
