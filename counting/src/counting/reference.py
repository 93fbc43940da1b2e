"""The official UnCounTR release (lukasknobel/SelfCollages: ``UnCounTRModel.pt``, ``args.pt``), read without running
pickled code and renamed to this package's parameter names. Only the paper's configuration is supported."""

from __future__ import annotations

import functools
import pickle
import re
import types
from pathlib import Path

import torch

from counting import DENSITY_SCALING
from counting.config import load_yaml, resolve_config_path
from counting.models import BACKBONES, UnCounTR, build_model, sincos_pos_embed_2d
from funai_common.weights import load_state_dict

REFERENCE_SUFFIXES = (".pt", ".pth")
"""Checkpoint files with these suffixes are read as the reference's state dict (``torch.save(model.state_dict())``)."""

OTHER_CONFIGS = {
    "exemplar_encoder.conv": "share_encoder=False (a separate convolutional exemplar encoder)",
    "fim_exemplar_blocks.": "use_exemplar_attention=True",
    "sim_projection.": "use_similarity_projection=True",
    "fim_cls_token": "split_map_and_count=True",
    "exemplar_embed": "unified_fim=True",
    "exemplar_pad_token": "vary_shots_per_sample=True",
}
"""Reference keys that exist only outside the paper's configuration, with the training argument that adds them."""

ALIASES = {
    "encoder.": "backbone.",
    "exemplar_encoder.": "backbone.",
    "backbone_modules.0.": "backbone.",
    "counting_modules.0.": "fim_embed.",
    "counting_modules.1.": "fim_blocks.",
    "counting_modules.2.": "fim_norm.",
    "counting_modules.4.": "pred_head.",
}
"""Second names of shared modules, saved again by ``state_dict()``: checked to be copies, then dropped."""

PARAMETER_LISTS = {"backbone_parameters.": ("backbone.",), "counting_parameters.": ("fim_", "pred_head.", "shot_token")}
"""The reference's ``nn.ParameterList`` optimiser groups (copies of other keys, numbered) and the keys they copy."""

RENAMES = [
    (r"backbone\.model\.(.+)", r"backbone.vit.\1"),  # DINO's torch.hub ViT and timm's share parameter names
    (r"fim_embed\.(weight|bias)", r"image_proj.\1"),
    (r"fim_blocks\.(\d+)\.norm0\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"fim_blocks\.(\d+)\.selfattn\.proj\.(weight|bias)", r"blocks.\1.self_attn.proj.\2"),
    (r"fim_blocks\.(\d+)\.norm1\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"fim_blocks\.(\d+)\.attn\.wq\.(weight|bias)", r"blocks.\1.cross_attn.q.\2"),
    (r"fim_blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"blocks.\1.cross_attn.proj.\2"),
    (r"fim_blocks\.(\d+)\.norm2\.(weight|bias)", r"blocks.\1.norm3.\2"),
    (r"fim_blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"blocks.\1.mlp.0.\2"),
    (r"fim_blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", r"blocks.\1.mlp.2.\2"),
    (r"fim_norm\.(weight|bias)", r"norm.\1"),
    (r"pred_head\.pred_head\.(\d+)\.(\d+)\.(weight|bias)", r"decoder.stages.\1.\2.\3"),
]
"""One-to-one renames (reference regex -> this package's name); the fused projections are handled apart."""

BLOCK_PARTS = "norm0 selfattn.qkv selfattn.proj norm1 attn.wq attn.wk attn.wv attn.proj norm2 mlp.fc1 mlp.fc2".split()
"""Sub-modules of a reference feature-interaction block (``fim_blocks.<i>.<part>.weight/bias``)."""
REQUIRED = ["fim_embed.weight", "fim_embed.bias", "fim_norm.weight", "fim_norm.bias", "fim_pos_embed"]

PAPER_ARGS = {
    "weights": "PretrainedWeights.DINO",
    "share_encoder": True,
    "use_exemplar_attention": False,
    "use_exemplar_roi_align": False,
    "use_exemplar_cls_token": False,
    "split_map_and_count": False,
    "weigh_by_similarity": False,
    "use_similarity_projection": False,
    "unified_fim": False,
    "vary_shots_per_sample": False,
    "return_backbone_layer_features": -1,
    "reference_crop_size": 64,
}
"""``args.pt`` values of the paper's model (the reference's defaults); a missing key takes its default, as there."""

ENUM_NAMES = {
    "BackboneTypes": ["ViT_B_8", "ViT_B_16", "ViT_S_16", "ViT_S_14", "ViT_B_14", "ViT_L_14", "ViT_G_14"],
    "PretrainedWeights": ["RANDOM", "DINO", "IMAGENET", "LEOPART", "DINOv2"],
}
PAPER_CONFIGS = {
    "BackboneTypes.ViT_B_16": "uncountr",
    "BackboneTypes.ViT_B_8": "uncountr_vitb8",
    "BackboneTypes.ViT_S_16": "uncountr_vits16",
}
"""Shipped config for each backbone the reference trained with DINO weights (ViT-B/16 is the paper's)."""


def _refusal(path, err: Exception) -> ValueError:
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))  # torch's weights_only message, shortened
    reason = f"global {found[1]}" if found else str(err).strip().splitlines()[0]
    return ValueError(f"{path}: refused, it holds objects other than plain values and tensors ({reason})")


def from_reference_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference ``UnCounTRModel`` state dict renamed to ``UnCounTR``'s names (backbone included).

    The fused self-attention ``qkv`` is split into ``q``/``kv``, the cross-attention ``wk``/``wv`` joined into
    ``kv``; ``fim_pos_embed`` (checked to be the fixed sin-cos table) and the unused zero-shot ``shot_token`` are
    dropped, as are the copies saved under second names. ValueError names refused, unexpected or missing keys.
    """
    for key in state_dict:
        for prefix, setting in OTHER_CONFIGS.items():
            if key.startswith(prefix):
                raise ValueError(
                    f"reference key {key} comes from {setting}; only the paper's configuration is supported"
                )
    canonical = {k: v for k, v in state_dict.items() if not k.startswith((*ALIASES, *PARAMETER_LISTS))}
    _check_copies(state_dict, canonical)
    blocks = sorted({int(m.group(1)) for k in canonical if (m := re.match(r"fim_blocks\.(\d+)\.", k))})
    required = REQUIRED + [f"fim_blocks.{i}.{p}.{t}" for i in blocks for p in BLOCK_PARTS for t in ("weight", "bias")]
    missing = [k for k in required if k not in canonical]
    if missing or not any(k.startswith("backbone.model.") for k in canonical):
        raise ValueError(f"reference state dict lacks keys {missing or ['backbone.model.*']}")
    _check_pos_embed(canonical["fim_pos_embed"], canonical["fim_embed.weight"].shape[0])
    out, unexpected = {}, []
    for key, value in canonical.items():
        if key in ("fim_pos_embed", "shot_token") or re.fullmatch(r"fim_blocks\.\d+\.attn\.wv\.(weight|bias)", key):
            continue
        if m := re.fullmatch(r"fim_blocks\.(\d+)\.selfattn\.qkv\.(weight|bias)", key):
            if value.shape[0] % 3:
                raise ValueError(f"reference key {key}: {value.shape[0]} rows, not three equal q, k, v parts")
            dim = value.shape[0] // 3
            out[f"blocks.{m[1]}.self_attn.q.{m[2]}"] = value[:dim].clone()
            out[f"blocks.{m[1]}.self_attn.kv.{m[2]}"] = value[dim:].clone()
        elif m := re.fullmatch(r"fim_blocks\.(\d+)\.attn\.wk\.(weight|bias)", key):
            wv = canonical[f"fim_blocks.{m[1]}.attn.wv.{m[2]}"]
            if wv.shape != value.shape:
                raise ValueError(f"reference keys {key} {tuple(value.shape)} and ...wv {tuple(wv.shape)} differ")
            out[f"blocks.{m[1]}.cross_attn.kv.{m[2]}"] = torch.cat([value, wv])
        elif name := next((re.sub(p, r, key) for p, r in RENAMES if re.fullmatch(p, key)), None):
            out[name] = value
        else:
            unexpected.append(key)
    if unexpected:
        raise ValueError(f"unexpected keys in the reference state dict: {unexpected[:10]} ({len(unexpected)} in all)")
    return out


def _check_copies(state_dict: dict[str, torch.Tensor], canonical: dict[str, torch.Tensor]) -> None:
    """Each second-name key must equal the key it copies (numbered lists: some key of the group they copy)."""
    for key, value in state_dict.items():
        alias = next((a for a in ALIASES if key.startswith(a)), None)
        group = next((g for a, g in PARAMETER_LISTS.items() if key.startswith(a)), None)
        if alias is not None:
            source = ALIASES[alias] + key[len(alias) :]
            same = source in canonical and torch.equal(canonical[source], value)
        elif group is not None:
            source = f"a {'/'.join(group)} key"
            same = any(
                k.startswith(group) and v.shape == value.shape and torch.equal(v, value) for k, v in canonical.items()
            )
        else:
            continue
        if not same:
            raise ValueError(f"reference key {key} should be a copy of {source}, but is not")


def _check_pos_embed(pos: torch.Tensor, dim: int) -> None:
    grid = int(round(pos.shape[1] ** 0.5)) if pos.ndim == 3 else 0
    if pos.ndim != 3 or pos.shape[0] != 1 or grid * grid != pos.shape[1] or pos.shape[2] != dim:
        raise ValueError(f"reference key fim_pos_embed has shape {tuple(pos.shape)}, expected (1, grid^2, {dim})")
    if not torch.allclose(pos[0].float(), sincos_pos_embed_2d(dim, grid), atol=1e-5):
        raise ValueError("reference key fim_pos_embed is not the fixed 2-D sin-cos table this package uses")


class _Namespace:
    """Stands in for ``argparse.Namespace``: unpickling only fills its ``__dict__``."""


def _enum_value(cls: str, value):
    if not isinstance(value, (int, str)):
        raise pickle.UnpicklingError(f"reference enum {cls} with a {type(value).__name__} value")
    names = ENUM_NAMES.get(cls, [])
    return f"{cls}.{names[value]}" if isinstance(value, int) and 0 <= value < len(names) else f"{cls}({value!r})"


class _ArgsUnpickler(pickle.Unpickler):
    """Plain values only: the Namespace becomes a dict holder, the reference's enums (``src.*``) their names."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("argparse", "Namespace"):
            return _Namespace
        if module.split(".")[0] == "src":  # the reference's package: never imported, enums read as "Class.MEMBER"
            return functools.partial(_enum_value, name)
        raise pickle.UnpicklingError(f"global {module}.{name}")


_ARGS_PICKLE = types.ModuleType("counting_reference_args")
_ARGS_PICKLE.Unpickler = _ArgsUnpickler
_ARGS_PICKLE.load = lambda file, **kwargs: _ArgsUnpickler(file, **kwargs).load()


def read_reference_args(path: str | Path) -> dict:
    """The training arguments in ``args.pt`` as a dict of plain values (enums as ``"Class.MEMBER"`` strings); any
    other pickled object is refused (ValueError) before it is built."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference arguments {path} not found")
    try:
        args = torch.load(path, map_location="cpu", pickle_module=_ARGS_PICKLE, weights_only=False)
    except (pickle.UnpicklingError, TypeError) as err:
        raise _refusal(path, err) from None
    if not isinstance(args, _Namespace):
        raise ValueError(f"{path}: expected the reference's argparse.Namespace, got {type(args).__name__}")
    return dict(vars(args))


def reference_config(args: dict, model_config: str | Path | None = None) -> dict:
    """This package's config for a release trained with ``args`` ({} = the paper's defaults): ``model_config`` (a
    path or shipped name) or the paper config of the args' backbone; the backbone weights come from the release."""
    for key, expected in PAPER_ARGS.items():
        if args.get(key, expected) != expected:
            raise ValueError(f"args.pt has {key}={args[key]!r}; only the paper's {key}={expected!r} is supported")
    backbone = args.get("backbone_type", "BackboneTypes.ViT_B_16")
    if backbone not in PAPER_CONFIGS:
        raise ValueError(f"args.pt has backbone_type={backbone!r}; supported: {sorted(PAPER_CONFIGS)}")
    cfg = load_yaml(resolve_config_path(model_config or PAPER_CONFIGS[backbone]))
    model = cfg["model"]
    alias = backbone.split(".")[1].lower()
    if args and BACKBONES.get(model["backbone"], model["backbone"]) != BACKBONES[alias]:
        raise ValueError(f"args.pt has backbone_type={backbone!r} but the model config has {model['backbone']}")
    if args.get("img_size", model["img_size"]) != model["img_size"]:
        raise ValueError(f"args.pt has img_size={args['img_size']} but the model config has {model['img_size']}")
    model.update(pretrained=False, checkpoint_path=None)  # the release holds the backbone's weights
    cfg.setdefault("collage", {})["density_scaling"] = float(args.get("density_scaling", DENSITY_SCALING))
    return cfg


def load_reference_model(
    path: str | Path, args_path: str | Path | None = None, model_config: str | Path | None = None
) -> tuple[UnCounTR, dict]:
    """Model (eval mode) + config from the release's ``UnCounTRModel.pt``, read with ``weights_only=True``;
    ``args_path`` defaults to ``args.pt`` beside it when present. Every tensor is checked against the model (names,
    shapes, the sin-cos grid) before loading; mismatches raise ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference checkpoint {path} not found (the release's UnCounTRModel.pt)")
    if args_path is None and (path.parent / "args.pt").is_file():
        args_path = path.parent / "args.pt"
    cfg = reference_config(read_reference_args(args_path) if args_path else {}, model_config)
    try:
        state = load_state_dict(path, keys=())
    except pickle.UnpicklingError as err:
        raise _refusal(path, err) from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (torch.save(model.state_dict()))")
    weights = from_reference_state_dict(state)
    model = build_model(cfg["model"])
    grid = int(round(state["fim_pos_embed"].shape[1] ** 0.5))
    if grid != model.grid:
        raise ValueError(f"{path}: fim_pos_embed is a {grid}x{grid} grid, the model's {model.grid}x{model.grid}")
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - weights.keys()), sorted(weights.keys() - own.keys())
    shapes = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in weights.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{path} does not match the model config: missing {missing[:10]}, unexpected {unexpected[:10]}, "
            f"shape mismatches (checkpoint vs model) {shapes[:10]}"
        )
    model.load_state_dict(weights)
    return model.eval(), cfg
