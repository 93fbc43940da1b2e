"""NeCo's dense evaluations besides Hummingbird (spec section 8): linear segmentation and overclustering."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from funai_common.metrics import ConfusionMatrix
from funai_common.transforms import IMAGENET_MEAN, IMAGENET_STD

FeatureFn = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, H, W) -> (B, S*S, D) patch features


class _SegTransform(Dataset):
    """Resized image tensor + mask at ``mask_size`` (nearest to ``input_size``, then nearest to ``mask_size``, as the
    reference); train mode: RandomResizedCrop(0.8, 1) + hflip."""

    def __init__(self, dataset: Any, input_size: int, mask_size: int, train: bool, seed: int = 0, epoch: int = 0):
        self.dataset, self.input_size, self.mask_size = dataset, input_size, mask_size
        self.train, self.seed, self.epoch = train, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.dataset[i]
        image = image.convert("RGB")
        if self.train:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + i)
            w, h = image.size
            area = w * h * float(torch.empty(1).uniform_(0.8, 1.0, generator=gen))
            ratio = float(torch.empty(1).uniform_(np.log(3 / 4), np.log(4 / 3), generator=gen).exp())
            cw, ch = min(w, int(round((area * ratio) ** 0.5))), min(h, int(round((area / ratio) ** 0.5)))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
            top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
            image, mask = image.crop((left, top, left + cw, top + ch)), mask.crop((left, top, left + cw, top + ch))
            if float(torch.rand(1, generator=gen)) < 0.5:
                image, mask = TF.hflip(image), TF.hflip(mask)
        image = image.resize((self.input_size, self.input_size), Image.BILINEAR)
        # the reference's two steps: the mask resized (nearest) with the image to input_size, then
        # F.interpolate(mode="nearest") to mask_size, i.e. pixel floor(i * input_size / mask_size) of the resized mask
        mask = torch.from_numpy(np.array(mask.resize((self.input_size, self.input_size), Image.NEAREST), np.int64))
        if self.mask_size != self.input_size:
            mask = F.interpolate(mask[None, None].float(), size=(self.mask_size, self.mask_size), mode="nearest")
            mask = mask[0, 0].long()
        tensor = TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)
        return tensor, mask


def _feature_maps(feature_fn: FeatureFn, images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, D, S, S) feature maps from row-major patch features."""
    feats = feature_fn(images).float()
    side = images.shape[-1] // patch_size
    if feats.shape[1] != side * side:
        raise ValueError(f"feature_fn returned {feats.shape[1]} tokens, expected {side * side}")
    return feats.transpose(1, 2).reshape(feats.shape[0], -1, side, side)


def linear_segmentation(
    feature_fn: FeatureFn,
    train_dataset: Any,
    val_dataset: Any,
    num_classes: int,
    patch_size: int,
    input_size: int = 448,
    mask_size: int = 100,
    epochs: int = 25,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    milestones: Sequence[int] = (20,),
    batch_size: int = 128,
    ignore_index: int = 255,
    device: str | torch.device = "cpu",
    seed: int = 0,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Frozen features at ``input_size`` upsampled bilinearly to ``mask_size`` -> 1x1 conv, SGD + step decay.

    Returns {"miou" in [0, 1], "per_class_iou"} on ``val_dataset`` (identity matching, masks at ``mask_size``).
    """
    torch.manual_seed(seed)
    head: nn.Module | None = None
    opt = sched = None
    for epoch in range(epochs):
        data = _SegTransform(train_dataset, input_size, mask_size, train=True, seed=seed, epoch=epoch)
        loader = DataLoader(
            data,
            batch_size=batch_size,
            shuffle=True,
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(seed + epoch),
        )
        for images, masks in tqdm(loader, desc=f"linear seg epoch {epoch + 1}", disable=not progress):
            with torch.no_grad():
                fmap = _feature_maps(feature_fn, images.to(device), patch_size)
                fmap = F.interpolate(fmap, size=(mask_size, mask_size), mode="bilinear", align_corners=False)
            if head is None:
                head = nn.Conv2d(fmap.shape[1], num_classes, 1).to(device)
                opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
                sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(milestones), gamma=0.1)
            loss = F.cross_entropy(head(fmap), masks.to(device), ignore_index=ignore_index)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    confusion = ConfusionMatrix(num_classes, ignore_index=ignore_index)
    val = DataLoader(
        _SegTransform(val_dataset, input_size, mask_size, train=False), batch_size=batch_size, num_workers=num_workers
    )
    with torch.no_grad():
        for images, masks in tqdm(val, desc="linear seg eval", disable=not progress):
            fmap = _feature_maps(feature_fn, images.to(device), patch_size)
            fmap = F.interpolate(fmap, size=(mask_size, mask_size), mode="bilinear", align_corners=False)
            confusion.update(masks, head(fmap).argmax(1).cpu())
    value, per_class = confusion.miou("identity")
    return {"miou": float(value), "per_class_iou": per_class.tolist()}


def _kmeans(x: np.ndarray, k: int, seed: int, niter: int, nredo: int) -> np.ndarray:
    """Cluster ids of the rows of ``x``: faiss k-means when installed (the reference's), else scikit-learn."""
    try:
        import faiss
    except ImportError:
        from sklearn.cluster import KMeans

        return KMeans(k, n_init=nredo, max_iter=niter, random_state=seed).fit_predict(x)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, nredo=nredo, seed=seed, verbose=False)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return km.index.search(np.ascontiguousarray(x, dtype=np.float32), 1)[1][:, 0]


def overclustering(
    feature_fn: FeatureFn,
    dataset: Any,
    num_classes: int,
    patch_size: int,
    ks: Sequence[int] = (21, 500),
    input_size: int = 448,
    mask_size: int = 100,
    pca_dim: int = 50,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    niter: int = 100,
    nredo: int = 5,
    ignore_index: int = 255,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """k-means on standardised, PCA-reduced patch features; mIoU of the clusters upsampled to ``mask_size``.

    K == num_classes uses Hungarian matching, K > num_classes greedy many-to-one matching. Returns
    {"K=k": {"miou": mean over seeds, "per_seed": [...]}}.
    """
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    feats, masks = [], []
    loader = DataLoader(
        _SegTransform(dataset, input_size, mask_size, train=False), batch_size=batch_size, num_workers=num_workers
    )
    with torch.no_grad():
        for images, mask in tqdm(loader, desc="overclustering features", disable=not progress):
            feats.append(_feature_maps(feature_fn, images.to(device), patch_size).cpu())
            masks.append(mask)
    fmap = torch.cat(feats)  # (N, D, S, S)
    gt = torch.cat(masks)
    n, d, s, _ = fmap.shape
    x = StandardScaler().fit_transform(fmap.permute(0, 2, 3, 1).reshape(-1, d).numpy())
    x = PCA(min(pca_dim, d, len(x)), random_state=0).fit_transform(x).astype(np.float32)
    results: dict[str, Any] = {}
    for k in ks:
        scores = []
        for seed in seeds:
            ids = torch.from_numpy(_kmeans(x, k, seed, niter, nredo).astype(np.int64)).reshape(n, 1, s, s)
            pred = F.interpolate(ids.float(), size=(mask_size, mask_size), mode="nearest").long()[:, 0]
            confusion = ConfusionMatrix(num_classes, num_predicted=k, ignore_index=ignore_index)
            confusion.update(gt, pred)
            scores.append(float(confusion.miou("hungarian" if k <= num_classes else "many_to_one")[0]))
        results[f"K={k}"] = {"miou": float(np.mean(scores)), "per_seed": scores}
    return results
