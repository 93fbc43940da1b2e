import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from counting.models import (
    CrossAttentionBlock,
    DensityDecoder,
    UnCounTR,
    build_backbone,
    build_model,
    interpolate_pos_embed,
    sincos_pos_embed_2d,
)


class Recorder(nn.Module):
    def forward(self, x):
        self.value = x
        return x


def tiny_backbone(patch: int = 16, img_size: int = 224):
    torch.manual_seed(0)
    return build_backbone(
        "vit_s_16", pretrained=False, img_size=img_size, patch_size=patch, embed_dim=48, depth=2, num_heads=2
    )


def test_backbone_tokens_and_cls_attention_match_timm():
    backbone = tiny_backbone(8, 64)
    images = torch.randn(2, 3, 32, 40)
    tokens, attention = backbone(images, with_attention=True)
    vit = backbone.vit
    reference = vit.forward_features(images)
    assert torch.allclose(tokens, reference[:, 1:], atol=1e-5) and tokens.shape == (2, 20, 48)
    # timm's unfused attention path passes the softmax weights through attn_drop: record them
    last = vit.blocks[-1].attn
    last.fused_attn, last.attn_drop = False, Recorder()
    vit.forward_features(images)
    assert torch.allclose(attention, last.attn_drop.value[:, :, 0, 1:], atol=1e-5)
    assert (attention.sum(-1) < 1).all()  # the CLS->CLS mass is dropped


def test_backbone_is_frozen():
    backbone = tiny_backbone(8, 64)
    backbone.train()
    assert not backbone.training and not backbone.vit.training
    assert not any(p.requires_grad for p in backbone.parameters())


def test_head_initialisation_leaves_the_backbone_weights_alone():
    """Xavier / LayerNorm init applies to the head only: the (pretrained) ViT keeps every weight it came with."""
    backbone = tiny_backbone(8, 64)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    UnCounTR(backbone, img_size=64, fim_dim=32, fim_heads=2, decoder_width=16, decoder_groups=4)
    after = backbone.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_exemplar_pooling_by_hand():
    model = UnCounTR(tiny_backbone(8, 64), img_size=64, fim_dim=32, fim_heads=2, decoder_width=16, decoder_groups=4)
    crops = torch.randn(2, 3, 3, 16, 16)
    pooled = model.exemplar_tokens(crops)
    tokens, attention = model.backbone(crops[1, 2][None], with_attention=True)
    weights = attention[0].mean(0)  # (4,)
    manual = sum(weights[i] * tokens[0, i] for i in range(4))
    assert pooled.shape == (2, 3, 48) and torch.allclose(pooled[1, 2], manual, atol=1e-5)


def test_sincos_embedding_values():
    pos = sincos_pos_embed_2d(8, 2)
    # token (row 0, col 1): first half encodes the column (omega = 1, 0.01), second half the row
    expected = [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01), 0.0, 0.0, 1.0, 1.0]
    assert torch.allclose(pos[1], torch.tensor(expected), atol=1e-6)
    assert torch.equal(interpolate_pos_embed(pos, 2, 2, 2), pos)
    resized = interpolate_pos_embed(sincos_pos_embed_2d(32, 6), 6, 8, 10)
    assert resized.shape == (80, 32)


@pytest.mark.parametrize("patch, stages", [(16, 4), (8, 3)])
def test_decoder_upsamples_by_the_patch(patch, stages):
    decoder = DensityDecoder(32, patch, width=16, groups=4)
    assert len(decoder.stages) == stages
    assert decoder(torch.randn(2, 32, 3, 5)).shape == (2, 3 * patch, 5 * patch)
    with pytest.raises(ValueError, match="power-of-two"):
        DensityDecoder(32, 14)


@pytest.mark.parametrize("size", [224, 384])
def test_model_shapes(size):
    model = UnCounTR(tiny_backbone(16, 224), img_size=224, fim_dim=32, fim_heads=2, decoder_width=8, decoder_groups=4)
    out = model(torch.randn(1, 3, size, size), torch.randn(1, 2, 3, 64, 64))
    assert out.shape == (1, size, size)


def test_only_the_head_gets_gradients(tiny_model_cfg):
    model = build_model(tiny_model_cfg)
    out = model(torch.randn(2, 3, 64, 64), torch.randn(2, 1, 3, 32, 32))
    out.sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("backbone"))
    assert float(model.image_proj.bias.detach().abs().sum()) == 0.0 and float(model.norm.weight.detach().mean()) == 1.0


def test_backbone_weights_not_found_name_the_model_and_path(tmp_path, monkeypatch):
    missing = tmp_path / "dino_vitb16.safetensors"
    with pytest.raises(FileNotFoundError, match=rf"checkpoint_path={missing} for vit_base_patch16_224.dino"):
        build_backbone("vit_b_16", pretrained=True, checkpoint_path=str(missing))

    def offline(*args, **kwargs):  # what timm raises offline for weights not in the cache (an OSError subclass)
        raise FileNotFoundError("An error happened while trying to locate the file on the Hub")

    monkeypatch.setattr("timm.create_model", offline)
    with pytest.raises(FileNotFoundError, match=r"backbone vit_base_patch8_224.dino .*checkpoint_path=/path/to"):
        build_backbone("vit_b_8", pretrained=True)


# ---------------------------------------------------------------- slow references for the head (spec g.4)
def sincos_reference(dim: int, grid: int) -> torch.Tensor:
    """MAE recipe written out: token r*grid + c = [sin(c w), cos(c w), sin(r w), cos(r w)], w_i = 10000^(-4i/dim)."""
    quarter = dim // 4
    out = torch.zeros(grid * grid, dim, dtype=torch.float64)
    for r in range(grid):
        for c in range(grid):
            for i in range(quarter):
                w = 10000 ** (-i / quarter)
                out[r * grid + c, [i, quarter + i, 2 * quarter + i, 3 * quarter + i]] = torch.tensor(
                    [math.sin(c * w), math.cos(c * w), math.sin(r * w), math.cos(r * w)], dtype=torch.float64
                )
    return out


def bicubic_weights(n_in: int, n_out: int, offset: float = 0.0) -> torch.Tensor:
    """(n_out, n_in) matrix of PyTorch's bicubic resampling: Keys kernel a = -0.75, half-pixel centres, taps clamped.

    ``offset`` 0.1: the reference's DINO-style call with scale factor (n_out + 0.1) / n_in, whose source coordinate
    is (j + 0.5) / scale - 0.5."""
    a = -0.75

    def kernel(x):
        x = abs(x)
        if x <= 1:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a if x < 2 else 0.0

    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for j in range(n_out):
        src = (j + 0.5) * n_in / (n_out + offset) - 0.5
        base = math.floor(src)
        for tap in range(base - 1, base + 3):
            m[j, min(max(tap, 0), n_in - 1)] += kernel(src - tap)
    return m


def bilinear_x2_weights(n: int) -> torch.Tensor:
    """(2n, n) matrix of bilinear x2 upsampling with align_corners=False (source index clamped at 0)."""
    m = torch.zeros(2 * n, n)
    for j in range(2 * n):
        src = max((j + 0.5) / 2 - 0.5, 0.0)
        i0 = int(math.floor(src))
        i1, lam = min(i0 + 1, n - 1), src - i0
        m[j, i0] += 1 - lam
        m[j, i1] += lam
    return m


def layer_norm_reference(x, norm):
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def attention_reference(attn, x, context):
    """Per-head loop: softmax(q k^T / sqrt(dh)) v, heads concatenated, then the output projection."""
    dim, heads = x.shape[-1], attn.num_heads
    dh = dim // heads
    q = x @ attn.q.weight.T + attn.q.bias
    kv = context @ attn.kv.weight.T + attn.kv.bias
    k, v = kv[..., :dim], kv[..., dim:]
    outs = []
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        weights = torch.softmax(q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(dh), dim=-1)
        outs.append(weights @ v[..., sl])
    return torch.cat(outs, -1) @ attn.proj.weight.T + attn.proj.bias


def block_reference(block, x, exemplars):
    y = layer_norm_reference(x, block.norm1)
    x = x + attention_reference(block.self_attn, y, y)
    x = x + attention_reference(block.cross_attn, layer_norm_reference(x, block.norm2), exemplars)
    fc1, fc2 = block.mlp[0], block.mlp[2]
    hidden = layer_norm_reference(x, block.norm3) @ fc1.weight.T + fc1.bias
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))  # exact GELU
    return x + hidden @ fc2.weight.T + fc2.bias


def decoder_reference(decoder, x):
    for stage in decoder.stages:
        conv, gn = stage[0], stage[1]
        x = F.conv2d(x, conv.weight, conv.bias, padding=1)
        b, c, h, w = x.shape
        g = x.reshape(b, gn.num_groups, -1)
        g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + gn.eps)
        x = g.reshape(b, c, h, w) * gn.weight[:, None, None] + gn.bias[:, None, None]
        x = x.clamp_min(0)
        if len(stage) == 4:  # last stage: 1x1 conv to one channel
            x = torch.einsum("bchw,oc->bohw", x, stage[3].weight[:, :, 0, 0]) + stage[3].bias[:, None, None]
        x = bilinear_x2_weights(h) @ x @ bilinear_x2_weights(w).T
    return x[:, 0]


def randomise(module: nn.Module, seed: int = 0):
    """Non-trivial weights everywhere (the model's own init leaves zero biases and unit norms)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return module


def test_sincos_dim32_grid6_and_its_bicubic_interpolation_by_hand():
    pos = sincos_pos_embed_2d(32, 6)
    reference = sincos_reference(32, 6)
    assert torch.allclose(pos.double(), reference, atol=1e-6)
    resized = interpolate_pos_embed(pos, 6, 8, 10)
    grid = reference.reshape(6, 6, 32)
    weights_h, weights_w = bicubic_weights(6, 8, 0.1), bicubic_weights(6, 10, 0.1)
    expected = torch.einsum("ir,jc,rcd->ijd", weights_h, weights_w, grid).reshape(80, 32)
    assert torch.allclose(resized.double(), expected, atol=1e-5)


def test_cross_attention_block_against_a_per_head_loop():
    torch.manual_seed(0)
    block = randomise(CrossAttentionBlock(32, 4, mlp_ratio=4.0))
    x, exemplars = torch.randn(2, 7, 32), torch.randn(2, 3, 32)
    with torch.no_grad():
        assert torch.allclose(block(x, exemplars), block_reference(block, x, exemplars), atol=1e-5)


@pytest.mark.parametrize("patch", [16, 8])
def test_decoder_values_against_the_stage_rule_written_out(patch):
    decoder = randomise(DensityDecoder(24, patch, width=16, groups=8), seed=patch)
    x = torch.randn(2, 24, 3, 4)
    with torch.no_grad():
        out = decoder(x)
        assert out.shape == (2, 3 * patch, 4 * patch)
        assert torch.allclose(out, decoder_reference(decoder, x), atol=1e-4)


class StubBackbone(nn.Module):
    """Given backbone outputs: image tokens (B, h*w, C) and exemplar tokens + CLS attention ((B*k), n, C)."""

    patch_size, embed_dim, num_heads = 8, 12, 2

    def __init__(self, image_tokens, exemplar_tokens, exemplar_attention):
        super().__init__()
        self.outputs = image_tokens, exemplar_tokens, exemplar_attention

    def forward(self, images, with_attention=False):
        return self.outputs[1:] if with_attention else self.outputs[0]


def test_full_forward_from_given_backbone_outputs_and_head_weights():
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randn(1, 8 * 10, 12, generator=gen)  # 64 x 80 image, patch 8 -> 8 x 10 grid (row-major)
    ex_tokens = torch.randn(2, 4, 12, generator=gen)  # 2 exemplars of 16 px -> 2 x 2 patches
    ex_attention = torch.rand(2, 2, 4, generator=gen) / 5  # per head, CLS -> patch (sums < 1)
    model = UnCounTR(
        StubBackbone(tokens, ex_tokens, ex_attention),
        img_size=48,
        fim_dim=32,
        fim_depth=2,
        fim_heads=4,
        decoder_width=16,
        decoder_groups=8,
    )
    randomise(model, seed=4)
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 80), torch.zeros(1, 2, 3, 16, 16))
        # exemplar token = sum over patches of feature * head-averaged CLS attention
        pooled = torch.stack([sum(ex_attention[k, :, n].mean() * ex_tokens[k, n] for n in range(4)) for k in range(2)])
        pos = torch.einsum(
            "ir,jc,rcd->ijd",
            bicubic_weights(6, 8, 0.1),
            bicubic_weights(6, 10, 0.1),
            sincos_reference(32, 6).reshape(6, 6, 32),
        )  # position table of the 6 x 6 training grid resampled to 8 x 10 (scale factors (8.1 / 6, 10.1 / 6))
        x = tokens @ model.image_proj.weight.T + model.image_proj.bias + pos.reshape(80, 32).float()
        # the exemplar tokens go through the same projection as the image tokens (the reference's fim_embed)
        y = (pooled @ model.image_proj.weight.T + model.image_proj.bias)[None]
        for block in model.blocks:
            x = block_reference(block, x, y)
        x = layer_norm_reference(x, model.norm)
        grid = torch.zeros(1, 32, 8, 10)
        for n in range(80):
            grid[0, :, n // 10, n % 10] = x[0, n]
        expected = decoder_reference(model.decoder, grid)
    assert out.shape == (1, 64, 80)
    assert torch.allclose(out, expected, atol=1e-4 * expected.abs().max().item())
