import math

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from neco.models import ProjectionHead, build_backbone, build_student_teacher, ema_update, param_groups
from neco.queue import PatchQueue
from neco.schedules import cosine_schedule
from neco.train import apply_schedules, build_schedules

TINY = {
    "name": "vit_small_patch14_reg4_dinov2",
    "pretrained": False,
    "checkpoint": None,
    "drop_registers": False,
    "patch_size": 14,
    "drop_path": 0.1,
    "head_hidden_dim": 16,
    "head_out_dim": 8,
    "head_layers": 3,
    "overrides": {"img_size": 98, "depth": 2, "embed_dim": 48, "num_heads": 2},
}


def test_cosine_schedule_hand_values():
    values = cosine_schedule(1.0, 0.0, epochs=2, iters_per_epoch=2)
    expected = [1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2]
    np.testing.assert_allclose(values, expected, atol=1e-12)
    wd = cosine_schedule(0.04, 0.5, 25, 100)
    assert len(wd) == 2500 and wd[0] == pytest.approx(0.04) and wd[-1] == pytest.approx(0.5, abs=1e-6)
    assert np.all(np.diff(wd) > 0)
    with pytest.raises(ValueError, match="epochs \\* iters_per_epoch > 0"):
        cosine_schedule(1, 0, 0, 10)


def test_ema_moves_teacher_by_one_minus_m():
    student, teacher = build_student_teacher(TINY)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for b, t, s in zip(before, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(t - b, 0.1 * (s - b))
    ema_update(teacher, student, 1.0)  # m = 1 (end of the schedule) freezes the teacher
    for t, t2 in zip([p.clone() for p in teacher.parameters()], teacher.parameters()):
        torch.testing.assert_close(t, t2)


def test_student_teacher_structure():
    student, teacher = build_student_teacher(TINY)
    assert all(not p.requires_grad for p in teacher.parameters())
    drop_s = [m.drop_prob for m in student.modules() if hasattr(m, "drop_prob")]
    drop_t = [m.drop_prob for m in teacher.modules() if hasattr(m, "drop_prob")]
    assert max(drop_s) > 0 and max(drop_t) == 0
    crops = [torch.randn(2, 3, 98, 98), torch.randn(2, 3, 98, 98), torch.randn(2, 3, 42, 42)]
    out = teacher(crops)
    assert [tuple(o.shape) for o in out] == [(2, 49, 8), (2, 49, 8), (2, 9, 8)]
    torch.testing.assert_close(out[0].norm(dim=-1), torch.ones(2, 49))  # L2-normalised head output
    # grouping crops by resolution does not change per-crop outputs
    torch.testing.assert_close(teacher([crops[2]])[0], out[2], atol=1e-5, rtol=1e-5)


def test_head_layout():
    head = ProjectionHead(48, 2048, 256, 3)
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(48, 2048), (2048, 2048), (2048, 256)]
    assert sum(isinstance(m, torch.nn.GELU) for m in head.modules()) == 2


def test_param_groups_and_schedules():
    student, _ = build_student_teacher(TINY)
    groups = param_groups(student, 1e-5, 1e-4, 0.04)
    assert [g["lr"] for g in groups] == [1e-5, 1e-5, 1e-4, 1e-4]
    assert [g["weight_decay"] for g in groups] == [0.04, 0.0, 0.04, 0.0]
    names = {id(p): n for n, p in student.named_parameters()}
    for g, decays in zip(groups, [True, False, True, False]):
        for p in g["params"]:
            assert (names[id(p)].endswith(".bias") or p.ndim == 1) != decays
    assert sum(len(g["params"]) for g in groups) == len(list(student.parameters()))
    cfg = {
        "optim": {
            "epochs": 2,
            "lr_backbone": 1e-5,
            "lr_head": 1e-4,
            "final_lr": 0.0,
            "weight_decay": 0.04,
            "weight_decay_end": 0.5,
            "momentum_teacher": 0.9995,
            "momentum_teacher_end": 1.0,
        }
    }
    sched = build_schedules(cfg, 3)
    opt = torch.optim.AdamW(groups)
    apply_schedules(opt, sched, 3)
    assert [g["weight_decay"] for g in opt.param_groups] == pytest.approx(
        [sched["weight_decay"][3], 0, sched["weight_decay"][3], 0]
    )
    assert opt.param_groups[2]["lr"] == pytest.approx(1e-4 * 0.5)  # t = T/2
    assert sched["momentum"][0] == pytest.approx(0.9995)
    # momentum 0.9995 -> 1 over T = 6 steps: 1 - 0.00025 (1 + cos(pi t / 6)), i.e. 0.99975 at t = 3
    expected = [1 - 0.00025 * (1 + math.cos(math.pi * t / 6)) for t in range(6)]
    np.testing.assert_allclose(sched["momentum"], expected, rtol=0, atol=1e-12)
    assert sched["momentum"][3] == pytest.approx(0.99975)


def test_patch_queue_fifo():
    q = PatchQueue(2, 5, 3)
    q.push(0, torch.ones(2, 3))
    q.push(0, 2 * torch.ones(2, 3))
    assert int(q.filled[0]) == 4 and int(q.filled[1]) == 0
    torch.testing.assert_close(q.banks()[0][:, 0], torch.tensor([2.0, 2.0, 1.0, 1.0]))  # newest first
    q.push(0, 3 * torch.ones(3, 3))
    torch.testing.assert_close(q.banks()[0][:, 0], torch.tensor([3.0, 3.0, 3.0, 2.0, 2.0]))  # oldest dropped
    q.push_random(1, torch.arange(12.0).reshape(2, 2, 3), per_image=1)  # 2 images -> 2 patches
    assert int(q.filled[1]) == 2 and set(q.banks()[1][:, 0].tolist()) <= {0.0, 3.0, 6.0, 9.0}


def test_drop_registers_and_local_checkpoint(tmp_path):
    reg = timm.create_model(
        "vit_small_patch14_reg4_dinov2",
        pretrained=False,
        num_classes=0,
        img_size=98,
        depth=2,
        embed_dim=48,
        num_heads=2,
    )
    path = tmp_path / "dinov2r.safetensors"
    save_file({f"teacher.backbone.{k}": v.contiguous() for k, v in reg.state_dict().items()}, str(path))
    xr = build_backbone(dict(TINY, checkpoint=str(path), drop_registers=True))
    assert xr.num_prefix_tokens == 1 and "reg_token" not in xr.state_dict()
    torch.testing.assert_close(
        xr.state_dict()["blocks.1.attn.qkv.weight"], reg.state_dict()["blocks.1.attn.qkv.weight"]
    )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_backbone(dict(TINY, checkpoint=str(tmp_path / "missing.pth")))


def test_loss_falls_on_a_fixed_batch():
    from neco.crops import sample_crop_boxes
    from neco.losses import neco_loss

    torch.manual_seed(0)
    student, teacher = build_student_teacher(dict(TINY, drop_path=0.0))
    gen = torch.Generator().manual_seed(0)
    boxes = sample_crop_boxes(112, 112, num_local=1, generator=gen)[None]
    sizes = [98, 98, 42]
    crops = [torch.randn(1, 3, s, s, generator=gen) for s in sizes]
    perms = [torch.randperm(49, generator=gen) for _ in range(4)]
    with torch.no_grad():
        target = teacher(crops[:2])
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = neco_loss(target, student(crops), boxes, sizes, 14, ref_indices=perms)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in teacher.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05


def _tiny_timm(name, **kw):
    return timm.create_model(name, pretrained=False, num_classes=0, depth=2, embed_dim=48, num_heads=2, **kw).eval()


def test_patch_tokens_floor_crops_that_are_not_a_multiple_of_the_patch():
    from neco.models import patch_tokens

    # scaled-down DINO ViT-S/16 recipe (224/98 px with p = 16 -> 64/26 px with p = 8): 26 px -> floor(26/8) = 3
    cfg = dict(TINY, name="vit_small_patch16_224", patch_size=8, drop_path=0.0)
    cfg["overrides"] = {"img_size": 64, "patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 2}
    student, teacher = build_student_teacher(cfg)
    teacher.eval()
    local = torch.randn(2, 3, 26, 26)
    tokens = patch_tokens(teacher.backbone, local)
    assert tokens.shape == (2, 9, 48)
    # a stride-8 convolution without padding never sees the last 26 - 24 = 2 rows and columns
    border = local.clone()
    border[..., 24:, :] = 5.0
    border[..., :, 24:] = -5.0
    torch.testing.assert_close(patch_tokens(teacher.backbone, border), tokens)
    torch.testing.assert_close(patch_tokens(teacher.backbone, local[..., :24, :24]), tokens)

    from neco.crops import sample_crop_boxes
    from neco.losses import neco_loss

    sizes = [64, 64, 26]
    boxes = sample_crop_boxes(96, 96, num_local=1, generator=torch.Generator().manual_seed(0))[None]
    crops = [torch.randn(1, 3, s, s) for s in sizes]
    with torch.no_grad():
        target = teacher(crops[:2])
    out = student(crops)
    assert [tuple(o.shape) for o in out] == [(1, 64, 8), (1, 64, 8), (1, 9, 8)]
    loss = neco_loss(target, out, boxes, sizes, 8, ref_indices=[torch.randperm(49) for _ in range(4)])
    loss.backward()
    assert torch.isfinite(loss) and student.backbone.patch_embed.proj.weight.grad is not None


def test_dinov2_hub_layouts_load_into_timm(tmp_path):
    x = torch.randn(1, 3, 98, 98)
    # registers: hub keeps register_tokens, a mask_token and the cls position inside pos_embed (1, 1 + N, D)
    reg = _tiny_timm("vit_small_patch14_reg4_dinov2", img_size=98)
    with torch.no_grad():
        for p in reg.parameters():
            p.normal_()  # random cls / register / position values, so a mix-up cannot go unnoticed
    sd = reg.state_dict()
    cls_pos = torch.randn(1, 1, 48)
    hub = {k: v for k, v in sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    hub.update(
        register_tokens=sd["reg_token"],
        cls_token=sd["cls_token"] - cls_pos,  # DINOv2 adds the cls position at run time; timm folds it in
        pos_embed=torch.cat([cls_pos, sd["pos_embed"]], 1),
        mask_token=torch.zeros(1, 48),
    )
    torch.save(hub, tmp_path / "dinov2_vits14_reg.pth")
    cfg = dict(TINY, drop_path=0.0, checkpoint=str(tmp_path / "dinov2_vits14_reg.pth"))
    loaded = build_backbone(cfg).eval()
    for key, value in sd.items():
        torch.testing.assert_close(loaded.state_dict()[key], value, msg=key)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reg(x))

    # no registers: timm and hub share the (1, 1 + N, D) pos_embed; only the mask_token is extra
    plain = _tiny_timm("vit_small_patch14_dinov2", img_size=98)
    torch.save(dict(plain.state_dict(), mask_token=torch.zeros(1, 48)), tmp_path / "dinov2_vits14.pth")
    cfg = dict(TINY, name="vit_small_patch14_dinov2", drop_path=0.0, checkpoint=str(tmp_path / "dinov2_vits14.pth"))
    with torch.no_grad():
        torch.testing.assert_close(build_backbone(cfg).eval()(x), plain(x))

    wide = _tiny_timm("vit_small_patch14_reg4_dinov2", img_size=98, mlp_ratio=2.0)
    save_file({k: v.contiguous() for k, v in wide.state_dict().items()}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ValueError, match=r"wide\.safetensors.*blocks\.0\.mlp\.fc1\.weight \(96, 48\)"):
        build_backbone(dict(TINY, checkpoint=str(tmp_path / "wide.safetensors")))


def test_rxr_checkpoint_in_dinov2_layout_loads_into_the_drop_registers_model(tmp_path):
    # the reference's R-XR runs build the DINOv2 code with num_register_tokens=0: no register_tokens, a mask_token and
    # the cls position inside pos_embed (1, 1 + N, D), i.e. the layout of a plain DINOv2 checkpoint. The drop_registers
    # model (timm's reg4 class, patch-only table) must compute what that network computes: plain timm DINOv2.
    x = torch.randn(1, 3, 98, 98)
    plain = _tiny_timm("vit_small_patch14_dinov2", img_size=98)
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_()
    assert plain.state_dict()["pos_embed"].shape == (1, 1 + 49, 48)
    torch.save(dict(plain.state_dict(), mask_token=torch.zeros(1, 48)), tmp_path / "neco_dinov2r_xr.pth")
    xr = build_backbone(
        dict(TINY, drop_path=0.0, drop_registers=True, checkpoint=str(tmp_path / "neco_dinov2r_xr.pth"))
    )
    with torch.no_grad():
        torch.testing.assert_close(xr.eval().forward_features(x), plain.forward_features(x))
    # the same weights inside a reference Lightning .ckpt (student under model.)
    state = {f"model.{k}": v for k, v in plain.state_dict().items()}
    state.update(
        {f"teacher.{k}": torch.zeros_like(v) for k, v in plain.state_dict().items()},
        **{"model.mask_token": torch.zeros(1, 48)},
    )
    torch.save({"state_dict": state}, tmp_path / "neco_xr.ckpt")
    xr = build_backbone(dict(TINY, drop_path=0.0, drop_registers=True, checkpoint=str(tmp_path / "neco_xr.ckpt")))
    with torch.no_grad():
        torch.testing.assert_close(xr.eval().forward_features(x), plain.forward_features(x))


def test_lightning_ckpt_loads_the_student_not_the_teacher(tmp_path):
    student, teacher = (_tiny_timm("vit_small_patch14_reg4_dinov2", img_size=98) for _ in range(2))
    state = {f"model.{k}": v for k, v in student.state_dict().items()}
    state.update({f"teacher.{k}": v for k, v in teacher.state_dict().items()})  # same names once unprefixed
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "neco.ckpt")
    loaded = build_backbone(dict(TINY, checkpoint=str(tmp_path / "neco.ckpt")))
    for key, value in student.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, msg=key)


@pytest.mark.parametrize("drop_registers", [False, True])
def test_unavailable_pretrained_weights_are_an_error_naming_the_model(offline_hub, drop_registers):
    cfg = {"name": "vit_small_patch14_reg4_dinov2.lvd142m", "pretrained": True, "checkpoint": None}
    cfg.update(drop_registers=drop_registers, drop_path=0.0, overrides={})
    match = "pretrained weights of model.name=vit_small_patch14_reg4_dinov2.lvd142m .*not available.*model.checkpoint="
    with pytest.raises(FileNotFoundError, match=match):
        build_backbone(cfg)


@pytest.mark.parametrize(
    "choice, kept", [(None, [0, 1, 2]), (-1, [2]), (-2, [1, 2]), (1, [1, 2]), ([0, 2], [0, 2]), ([2, 2], [2])]
)
def test_freeze_blocks_keeps_the_chosen_blocks_and_the_head(choice, kept):
    from neco.models import freeze_blocks

    student, _ = build_student_teacher(dict(TINY, overrides=dict(TINY["overrides"], depth=3)))
    assert freeze_blocks(student.backbone, choice) == kept
    trainable = {n for n, p in student.backbone.named_parameters() if p.requires_grad}
    if choice is None:
        expected = {n for n, _ in student.backbone.named_parameters()}  # patch embedding, tokens, norm included
    else:
        names = [n for n, _ in student.backbone.named_parameters()]
        expected = {n for n in names if n.startswith("blocks.") and int(n.split(".")[1]) in kept}
    assert trainable == expected and ("norm.weight" in trainable) == (choice is None)
    groups = param_groups(student, 1e-5, 1e-4, 0.04)
    backbone_ids = {id(p) for g in groups[:2] for p in g["params"]}
    assert backbone_ids == {id(p) for n, p in student.backbone.named_parameters() if n in expected}
    assert sum(len(g["params"]) for g in groups[2:]) == len(list(student.head.parameters()))  # the head always trains


def test_freeze_blocks_unknown_block_is_an_error_listing_the_blocks():
    from neco.models import freeze_blocks

    student, _ = build_student_teacher(TINY)
    with pytest.raises(ValueError, match=r"trainable_blocks names blocks \[7\]; the backbone has blocks \[0, 1\]"):
        freeze_blocks(student.backbone, [0, 7])
    with pytest.raises(ValueError, match=r"trainable_blocks=2 keeps none of the backbone's blocks \[0, 1\]"):
        freeze_blocks(student.backbone, 2)  # an int past the last block, not a silently frozen backbone
    for bad in (["last"], "1"):
        with pytest.raises(ValueError, match="expected null, an int or a list of block ids"):
            freeze_blocks(student.backbone, bad)
    assert all(p.requires_grad for p in student.backbone.parameters())  # nothing frozen by a rejected choice
    assert freeze_blocks(student.backbone, []) == []  # [] on purpose: only the head trains
    assert not any(p.requires_grad for p in student.backbone.parameters())
    groups = param_groups(student, 1e-5, 1e-4, 0.04)
    assert [len(g["params"]) for g in groups[:2]] == [0, 0]
    torch.optim.AdamW(groups)


def test_push_random_draws_from_every_image_of_the_batch():
    """10 patches per image of 4 images of 49 patches: drawn uniformly from the whole batch (not the first rows)."""
    q = PatchQueue(1, 64, 2)
    tokens = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(49.0), indexing="ij"), -1)  # (image, patch)
    torch.manual_seed(0)
    q.push_random(0, tokens, per_image=10)
    bank = q.banks()[0]
    assert len(bank) == 40 and len({tuple(r) for r in bank.tolist()}) == 40  # distinct patches of the batch
    assert set(bank[:, 0].tolist()) == {0.0, 1.0, 2.0, 3.0}  # P(one image missing) < 4 * (147/196)^40 ~ 4e-5
    assert bank[:, 1].max() > 39  # not the leading patches of each image either


def test_patch_tokens_of_non_square_images_floor_height_and_width_separately():
    from neco.models import patch_tokens

    student, _ = build_student_teacher(dict(TINY, drop_path=0.0))
    student.eval()
    images = torch.randn(2, 3, 30, 44)  # 30 // 14 = 2 rows, 44 // 14 = 3 columns
    with torch.no_grad():
        tokens = patch_tokens(student.backbone, images)
        expected = patch_tokens(student.backbone, images[..., :28, :42])
    assert tokens.shape == (2, 6, 48)
    torch.testing.assert_close(tokens, expected)
