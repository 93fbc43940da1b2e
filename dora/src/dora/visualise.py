"""``dora-visualise``: discovered object masks over a clip, as a PNG grid and an mp4."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dora.augment import normalize
from dora.config import load_config, make_dir, run_cli
from dora.models import forward_with_attention
from dora.tracking import choose_heads, track_and_mask
from dora.video import open_source

COLOURS = np.array([[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240]])


def prepare_clip(frames: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float (T, 3, size, size) in [0, 1]: short side resized to ``size``, centre crop."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255
    h, w = x.shape[-2:]
    s = size / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * s)), max(size, round(w * s))), mode="bilinear", antialias=True)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top : top + size, left : left + size].clamp(0, 1)


@torch.no_grad()
def clip_masks(model, clip: torch.Tensor, heads: list[int]) -> torch.Tensor:
    """Binary object masks (K, T, S, S) of a clip (T, 3, S, S) in [0, 1] under a timm ViT."""
    x = normalize(clip)
    _, tokens, attn, query, key = forward_with_attention(model, x)
    split = lambda a: a.unsqueeze(1)  # noqa: E731  (T, ...) -> (T, B=1, ...)
    ones = torch.ones(1, *clip.shape, device=clip.device)
    patch = model.patch_embed.patch_size[0]
    masks = track_and_mask(split(attn), split(query), split(key), split(tokens[:, 1:]), ones, patch, heads)
    return masks[:, 0, :, 0]


def overlay(clip: torch.Tensor, masks: torch.Tensor, alpha: float = 0.55) -> np.ndarray:
    """uint8 (T, S, S*(K+1), 3): each frame, then one panel per object with its mask tinted."""
    frames = (clip.permute(0, 2, 3, 1).numpy() * 255).astype(np.float32)
    panels = [frames]
    for k in range(masks.shape[0]):
        m = masks[k].numpy()[..., None]
        tinted = frames * (1 - alpha * m) + alpha * m * COLOURS[k % len(COLOURS)]
        panels.append(tinted * (0.35 + 0.65 * m))
    return np.concatenate(panels, axis=2).clip(0, 255).astype(np.uint8)


def save_grid(panels: np.ndarray, path: Path, title: str = "") -> None:
    """PNG: one row per frame (frame | object 1 | object 2 | ...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = panels.shape[0]
    fig, axes = plt.subplots(t, 1, figsize=(2 * panels.shape[2] / panels.shape[1], 2 * t), squeeze=False)
    for i in range(t):
        axes[i, 0].imshow(panels[i])
        axes[i, 0].axis("off")
        axes[i, 0].set_title(f"frame {i}", fontsize=8, loc="left")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def visualise(model, frames: np.ndarray, out_dir: Path, size: int, heads: list[int], fps: int = 2, title: str = ""):
    """Write masks.png and masks.mp4 for a clip; returns the masks (K, T, S, S)."""
    from dora.synthetic import write_video

    out_dir.mkdir(parents=True, exist_ok=True)
    clip = prepare_clip(frames, size)
    masks = clip_masks(model, clip, heads)
    panels = overlay(clip, masks)
    save_grid(panels, out_dir / "masks.png", title or f"heads {heads}")
    even = panels[:, : panels.shape[1] // 2 * 2, : panels.shape[2] // 2 * 2]
    write_video(out_dir / "masks.mp4", even, fps=fps)
    return masks


def main(argv: list[str] | None = None) -> dict:
    """Load a backbone, read a clip, track its objects; writes masks.png, masks.mp4 and masks.json."""
    from dora.eval import load_eval_backbone, resolve_checkpoint_model

    cfg = load_config(argv if argv is not None else sys.argv[1:], default="visualise.yaml")
    if not cfg["video"]:
        raise ValueError("video=PATH is required (a video file, frame-cache folder or frame folder)")
    for key, least in (("start", 0), ("num_frames", 1), ("step", 1)):
        if type(cfg[key]) is not int or cfg[key] < least:
            raise ValueError(f"{key}={cfg[key]!r}: expected an integer >= {least}")
    resolve_checkpoint_model(cfg)
    model = load_eval_backbone(cfg)
    patch = model.patch_embed.patch_size[0]
    if cfg["size"] % patch:
        raise ValueError(f"size={cfg['size']}: expected a multiple of the model's patch size {patch}")
    src = open_source(cfg["video"], short_side=cfg["size"])
    idx = [cfg["start"] + cfg["step"] * i for i in range(cfg["num_frames"])]
    if idx[-1] >= src.num_frames:
        raise ValueError(
            f"clip frames {idx[0]}..{idx[-1]} (start={cfg['start']}, num_frames={cfg['num_frames']}, "
            f"step={cfg['step']}) exceed the video's {src.num_frames} frames: lower start, num_frames or step"
        )
    got = src.read(idx)
    idx = [i for i in idx if i in got]  # frames the source could not decode (counted in its warning) are left out
    if not idx:
        raise ValueError(f"none of the clip's frames could be decoded from {cfg['video']}")
    frames = np.stack([got[i] for i in idx])
    num_heads = model.blocks[-1].attn.num_heads
    heads = cfg["heads"]
    if heads is not None and (
        not isinstance(heads, list) or not all(isinstance(h, int) and 0 <= h < num_heads for h in heads)
    ):
        raise ValueError(f"heads={heads!r}: expected a list of head indices in 0..{num_heads - 1}, e.g. heads=[0, 2]")
    heads = heads or choose_heads(num_heads, cfg["num_objects"], random.Random(cfg["seed"]))
    out_dir = make_dir(cfg["out_dir"], "out_dir")
    masks = visualise(model, frames, out_dir, cfg["size"], heads, cfg["fps"])
    info = {
        "checkpoint": cfg["checkpoint"],
        "heads": heads,
        "frames": idx,
        "mask_fraction": masks.mean(dim=(1, 2, 3)).tolist(),
    }
    (out_dir / "masks.json").write_text(json.dumps(info, indent=1))
    print(f"wrote {out_dir / 'masks.png'} and {out_dir / 'masks.mp4'}")
    return info


def cli() -> None:
    """Console-script entry point: exit status 0, or a one-line error naming the bad path, key or value."""
    run_cli(main, "dora-visualise")


if __name__ == "__main__":
    cli()
