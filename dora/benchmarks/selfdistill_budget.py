"""How many steps does this package's self-distillation need before a tiny ViT beats its random initialisation?

    python benchmarks/selfdistill_budget.py [--steps 400] [--every 100] [--batch 32] [--device cpu]
                                            [--objective dino|simclr] [--grey] [--classes texture|hue]

Plain image-level DINO with this package's loss (``DoRALoss``, clean variant) and head, on labelled object images of
the demo's kind themselves (no video, no tracking, no masks; by default the texture classes of the README's earlier
experiment rounds): two 32 px global views, four 16 px local crops, EMA teacher.
It prints the teacher's k-NN top-1 (the demo's protocol) every ``--every`` steps, next to the same tiny ViT trained
with labels (cross-entropy, same optimiser and batch) as a reference for what the architecture can learn in that
many steps. The demo's question -- do DoRA's features beat the random network? -- cannot be answered yes before
this does; run it with more steps on a GPU to find the budget.

``--objective simclr`` replaces self-distillation by a contrastive loss (InfoNCE between the two global views of
each image, the other images of the batch as negatives, through the head's MLP, temperature 0.2; the student is
scored), to tell a limit of the objective from a limit of the data, the architecture or the budget. ``--grey``
renders every image in grey levels, so that colour cannot tell two images apart.
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
import torch.nn.functional as F

from dora.augment import normalize
from dora.demo import knn_accuracy
from dora.losses import DoRALoss
from dora.models import build_network
from dora.synthetic import CLASS_KINDS, labelled_objects

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


def _grey(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of (B, 3, H, W) in [0, 1] by ``shift`` (B,) turns (HSV round trip)."""
    maxc, minc = x.max(1).values, x.min(1).values
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    r, g, b = ((maxc - c) / safe for c in x.unbind(1))
    h = torch.where(maxc == x[:, 0], b - g, torch.where(maxc == x[:, 1], 2 + r - b, 4 + g - r))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h)) + shift.view(-1, 1, 1)
    s = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + 6 * h.unsqueeze(1)) % 6
    return maxc.unsqueeze(1) * (1 - s.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1))


def views(images: torch.Tensor, size: int, scale: tuple[float, float], hue: float) -> torch.Tensor:
    """One random view per image, drawn for the whole batch at once: random resized crop (area ``scale``, aspect
    3/4-4/3, bilinear without antialiasing), flip, colour jitter with p 0.8 (brightness, contrast, saturation 0.4,
    hue ``hue``, in a random order per batch), grayscale with p 0.2; ImageNet-normalised."""
    n, dev = len(images), images.device
    area = torch.empty(n, device=dev).uniform_(*scale)
    ratio = torch.empty(n, device=dev).uniform_(np.log(3 / 4), np.log(4 / 3)).exp()
    w, h = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
    flip = torch.randint(0, 2, (n,), device=dev) * 2 - 1
    cx, cy = (torch.rand(n, device=dev) * 2 - 1) * (1 - w), (torch.rand(n, device=dev) * 2 - 1) * (1 - h)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * flip, cx, h, cy
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    x = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)

    jitter = (torch.rand(n, device=dev) < 0.8).float().view(-1, 1, 1, 1)
    factor = [1 + jitter * torch.empty(n, 1, 1, 1, device=dev).uniform_(-0.4, 0.4) for _ in range(3)]
    for op in torch.randperm(4).tolist():
        if op == 0:
            x = (x * factor[0]).clamp(0, 1)
        elif op == 1:
            x = (factor[1] * x + (1 - factor[1]) * _grey(x).mean((2, 3), keepdim=True)).clamp(0, 1)
        elif op == 2:
            x = (factor[2] * x + (1 - factor[2]) * _grey(x)).clamp(0, 1)
        elif hue > 0:
            x = _shift_hue(x, jitter.view(-1) * torch.empty(n, device=dev).uniform_(-hue, hue))
    x = torch.where(torch.rand(n, 1, 1, 1, device=dev) < 0.2, _grey(x).expand_as(x), x)
    return normalize(x)


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
    parser.add_argument("--objective", choices=("dino", "simclr"), default="dino")
    parser.add_argument("--grey", action="store_true", help="grey objects on grey backgrounds (texture classes)")
    parser.add_argument(
        "--classes", choices=CLASS_KINDS, default="texture", help="object classes (dora-demo --classes)"
    )
    args = parser.parse_args(argv)
    if args.grey and args.classes != "texture":
        parser.error("--grey needs --classes texture (grey objects have no hue)")
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    train_images, train_labels = labelled_objects(500, size=32, seed=7, grey=args.grey, classes=args.classes)
    x = torch.from_numpy(train_images).permute(0, 3, 1, 2).float().div(255).to(dev)
    y = torch.from_numpy(train_labels).to(dev)
    eval_images, eval_labels = labelled_objects(150, size=32, seed=1, grey=args.grey, classes=args.classes)

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

    def dino_loss(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = teacher.head(teacher.backbone.forward_features(views(batch, 32, (0.4, 1.0), args.hue))[:, 0])
        local = student(torch.stack([views(batch, 16, (0.05, 0.4), args.hue) for _ in range(4)]))
        other = student(views(batch, 32, (0.4, 1.0), args.hue)[None, None])
        return loss_fn(local.reshape(1, -1, local.shape[-1]), other, target[None], 0)

    def simclr_loss(batch: torch.Tensor) -> torch.Tensor:
        cls = [student.backbone.forward_features(views(batch, 32, (0.4, 1.0), args.hue))[:, 0] for _ in range(2)]
        za, zb = (F.normalize(student.head.mlp(c)) for c in cls)
        logits = za @ zb.T / 0.2
        target = torch.arange(len(batch), device=dev)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))

    ssl_loss, scored = (dino_loss, teacher) if args.objective == "dino" else (simclr_loss, student)
    rows = [(0, float("nan"), score(scored.backbone), score(supervised))]
    print(f"| step | {args.objective} loss | k-NN self-supervised (%) | k-NN supervised (%) |\n|---|---|---|---|")
    print(f"| 0 | - | {rows[0][2]:.1f} | {rows[0][3]:.1f} |")
    for step in range(1, args.steps + 1):
        student.train()
        loss = ssl_loss(x[torch.randint(len(x), (args.batch,), device=dev)])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if args.objective == "dino":
            with torch.no_grad():
                for ps, pt in zip(student.parameters(), teacher.parameters()):
                    pt.mul_(args.momentum).add_(ps.detach(), alpha=1 - args.momentum)

        idx = torch.randint(len(x), (args.batch,), device=dev)
        supervised.train()
        sup_loss = F.cross_entropy(
            classifier(supervised.forward_features(views(x[idx], 32, (0.4, 1.0), args.hue))[:, 0]), y[idx]
        )
        sup_opt.zero_grad()
        sup_loss.backward()
        sup_opt.step()
        if step % args.every == 0 or step == args.steps:
            rows.append((step, loss.item(), score(scored.backbone), score(supervised)))
            print(f"| {step} | {rows[-1][1]:.3f} | {rows[-1][2]:.1f} | {rows[-1][3]:.1f} |", flush=True)
    floor = f"DINO loss of a uniform teacher: log(256) = {np.log(256):.2f}"
    if args.objective == "simclr":
        floor = f"InfoNCE of features that ignore the input: log({args.batch}) = {np.log(args.batch):.2f}"
    print(f"chance {100 / (int(y.max()) + 1):.1f} %; {floor}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
