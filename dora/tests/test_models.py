import math

import pytest
import torch

from dora.models import DINOHead, build_backbone, forward_with_attention, load_backbone, read_backbone_state


def test_forward_with_attention_matches_manual(tiny_vit):
    x = torch.randn(2, 3, 32, 32)
    cls, tokens, attn, query, key = forward_with_attention(tiny_vit, x)
    assert cls.shape == (2, 32) and tokens.shape == (2, 17, 32)
    assert attn.shape == (2, 4, 17, 17) and query.shape == (2, 4, 17, 8) and key.shape == (2, 4, 17, 8)
    torch.testing.assert_close(tokens, tiny_vit.forward_features(x))
    torch.testing.assert_close(cls, tokens[:, 0])
    # recompute the last block by hand: tokens before it, LN1, qkv split, softmax(q k^T / sqrt(dh))
    m = tiny_vit
    h = m.patch_embed(x)
    h = m._pos_embed(h)
    h = m.blocks[0](h)
    y = m.blocks[1].norm1(h)
    w, b = m.blocks[1].attn.qkv.weight, m.blocks[1].attn.qkv.bias
    q = (y @ w[:32].T + b[:32]).reshape(2, 17, 4, 8).transpose(1, 2)
    k = (y @ w[32:64].T + b[32:64]).reshape(2, 17, 4, 8).transpose(1, 2)
    torch.testing.assert_close(query, q)
    torch.testing.assert_close(key, k)
    torch.testing.assert_close(attn, torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1))
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4, 17))


def test_rectangular_input_follows_the_official_dino_position_interpolation(tiny_vit):
    x = torch.randn(1, 3, 48, 24)
    _, tokens, attn, _, _ = forward_with_attention(tiny_vit, x)
    assert tokens.shape == (1, 1 + 6 * 3, 32) and attn.shape == (1, 4, 19, 19)
    # the official ViT's prepare_tokens: interpolate_pos_encoding with its +0.1 offset (bicubic, no antialias)
    m = tiny_vit
    side = int(math.sqrt(m.pos_embed.shape[1] - 1))
    table = m.pos_embed[:, 1:].reshape(1, side, side, 32).permute(0, 3, 1, 2)
    table = torch.nn.functional.interpolate(table, scale_factor=(6.1 / side, 3.1 / side), mode="bicubic")
    pos = torch.cat([m.pos_embed[:, :1], table.permute(0, 2, 3, 1).reshape(1, 18, 32)], 1)
    h = torch.cat([m.cls_token, m.patch_embed(x).reshape(1, 18, 32)], 1) + pos
    torch.testing.assert_close(tokens, m.norm(m.blocks(h)))
    # square inputs of the stored size use the table as it is
    y = torch.randn(1, 3, 32, 32)
    h = torch.cat([m.cls_token, m.patch_embed(y).reshape(1, 16, 32)], 1) + m.pos_embed
    torch.testing.assert_close(forward_with_attention(m, y)[1], m.norm(m.blocks(h)))


def test_dino_head_weight_norm():
    head = DINOHead(32, out_dim=10, hidden_dim=16, bottleneck_dim=8, norm_last_layer=True)
    assert not head.last_layer.weight_g.requires_grad
    x = torch.randn(5, 32)
    z = torch.nn.functional.normalize(head.mlp(x), dim=-1)
    v = head.last_layer.weight_v
    torch.testing.assert_close(head(x), z @ (v / v.norm(dim=1, keepdim=True)).T)
    assert DINOHead(32, 10, 16, 8, norm_last_layer=False).last_layer.weight_g.requires_grad


def test_dino_head_last_layer_keeps_the_default_linear_init():
    """The reference DINOHead applies its trunc-normal (std 0.02) init before it builds the last layer, so v keeps
    nn.Linear's default: uniform on [-1/sqrt(bottleneck), 1/sqrt(bottleneck)] (std 1/(8 sqrt 3) = 0.072 for 64),
    which sets ||v|| and hence how fast AdamW turns the weight-normed directions. The MLP layers are trunc-normal."""
    torch.manual_seed(0)
    head = DINOHead(32, out_dim=4096, hidden_dim=16, bottleneck_dim=64)
    v = head.last_layer.weight_v.detach()
    assert v.abs().max() <= 1 / 8
    assert v.std().item() == pytest.approx(1 / 8 / math.sqrt(3), rel=0.03)
    assert head.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.1)
    torch.testing.assert_close(head.last_layer.weight_g.detach(), torch.ones(4096, 1))


def test_backbone_cls_token_has_the_dino_init():
    """The DINO / DoRA ViT draws its CLS token trunc-normal with std 0.02 (timm's default is N(0, 1e-6))."""
    torch.manual_seed(0)
    model = build_backbone("vit_small_patch16_224", img_size=32, patch_size=8, embed_dim=384, depth=1, num_heads=6)
    cls = model.cls_token.detach()
    # trunc_normal_(std=0.02) truncates at +-2 (absolute), so it is a plain N(0, 0.02^2) here; 384 draws: the
    # estimated std is within ~4 % of 0.02 (1 sigma)
    assert cls.std().item() == pytest.approx(0.02, rel=0.15)


def test_load_legacy_checkpoint_with_prefixes(tmp_path, tiny_vit):
    src = build_backbone("vit_small_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
    ckpt = {
        "teacher": {f"module.backbone.{k}": v for k, v in src.state_dict().items()}
        | {"module.head.last_layer.weight_g": torch.ones(3, 1)},
        "epoch": 100,
    }
    path = tmp_path / "dora_venice_100ep.pth"
    torch.save(ckpt, path)
    state = read_backbone_state(path)
    assert set(state) == set(src.state_dict())
    missing, unexpected = load_backbone(tiny_vit, path)
    assert missing == [] and unexpected == []
    for k, v in src.state_dict().items():
        torch.testing.assert_close(tiny_vit.state_dict()[k], v)
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        read_backbone_state(tmp_path / "nothere.pth")


def test_registers_rejected():
    with pytest.raises(ValueError, match="registers"):
        build_backbone(
            "vit_small_patch16_224",
            img_size=32,
            patch_size=8,
            embed_dim=32,
            depth=1,
            num_heads=2,
            reg_tokens=4,
            no_embed_class=True,
        )


def test_pretrained_flag_reaches_timm(monkeypatch):
    """``model.pretrained`` goes to timm.create_model (faked here: fixed 'downloaded' weights, no network)."""
    import timm

    from dora.config import load_config
    from dora.models import build_network

    create, calls = timm.create_model, []

    def fake_create_model(name, pretrained=False, **kwargs):
        calls.append(pretrained)
        with torch.random.fork_rng():
            if pretrained:
                torch.manual_seed(1234)
            return create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", fake_create_model)
    cfg = load_config(["--config", "tiny"])
    build_network(cfg)
    assert calls == [False]
    cfg = load_config(["--config", "tiny", "model.pretrained=true"])
    student, teacher = build_network(cfg), build_network(cfg, teacher=True)
    assert calls == [False, True, True]
    for (name, a), b in zip(student.backbone.state_dict().items(), teacher.backbone.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="model.pretrained"):
        build_network(load_config(["--config", "tiny", "model.pretrained=weights.pth"]))


def test_overrides_of_keys_with_their_own_model_key_are_clear_errors():
    """``model.overrides.drop_path_rate=0.1`` (the README's example once) reached build_backbone twice: a TypeError."""
    from dora.config import load_config
    from dora.models import build_network

    tiny = "img_size: 32, embed_dim: 32, depth: 2, num_heads: 2"
    for key, value in (("drop_path_rate", 0.1), ("pretrained", "true")):
        cfg = load_config(["--config", "tiny", f"model.overrides={{{tiny}, patch_size: 8, {key}: {value}}}"])
        with pytest.raises(ValueError, match=rf"model.overrides.{key}: set model.{key} instead"):
            build_network(cfg)
    cfg = load_config(["--config", "tiny", f"model.overrides={{{tiny}, patch_size: 4}}", "model.drop_path_rate=0.2"])
    net = build_network(cfg)
    assert net.backbone.patch_embed.patch_size == (4, 4)
    assert net.backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)


def test_checkpoint_of_another_architecture_and_offline_weights_are_clear_errors(tmp_path, tiny_vit, monkeypatch):
    import timm

    path = tmp_path / "vits16_teacher.pth"
    torch.save({"teacher": {"module.backbone.norm.bias": torch.zeros(384)}}, path)
    with pytest.raises(ValueError, match=r"vits16_teacher.pth does not fit .*norm.bias \(384,\) vs \(32,\).*arch"):
        load_backbone(tiny_vit, path)

    def offline(*args, **kwargs):  # what timm raises offline for weights not in the cache (an OSError subclass)
        raise FileNotFoundError("An error happened while trying to locate the file on the Hub")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(
        FileNotFoundError,
        match=r"pretrained weights of timm backbone 'vit_small_patch16_224.dino' not available.*local checkpoint",
    ):
        build_backbone("vit_small_patch16_224.dino", pretrained=True)
