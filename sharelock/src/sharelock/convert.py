"""`sharelock-convert`: an official ShareLock Lightning checkpoint (FunAILab/ShareLock `*.ckpt`) -> a checkpoint folder.

The file is read without running code from it (`sharelock.safe_pickle`). The head layout (layers, widths) comes from
the weight shapes and is checked against the checkpoint's `hyper_parameters` (the reference's OmegaConf config,
`configs/default_config.yaml` layout: `model.vision_encoder`, `model.language_encoder`,
`model.{vision,language}_projector.{num_layers,hidden_size,normalize}`, `model.embedding_space_dim`). The backbones
come from the command line, else from those hyper-parameters.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch

from sharelock.config import load_config, run_cli
from sharelock.models import MODEL_FILE, ShareLock, from_reference_state_dict
from sharelock.safe_pickle import load_checkpoint, plain

log = logging.getLogger("sharelock")

# the reference's backbone names (torch.hub; sharelock/utils/misc.py there) -> (timm name, feature width)
_DINOV2 = {"s": ("small", 384), "b": ("base", 768), "l": ("large", 1024), "g": ("giant", 1536)}
REFERENCE_VISION = {
    f"dinov2_vit{k}14{reg}": (f"vit_{size}_patch14_{'reg4_' if reg else ''}dinov2.lvd142m", dim)
    for k, (size, dim) in _DINOV2.items()
    for reg in ("", "_reg")
}
REFERENCE_VISION["dino_vitb16"] = ("vit_base_patch16_224.dino", 768)
KNOWN_WIDTHS = {**dict(REFERENCE_VISION.values()), "meta-llama/Meta-Llama-3-8B": 4096}


def hyper_parameter(hparams: dict, dotted: str) -> Any:
    """The plain value at `a.b.c` of the hyper-parameters, or None when absent or not plain."""
    node: Any = hparams
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, str | int | float) else None


def head_layout(state: dict[str, torch.Tensor], prefix: str) -> tuple[int, int | None, int | None, int | None]:
    """(layers, input width, hidden width, output width) of a projection head from its weights under `prefix`:
    Linear weights at Sequential indices 0, 4, 8, ... (blocks Linear, BatchNorm1d, ReLU, Dropout); none: identity."""
    linear = sorted(
        int(k[len(prefix) :].split(".")[0]) for k, v in state.items() if k.startswith(prefix) and v.ndim == 2
    )
    if not linear:
        return 0, None, None, None
    if linear != list(range(0, 4 * len(linear), 4)):
        raise ValueError(f"{prefix}*: Linear weights at indices {linear}, expected 0, 4, 8, ... (the reference head)")
    first, last = state[f"{prefix}{linear[0]}.weight"], state[f"{prefix}{linear[-1]}.weight"]
    return len(linear), first.shape[1], first.shape[0] if len(linear) > 1 else None, last.shape[0]


def model_config(state: dict[str, torch.Tensor], hparams: dict, overrides: dict) -> dict[str, Any]:
    """`ShareLock(**config)` for renamed reference weights: layout from the shapes, normalisation from `overrides`
    (`model.*` of the config), else the hyper-parameters, else the reference default (True)."""
    t_layers, t_in, t_hidden, t_out = head_layout(state, "text_head.layers.")
    v_layers, v_in, v_hidden, v_out = head_layout(state, "vision_head.layers.")
    if not (t_layers or v_layers):
        raise ValueError("the checkpoint holds no projection weights: cannot tell the feature widths")
    if t_layers and v_layers and t_out != v_out:
        raise ValueError(f"the language head outputs {t_out} dims, the vision head {v_out}: not one embedding space")
    if t_hidden and v_hidden and t_hidden != v_hidden:
        raise ValueError(f"hidden widths differ (language {t_hidden}, vision {v_hidden}): ShareLock has one hidden_dim")
    embedding = t_out if t_layers else v_out
    config = dict(
        vision_dim=v_in or embedding,
        text_dim=t_in or embedding,
        text_layers=t_layers,
        hidden_dim=t_hidden or v_hidden or 4096,
        vision_layers=v_layers,
        embedding_dim=embedding if t_layers and v_layers else None,
        dropout=overrides["dropout"],
    )
    for side, head in (("vision", "vision_projector"), ("text", "language_projector")):
        stored = hyper_parameter(hparams, f"model.{head}.normalize")
        given = overrides[f"{side}_normalize"]
        config[f"{side}_normalize"] = bool(given if given is not None else stored if stored is not None else True)
    return config


def check_hyper_parameters(config: dict[str, Any], hparams: dict) -> None:
    """Raise if a head size recorded in the hyper-parameters disagrees with the one read from the weights."""
    expected = {
        "model.language_projector.num_layers": config["text_layers"],
        "model.vision_projector.num_layers": config["vision_layers"],
    }
    for layers, head in (("text_layers", "language_projector"), ("vision_layers", "vision_projector")):
        if config[layers] > 1:
            expected[f"model.{head}.hidden_size"] = config["hidden_dim"]
    if config["embedding_dim"] is not None:
        expected["model.embedding_space_dim"] = config["embedding_dim"]
    wrong = []
    for key, inferred in expected.items():
        stored = hyper_parameter(hparams, key)
        if key.endswith("num_layers") and isinstance(stored, int):
            stored = max(stored, 0)  # the reference: num_layers < 1 is the identity
        if stored is not None and stored != inferred:
            wrong.append(f"{key}={stored!r} but the weights give {inferred}")
    if wrong:
        raise ValueError("the weights disagree with the checkpoint's hyper_parameters: " + "; ".join(wrong))


def backbone_specs(cfg: dict, hparams: dict, config: dict[str, Any]) -> dict[str, Any]:
    """meta.json's `backbones` (as `sharelock-train` records them from its feature stores): `vision.*` / `language.*`
    of the config, names missing there taken from the hyper-parameters; widths checked against the heads."""
    from sharelock.precompute import vision_store_name

    vision, language = dict(cfg["vision"]), dict(cfg["language"])
    if not vision["model"]:
        name = hyper_parameter(hparams, "model.vision_encoder")
        if name not in REFERENCE_VISION:
            found = "names none" if name is None else f"names {name!r}, which has no timm equivalent known here"
            raise ValueError(
                f"vision.model is not set and the checkpoint's hyper_parameters model.vision_encoder {found}: set "
                "vision.model=TIMM_NAME (the paper: DINOv2, e.g. vit_base_patch14_dinov2.lvd142m)"
            )
        vision["model"] = REFERENCE_VISION[name][0]
    if not language["model"]:
        language["model"] = hyper_parameter(hparams, "model.language_encoder")
        if not isinstance(language["model"], str) or not language["model"]:
            raise ValueError(
                "language.model is not set and the checkpoint's hyper_parameters name no model.language_encoder: set "
                "language.model=HF_ID_OR_PATH (the paper: meta-llama/Meta-Llama-3-8B)"
            )
    given = {
        "vision.model": (vision["model"], config["vision_dim"]),
        "language.model": (language["model"], config["text_dim"]),
    }
    for key, (name, width) in given.items():
        if KNOWN_WIDTHS.get(name, width) != width:
            raise ValueError(f"{key}={name!r} gives {KNOWN_WIDTHS[name]}-d features, but the heads take {width}-d")
    return {
        "vision": vision,
        "text": language,
        "vision_model": vision_store_name(vision),
        "text_model": language["model"],
    }


def _positional(argv: list[str]) -> list[str]:
    """Leading `CKPT OUT_DIR` arguments as `checkpoint=CKPT out=OUT_DIR`."""
    n = 0
    while n < min(2, len(argv)) and "=" not in argv[n] and not argv[n].startswith("-"):
        n += 1
    return [f"{key}={value}" for key, value in zip(("checkpoint", "out"), argv[:n])] + list(argv[n:])


def main(argv: list[str] | None = None) -> Path:
    """Entry point of `sharelock-convert CKPT OUT_DIR [key=value ...]`; returns the checkpoint folder written."""
    from sharelock.train import setup_logging
    from sharelock.training import save_checkpoint

    cfg = load_config(_positional(sys.argv[1:] if argv is None else argv), "convert")
    if not cfg["checkpoint"] or not cfg["out"]:
        raise ValueError("usage: sharelock-convert CKPT OUT_DIR [key=value ...] (or checkpoint=CKPT out=OUT_DIR)")
    out = Path(cfg["out"])
    if out.exists() and not cfg["overwrite"]:
        raise ValueError(f"{out} already exists: give a new folder, or overwrite=true to replace a checkpoint folder")
    if out.exists() and not (out / MODEL_FILE).is_file():
        raise ValueError(f"{out} is not a ShareLock checkpoint folder (no {MODEL_FILE}): refusing to replace it")
    setup_logging(None)
    stored = load_checkpoint(cfg["checkpoint"])
    if not isinstance(stored, dict):
        raise ValueError(f"{cfg['checkpoint']} holds a {type(stored).__name__}, expected a Lightning checkpoint dict")
    weights = stored.get("state_dict", stored)
    not_tensors = [k for k, v in weights.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{cfg['checkpoint']}: state_dict entries that are not tensors: {', '.join(not_tensors[:5])}")
    hparams = plain(stored.get("hyper_parameters"))
    hparams = hparams if isinstance(hparams, dict) else {}
    state = from_reference_state_dict(weights)
    config = model_config(state, hparams, cfg["model"])
    check_hyper_parameters(config, hparams)
    backbones = backbone_specs(cfg, hparams, config)
    model = ShareLock(**config)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # e.g. BatchNorm widths that do not fit the Linear layers
        raise ValueError(f"{cfg['checkpoint']}: the weights do not form ShareLock heads {config}: {err}") from None
    source = {
        "checkpoint": str(Path(cfg["checkpoint"]).resolve()),
        "epoch": stored.get("epoch"),
        "global_step": stored.get("global_step"),
    }
    meta = {"model": model.config, "backbones": backbones, "step": stored.get("global_step"), "converted_from": source}
    save_checkpoint(out, model, meta, cfg)
    log.info("wrote %s: %s; vision %s, language %s", out, config, backbones["vision_model"], backbones["text_model"])
    return out


def cli() -> None:
    """Console-script entry point: exit status 0, or a one-line error naming the bad path, key or value."""
    run_cli(main, "sharelock-convert", ImportError)


if __name__ == "__main__":
    cli()
