"""pin-localise: box of a named object in one image with a frozen VLM and a PIN checkpoint.

pin-localise IMAGE "object name" [--config blip2|PATH] checkpoint=<run>/checkpoints/step_X [out=box.png]
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import load_weights
from .config import load_config, run_cli
from .eval_data import ObjectQuery, load_image
from .figures import box_figure
from .methods import Method
from .pipeline import codec_from_cfg, predict_boxes, vlm_from_cfg


def main(argv: list[str] | None = None) -> list[float]:
    """pin-localise: predict the named object's box in one image, save a figure; returns the box (xyxy, S x S frame)."""
    cfg, positional = load_config(argv, flags=("checkpoint", "out"), usage_args='IMAGE "object name"')
    if len(positional) != 2:
        raise ValueError('usage: pin-localise IMAGE "object name" checkpoint=PATH [out=PNG] [--config NAME]')
    image_path, name = positional
    if not Path(image_path).is_file():
        raise FileNotFoundError(f"image {image_path} not found")
    checkpoint = cfg["_cli"].get("checkpoint") or cfg["eval"].get("checkpoint")
    if not checkpoint:
        raise ValueError("pin-localise needs checkpoint=<run>/checkpoints/step_X (or a .safetensors / reference .pt)")
    codec = codec_from_cfg(cfg)
    weights = load_weights(checkpoint)  # before the VLM: a bad path fails in seconds
    vlm = vlm_from_cfg(cfg)
    if torch.cuda.is_available():
        vlm.model.to("cuda")
    method = Method(vlm, cfg["method"], cfg)
    method.load_state_dict(weights, source=checkpoint)
    method.to(next(vlm.model.parameters()).device)
    method.train(False)
    image = load_image(ObjectQuery(image_path, name, [0, 0, 0, 0], "query"), codec.image_size)
    boxes, texts = predict_boxes(
        vlm, codec, image[None], [name], cfg["eval"]["num_beams"], cfg["eval"]["max_new_tokens"]
    )
    box = boxes[0]
    out = Path(cfg["_cli"].get("out") or Path(image_path).with_suffix(".pin.png").name)
    box_figure([image], [f"{name}: {[round(v) for v in box]}"], [box], [None], out, cols=1)
    print(f"{name}: box xyxy in the {codec.image_size}x{codec.image_size} frame = {box}")
    print(f"generated: {texts[0]!r}")
    print(f"saved {out}")
    return box


def cli() -> None:
    """Console-script entry point: exit status 0, or a one-line error naming the bad path, key or value."""
    run_cli(main, "pin-localise", ImportError)  # ImportError: an optional package


if __name__ == "__main__":
    cli()
