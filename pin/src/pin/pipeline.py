"""Glue shared by the CLIs: config -> VLM, pools, datasets; the training loss and box prediction of a batch."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .boxes import GridCodec
from .config import get_key
from .layout import LayoutSampler
from .prompts import IGNORE_INDEX, build_labels, end_text, eval_prompt, loss_free_prefix, masked_lm_loss, training_text
from .synonyms import load_synonyms
from .synthetic import Backgrounds, Composer, ObjectPool, SyntheticCompositions, procedural_pool
from .vlm import FrozenVLM
from .zoo import build_vlm


def check_image_size(cfg: dict, model_size: int | None) -> None:
    """Compositions, eval frames and size bins live at codec.image_size, which must be the VLM's input size
    (the reference has one image_size for both); `model_size` None (the checkpoint default, not known yet) passes."""
    codec_size = cfg["codec"]["image_size"]
    if model_size is not None and int(model_size) != int(codec_size):
        raise ValueError(
            f"codec.image_size={codec_size} differs from model.image_size={model_size}: synthetic images would be "
            f"composed at {codec_size} px and resized; set codec.image_size={model_size} (or model.image_size="
            f"{codec_size})"
        )


def codec_from_cfg(cfg: dict) -> GridCodec:
    """The box codec; raises ValueError when codec.image_size != model.image_size."""
    c = cfg["codec"]
    check_image_size(cfg, cfg.get("model", {}).get("image_size"))
    return GridCodec(c["grid"], c["max_value"], c["image_size"])


def pools_from_cfg(cfg: dict) -> tuple[ObjectPool, ObjectPool, ObjectPool]:
    """(train, val, zero_shot) object pools from data.objects (folder or json) or data.procedural_classes.

    `data.held_out` ("default": the COCO + PVOC classes, or a list) names the zero-shot classes; every name of a
    given list must be a class of the pool (a typo would otherwise be trained on)."""
    d = cfg["data"]
    held = d.get("held_out") or ()
    if d.get("objects"):
        src = str(d["objects"])
        pool = ObjectPool.from_json(src) if src.endswith(".json") else ObjectPool.from_folder(src)
        names = pool.names
    elif d.get("procedural_classes"):
        names = list(d["procedural_classes"])
    else:
        raise ValueError(
            "config needs data.objects (object pool folder or LVIS_instance_pools.json) or "
            "data.procedural_classes (list of shape names)"
        )
    if isinstance(held, str) and held != "default":  # iterating it would hold out its letters
        raise ValueError(f"data.held_out={held!r}: expected 'default' or a list of class names, e.g. [{held}]")
    if held == "default":
        from .heldout import HELD_OUT_CLASSES

        held = HELD_OUT_CLASSES
    else:
        unknown = sorted(h for h in held if h.lower() not in {n.lower() for n in names})
        if unknown:
            source = f"data.objects={d['objects']}" if d.get("objects") else "data.procedural_classes"
            raise ValueError(
                f"data.held_out names {unknown}, which are not classes of the object pool ({source}: "
                f"{len(names)} classes, e.g. {sorted(names)[:8]})"
            )
    if d.get("objects"):
        train, val, zero_shot = pool.split(held, d.get("val_size", 0), d.get("split_seed", 10))
        if d.get("val_size", 0) >= len(train) + len(val):
            raise ValueError(
                f"data.val_size={d.get('val_size', 0)} leaves no training cut-outs: data.objects={d['objects']} holds "
                f"{len(train) + len(val)} outside the held-out classes"
            )
        return train, val, zero_shot
    # held-out shapes form the zero-shot pool; without any it is empty (never the val pool's trained classes)
    held = {h.lower() for h in held}
    seen = [n for n in names if n.lower() not in held]
    unseen = [n for n in names if n.lower() in held]
    if not seen:
        raise ValueError(f"data.held_out={sorted(held)} holds every one of data.procedural_classes")
    pool = procedural_pool(seen, d.get("per_class", 8), seed=cfg["seed"])
    val = procedural_pool(seen, d.get("per_class", 8), seed=cfg["seed"] + 1)
    zero_shot = procedural_pool(unseen, d.get("per_class", 8), seed=cfg["seed"] + 2) if unseen else ObjectPool([])
    return pool, val, zero_shot


def class_names(cfg: dict) -> list[str]:
    """Every name the tokenizer of a tiny VLM must know, which it would otherwise read as <unk>: the procedural
    classes, their synonyms with data.synonyms_description, the relative words "behind" and "before" with referral."""
    d = cfg["data"]
    names = list(d.get("procedural_classes") or [])
    if d.get("synonyms_description") and names:
        synonyms = load_synonyms(d["synonyms_path"] and str(d["synonyms_path"]))
        names += [w for name in names for w in synonyms.get(name, []) if w not in names]
    if d.get("same_object_likelihood"):
        names += ["behind", "before"]
    return names


def vlm_from_cfg(cfg: dict) -> FrozenVLM:
    """The frozen VLM of model.*; its input size (model.image_size or the checkpoint's) must be codec.image_size."""
    m = cfg["model"]
    vlm = build_vlm(
        m["name"],
        m.get("kind", "blip2"),
        class_names(cfg),
        codec_from_cfg(cfg),
        m.get("dtype", "float32"),
        seed=cfg["seed"],
        image_size=m.get("image_size"),
        tiny_options=m.get("tiny"),
    )
    check_image_size(cfg, vlm.image_size)
    return vlm


# what a checkpoint's weights mean: settings that must be those it was trained with (dropout aside)
WEIGHT_KEYS = {
    "pin": ("pin.table_dim", "pin.hidden_dims", "pin.learned_table"),
    "vpt": ("vpt.num_tokens",),
    "lora": ("lora.r", "lora.alpha", "lora.target_modules"),
}


_ABSENT = object()


def _as_typed(key: str, value):
    """``lora.target_modules=qkv`` on the command line is the list ``[qkv]`` (as ``Method`` reads it)."""
    return [value] if key == "lora.target_modules" and isinstance(value, str) else value


def model_differences(cfg: dict, recorded: dict) -> list[str]:
    """The settings in which ``cfg`` builds another VLM, method or box codec than ``recorded`` (a checkpoint's
    config) did, as ``key=value (checkpoint: value)``; a model named by another path to the same folder name is the
    same model. A tiny random VLM is also its seed and the words its tokenizer was built with."""
    keys = ["method", "model.kind", "model.image_size", "codec.grid", "codec.max_value", "codec.image_size"]
    keys += WEIGHT_KEYS.get(recorded.get("method", cfg["method"]), ())
    tiny = str(cfg["model"]["name"]).startswith("tiny")
    if tiny:
        keys += ["seed", "model.tiny", "data.procedural_classes", "data.synonyms_description"]
    pairs = [(k, _as_typed(k, get_key(cfg, k, _ABSENT)), _as_typed(k, get_key(recorded, k, _ABSENT))) for k in keys]
    referral = get_key(recorded, "data.same_object_likelihood", _ABSENT)
    if tiny and referral is not _ABSENT:  # with referral on, "behind" and "before" join the tiny vocabulary
        pairs.append(("data.same_object_likelihood > 0", bool(cfg["data"]["same_object_likelihood"]), bool(referral)))
    mine, theirs = (str(get_key(c, "model.name", _ABSENT)).rstrip("/").rsplit("/", 1)[-1] for c in (cfg, recorded))
    if mine != theirs:
        pairs.append(("model.name", cfg["model"]["name"], get_key(recorded, "model.name", _ABSENT)))
    return [f"{key}={a!r} (checkpoint: {b!r})" for key, a, b in pairs if a != b and b is not _ABSENT]  # older key sets


def check_trained_with(cfg: dict, checkpoint: Path, given: str, verb: str) -> None:
    """Refuse a checkpoint folder whose recorded config builds another VLM, method or codec than ``cfg``
    (``model_differences``); files without a config (.safetensors, reference .pt) are not checked."""
    state = Path(checkpoint) / "state.json"
    if not state.is_file():
        return
    diffs = model_differences(cfg, json.loads(state.read_text()).get("config") or {})
    if diffs:
        raise ValueError(
            f"{given}: {checkpoint} was trained with other settings: {'; '.join(diffs)}; {verb} it with its run's "
            f"config (--config {Path(checkpoint) / 'config.yaml'}) or the same overrides"
        )


def dataset_from_cfg(cfg: dict, pool: ObjectPool, split: str = "train", length: int | None = None):
    """Synthetic compositions for `split` (train uses data.backgrounds, val/test data.val_backgrounds); objects are
    described by synonyms from data.synonyms_path in every split when data.synonyms_description is on."""
    d, c = cfg["data"], cfg["codec"]
    sampler = LayoutSampler(c["grid"], c["image_size"], d["min_fractions"], d.get("max_cells", c["grid"]))
    bg_root = d.get("backgrounds") if split == "train" else d.get("val_backgrounds") or d.get("backgrounds")
    backgrounds = Backgrounds(bg_root, c["image_size"])
    seed = cfg["seed"] + (0 if split == "train" else 1000)
    synonyms = load_synonyms(d["synonyms_path"] and str(d["synonyms_path"])) if d.get("synonyms_description") else None
    composer = Composer(
        pool,
        backgrounds,
        sampler,
        seed,
        d["max_objects"],
        d["max_objects"],
        d.get("same_object_likelihood", 0.0),
        d.get("pos_img_referral", 0.0),
        d.get("object_sampling", "instances"),
        synonyms,
    )
    n = length if length is not None else (d["train_size"] if split == "train" else d.get("val_size", 1000))
    return SyntheticCompositions(composer, n, d["switch_epoch"])


def pixel_values(vlm: FrozenVLM, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) in [0, 1] -> resized to the VLM's input size and normalised."""
    if images.shape[-1] != vlm.image_size or images.shape[-2] != vlm.image_size:
        images = F.interpolate(images, size=(vlm.image_size, vlm.image_size), mode="bilinear", align_corners=False)
    return vlm.normalise(images)


def training_batch(vlm: FrozenVLM, codec: GridCodec, phrases: Sequence[str], cells, reconstruct: bool):
    """(input_ids, attention_mask, targets) of the training sentences, right-padded."""
    end = end_text(vlm.kind, vlm.end_token)
    texts = [training_text(p, codec.encode(c), end, reconstruct) for p, c in zip(phrases, cells)]
    ids, mask = vlm.batch(texts, padding_side="right")
    prefix = [vlm.prefix_length(loss_free_prefix(p, reconstruct)) for p in phrases]
    targets = build_labels(ids, prefix, vlm.pad_token_id, vlm.image_token_id, mask)
    return ids, mask, targets


def _logits_and_targets(vlm: FrozenVLM, codec: GridCodec, batch: dict, device):
    ids, mask, targets = training_batch(vlm, codec, batch["phrase"], batch["cells"].tolist(), batch["reconstruct"])
    pv = pixel_values(vlm, batch["image"].to(device)).to(next(vlm.model.parameters()).dtype)
    return vlm.logits(pv, ids.to(device), mask.to(device)), targets.to(device)


def training_loss(vlm: FrozenVLM, codec: GridCodec, batch: dict, device) -> torch.Tensor:
    """Next-token cross-entropy of a collated synthetic batch on the (hooked) VLM."""
    return masked_lm_loss(*_logits_and_targets(vlm, codec, batch, device))


def summed_training_loss(vlm: FrozenVLM, codec: GridCodec, batch: dict, device) -> tuple[torch.Tensor, int]:
    """(sum of the supervised tokens' cross-entropies, their number): for token means over many batches."""
    logits, targets = _logits_and_targets(vlm, codec, batch, device)
    return masked_lm_loss(logits, targets, reduction="sum"), int((targets != IGNORE_INDEX).sum())


def predict_boxes(
    vlm: FrozenVLM,
    codec: GridCodec,
    images: torch.Tensor,
    names: Sequence[str],
    num_beams: int = 3,
    max_new_tokens: int = 12,
    context: str = "",
) -> tuple[list[list[float]], list[str]]:
    """Prompt "In the image is a {name} located at" per image and parse the boxes; (boxes in pixels, texts).

    `context` (k-shot baseline) is prepended to every prompt.
    """
    device = next(vlm.model.parameters()).device
    pv = pixel_values(vlm, images.to(device)).to(next(vlm.model.parameters()).dtype)
    texts = vlm.generate(pv, [context + eval_prompt(n) for n in names], num_beams, max_new_tokens)
    return [codec.decode(t[len(context) :]) for t in texts], texts
