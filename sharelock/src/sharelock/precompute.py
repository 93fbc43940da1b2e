"""`sharelock-features`: precompute vision (CLS) or language (last-token) features into a feature store.

Resumable: completed shards are kept and their ids skipped on restart. Several GPUs: `accelerate launch -m
sharelock.precompute ...`; each process takes every n-th pending sample and writes its own shards.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm import tqdm

from sharelock.config import check_output_dir, load_config, run_cli
from sharelock.data import (
    ImageCaptionFolder,
    LabelledImages,
    eval_transform,
    expand_urls,
    iter_webdataset,
    load_class_names,
    read_captions,
)
from sharelock.features import (
    build_language_encoder,
    build_vision_encoder,
    last_token_features,
    text_dim,
    vision_dim,
    with_default_dtype,
)
from sharelock.models import format_prompt
from sharelock.store import FeatureWriter
from sharelock.templates import resolve_templates

log = logging.getLogger("sharelock.features")


def vision_store_name(spec: dict) -> str:
    """Model name recorded in a vision store: the timm name, plus the local checkpoint if one is used."""
    return f"{spec['model']}@{spec['checkpoint']}" if spec.get("checkpoint") else spec["model"]


class _WebImages(torch.utils.data.IterableDataset):
    def __init__(self, urls: list[str], done: set[str], rank: int, world: int) -> None:
        self.urls, self.done, self.rank, self.world = urls, done, rank, world
        self.transform = eval_transform()

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor, int]]:
        info = torch.utils.data.get_worker_info()
        urls = self.urls[self.rank :: self.world]
        if info is not None:
            urls = urls[info.id :: info.num_workers]
        for key, image, _ in iter_webdataset(urls, images=True, captions=False, skip=self.done.__contains__):
            yield key, self.transform(image), -1


class _Pending(torch.utils.data.Dataset):
    """Items of a map-style (id, image[, label]) dataset whose ids are not done, every world-th for this rank."""

    def __init__(self, dataset, done: set[str], rank: int, world: int) -> None:
        ids = dataset.ids if hasattr(dataset, "ids") else [str(i) for i in range(len(dataset))]
        self.dataset = dataset
        self.items = [i for i, k in enumerate(ids) if k not in done][rank::world]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.dataset[self.items[i]]
        return item if len(item) == 3 else (*item, -1)


def extract_images(cfg: dict, accelerator: Accelerator) -> Path:
    """Image features for a webdataset, a captioned image folder or a labelled set (labels stored too)."""
    src = cfg["source"]
    # the source first: a wrong path fails before a backbone is loaded (or downloaded) and before the store exists
    if src["type"] == "webdataset":
        urls, samples = expand_urls(src["path"]), None
    elif src["type"] == "folder":
        if not src["captions"]:
            raise ValueError("source.type=folder needs source.captions=FILE (JSON or CSV naming the images)")
        samples = ImageCaptionFolder(src["path"], src["captions"])
    elif src["type"] == "labelled":
        samples = LabelledImages(
            src["path"], src["kind"], src["split"], image_column=src["image_column"], label_column=src["label_column"]
        )
    else:
        raise ValueError(f"source.type={src['type']!r} is not an image source: use webdataset, folder or labelled")
    vision = with_default_dtype(cfg["vision"], accelerator.device)
    if vision["dtype"] not in ("float32", "bfloat16"):
        raise ValueError(f"vision.dtype={vision['dtype']!r}: expected float32, bfloat16 or null (the default)")
    encoder = build_vision_encoder(vision).to(accelerator.device)
    source = dict(src)
    if src["type"] == "labelled":  # the class order that the labels index: folder names, or an hf: dataset's names
        source["classes"] = samples.classes
    writer = FeatureWriter(
        cfg["out"], vision_store_name(cfg["vision"]), "image", vision_dim(encoder), cfg["store_dtype"],
        cfg["shard_size"], accelerator.process_index, backbone={"vision": vision}, source=source,
    )  # fmt: skip
    accelerator.wait_for_everyone()  # every rank has read the completed ids before any rank adds shards
    rank, world = accelerator.process_index, accelerator.num_processes
    if samples is None:
        dataset, total = _WebImages(urls, writer.done, rank, world), None
    else:
        dataset = _Pending(samples, writer.done, rank, world)
        total = len(dataset)
    workers = cfg["num_workers"] if not isinstance(dataset, _WebImages) else min(cfg["num_workers"], len(dataset.urls))
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg["batch_size"], num_workers=workers)
    # bf16 autocast by default on GPU (vision.dtype=float32: the reference's float32 forward)
    autocast = torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=vision["dtype"] == "bfloat16")
    labelled = src["type"] == "labelled"
    bar = tqdm(total=total, desc="image features", disable=not accelerator.is_local_main_process)
    with torch.no_grad(), autocast:
        for ids, images, labels in loader:
            feats = encoder(images.to(accelerator.device)).float()
            writer.add(list(ids), feats, labels.tolist() if labelled else None)
            bar.update(len(ids))
    writer.close()
    bar.close()
    return Path(cfg["out"])


def _texts(src: dict) -> tuple[list[str], list[str]]:
    """(ids, texts) of a text source."""
    if src["type"] == "captions":
        caps = read_captions(src["path"])
        return list(caps), list(caps.values())
    if src["type"] == "webdataset":
        pairs = [(k, c) for k, _, c in iter_webdataset(src["path"], images=False, captions=True)]
        if not pairs:
            raise ValueError(f"no captions ({{key}}.txt members) in the webdataset shards {src['path']!r}")
        return [k for k, _ in pairs], [c for _, c in pairs]
    if src["type"] == "classnames":
        names = load_class_names(src["path"], label_column=src["label_column"])
        templates = resolve_templates(src["template"])
        ids = [f"{t}/{c}" if len(templates) > 1 else str(c) for t in range(len(templates)) for c in range(len(names))]
        return ids, [format_prompt(t, n) for t in templates for n in names]
    raise ValueError(f"source.type={src['type']!r} is not a text source: use captions, webdataset or classnames")


def extract_texts(cfg: dict, accelerator: Accelerator) -> Path:
    """Last-token LLM features of captions or class-name prompts, length-bucketed within chunks."""
    ids, texts = _texts(cfg["source"])  # first: a wrong source fails before the language model is loaded
    spec = with_default_dtype(cfg["language"], accelerator.device)
    model, tokenizer = build_language_encoder(spec, accelerator.device)
    writer = FeatureWriter(
        cfg["out"], spec["model"], "text", text_dim(model), cfg["store_dtype"], cfg["shard_size"],
        accelerator.process_index, backbone={"text": spec}, source=cfg["source"],
    )  # fmt: skip
    accelerator.wait_for_everyone()  # every rank has read the completed ids before any rank adds shards
    todo = [i for i, k in enumerate(ids) if k not in writer.done][
        accelerator.process_index :: accelerator.num_processes
    ]
    bar = tqdm(total=len(todo), desc="text features", disable=not accelerator.is_local_main_process)
    for start in range(0, len(todo), cfg["chunk_size"]):
        chunk = todo[start : start + cfg["chunk_size"]]
        feats = last_token_features(
            model, tokenizer, [texts[i] for i in chunk], cfg["text_batch_size"], cfg["language"]["max_length"]
        )
        writer.add([ids[i] for i in chunk], feats)
        bar.update(len(chunk))
    writer.close()
    bar.close()
    return Path(cfg["out"])


def main(argv: list[str] | None = None) -> Path:
    """Entry point of `sharelock-features`; returns the store directory."""
    cfg = load_config(sys.argv[1:] if argv is None else argv, "features")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    if not cfg["out"]:
        raise ValueError("set out=DIR (the feature store directory)")
    check_output_dir(cfg["out"])
    if not cfg["source"]["path"]:
        raise ValueError(
            "set source.path (tar pattern, image root, hf:<name>[:<split>], captions file or class-names file)"
        )
    # CPU processes (gloo, `accelerate launch --multi_gpu` without GPUs) must form one job, not several rank-0 runs
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if cfg["modality"] == "image":
        out = extract_images(cfg, accelerator)
    elif cfg["modality"] == "text":
        out = extract_texts(cfg, accelerator)
    else:
        raise ValueError(f"modality={cfg['modality']!r}: expected 'image' or 'text'")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group: gloo threads left at exit can abort a worker
    log.info("features written to %s", out)
    return out


def cli() -> None:
    """Console-script entry point: exit status 0, or a one-line error naming the bad path, key or value."""
    run_cli(main, "sharelock-features", ImportError)


if __name__ == "__main__":
    cli()
