import copy
import math
import pickle

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")

from funai_common.vit import (  # noqa: E402
    DinoInterpolationViT,
    dino_interpolate,
    supports_dino_interpolation,
    use_dino_interpolation,
)


def _cubic(x: float, a: float = -0.75) -> float:
    x = abs(x)
    if x <= 1:
        return (a + 2) * x**3 - (a + 3) * x**2 + 1
    if x < 2:
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return 0.0


def _slow_bicubic(grid: np.ndarray, out_h: int, out_w: int, scale_h: float, scale_w: float) -> np.ndarray:
    """Cubic convolution (a = -0.75) one output position at a time: source coordinate (i + 0.5) / scale - 0.5,
    neighbours clamped to the border."""
    m_h, m_w, dim = grid.shape
    out = np.zeros((out_h, out_w, dim))
    for i in range(out_h):
        sy = (i + 0.5) / scale_h - 0.5
        for j in range(out_w):
            sx = (j + 0.5) / scale_w - 0.5
            y0, x0 = math.floor(sy), math.floor(sx)
            for dy in range(-1, 3):
                for dx in range(-1, 3):
                    wgt = _cubic(sy - (y0 + dy)) * _cubic(sx - (x0 + dx))
                    out[i, j] += wgt * grid[min(max(y0 + dy, 0), m_h - 1), min(max(x0 + dx, 0), m_w - 1)]
    return out


@pytest.mark.parametrize(("side", "grid"), [(5, (3, 4)), (4, (7, 2)), (6, (6, 3))])
def test_offset_interpolation_matches_a_slow_cubic_convolution(side, grid):
    table = torch.randn(1, side * side, 3, dtype=torch.float64)
    got = dino_interpolate(table, grid)
    ref = _slow_bicubic(table[0].reshape(side, side, 3).numpy(), *grid, (grid[0] + 0.1) / side, (grid[1] + 0.1) / side)
    np.testing.assert_allclose(got[0].reshape(*grid, 3).numpy(), ref, atol=1e-5)
    # offset 0: plain resize to the size, scale out / in
    got = dino_interpolate(table, grid, offset=0)
    ref = _slow_bicubic(table[0].reshape(side, side, 3).numpy(), *grid, grid[0] / side, grid[1] / side)
    np.testing.assert_allclose(got[0].reshape(*grid, 3).numpy(), ref, atol=1e-5)


def test_stored_grid_is_returned_unchanged_and_bad_tables_are_refused():
    table = torch.randn(1, 16, 4)
    assert dino_interpolate(table, (4, 4)) is table
    with pytest.raises(ValueError, match="15 patch entries is not a square"):
        dino_interpolate(torch.randn(1, 15, 4), (2, 2))


def _vit(**kw):
    args = dict(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=0, dynamic_img_size=True)
    return timm.create_model("vit_small_patch16_224", **{**args, **kw}).eval()


def _manual_tokens(model, images, prefix_in_table: bool):
    """Patch embedding + DINO-interpolated table + CLS/registers, then timm's blocks and final norm."""
    x = model.patch_embed(images)  # (B, h, w, D)
    b, h, w, d = x.shape
    table = model.pos_embed
    k = model.num_prefix_tokens if prefix_in_table else 0
    patch = dino_interpolate(table[:, k:], (h, w)) + x.reshape(b, h * w, d)
    front = [model.cls_token.expand(b, -1, -1)]
    if model.reg_token is not None:
        front.append(model.reg_token.expand(b, -1, -1))
    if prefix_in_table:
        front = [front[0] + table[:, :1]]
    return model.norm(model.blocks(torch.cat([*front, patch], 1)))


def test_vit_uses_the_reference_interpolation_at_other_sizes_only():
    torch.manual_seed(0)
    timm_default = _vit()
    model = use_dino_interpolation(copy.deepcopy(timm_default))
    assert isinstance(model, DinoInterpolationViT)
    native = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.forward_features(native), timm_default.forward_features(native))
    rect = torch.randn(2, 3, 48, 24)
    out = model.forward_features(rect)
    torch.testing.assert_close(out, _manual_tokens(model, rect, prefix_in_table=True))
    # timm's own (antialiased, to-size) resampling is something else
    assert (out - timm_default.forward_features(rect)).abs().max() > 1e-3


def test_register_layout_without_class_position():
    torch.manual_seed(0)
    model = use_dino_interpolation(_vit(reg_tokens=2, no_embed_class=True))
    x = torch.randn(1, 3, 40, 16)
    out = model.forward_features(x)
    assert out.shape == (1, 1 + 2 + 5 * 2, 16)
    torch.testing.assert_close(out, _manual_tokens(model, x, prefix_in_table=False))


def test_copies_and_pickles_keep_the_interpolation():
    torch.manual_seed(0)
    model = use_dino_interpolation(_vit(), offset=0.0, antialias=True)
    x = torch.randn(1, 3, 24, 40)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(other) is DinoInterpolationViT and other.dino_interpolation == (0.0, True)
        torch.testing.assert_close(other.forward_features(x), model.forward_features(x))
    # offset 0 + antialias is timm's own resampling
    plain = _vit()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(plain.forward_features(x), model.forward_features(x))


def test_refuses_models_it_cannot_patch():
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        use_dino_interpolation(_vit(dynamic_img_size=False))
    # a 2 x 8 grid has as many entries as a 4 x 4 one: it must not be read as one
    wide = _vit(img_size=(16, 64))
    assert not supports_dino_interpolation(wide) and supports_dino_interpolation(_vit())
    with pytest.raises(ValueError, match=r"square position grid, got \(2, 8\)"):
        use_dino_interpolation(wide)
    distilled = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, dynamic_img_size=True)
    assert not supports_dino_interpolation(distilled)
    with pytest.raises(ValueError, match="needs a timm VisionTransformer, got Linear"):
        use_dino_interpolation(torch.nn.Linear(2, 2))


def test_unavailable_pretrained_weights_name_the_model(monkeypatch):
    from funai_common.weights import create_timm_model

    def offline(*args, **kwargs):  # what timm raises offline for weights not in the cache (an OSError subclass)
        raise FileNotFoundError("An error happened while trying to locate the file on the Hub\nmore")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(FileNotFoundError, match=r"^pretrained weights of timm model vit_x not available \(An error "):
        create_timm_model("vit_x", pretrained=True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(FileNotFoundError, match=r"; use PATH \(on a machine without internet, HF_HUB_OFFLINE=1 gives"):
        create_timm_model("vit_x", True, "model=vit_x", "use PATH")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # already offline: nothing to add
    with pytest.raises(FileNotFoundError, match=r"of model=vit_x not available \(.*file on the Hub\); use PATH$"):
        create_timm_model("vit_x", True, "model=vit_x", "use PATH")
    with pytest.raises(FileNotFoundError, match="An error happened"):  # not about weights: timm's own error
        create_timm_model("vit_x", pretrained=False)
