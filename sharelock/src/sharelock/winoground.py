"""`sharelock-winoground`: Winoground (Thrush et al., CVPR 2022) text, image and group scores.

Each of the 400 examples has two images and two captions made of the same words in another order; caption k
describes image k. With f(c, i) the cosine of caption c and image i:

- text score: f(C0, I0) > f(C1, I0) and f(C1, I1) > f(C0, I1) (each image prefers its caption);
- image score: f(C0, I0) > f(C0, I1) and f(C1, I1) > f(C1, I0) (each caption prefers its image);
- group score: both. Ties fail. Chance is 25 / 25 / 16.7 %.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from funai_common.datasets import open_image
from sharelock.config import load_config, read_json, run_cli
from sharelock.data import is_hf_spec, load_hf_split
from sharelock.models import ShareLock, load_model, resolve_checkpoint

log = logging.getLogger("sharelock")
TAG_KEY = "collapsed_tag"  # Object / Relation / Both in the release


def winoground_scores(sim: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example booleans {'text', 'image', 'group'} (N,) from similarities (N, 2, 2) indexed [example, caption,
    image]."""
    if sim.ndim != 3 or sim.shape[1:] != (2, 2):
        raise ValueError(f"similarities must be (N, 2, 2) [example, caption, image], got {tuple(sim.shape)}")
    text = (sim[:, 0, 0] > sim[:, 1, 0]) & (sim[:, 1, 1] > sim[:, 0, 1])
    image = (sim[:, 0, 0] > sim[:, 0, 1]) & (sim[:, 1, 1] > sim[:, 1, 0])
    return {"text": text, "image": image, "group": text & image}


def summarize(sim: torch.Tensor, tags: list[str] | None = None) -> dict[str, Any]:
    """Scores in percent over all examples and, when ``tags`` are given, per tag."""
    hits = winoground_scores(sim)
    out: dict[str, Any] = {"n": len(sim), **{k: 100.0 * v.float().mean().item() for k, v in hits.items()}}
    if tags:
        out["per_tag"] = {}
        for tag in sorted(set(tags)):
            keep = torch.tensor([t == tag for t in tags])
            out["per_tag"][tag] = {
                "n": int(keep.sum()),
                **{k: 100.0 * v[keep].float().mean().item() for k, v in hits.items()},
            }
    return out


def _image_file(folder: Path, stem: str) -> Path:
    for suffix in (".png", ".jpg", ".jpeg"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    raise FileNotFoundError(f"image {stem!r} not found in {folder} (looked for .png, .jpg, .jpeg)")


def load_examples(data: str | Path) -> list[dict[str, Any]]:
    """Examples {'caption_0', 'caption_1', 'image_0', 'image_1' (PIL or path), 'tag'} from the release's folder
    (``examples.jsonl`` and ``images/``, at the top or under ``data/``) or from ``hf:<name>[:<split>]``."""
    if is_hf_spec(data):
        rows = load_hf_split(str(data), "test")
        missing = {"image_0", "image_1", "caption_0", "caption_1"} - set(rows.column_names)
        if missing:
            raise KeyError(f"{data} lacks the Winoground column(s) {sorted(missing)}; it has {rows.column_names}")
        return [
            {
                **{k: r[k] for k in ("image_0", "image_1", "caption_0", "caption_1")},
                "tag": r.get(TAG_KEY),
                "id": r.get("id"),
            }
            for r in rows
        ]
    root = Path(data).expanduser()
    folder = next((f for f in (root, root / "data") if (f / "examples.jsonl").is_file()), None)
    if folder is None:
        raise FileNotFoundError(f"no examples.jsonl in {root} or {root / 'data'} (the Winoground release's data/)")
    examples = []
    for line_no, line in enumerate((folder / "examples.jsonl").read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{folder / 'examples.jsonl'} line {line_no} is not JSON: {err}") from None
        missing = {"image_0", "image_1", "caption_0", "caption_1"} - set(rec)
        if missing:
            raise KeyError(f"{folder / 'examples.jsonl'} line {line_no} lacks {sorted(missing)}")
        images = {k: _image_file(folder / "images", rec[k]) for k in ("image_0", "image_1")}
        examples.append({**rec, **images, "tag": rec.get(TAG_KEY)})
    if not examples:
        raise ValueError(f"{folder / 'examples.jsonl'} holds no examples")
    return examples


@torch.no_grad()
def similarities(model: ShareLock, examples: list[dict[str, Any]], batch_size: int = 32) -> torch.Tensor:
    """Cosines (N, 2, 2) [example, caption, image] of a model with attached backbones."""

    def pil(x) -> Image.Image:
        return x if isinstance(x, Image.Image) else open_image(x)

    images = [ex[f"image_{k}"] for ex in examples for k in (0, 1)]
    img = torch.cat(
        [
            model.encode_image([pil(x) for x in images[i : i + batch_size]])
            for i in tqdm(range(0, len(images), batch_size), desc="winoground images")
        ]
    ).view(len(examples), 2, -1)
    txt = model.encode_text([ex[f"caption_{k}"] for ex in examples for k in (0, 1)]).view(len(examples), 2, -1)
    return torch.einsum("ncd,nid->nci", txt.to(img.device), img).cpu()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point of `sharelock-winoground`; prints a table and writes metrics.json and per_example.jsonl (id, tag,
    the 2 x 2 cosines [caption][image] and the three outcomes)."""
    from sharelock.features import build_language_encoder, build_vision_encoder, language_spec, with_default_dtype
    from sharelock.train import setup_logging

    cfg = load_config(sys.argv[1:] if argv is None else argv, "winoground")
    if not cfg["checkpoint"]:
        raise ValueError("set checkpoint=RUN_DIR or a checkpoint directory")
    if not cfg["data"]:
        raise ValueError("set data=WINOGROUND_DATA_FOLDER or data=hf:facebook/winoground")
    ckpt = resolve_checkpoint(cfg["checkpoint"])
    backbones = read_json(ckpt / "meta.json").get("backbones") or {}
    if not backbones.get("vision"):
        raise ValueError(f"{ckpt} records no vision backbone: train from stores extracted by sharelock-features")
    text_spec = language_spec(backbones, cfg["language_model"])
    examples = load_examples(cfg["data"])  # checked before any model is loaded
    out = Path(cfg["out"] or ckpt.parent.parent / "eval" / "winoground")
    setup_logging(out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(ckpt, device)
    language, tokenizer = build_language_encoder(with_default_dtype(text_spec, device), device)
    vision = build_vision_encoder(backbones["vision"]).to(device)
    model.attach_encoders(vision, None, language, tokenizer, cfg["text_batch_size"])
    sim = similarities(model, examples, cfg["batch_size"])
    tags = [ex["tag"] for ex in examples]
    result = {"checkpoint": str(ckpt), "data": str(cfg["data"]), **summarize(sim, tags if all(tags) else None)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    hits = winoground_scores(sim)
    with open(out / "per_example.jsonl", "w") as f:
        for n, ex in enumerate(examples):
            row = {"id": n if ex.get("id") is None else ex["id"], "tag": ex["tag"], "sim": sim[n].tolist()}
            f.write(json.dumps(row | {k: bool(v[n]) for k, v in hits.items()}) + "\n")
    table = "| examples | n | text | image | group |\n|---|---|---|---|---|\n"
    rows = [("all", result)] + sorted(result.get("per_tag", {}).items())
    table += "\n".join(f"| {k} | {r['n']} | {r['text']:.1f} | {r['image']:.1f} | {r['group']:.1f} |" for k, r in rows)
    log.info("Winoground scores (%%)\n%s", table)
    return result


def cli() -> None:
    """Console-script entry point: exit status 0, or a one-line error naming the bad path, key or value."""
    run_cli(main, "sharelock-winoground", ImportError)


if __name__ == "__main__":
    cli()
