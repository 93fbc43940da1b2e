"""counting-preprocess masks|clusters|all: object masks and k-means clusters of DINO CLS features (resumable).

masks: either SelfMask-style predictions read from files (``mask_method=files``) or a built-in unsupervised
saliency from the frozen backbone (``mask_method=saliency``): the last block's CLS attention averaged over heads,
upsampled, thresholded so that the kept region holds ``saliency_mass`` of the attention (DINO's visualisation
rule), largest connected component. The built-in saliency is a substitute for SelfMask, not a reproduction.
clusters: CLS features of every pool image (224 x 224, ImageNet normalisation) and k-means (faiss if installed,
else scikit-learn's KMeans(random_state=seed, n_init="auto") as the reference).
Both steps write shards and skip the ones already on disk, so an interrupted run continues where it stopped; the
settings recorded in the output folder (``index.json``) must then match the current ones (ValueError otherwise).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from scipy import ndimage
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from counting.collage import normalize
from counting.config import load_config, make_dir, run_cli
from counting.models import FrozenViT, build_backbone
from counting.pools import list_images, load_rgb
from counting.resize import resize_image, resize_mask
from counting.train import setup_logging

log = logging.getLogger("counting")


class PoolImages(Dataset):
    """Pool images resized to ``size`` x ``size`` (aspect not kept, as the reference) and normalised."""

    def __init__(self, paths: list[Path], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return normalize(resize_image(load_rgb(self.paths[index]), (self.size, self.size), antialias=False))


def pool_paths(cfg: dict) -> list[Path]:
    """The pool's images: those under ``cfg["image_root"]`` (sorted), the first ``max_images`` if set; else an error."""
    paths = list_images(cfg["image_root"])
    if cfg["max_images"] is not None:
        paths = paths[: int(cfg["max_images"])]
    if not paths:
        limit = f" (max_images={cfg['max_images']})" if cfg["max_images"] is not None else ""
        raise FileNotFoundError(f"no images under {cfg['image_root']}{limit}")
    return paths


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    """[(start, stop), ...] covering range(n) in consecutive shards of ``shard_size`` (the last may be shorter)."""
    return [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]


def saliency_masks(backbone: FrozenViT, images: torch.Tensor, size: int, mass: float = 0.6) -> torch.Tensor:
    """Foreground masks (B, size, size) from the CLS attention of the last block (averaged over heads).

    Patch-level selection (the top patches holding ``mass`` of the attention), upsampled bilinearly and thresholded
    at 0.5, largest connected component (the whole image when nothing is selected).
    """
    _, attention = backbone(images, with_attention=True)
    grid_h, grid_w = images.shape[-2] // backbone.patch_size, images.shape[-1] // backbone.patch_size
    attn = attention.mean(1)
    attn = attn / attn.sum(-1, keepdim=True)
    sorted_attn, _ = attn.sort(dim=-1, descending=True)
    # DINO's rule: keep the most attended patches until they hold ``mass`` (including the patch that crosses it)
    keep = ((sorted_attn.cumsum(-1) - sorted_attn) < mass).sum(-1).clamp_min(1)
    threshold = sorted_attn.gather(1, (keep - 1)[:, None])
    patches = (attn >= threshold).float().reshape(-1, 1, grid_h, grid_w)
    masks = F.interpolate(patches, size=(size, size), mode="bilinear", align_corners=False)[:, 0] > 0.5
    out = torch.zeros_like(masks)
    for i, mask in enumerate(masks.cpu().numpy()):
        labels, num = ndimage.label(mask)
        if num == 0:
            out[i] = True
            continue
        largest = 1 + int(np.argmax(ndimage.sum_labels(mask, labels, range(1, num + 1))))
        out[i] = torch.from_numpy(labels == largest)
    return out


def mask_from_files(folder: Path, relative: Path, index: int, size: int, cache: dict) -> torch.Tensor:
    """Mask of image ``index`` from SelfMask-style shards (``*_<first>_<last>.pt``) or ``<relative>.png``."""
    png = (folder / relative).with_suffix(".png")
    if png.is_file():
        with Image.open(png) as img:
            return resize_mask(torch.from_numpy(np.asarray(img.convert("L")) > 127), (size, size))
    if "shards" not in cache:
        shards = []
        for path in folder.glob("*.pt"):
            first, last = path.stem.split("_")[-2:]
            shards.append((int(first), int(last), path))
        if not shards:
            raise FileNotFoundError(f"no mask for {relative}: neither {png} nor *_<first>_<last>.pt shards in {folder}")
        cache["shards"] = sorted(shards)
    for first, last, path in cache["shards"]:
        if first <= index <= last:
            if cache.get("loaded") != path:
                data = torch.load(path, map_location="cpu", weights_only=True)
                cache["data"] = torch.cat([torch.as_tensor(d) for d in data]) if isinstance(data, list) else data
                cache["loaded"] = path
            return resize_mask(cache["data"][index - first].bool(), (size, size))
    raise FileNotFoundError(f"image index {index} is in no mask shard of {folder}")


def device_of(cfg: dict) -> torch.device:
    """The torch device of ``cfg["device"]`` (auto: CUDA if available); ValueError for a bad or missing device."""
    if cfg["device"] == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(cfg["device"])
    except (RuntimeError, TypeError):
        raise ValueError(f"device={cfg['device']!r} is not a device; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={cfg['device']!r} but CUDA is not available here; use device=cpu or device=auto")
    return device


def load_backbone(cfg: dict) -> FrozenViT:
    """The frozen ViT that ``cfg`` describes (backbone, weights, input_size, backbone_kwargs) on ``cfg["device"]``."""
    return build_backbone(
        cfg["backbone"], cfg["pretrained"], cfg["checkpoint_path"], cfg["input_size"], **(cfg["backbone_kwargs"] or {})
    ).to(device_of(cfg))


def model_settings(cfg: dict) -> dict:
    """The settings that determine a backbone's outputs (paths such as ``checkpoint_path`` are not compared)."""
    return {k: cfg[k] for k in ("backbone", "pretrained", "backbone_kwargs", "input_size")}


def check_resume(folder: Path, settings: dict, shards: list[Path]) -> None:
    """Raise ValueError if ``folder``'s shards were made with other settings than ``settings``; then record these.

    Settings missing from the recorded ``index.json`` (older runs) are not compared.
    """
    index_file, settings = folder / "index.json", json.loads(json.dumps(settings))
    recorded = json.loads(index_file.read_text()) if shards and index_file.is_file() else {}
    for key, now in settings.items():
        if key in recorded and recorded[key] != now:
            was = recorded[key]
            if key == "images":
                key = "images (image_root or max_images)"
                was, now = (f"{len(v)} images: {v[0] if v else ''}, ..." for v in (was, now))
            raise ValueError(
                f"{folder} holds shards made with {key}={was!r} but this run has {key}={now!r}; "
                "use a new output folder or delete it to recompute"
            )
    index_file.write_text(json.dumps(settings))


def run_masks(cfg: dict) -> Path:
    """Write ``index.json`` and ``masks_<start>_<stop>.safetensors`` shards (uint8 (n, s, s)) to ``masks_dir``."""
    paths, out = pool_paths(cfg), make_dir(cfg["masks_dir"], "masks_dir")
    root = Path(cfg["image_root"])
    index = {
        "images": [str(p.relative_to(root)) for p in paths],
        "shard_size": cfg["shard_size"],
        "mask_size": cfg["mask_size"],
        "method": cfg["mask_method"],
        "backbone": cfg["backbone"] if cfg["mask_method"] == "saliency" else None,
        "saliency_mass": cfg["saliency_mass"] if cfg["mask_method"] == "saliency" else None,
        "model": model_settings(cfg) if cfg["mask_method"] == "saliency" else None,
    }
    check_resume(out, index, list(out.glob("masks_*.safetensors")))
    backbone = load_backbone(cfg) if cfg["mask_method"] == "saliency" else None
    cache: dict = {}
    for start, stop in tqdm(shard_ranges(len(paths), cfg["shard_size"]), desc="mask shards"):
        file = out / f"masks_{start:08d}_{stop:08d}.safetensors"
        if file.is_file():
            continue
        if backbone is not None:
            loader = DataLoader(
                PoolImages(paths[start:stop], cfg["input_size"]), cfg["batch_size"], num_workers=cfg["num_workers"]
            )
            masks = torch.cat(
                [
                    saliency_masks(backbone, b.to(device_of(cfg)), cfg["mask_size"], cfg["saliency_mass"]).cpu()
                    for b in loader
                ]
            )
        elif cfg["mask_method"] == "files":
            if not cfg["mask_files"]:
                raise ValueError("mask_method=files needs mask_files=FOLDER")
            folder = Path(cfg["mask_files"])
            masks = torch.stack(
                [
                    mask_from_files(folder, paths[i].relative_to(root), i, cfg["mask_size"], cache)
                    for i in range(start, stop)
                ]
            )
        else:
            raise ValueError(f"mask_method must be 'saliency' or 'files', got {cfg['mask_method']!r}")
        tmp = file.with_suffix(".tmp")
        save_file({"masks": masks.to(torch.uint8).contiguous()}, str(tmp))
        tmp.rename(file)
    log.info("masks of %d images in %s", len(paths), out)
    return out


def kmeans(features: np.ndarray, k: int, backend: str = "auto", seed: int = 0, iters: int = 25, gpu: bool = True):
    """(assignments (N,), centroids (k, D)) of k-means on float32 features; faiss or scikit-learn.

    A GPU build of faiss runs on every visible GPU (faiss.Kmeans stays on the CPU unless told); ``gpu=False`` keeps
    it on the CPU."""
    if backend in ("auto", "faiss"):
        try:
            import faiss
        except ImportError:
            if backend == "faiss":
                raise ImportError("kmeans_backend=faiss needs `pip install funai-counting[faiss-cpu]`") from None
        else:
            use_gpu = gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
            model = faiss.Kmeans(features.shape[1], k, niter=iters, seed=seed, verbose=False, gpu=use_gpu)
            model.train(np.ascontiguousarray(features, dtype=np.float32))
            _, labels = model.index.search(np.ascontiguousarray(features, dtype=np.float32), 1)
            return labels[:, 0].astype(np.int64), model.centroids
    if backend not in ("auto", "faiss", "sklearn"):
        raise ValueError(f"kmeans_backend must be auto, faiss or sklearn, got {backend!r}")
    from sklearn.cluster import KMeans

    model = KMeans(n_clusters=k, random_state=seed, n_init="auto").fit(features)
    return model.labels_.astype(np.int64), model.cluster_centers_.astype(np.float32)


@torch.no_grad()
def run_clusters(cfg: dict) -> Path:
    """CLS feature shards in ``features``, then k-means into ``num_clusters``; writes the ``clusters`` file (its
    ``{num_clusters}``, if any, replaced by the number)."""
    paths, k = pool_paths(cfg), int(cfg["num_clusters"])
    if not 1 <= k <= len(paths):  # before any feature is computed
        raise ValueError(f"num_clusters={k}: expected 1 to the number of pool images ({len(paths)})")
    out = Path(str(cfg["clusters"]).replace("{num_clusters}", str(k)))
    feat_dir = make_dir(cfg["features"], "features")
    make_dir(out.parent, "clusters")
    shards = list(feat_dir.glob("features_*.safetensors"))
    for shard in shards:  # the backbone is also in each shard (the only record of runs without index.json)
        with safe_open(str(shard), "pt") as f:
            if (made_with := (f.metadata() or {}).get("backbone")) != cfg["backbone"]:
                raise ValueError(
                    f"{feat_dir} holds shards made with backbone={made_with!r} but this run has "
                    f"backbone={cfg['backbone']!r}; use a new output folder or delete it to recompute"
                )
    root = Path(cfg["image_root"])
    images = [str(p.relative_to(root)) for p in paths]
    check_resume(feat_dir, {"images": images, "shard_size": cfg["shard_size"], **model_settings(cfg)}, shards)
    backbone = None
    shards = []
    for start, stop in tqdm(shard_ranges(len(paths), cfg["shard_size"]), desc="feature shards"):
        file = feat_dir / f"features_{start:08d}_{stop:08d}.safetensors"
        shards.append(file)
        if file.is_file():
            continue
        backbone = backbone or load_backbone(cfg)
        loader = DataLoader(
            PoolImages(paths[start:stop], cfg["input_size"]), cfg["batch_size"], num_workers=cfg["num_workers"]
        )
        feats = torch.cat([backbone.cls_features(b.to(device_of(cfg))).float().cpu() for b in loader])
        tmp = file.with_suffix(".tmp")
        save_file({"features": feats.contiguous()}, str(tmp), metadata={"backbone": cfg["backbone"]})
        tmp.rename(file)
    features = torch.cat([load_file(str(f))["features"] for f in shards]).numpy()
    log.info("k-means: %d features x %d dims into %d clusters", *features.shape, k)
    labels, centroids = kmeans(
        features, k, cfg["kmeans_backend"], cfg["kmeans_seed"], cfg["kmeans_iters"], gpu=cfg["device"] != "cpu"
    )
    settings = {k_: str(cfg[k_]) for k_ in ("backbone", "num_clusters", "kmeans_backend", "kmeans_seed", "input_size")}
    save_file(
        {"assignments": torch.from_numpy(labels), "centroids": torch.from_numpy(np.asarray(centroids))},
        str(out),
        metadata=settings,
    )
    out.with_suffix(".json").write_text(json.dumps({**settings, "num_images": len(features)}, indent=2))
    log.info("clusters written to %s", out)
    return out


def main(argv: list[str] | None = None) -> dict:
    """``counting-preprocess masks|clusters|all key=value ...``; returns the written paths."""
    argv = sys.argv[1:] if argv is None else argv
    cfg, rest = load_config(argv, default="preprocess", positional="[masks|clusters|all (default)]")
    steps = rest or ["all"]
    if len(steps) != 1 or steps[0] not in ("masks", "clusters", "all"):
        raise ValueError(f"expected one step: masks, clusters or all; got {rest}")
    if type(cfg["shard_size"]) is not int or cfg["shard_size"] < 1:
        raise ValueError(f"shard_size={cfg['shard_size']!r}: expected a positive number of images per shard")
    setup_logging(None)
    out = {}
    if steps[0] in ("masks", "all"):
        out["masks"] = str(run_masks(cfg))
    if steps[0] in ("clusters", "all"):
        out["clusters"] = str(run_clusters(cfg))
    return out


def cli() -> None:
    """Console-script entry point: exit status 0, or a one-line error naming the bad path, key or value."""
    run_cli(main, "counting-preprocess")


if __name__ == "__main__":
    cli()
