"""Command-line tools: ``funai-knn`` (feature files -> k-NN table) and ``funai-hummingbird`` (model -> mIoU)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import torch

from funai_common.datasets import SEGMENTATION_DATASETS, build_segmentation_dataset, subset
from funai_common.hummingbird import HummingbirdEvaluator
from funai_common.knn import knn_classify_many
from funai_common.search import BACKENDS
from funai_common.weights import create_timm_model, fit_to_timm_vit, load_safetensors, load_state_dict

log = logging.getLogger("funai_common")


def load_features(path, labels_path=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) from a safetensors file with keys "features" and "labels", or a .npy pair."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"feature file {path} does not exist")
    if path.suffix == ".safetensors":
        tensors = load_safetensors(path)
        missing = {"features", "labels"} - tensors.keys()
        if missing:
            raise KeyError(f"{path} lacks the keys {sorted(missing)} (has {sorted(tensors)})")
        return tensors["features"], tensors["labels"]
    if path.suffix == ".npy":
        if labels_path is None:
            raise ValueError(f"{path} is a .npy feature file: give its labels file too (--train-labels/--test-labels)")
        return torch.from_numpy(np.load(path)), torch.from_numpy(np.load(labels_path))
    raise ValueError(f"unsupported feature file {path}: expected .safetensors or .npy")


def format_table(header: list[str], rows: list[list]) -> str:
    """A plain-text table with aligned columns (numbers to two decimals)."""
    cells = [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _check_out(path) -> None:
    """Refuse an ``--out`` that cannot take a JSON file (a folder, or below a file) before any work is done."""
    if path and Path(path).is_dir():
        raise ValueError(f"--out {path} is a directory; expected the path of a JSON file (e.g. {path}/out.json)")
    blocking = next((p for p in Path(path or ".").parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"--out {path}: {blocking} is a file, not a directory")


def _write_json(path, payload) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2))
        log.info("wrote %s", path)


def knn_main(argv=None) -> dict:
    """funai-knn: DINO weighted k-NN on precomputed train/test features."""
    p = argparse.ArgumentParser(prog="funai-knn", description=knn_main.__doc__)
    p.add_argument("--train", required=True, help=".safetensors (features, labels) or .npy features")
    p.add_argument("--test", required=True)
    p.add_argument("--train-labels", help="labels .npy when --train is a .npy file")
    p.add_argument("--test-labels")
    p.add_argument("--k", type=int, nargs="+", default=[10, 20, 100, 200])
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--num-classes", type=int)
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _check_out(args.out)
    train_f, train_y = load_features(args.train, args.train_labels)
    test_f, test_y = load_features(args.test, args.test_labels)
    results = knn_classify_many(
        train_f,
        train_y,
        test_f,
        test_y,
        ks=args.k,
        temperature=args.temperature,
        num_classes=args.num_classes,
        backend=args.backend,
    )
    print(format_table(["k", "top-1", "top-5"], [[k, r["top1"], r["top5"]] for k, r in results.items()]))
    payload = {str(k): r for k, r in results.items()}
    _write_json(args.out, payload)
    return payload


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _parse_kwargs(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--model-args expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        parsed = yaml.safe_load(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        out[key] = float(parsed) if isinstance(parsed, str) and _EXPONENT_FLOAT.fullmatch(parsed) else parsed
    return out


def _stored_img_size(state: dict) -> int | None:
    """Input size of a checkpoint's square position table (its side times the patch size), when it has one."""
    table, patch = state.get("pos_embed"), state.get("patch_embed.proj.weight")
    if table is None or patch is None or table.ndim != 3:
        return None
    for prefix in (1, 0):  # a class-token entry (DINO, DINOv2 hub) or patches only (timm register models)
        side = math.isqrt(table.shape[1] - prefix)
        if side * side == table.shape[1] - prefix:
            return side * patch.shape[-1]
    return None


def timm_patch_features(
    model_name: str, input_size: int, pretrained: bool = True, checkpoint=None, device="cpu", **model_args
):
    """(feature_fn, patch_size) for a timm ViT: feature_fn(images) -> (B, S*S, D) final-norm patch tokens.

    The model keeps the position table it was trained with (the pretrained weights', or the checkpoint's size) and
    interpolates it at ``input_size`` as the official DINO / DINOv2 code does (``use_dino_interpolation``), like the
    torch.hub models of the Hummingbird protocol. ``img_size`` in ``model_args`` fixes the table size instead.
    """
    try:
        import timm  # noqa: F401 (a clear message when the optional dependency is missing)
    except ImportError:
        raise ValueError("funai-hummingbird --model needs timm: pip install 'funai-common[demo]'") from None
    from funai_common.vit import supports_dino_interpolation, use_dino_interpolation

    state = None
    if checkpoint is not None:
        state = load_state_dict(checkpoint, strip_prefixes=("module.", "backbone."))
        stored = _stored_img_size(state)
        if stored and "img_size" not in model_args:
            model_args = {"img_size": stored, **model_args}
    try:
        model = create_timm_model(
            model_name,
            pretrained and checkpoint is None,
            f"--model {model_name!r}",
            "offline, give local weights with --checkpoint PATH",
            num_classes=0,
            **{"dynamic_img_size": True, **model_args},
        )
    except TypeError as err:  # a --model-args key the model's constructor does not take (a misspelt one)
        raise ValueError(f"--model-args {model_args} do not fit --model {model_name!r}: {err}") from None
    if state is not None:
        try:
            state = fit_to_timm_vit(state, model)  # DINOv2 hub names; a table of another size is resampled
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as err:
            raise ValueError(f"checkpoint {checkpoint} does not fit {model_name}: {err}") from None
        if missing:
            raise KeyError(f"checkpoint {checkpoint} lacks {len(missing)} weights of {model_name}, e.g. {missing[:3]}")
        if unexpected:
            log.warning("ignored %d checkpoint keys not in %s, e.g. %s", len(unexpected), model_name, unexpected[:3])
    if supports_dino_interpolation(model):
        use_dino_interpolation(model)
    model.eval().to(device)
    prefix = getattr(model, "num_prefix_tokens", 1)

    def feature_fn(images):
        return model.forward_features(images)[:, prefix:]

    return feature_fn, model.patch_embed.patch_size[0]


def hummingbird_main(argv=None) -> dict:
    """funai-hummingbird: Hummingbird in-context segmentation mIoU of a timm model or checkpoint."""
    p = argparse.ArgumentParser(prog="funai-hummingbird", description=hummingbird_main.__doc__)
    p.add_argument("--model", required=True, help="timm model name, e.g. vit_small_patch14_dinov2.lvd142m")
    p.add_argument("--checkpoint", help="local weights (.safetensors, or .pth read with weights_only=True)")
    p.add_argument("--no-pretrained", action="store_true", help="random initialisation (tests)")
    p.add_argument("--model-args", nargs="*", default=[], help="extra timm kwargs, key=value")
    p.add_argument("--dataset", required=True, choices=[*SEGMENTATION_DATASETS, "synthetic"])
    p.add_argument("--data-dir", help="dataset root (see the README for each layout)")
    p.add_argument("--train-split", help="default: trainaug for voc, train otherwise")
    p.add_argument("--val-split", default="val")
    p.add_argument("--train-fs", help="file set: image ids (one per line) of the memory images, e.g. 1_div_8 subsets")
    p.add_argument("--val-fs", help="file set of the evaluated images")
    p.add_argument("--train-fraction", type=float, help="random fraction of the memory images (seeded by --seed)")
    p.add_argument("--ignore-index", type=int, help="ground-truth id left out of the mIoU (default: the dataset's)")
    p.add_argument("--bank-fp16", action="store_true", help="memory bank in float16 (any backend; scores in float32)")
    p.add_argument("--input-size", type=int, default=504)
    p.add_argument("--memory-size", type=int)
    p.add_argument("--augmentation-epochs", type=int, default=2)
    p.add_argument("--num-neighbors", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _check_out(args.out)
    try:
        torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a torch device; expected cpu, cuda or cuda:N") from None
    # the datasets first: a wrong --data-dir fails before any weights are loaded (or downloaded)
    train_split = args.train_split or ("trainaug" if args.dataset == "voc" else "train")
    extra = {"image_size": args.input_size} if args.dataset == "synthetic" else {}
    train = build_segmentation_dataset(args.dataset, args.data_dir, train_split, **extra)
    val = build_segmentation_dataset(args.dataset, args.data_dir, args.val_split, **extra)
    if args.train_fs or args.train_fraction is not None:
        train = subset(train, args.train_fs, args.train_fraction, args.seed)
    if args.val_fs:
        val = subset(val, args.val_fs)
    feature_fn, patch_size = timm_patch_features(
        args.model,
        args.input_size,
        not args.no_pretrained,
        args.checkpoint,
        args.device,
        **_parse_kwargs(args.model_args),
    )
    evaluator = HummingbirdEvaluator(
        feature_fn,
        train,
        val,
        val.num_classes,
        patch_size,
        args.input_size,
        args.memory_size,
        args.augmentation_epochs,
        args.num_neighbors,
        batch_size=args.batch_size,
        backend=args.backend,
        seed=args.seed,
        device=args.device,
        num_workers=args.num_workers,
        ignore_index=args.ignore_index,
        bank_dtype=torch.float16 if args.bank_fp16 else None,
    )
    result = evaluator.evaluate()
    print(
        format_table(
            ["model", "dataset", "memory rows", "mIoU (%)"],
            [[args.model, args.dataset, result["memory_rows"], 100 * result["miou"]]],
        )
    )
    payload = {"model": args.model, "dataset": args.dataset, "input_size": args.input_size, **result}
    _write_json(args.out, payload)
    return payload


def _run(main, prog: str) -> None:
    try:
        main()
    except (FileNotFoundError, KeyError, ValueError) as err:
        message = str(err.args[0] if isinstance(err, KeyError) and err.args else err)  # str(KeyError) adds quotes
        if "\nOriginal Traceback" in message:  # raised in a DataLoader worker: its last line is the error
            message = message.rstrip().rsplit("\n", 1)[-1].split(": ", 1)[-1]
        raise SystemExit(f"{prog}: error: {message}") from None


def knn_cli() -> None:
    """Console entry point of funai-knn: exit status 0, or a one-line error naming the bad path, key or value."""
    _run(knn_main, "funai-knn")


def hummingbird_cli() -> None:
    """Console entry point of funai-hummingbird: exit status 0, or a one-line error."""
    _run(hummingbird_main, "funai-hummingbird")


if __name__ == "__main__":  # python -m funai_common.cli knn|hummingbird ARGS...
    import sys

    commands = {"knn": knn_cli, "hummingbird": hummingbird_cli}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        raise SystemExit("usage: python -m funai_common.cli {knn,hummingbird} [--help | ARGS...]")
    command = sys.argv.pop(1)
    commands[command]()
