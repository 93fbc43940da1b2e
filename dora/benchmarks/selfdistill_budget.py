"""How many steps does this package's self-distillation need before a tiny ViT beats its random initialisation?

    python benchmarks/selfdistill_budget.py [--steps 400] [--every 100] [--batch 32] [--device cpu]

Plain image-level DINO with this package's loss (``DoRALoss``, clean variant) and head, on the demo's labelled object
images themselves (no video, no tracking, no masks): two 32 px global views, four 16 px local crops, EMA teacher.
It prints the teacher's k-NN top-1 (the demo's protocol) every ``--every`` steps, next to the same tiny ViT trained
with labels (cross-entropy, same optimiser and batch) as a reference for what the architecture can learn in that
many steps. The demo's question -- do DoRA's features beat the random network? -- cannot be answered yes before
this does; run it with more steps on a GPU to find the budget.
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
import torchvision.transforms.v2 as T

from dora.augment import normalize
from dora.demo import knn_accuracy
from dora.losses import DoRALoss
from dora.models import build_network
from dora.synthetic import labelled_objects

TINY = {
    "model": {
        "arch": "vit_small_patch16_224",
        "drop_path_rate": 0.0,
        "out_dim": 256,
        "head_hidden_dim": 256,
        "head_bottleneck_dim": 64,
        "norm_last_layer": False,
        "overrides": {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 3, "num_heads": 4},
    }
}


def views(images: torch.Tensor, size: int, scale: tuple[float, float], hue: float) -> torch.Tensor:
    """One random view per image: crop, flip, colour jitter (p 0.8), grayscale (p 0.2); ImageNet-normalised."""
    aug = T.Compose(
        [
            T.RandomResizedCrop(size, scale, antialias=True),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, hue)], p=0.8),
            T.RandomGrayscale(0.2),
        ]
    )
    return normalize(torch.stack([aug(x) for x in images]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--momentum", type=float, default=0.99, help="teacher EMA momentum")
    parser.add_argument("--teacher-temp", type=float, default=0.04)
    parser.add_argument("--hue", type=float, default=0.1, help="hue jitter strength")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    train_images, train_labels = labelled_objects(500, size=32, seed=7)
    x = torch.from_numpy(train_images).permute(0, 3, 1, 2).float().div(255).to(dev)
    y = torch.from_numpy(train_labels).to(dev)
    eval_images, eval_labels = labelled_objects(150, size=32, seed=1)

    student = build_network(TINY).to(dev)
    teacher = build_network(TINY, teacher=True).to(dev)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    loss_fn = DoRALoss(256, 4, args.teacher_temp, args.teacher_temp, 0, 1, loss_variant="clean").to(dev)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.04)

    supervised = build_network(TINY).backbone.to(dev)
    classifier = torch.nn.Linear(supervised.embed_dim, int(y.max()) + 1).to(dev)
    sup_opt = torch.optim.AdamW([*supervised.parameters(), *classifier.parameters()], lr=args.lr, weight_decay=0.04)

    def score(backbone) -> float:
        return knn_accuracy(copy.deepcopy(backbone).cpu(), eval_images, eval_labels)

    rows = [(0, float("nan"), score(teacher.backbone), score(supervised))]
    print("| step | DINO loss | k-NN self-distilled teacher (%) | k-NN supervised (%) |\n|---|---|---|---|")
    print(f"| 0 | - | {rows[0][2]:.1f} | {rows[0][3]:.1f} |")
    for step in range(1, args.steps + 1):
        batch = x[torch.randint(len(x), (args.batch,), device=dev)]
        student.train()
        with torch.no_grad():
            target = teacher.head(teacher.backbone.forward_features(views(batch, 32, (0.4, 1.0), args.hue))[:, 0])
        local = student(torch.stack([views(batch, 16, (0.05, 0.4), args.hue) for _ in range(4)]))
        other = student(views(batch, 32, (0.4, 1.0), args.hue)[None, None])
        loss = loss_fn(local.reshape(1, -1, local.shape[-1]), other, target[None], 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.mul_(args.momentum).add_(ps.detach(), alpha=1 - args.momentum)

        idx = torch.randint(len(x), (args.batch,), device=dev)
        supervised.train()
        sup_loss = torch.nn.functional.cross_entropy(
            classifier(supervised.forward_features(views(x[idx], 32, (0.4, 1.0), args.hue))[:, 0]), y[idx]
        )
        sup_opt.zero_grad()
        sup_loss.backward()
        sup_opt.step()
        if step % args.every == 0 or step == args.steps:
            rows.append((step, loss.item(), score(teacher.backbone), score(supervised)))
            print(f"| {step} | {rows[-1][1]:.3f} | {rows[-1][2]:.1f} | {rows[-1][3]:.1f} |", flush=True)
    print(f"chance {100 / (int(y.max()) + 1):.1f} %; DINO loss of a uniform teacher: log(256) = {np.log(256):.2f}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
