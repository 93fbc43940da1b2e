"""``neco-export``: write a trained NeCo backbone as a safetensors file that plain timm loads.

neco-export checkpoint=runs/neco/neco_dinov2r_vits14 output=neco_dinov2r_vits14.safetensors
# then: timm.create_model("vit_small_patch14_reg4_dinov2.lvd142m", pretrained=True,
#                         pretrained_cfg_overlay=dict(file="neco_dinov2r_vits14.safetensors"))
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from safetensors.torch import save_file

from neco.config import UnknownKeyError, check_kind, parse_overrides, print_help, run_cli, wants_help
from neco.eval import backbone_from_checkpoint, resolve_checkpoint
from neco.models import BACKBONES

DEFAULTS = {"checkpoint": None, "output": None, "weights": "student"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Export; returns {"output", "timm_name", "create_kwargs"} (also written next to the weights as JSON)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if wants_help(argv):
        print_help(DEFAULTS)
        raise SystemExit(0)
    _, pairs = parse_overrides(argv)
    args = dict(DEFAULTS)
    for key, value, raw in pairs:
        if key not in args:
            raise UnknownKeyError(key, args)
        args[key] = check_kind(key, args[key], value, raw)
    if not args["checkpoint"]:
        raise ValueError("give checkpoint=<run dir or checkpoint dir>")
    if args["output"] and not str(args["output"]).endswith(".safetensors"):  # timm reads a file by its suffix
        raise ValueError(
            f"output={args['output']!r}: expected a file name ending in .safetensors (the JSON goes beside it)"
        )
    path = resolve_checkpoint(args["checkpoint"])
    backbone, train_cfg = backbone_from_checkpoint(path, args["weights"])
    output = args["output"] or os.path.join(path, f"backbone_{args['weights']}.safetensors")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    model_cfg = train_cfg["model"]
    kwargs = dict(model_cfg.get("overrides") or {})
    if model_cfg.get("drop_registers"):
        kwargs["reg_tokens"] = 0
    info = {
        "output": output,
        "timm_name": BACKBONES.get(model_cfg["name"], model_cfg["name"]),
        "create_kwargs": kwargs,
        "source_checkpoint": os.path.abspath(path),
        "weights": args["weights"],
    }
    state = {k: v.contiguous() for k, v in backbone.state_dict().items()}
    save_file(state, output, metadata={"format": "pt", "timm_name": info["timm_name"]})
    with open(os.path.splitext(output)[0] + ".json", "w") as f:
        json.dump(info, f, indent=1)
    print(f"wrote {output} (timm {info['timm_name']}, kwargs {kwargs})")
    return info


def cli() -> None:
    """Console-script entry point: exit status 0, or a one-line error naming the bad path, key or value."""
    run_cli(main, "neco-export")


if __name__ == "__main__":
    cli()
