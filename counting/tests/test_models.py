import math

import pytest
import torch
import torch.nn as nn

from counting.models import (
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
