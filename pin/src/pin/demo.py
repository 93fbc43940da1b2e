"""pin-demo: PIN on a tiny random BLIP-2 with procedural shapes, on CPU in a few minutes (a pipeline check).

A tiny random VLM has no language prior and no pre-training, so the demo first makes a stand-in "caption-trained" VLM:
  1. Pre-training stand-in: the whole tiny BLIP-2 learns to name the object of one-object images (colour-coded
     shapes: "red circle", ...) and the *format* of the box sentence, with boxes drawn at random: it learns the text,
     not where objects are. Checked: its loss on held-out images against the same images shuffled within the batch.
  2. The VLM is frozen; only the positional insert trains on synthetic compositions (3 objects with name
     reconstruction, then 1-3 objects, box only): the PIN recipe at toy scale. The insert's last layer starts at
     zero, so the first loss is the frozen VLM's own and every drop of the curve is the insert's doing.
  3. Held-out compositions (new images, an epoch never trained on): pooled mIoU of PIN against the frozen VLM without
     PIN (raw), random grid boxes and the best constant box (the mean training box), reported whichever wins.
     Writes metrics.json, summary.json, boxes.png and pin_loss.png.

    pin-demo [--out runs/demo/pin] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from .config import config_path, load_yaml, run_cli
from .eval import evaluate_queries, format_table, summarise
from .eval_data import QueryDataset, synthetic_queries
from .figures import box_figure, loss_figure
from .methods import Method
from .metrics import localisation_miou, paired_iou
from .pipeline import codec_from_cfg, dataset_from_cfg, pools_from_cfg, training_loss, vlm_from_cfg
from .runlog import check_output_dir
from .synthetic import collate


def _batches(dataset, batch_size: int, start_epoch: int = 0):
    """Endless collated batches, epoch after epoch (the dataset switches phase by epoch)."""
    epoch = start_epoch
    while True:
        dataset.set_epoch(epoch)
        for i in range(0, len(dataset) - batch_size + 1, batch_size):
            yield collate([dataset[j] for j in range(i, i + batch_size)])
        epoch += 1


def _fit(vlm, codec, batches, params, steps: int, lr: float, grad_norms: list | None = None) -> list[float]:
    """Adam on `params`; appends the global gradient norm of every step to `grad_norms` when given."""
    opt = torch.optim.Adam(params, lr=lr, foreach=True)
    losses = []
    for _ in range(steps):
        loss = training_loss(vlm, codec, next(batches), "cpu")
        opt.zero_grad()
        loss.backward()
        if grad_norms is not None:
            grads = [p.grad.detach().flatten() for p in params if p.grad is not None]
            grad_norms.append(float(torch.cat(grads).norm()) if grads else 0.0)
        opt.step()
        losses.append(loss.item())
    return losses


CLASSES = ["red circle", "blue square", "green triangle", "yellow cross"]  # colour-coded: nameable by a tiny VLM


def pretrain_stand_in(vlm, codec, dataset, steps: int, bs: int, lr: float) -> list[float]:
    """Train the whole tiny VLM on `dataset`'s sentences with *random* boxes (names and format), then freeze it."""
    vlm.model.requires_grad_(True)
    vlm.model.train()
    rng = np.random.default_rng(0)

    def random_box_batches():
        for i, batch in enumerate(_batches(dataset, bs, start_epoch=10**5)):
            batch["cells"] = torch.tensor([codec.random_cells(rng) for _ in batch["phrase"]])
            batch["reconstruct"] = i % 2 == 0  # both sentence forms of the PIN recipe
            yield batch

    losses = _fit(vlm, codec, random_box_batches(), list(vlm.model.parameters()), steps, lr)
    vlm.freeze()
    return losses


@torch.no_grad()
def image_reliance(vlm, codec, batch: dict) -> tuple[float, float]:
    """Loss of the sentences with their own images and with the images shuffled within the batch: a VLM that
    reads its input does worse on the shuffled ones."""
    shuffled = dict(batch, image=batch["image"].roll(1, 0))
    return training_loss(vlm, codec, batch, "cpu").item(), training_loss(vlm, codec, shuffled, "cpu").item()


def run(out: Path, quick: bool) -> dict:
    """Run the demo (stand-in pre-training, PIN training, held-out eval), writing to `out`; returns the metrics."""
    # One thread: on a small shared CPU the per-op threading overhead dominates these tiny models.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    t0 = time.time()
    cfg = load_yaml(config_path("tiny"))
    cfg["_cli"] = {}
    steps0, steps1, n_eval, bs = (4, 4, 3, 8) if quick else (800, 600, 30, 16)
    cfg["data"].update(train_size=bs * 25, switch_epoch=4, per_class=16, procedural_classes=CLASSES)
    cfg["pin"]["hidden_dims"] = [128, 128]
    codec = codec_from_cfg(cfg)
    vlm = vlm_from_cfg(cfg)
    train_pool, val_pool, _ = pools_from_cfg(cfg)
    pre_data = dataset_from_cfg(cfg, train_pool, "train")
    pre_data.composer.fixed_objects, pre_data.switch_epoch = 1, 10**9  # one object per image, every epoch
    pre_losses = pretrain_stand_in(vlm, codec, pre_data, steps0, bs, 2e-3)
    t_pre = time.time() - t0
    check = dataset_from_cfg(cfg, val_pool, "val", length=64)
    check.composer.fixed_objects, check.switch_epoch = 1, 10**9
    own, shuffled = image_reliance(vlm, codec, next(_batches(check, len(check))))

    val = dataset_from_cfg(cfg, val_pool, "val", length=n_eval)
    queries = synthetic_queries(val, n_eval, fixed=False)  # 1-3 objects per image
    evals = {"frozen VLM, raw prompt": evaluate_queries(vlm, codec, queries, batch_size=16)}

    method = Method(vlm, "pin", cfg)
    last = method.module.mlp[-1]
    torch.nn.init.zeros_(last.weight)  # demo only: start at the frozen VLM (the library keeps the paper's init)
    torch.nn.init.zeros_(last.bias)
    data = dataset_from_cfg(cfg, train_pool, "train")
    grad_norms: list[float] = []
    losses = _fit(vlm, codec, _batches(data, bs), method.parameters(), steps1, 1e-2, grad_norms)
    t_train = time.time() - t0 - t_pre
    evals["frozen VLM + PIN"] = evaluate_queries(vlm, codec, queries, batch_size=16)

    rows = []
    rand = [summarise(evaluate_queries(None, codec, queries, random_seed=s), codec) for s in range(5)]
    row = {k: float(np.mean([r[k] for r in rand])) if isinstance(rand[0][k], float) else rand[0][k] for k in rand[0]}
    rows.append({"method": "random box", **row, "miou_std": float(np.std([r["miou"] for r in rand]))})
    train_boxes = [codec.cells_to_pixels(data[i]["cells"].tolist()) for i in range(min(200, len(data)))]
    mean_box = np.mean(train_boxes, 0).tolist()
    gts = [q.box for q in queries]
    rows.append(
        {"method": "constant mean box", **localisation_miou([mean_box] * len(gts), gts, codec.image_size, codec)}
    )
    for name, res in evals.items():
        rows.append({"method": name, **summarise(res, codec)})
    for r in rows:
        r["dataset"] = "held-out synthetic"
        r.update({k: None for k in ("batch_weighted_miou_m", "batch_weighted_miou_l") if k not in r})
    table = format_table(rows)

    out.mkdir(parents=True, exist_ok=True)
    pin_result = evals["frozen VLM + PIN"]
    k = min(8, len(queries))
    ds = QueryDataset(queries[:k], codec.image_size)
    ious = paired_iou(pin_result["preds"][:k], pin_result["gts"][:k]).tolist()
    box_figure(
        [ds[i]["image"] for i in range(k)],
        [f"{q.name} IoU {v:.2f}" for q, v in zip(queries[:k], ious)],
        pin_result["preds"][:k],
        pin_result["gts"][:k],
        out / "boxes.png",
    )
    loss_figure(losses, out / "pin_loss.png")
    switch = cfg["data"]["switch_epoch"] * (len(data) // bs)
    phases = [losses[:switch], losses[switch:]]
    trend = [
        f"{np.mean(p[: max(1, len(p) // 10)]):.2f} -> {np.mean(p[-max(1, len(p) // 10) :]):.2f}" if p else "n/a"
        for p in phases
    ]
    miou = {r["method"]: r["miou"] for r in rows}
    best_baseline = max(miou["random box"], miou["constant mean box"], miou["frozen VLM, raw prompt"])
    summary = {
        "PIN mIoU (held-out synthetic)": round(miou["frozen VLM + PIN"], 3),
        "random-box mIoU": round(miou["random box"], 3),
        "best baseline mIoU (random/constant/raw)": round(best_baseline, 3),
        "stand-in loss, own / shuffled images": f"{own:.2f} / {shuffled:.2f}",
        "PIN loss, phase 1 / phase 2 (first->last 10%)": f"{trend[0]} / {trend[1]}",
        "verdict": "PIN beats the baselines" if miou["frozen VLM + PIN"] > best_baseline else "PIN does not win",
    }
    metrics = {
        "rows": rows,
        "pin_losses": losses,
        "pretrain_losses": pre_losses,
        "stand_in_loss_own_images": own,
        "stand_in_loss_shuffled_images": shuffled,
        "pin_grad_norms": grad_norms,
        "summary": summary,
        "pin_parameters": sum(p.numel() for p in method.parameters()),
        "seconds_pretrain": t_pre,
        "seconds_pin": t_train,
        "seconds_total": time.time() - t0,
        "example_generations": pin_result["texts"][:8],
        "constant_box": mean_box,
        "ground_truth_boxes": gts,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(table)
    print(f"gradient norm reaching PIN: {grad_norms[0]:.2e} (first step), {np.median(grad_norms):.2e} (median)")
    print(json.dumps(summary, indent=2))
    return metrics


def main(argv: list[str] | None = None) -> dict:
    """pin-demo: parse `--out` and `--quick`, run the demo; returns its metrics dict."""
    parser = argparse.ArgumentParser(prog="pin-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo/pin", help="output folder")
    parser.add_argument("--quick", action="store_true", help="a few steps only (< 20 s), for the tests")
    args = parser.parse_args(argv)
    check_output_dir(args.out)  # before minutes of training, not when the results are written
    return run(Path(args.out), args.quick)


def cli() -> None:
    """Console-script entry point: exit status 0, or a one-line error naming the bad path, key or value."""
    run_cli(main, "pin-demo")


if __name__ == "__main__":
    cli()
