"""Hummingbird dense in-context evaluation (Balažević et al. 2023), the open-hummingbird-eval protocol.

A memory of (patch feature, soft patch label) pairs is built from augmented training images; each validation patch
retrieves its k = 30 nearest memory rows, averages their labels with softmax(cos / 0.02) weights, and the patch
predictions are upsampled bilinearly and scored by mIoU with Hungarian matching.

Conventions: masks are integer class maps (N, H, W) with H = W = S * P; patches are in row-major order
(patch p = row * S + col).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from funai_common.metrics import ConfusionMatrix
from funai_common.search import NeighborIndex
from funai_common.transforms import HUMMINGBIRD_REFERENCE_STD, HummingbirdTrainTransform, HummingbirdValTransform

log = logging.getLogger(__name__)

# Score of a patch with no labelled pixel in rare-class-first sampling (only possible without the 255 -> 0 remap).
EMPTY_PATCH_SCORE = 1e6


def _grid(masks: torch.Tensor, patch_size: int) -> int:
    n, h, w = masks.shape
    if h != w or h % patch_size:
        raise ValueError(f"masks must be square with a side divisible by patch_size={patch_size}, got {(h, w)}")
    return h // patch_size


def patch_labels(
    masks: torch.Tensor, patch_size: int, num_classes: int, ignore_index: int = 255, ignore_as_background: bool = True
) -> torch.Tensor:
    """Soft labels (N, S*S, C): the fraction of each patch's pixels in each class.

    With ``ignore_as_background`` (reference default) ignored pixels count as class 0; otherwise they are left out
    and each patch's fractions are taken over its labelled pixels (a patch with none gets all zeros).
    """
    masks = masks.long()
    n = masks.shape[0]
    s = _grid(masks, patch_size)
    ignored = masks == ignore_index
    masks = masks.masked_fill(ignored, 0)
    if masks.min() < 0 or masks.max() >= num_classes:
        raise ValueError(
            f"mask values must be in [0, {num_classes}) or {ignore_index}, "
            f"got range [{int(masks.min())}, {int(masks.max())}]"
        )
    rows = torch.arange(masks.shape[1], device=masks.device) // patch_size
    patch_of_pixel = (rows[:, None] * s + rows[None, :]).expand_as(masks)  # (N, H, W)
    image = torch.arange(n, device=masks.device)[:, None, None]
    codes = (image * s * s + patch_of_pixel) * num_classes + masks
    weights = None if ignore_as_background else (~ignored).float().reshape(-1)
    counts = torch.bincount(codes.reshape(-1), weights=weights, minlength=n * s * s * num_classes)
    counts = counts.reshape(n, s * s, num_classes).float()
    if ignore_as_background:
        return counts / (patch_size * patch_size)
    return counts / counts.sum(-1, keepdim=True).clamp_min(1)


def rare_class_scores(
    masks: torch.Tensor, patch_size: int, num_classes: int, ignore_index: int = 255, ignore_as_background: bool = True
) -> torch.Tensor:
    """(N, S*S) score of each patch: sum over the classes present in it of the number of the image's patches that
    contain that class (ignored pixels count as class 0, as in the reference; a patch with no class scores 1e6)."""
    labels = patch_labels(masks, patch_size, num_classes, ignore_index, ignore_as_background)
    presence = (labels > 0).float()  # (N, S*S, C)
    frequency = presence.sum(1, keepdim=True)  # (N, 1, C)
    scores = (presence * frequency).sum(-1)
    return scores.masked_fill(presence.sum(-1) == 0, EMPTY_PATCH_SCORE)


def select_memory_patches(
    masks: torch.Tensor,
    patch_size: int,
    num_classes: int,
    k: int,
    draws: torch.Tensor,
    ignore_index: int = 255,
    ignore_as_background: bool = True,
) -> torch.Tensor:
    """(N, k) indices of the k patches per image with the smallest rare-class score x draw (draws: (N, S*S) U(0,1)).

    A patch with no labelled pixel keeps its score 1e6 undrawn, as in the reference, so it comes after every other.
    """
    scores = rare_class_scores(masks, patch_size, num_classes, ignore_index, ignore_as_background)
    if draws.shape != scores.shape:
        raise ValueError(f"draws must have shape {tuple(scores.shape)}, got {tuple(draws.shape)}")
    drawn = torch.where(scores == EMPTY_PATCH_SCORE, scores, scores * draws.to(scores))
    return torch.topk(drawn, k, dim=1, largest=False).indices


def build_memory(
    features: torch.Tensor,
    masks: torch.Tensor,
    patch_size: int,
    num_classes: int,
    memory_size: int | None = None,
    draws: torch.Tensor | None = None,
    ignore_index: int = 255,
    ignore_as_background: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Memory rows from one batch: (features / ||features|| (R, D), soft labels (R, C)).

    features: (N, S*S, D) patch features. ``memory_size=None`` keeps every patch (image-major, row-major patches);
    otherwise k = memory_size // N patches per image (at least 1, at most all S*S), rare classes first (see
    ``select_memory_patches``).
    """
    n, num_patches, dim = features.shape
    feats = features / features.norm(dim=-1, keepdim=True)
    labels = patch_labels(masks, patch_size, num_classes, ignore_index, ignore_as_background).to(feats.device)
    if memory_size is None:
        return feats.reshape(-1, dim), labels.reshape(-1, num_classes)
    k = min(max(1, memory_size // n), num_patches)
    if draws is None:
        draws = torch.rand(n, num_patches)
    chosen = select_memory_patches(masks, patch_size, num_classes, k, draws, ignore_index, ignore_as_background)
    chosen = chosen.to(feats.device)
    feats = torch.gather(feats, 1, chosen[..., None].expand(-1, -1, dim))
    labels = torch.gather(labels, 1, chosen[..., None].expand(-1, -1, num_classes))
    return feats.reshape(-1, dim), labels.reshape(-1, num_classes)


def _transfer(
    index: NeighborIndex,
    memory_labels: torch.Tensor,
    query_features: torch.Tensor,
    k: int,
    temperature: float,
    row_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    m, num_patches, dim = query_features.shape
    queries = query_features.reshape(-1, dim)
    scores, idx = index.search(queries, k)
    # The inner product divided by |q| (and by the rows' norms, where they are not unit-norm as in the evaluator's
    # memory) is the cosine of the re-normalised pair.
    cosine = scores / queries.norm(dim=1, keepdim=True).clamp_min(1e-12).to(scores)
    if row_norms is not None:
        cosine = cosine / row_norms.to(scores.device)[idx.to(scores.device)].clamp_min(1e-12).to(scores)
    weights = torch.softmax(cosine / temperature, dim=1)
    labels = memory_labels[idx.to(memory_labels.device)].to(weights)  # (M*S*S, k, C)
    return torch.einsum("qk,qkc->qc", weights, labels).reshape(m, num_patches, -1)


def transfer_labels(
    memory_features: torch.Tensor,
    memory_labels: torch.Tensor,
    query_features: torch.Tensor,
    k: int = 30,
    temperature: float = 0.02,
    backend: str = "auto",
) -> torch.Tensor:
    """(M, S*S, C) label distribution of each query patch: softmax(cos / T)-weighted mean of its k nearest labels.

    Neighbours are the memory rows with the largest inner product with the raw query (same ranking as cosine for
    unit-norm rows, as ``build_memory`` gives); the weights use the cosine whatever the rows' norms.
    """
    memory_features = torch.as_tensor(memory_features)
    row_norms = torch.linalg.vector_norm(memory_features, dim=1, dtype=torch.float32)  # no float32 copy of the bank
    index = NeighborIndex(memory_features, backend=backend)
    return _transfer(index, memory_labels, query_features, k, temperature, row_norms)


def upsample_predictions(patch_probs: torch.Tensor, size: int) -> torch.Tensor:
    """(M, size, size) long: patch distributions (M, S*S, C) bilinearly upsampled (align_corners=False), argmax."""
    m, num_patches, c = patch_probs.shape
    s = int(round(num_patches**0.5))
    if s * s != num_patches:
        raise ValueError(f"number of patches {num_patches} is not a square")
    grid = patch_probs.reshape(m, s, s, c).permute(0, 3, 1, 2).float()
    return F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False).argmax(1)


class _ProtocolDataset(Dataset):
    """Applies a joint Hummingbird transform with a per-(epoch, index) seeded generator."""

    def __init__(self, dataset, transform, seed: int, epoch: int = 0):
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, seed, epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, mask = self.dataset[i]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 100_003 + i)
        return self.transform(image, mask, generator)


class HummingbirdEvaluator:
    """Hummingbird in-context segmentation of any feature function on two segmentation datasets.

    feature_fn: images (B, 3, input_size, input_size), normalised, on ``device`` -> patch features (B, S*S, D) with
    S = input_size // patch_size. Datasets yield (PIL image, PIL mask of class ids). ``ignore_index=None`` takes the
    dataset's (VOC 255, ADE20K 0). ``remap_ignore_to_zero`` reproduces the reference's memory quirk (ignored pixels
    become class 0); ``std`` defaults to the reference's (0.229, 0.224, 0.255). With ``keep_memory_features`` the
    memory's features stay available as ``memory_features`` after ``build_memory`` (e.g. as a support bank).
    ``bank_dtype=torch.float16`` stores the memory in half precision (the reference's faiss ``use_fp16``; every
    backend), scores are still accumulated in float32.
    """

    def __init__(
        self,
        feature_fn: Callable[[torch.Tensor], torch.Tensor],
        train_dataset,
        val_dataset,
        num_classes: int,
        patch_size: int,
        input_size: int = 504,
        memory_size: int | None = None,
        augmentation_epochs: int = 2,
        num_neighbors: int = 30,
        temperature: float = 0.02,
        batch_size: int = 16,
        ignore_index: int | None = None,
        backend: str = "auto",
        seed: int = 0,
        device: str | torch.device = "cpu",
        num_workers: int = 0,
        remap_ignore_to_zero: bool = True,
        std=HUMMINGBIRD_REFERENCE_STD,
        progress: bool = True,
        keep_memory_features: bool = False,
        bank_dtype: torch.dtype | None = None,
    ):
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} must be a multiple of patch_size {patch_size}")
        if memory_size is not None and memory_size < 1:  # 0 or -5 had silently kept one patch per image
            raise ValueError(f"memory_size {memory_size}: expected a positive number of rows, or None (every patch)")
        if ignore_index is None:
            ignore_index = getattr(val_dataset, "ignore_index", 255)
        self.feature_fn, self.train_dataset, self.val_dataset = feature_fn, train_dataset, val_dataset
        self.num_classes, self.patch_size, self.input_size = num_classes, patch_size, input_size
        self.memory_size, self.augmentation_epochs = memory_size, augmentation_epochs
        self.num_neighbors, self.temperature, self.batch_size = num_neighbors, temperature, batch_size
        self.ignore_index, self.backend, self.seed = ignore_index, backend, seed
        self.device, self.num_workers, self.remap = torch.device(device), num_workers, remap_ignore_to_zero
        self.train_transform = HummingbirdTrainTransform(input_size, std=std)
        self.val_transform = HummingbirdValTransform(input_size, std=std)
        self.progress = progress
        self.keep_memory_features = keep_memory_features
        self.bank_dtype = bank_dtype
        self.memory_features: torch.Tensor | None = None
        self._memory = None

    def _loader(self, dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    @torch.no_grad()
    def _features(self, images: torch.Tensor) -> torch.Tensor:
        s = self.input_size // self.patch_size
        feats = self.feature_fn(images.to(self.device))
        if feats.ndim != 3 or feats.shape[1] != s * s:
            raise ValueError(f"feature_fn must return (B, {s * s}, D) patch features, got {tuple(feats.shape)}")
        return feats.float()

    @torch.no_grad()
    def build_memory(self) -> tuple[NeighborIndex, torch.Tensor]:
        """Build (once) the memory index and its soft labels from augmented training images."""
        if self._memory is not None:
            return self._memory
        n_train = len(self.train_dataset)
        per_image = None
        if self.memory_size is not None:
            # Reference rule: K = max(1, M // (N_train * epochs)) patches per augmented image; a memory larger than
            # all patches (small training sets) keeps every patch instead of failing as the reference does.
            per_image = max(1, self.memory_size // (n_train * self.augmentation_epochs))
            per_image = min(per_image, (self.input_size // self.patch_size) ** 2)
        generator = torch.Generator().manual_seed(self.seed)
        # rows are written into one buffer allocated at the first batch: collecting per-batch tensors and concatenating
        # them would hold the memory twice at its peak (84 GB instead of 42 GB for ViT-L at 1024 x 10^4 rows)
        rows = n_train * self.augmentation_epochs * (per_image or (self.input_size // self.patch_size) ** 2)
        memory_features = memory_labels = None
        filled = 0
        for epoch in range(self.augmentation_epochs):
            data = _ProtocolDataset(self.train_dataset, self.train_transform, self.seed, epoch)
            for images, masks in tqdm(
                self._loader(data), desc=f"memory (epoch {epoch + 1})", disable=not self.progress
            ):
                f = self._features(images)
                draws, memory_size = None, None
                if per_image is not None:
                    draws = torch.rand(f.shape[0], f.shape[1], generator=generator)
                    memory_size = per_image * f.shape[0]
                mf, ml = build_memory(
                    f,
                    masks,
                    self.patch_size,
                    self.num_classes,
                    memory_size,
                    draws,
                    self.ignore_index,
                    ignore_as_background=self.remap,
                )
                if memory_features is None:
                    memory_features = mf.new_empty(rows, mf.shape[1])
                    memory_labels = ml.new_empty(rows, ml.shape[1], device=mf.device)
                memory_features[filled : filled + len(mf)] = mf
                memory_labels[filled : filled + len(mf)] = ml.to(mf.device)
                filled += len(mf)
        if filled != rows:
            raise RuntimeError(f"Hummingbird memory: {filled} rows built, {rows} expected")
        log.info("Hummingbird memory: %d rows of dim %d", *memory_features.shape)
        if memory_features.shape[0] < self.num_neighbors:
            raise ValueError(
                f"the Hummingbird memory holds {memory_features.shape[0]} patches, fewer than "
                f"num_neighbors={self.num_neighbors}: raise memory_size or lower num_neighbors"
            )
        if self.keep_memory_features:
            self.memory_features = memory_features
        index = NeighborIndex(memory_features, backend=self.backend, bank_dtype=self.bank_dtype)
        self._memory = (index, memory_labels)
        return self._memory

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(B, input_size, input_size) predicted class maps for normalised, resized images (B, 3, H, W)."""
        index, memory_labels = self.build_memory()
        probs = _transfer(index, memory_labels, self._features(images), self.num_neighbors, self.temperature)
        return upsample_predictions(probs, self.input_size)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Score the validation set: {"miou": float in [0, 1], "per_class_iou": list, "memory_rows": int}."""
        index, _ = self.build_memory()
        confusion = ConfusionMatrix(self.num_classes, ignore_index=self.ignore_index)
        data = _ProtocolDataset(self.val_dataset, self.val_transform, self.seed)
        for images, masks in tqdm(self._loader(data), desc="hummingbird eval", disable=not self.progress):
            confusion.update(masks, self.predict(images).cpu())
        value, per_class = confusion.miou("hungarian")
        return {"miou": value, "per_class_iou": per_class.tolist(), "memory_rows": index.num_rows}
