import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from sharelock.data import eval_transform
from sharelock.training import build_optimizer, warmup_cosine


def lrs(total=5000, warmup=150, lr=1e-3, schedule="cosine"):
    p = torch.nn.Parameter(torch.zeros(1))
    opt, sched = build_optimizer([p], lr=lr, warmup_steps=warmup, total_steps=total, schedule=schedule)
    out = []
    for _ in range(total + 1):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedule_warmup_peak_and_end():
    values = lrs()
    assert values[0] == 0.0
    assert values[75] == pytest.approx(0.5e-3)
    assert values[150] == pytest.approx(1e-3)
    mid = 150 + (5000 - 150) // 2
    assert values[mid] == pytest.approx(0.5e-3, rel=1e-3)
    assert values[5000] == pytest.approx(0.0, abs=1e-12)
    assert max(values) == pytest.approx(1e-3)
    assert lrs(total=50, warmup=10, schedule="constant")[10:] == pytest.approx([1e-3] * 41)
    assert warmup_cosine(5001, 150, 5000) == warmup_cosine(9000, 150, 5000) == 0.0  # stays at 0 past the end


def test_optimizer_is_adam_with_coupled_l2():
    p = torch.nn.Parameter(torch.tensor([2.0]))
    opt, sched = build_optimizer([p], lr=0.1, weight_decay=0.5, warmup_steps=0, total_steps=10)
    assert type(opt) is torch.optim.Adam
    p.grad = torch.tensor([0.0])
    opt.step()
    # coupled L2: g = 0 + 0.5 * 2 = 1 and the first Adam step moves by lr * g / (|g| + eps) = 0.1;
    # AdamW would decay to 2 - 0.1 * 0.5 * 2 = 1.9 and take no Adam step for a zero gradient
    assert p.item() == pytest.approx(2.0 - 0.1, abs=1e-6)


def test_adam_betas_and_eps_match_a_hand_written_loop():
    # three steps against Adam written out in float64 with the reference's betas (0.9, 0.999) and eps 1e-8;
    # the first coordinate's gradients are of the order of eps, so eps shows, and varying gradients show beta2
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt, _ = build_optimizer([p], lr=0.1, weight_decay=0.0, schedule="constant")
    grads = [[1e-8, 1.0], [3e-8, -2.0], [-2e-8, 0.5]]
    expected, m, v = np.zeros(2), np.zeros(2), np.zeros(2)
    for t, g in enumerate(grads, start=1):
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        m = 0.9 * m + 0.1 * np.array(g)
        v = 0.999 * v + 0.001 * np.array(g) ** 2
        expected -= 0.1 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-9)


def test_eval_transform_matches_manual_pipeline():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    out = eval_transform()(img)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    # by hand: shorter side 300 -> 256, width 400*256/300 = 341.33 -> 341; PIL bilinear resize is antialiased
    resized = np.asarray(img.resize((341, 256), Image.BILINEAR), dtype=np.float32) / 255
    top, left = round((256 - 224) / 2), round((341 - 224) / 2)
    crop = resized[top : top + 224, left : left + 224]
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = torch.from_numpy(((crop - mean) / std).transpose(2, 0, 1)).float()
    assert (out - expected).abs().max().item() < 2.5 / 255 / 0.225  # uint8 rounding in PIL vs float in torch
    assert (out - expected).abs().mean().item() < 0.01
    assert math.isfinite(out.sum().item())

    # grey, palette and RGBA images give the 3-channel tensor of their RGB conversion
    for mode in ("L", "P", "RGBA", "CMYK"):
        other = img.convert(mode)
        assert torch.equal(eval_transform()(other), eval_transform()(other.convert("RGB")))


def test_constant_schedule_has_no_warmup_like_the_reference():
    # reference: lr_schedule "constant" returns the bare optimizer (no scheduler), so the LR is lr from step 0
    assert lrs(total=20, warmup=10, schedule="constant") == pytest.approx([1e-3] * 21)
    with_warmup = lrs(total=20, warmup=10, schedule="constant_with_warmup")
    assert with_warmup == pytest.approx([1e-4 * k for k in range(10)] + [1e-3] * 11)
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], schedule="linear")


def test_trim_records_drops_later_steps_and_a_line_cut_short_by_a_crash(tmp_path):
    from sharelock.training import trim_records

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.0}\n{"step": 4, "lo')
    trim_records(path, 2)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'


def test_trim_records_replaces_the_file_only_once_rewritten(tmp_path, monkeypatch):
    """A kill while the trimmed records are written (here: at the rename) leaves the file as it was (it was rewritten
    in place, so such a kill lost records); a file with nothing past the step is not rewritten."""
    import sharelock.training as module

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 0.5}) + "\n" for s in (1, 2, 3)]
    path.write_text("".join(lines))

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(module.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        module.trim_records(path, 2)
    assert path.read_text() == "".join(lines)
    module.trim_records(path, 3)  # nothing to drop: no rename
    monkeypatch.undo()
    module.trim_records(path, 2)
    assert path.read_text() == "".join(lines[:2])
