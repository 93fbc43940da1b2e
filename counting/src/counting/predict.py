"""counting-predict IMAGE --boxes x1,y1,x2,y2 ...: count one image given 1-3 exemplar boxes."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from counting.checkpoint import resolve_checkpoint
from counting.config import run_cli
from counting.data import prepare_test_image
from counting.eval import density_fn_for, load_trained_model
from counting.figures import save_density_figure
from counting.inference import PROTOCOLS, count_image
from counting.pools import load_rgb


def parse_box(text: str) -> list[float]:
    """argparse type: ``x1,y1,x2,y2`` -> [x1, y1, x2, y2] floats; anything else, or x2 <= x1 or y2 <= y1, is refused."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4 or values[2] <= values[0] or values[3] <= values[1]:
        raise argparse.ArgumentTypeError(f"box {text!r} must be x1,y1,x2,y2 with x2 > x1 and y2 > y1 (pixels)")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The ``counting-predict`` argument parser (image, exemplar boxes, checkpoint, output, protocol, window)."""
    parser = argparse.ArgumentParser(prog="counting-predict", description=__doc__)
    parser.add_argument("image", type=Path)
    parser.add_argument("--boxes", type=parse_box, nargs="+", required=True, help="1-3 exemplar boxes x1,y1,x2,y2")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="checkpoint directory of counting-train, a run folder (its latest checkpoint), or UnCounTRModel.pt",
    )
    parser.add_argument("--model-config", type=Path, default=None, help="config for a bare model.safetensors")
    parser.add_argument("--reference-args", type=Path, default=None, help="args.pt (default: beside UnCounTRModel.pt)")
    parser.add_argument("--out", type=Path, default=None, help="density overlay PNG (default <image>_density.png)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="original")
    parser.add_argument("--height", type=int, default=384, help="test height = sliding-window size")
    parser.add_argument("--stride", type=int, default=128)
    return parser


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    """Print and return {"count": float, "figure": path, "checkpoint": path} (a run folder's latest checkpoint)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if not 1 <= len(args.boxes) <= 3:
        raise ValueError(f"give 1 to 3 exemplar boxes, got {len(args.boxes)}")
    if not args.image.is_file():
        raise FileNotFoundError(f"image {args.image} not found")
    if args.out is not None and args.out.is_dir():
        raise ValueError(f"--out {args.out} is a folder; expected the path of the figure to write (e.g. count.png)")
    checkpoint = resolve_checkpoint(args.checkpoint)
    model, cfg = load_trained_model(checkpoint, args.model_config, args.reference_args)
    image = load_rgb(args.image)
    boxes = torch.tensor(args.boxes)
    _, h, w = image.shape
    if (boxes[:, 2] > w).any() or (boxes[:, 3] > h).any() or (boxes < 0).any():
        raise ValueError(f"boxes {args.boxes} fall outside the {w}x{h} image")
    item = prepare_test_image(image, boxes, model.patch_size, args.height, args.protocol == "fixed_images")
    count, density = count_image(
        density_fn_for(model, item["exemplars"]),
        item["image"][None],
        item["rects"],
        protocol=args.protocol,
        window=args.height,
        stride=args.stride,
        density_scaling=cfg["collage"]["density_scaling"],
    )
    out = args.out or args.image.with_name(f"{args.image.stem}_density.png")
    hh, ww = item["image"].shape[-2:]
    save_density_figure(out, item["image"], density, count, None, item["rel_boxes"] * torch.tensor([ww, hh, ww, hh]))
    result = {"count": count, "figure": str(out), "checkpoint": str(checkpoint)}
    print(json.dumps(result))
    return result


def cli() -> None:
    """Console-script entry point: exit status 0, or a one-line error naming the bad path, key or value."""
    run_cli(main, "counting-predict")


if __name__ == "__main__":
    cli()
