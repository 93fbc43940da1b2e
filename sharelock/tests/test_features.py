import pytest
import torch

from sharelock.features import build_language_encoder, build_vision_encoder, last_token_features
from sharelock.tiny import build_tiny_llama, tiny_vit_spec


def single_feature(model, tokenizer, text):
    """One text, no padding at all: the last hidden state of the base model at the last token."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    base = getattr(model, "base_model", model)
    return base(input_ids=ids).last_hidden_state[0, -1]


def test_tokenizer_adds_bos_and_has_no_pad(tiny_text):
    tokenizer, _, _ = tiny_text
    ids = tokenizer("a red circle")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 4
    assert tokenizer.pad_token is None


def test_batched_equals_single_and_input_order(tiny_text):
    tokenizer, model, captions = tiny_text
    tokenizer.padding_side = "right"  # must be overridden inside
    texts = captions + ["a red circle", "green"]
    expected = torch.stack([single_feature(model, tokenizer, t) for t in texts])
    for bs in (1, 3, 64):
        got = last_token_features(model, tokenizer, texts, batch_size=bs)
        assert got.shape == (len(texts), 32) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the tokenizer is left as it was
    assert tokenizer.padding_side == "right" and tokenizer.pad_token is None


def test_causal_lm_uses_final_normed_hidden_state(tiny_text):
    tokenizer, _, captions = tiny_text
    lm = build_tiny_llama(len(tokenizer), hidden_size=32, causal_lm=True)
    with torch.no_grad():
        lm.model.norm.weight.uniform_(0.5, 2.0)
    captured = []
    handle = lm.model.norm.register_forward_hook(lambda mod, inp, out: captured.append(out))
    got = last_token_features(lm, tokenizer, captions[:1], batch_size=1)
    handle.remove()
    # the feature is the output of the final RMSNorm at the last position (not the LM-head logits)
    assert got.shape == (1, 32)
    torch.testing.assert_close(got[0], captured[0][0, -1])


def test_vision_encoder_returns_cls_after_final_norm():
    torch.manual_seed(0)
    model = build_vision_encoder(tiny_vit_spec(img_size=28))  # LayerScale off: blocks matter
    x = torch.randn(2, 3, 28, 28)
    feats = model(x)
    tokens = model.forward_features(x)  # (B, 1 + N, D) after model.norm
    assert feats.shape == (2, 48)
    torch.testing.assert_close(feats, tokens[:, 0])
    # recompute the final LayerNorm by hand on the pre-norm tokens
    pre = model.blocks(model._pos_embed(model.patch_embed(x)))
    manual = torch.nn.functional.layer_norm(pre[:, 0], (48,), model.norm.weight, model.norm.bias, model.norm.eps)
    torch.testing.assert_close(feats, manual, atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in model.parameters())


def test_roberta_style_positions_start_after_padding_idx(tiny_text):
    from transformers import RobertaConfig, RobertaModel

    tokenizer, _, captions = tiny_text
    tokenizer.pad_token = tokenizer.eos_token
    pad = tokenizer.pad_token_id
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64, pad_token_id=pad)  # fmt: skip
    torch.manual_seed(0)
    model = RobertaModel(config).eval()
    texts = captions[:3] + ["green"]
    with torch.no_grad():  # the model's own position numbering (pad + 1, pad + 2, ...) on each unpadded text
        expected = torch.stack([single_feature(model, tokenizer, t) for t in texts])
    tokenizer.pad_token = None
    for bs in (1, 4):
        torch.testing.assert_close(last_token_features(model, tokenizer, texts, batch_size=bs), expected)


def test_vision_checkpoint_at_another_resolution_and_hub_layout(tmp_path):
    import timm
    from safetensors.torch import save_file
    from timm.layers import resample_abs_pos_embed

    spec = tiny_vit_spec(img_size=28)
    torch.manual_seed(0)
    native = timm.create_model(spec["model"], pretrained=False, num_classes=0, **{**spec["kwargs"], "img_size": 56})
    state = dict(native.state_dict())
    state["mask_token"] = torch.zeros(1, native.embed_dim)  # DINOv2's original files carry it; not part of timm's
    save_file(state, str(tmp_path / "native.safetensors"))
    model = build_vision_encoder({**spec, "checkpoint": str(tmp_path / "native.safetensors")})
    grid = 28 // native.patch_embed.patch_size[0]
    expected = resample_abs_pos_embed(native.pos_embed, (grid, grid), num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed, expected)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, native.blocks[0].attn.qkv.weight)
    # a checkpoint lacking weights is refused, not silently completed with random ones
    save_file({k: v for k, v in state.items() if not k.startswith("blocks.1.")}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="partial.safetensors does not fit"):
        build_vision_encoder({**spec, "checkpoint": str(tmp_path / "partial.safetensors")})


def test_backbones_that_cannot_be_loaded_are_named(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"pretrained weights of language model '.*no-such-llm' not available"):
        build_language_encoder({"model": str(tmp_path / "no-such-llm"), "dtype": None})
    with pytest.raises(ValueError, match="vision.model='no_such_vit': not a timm model name"):
        build_vision_encoder({"model": "no_such_vit", "pretrained": False})
    import timm

    def offline(*args, **kwargs):  # what timm raises when the weights are neither cached nor downloadable
        raise OSError("cannot find the requested files in the local cache")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(FileNotFoundError, match=r"'vit_base_patch14_dinov2.lvd142m' .* vision.checkpoint=PATH"):
        build_vision_encoder({"model": "vit_base_patch14_dinov2.lvd142m", "pretrained": True})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_features_close_to_fp32(tiny_text):
    tokenizer, model, captions = tiny_text
    cpu = last_token_features(model, tokenizer, captions, batch_size=2)
    gpu = last_token_features(model.to("cuda", torch.bfloat16), tokenizer, captions, batch_size=2)
    model.to("cpu", torch.float32)
    assert gpu.dtype == torch.float32 and gpu.device.type == "cpu"
    cos = torch.nn.functional.cosine_similarity(cpu, gpu, dim=-1)
    assert bool((cos > 0.99).all())


def test_dynamic_vit_interpolates_its_table_like_dinov2_hub():
    import timm

    from funai_common.vit import dino_interpolate

    spec = tiny_vit_spec(img_size=56)
    spec["kwargs"]["dynamic_img_size"] = True
    torch.manual_seed(0)
    model = build_vision_encoder(spec)  # 4 x 4 table (patch 14), run at 28 px: a 2 x 2 grid
    x = torch.randn(3, 3, 28, 28)
    fixed = timm.create_model(spec["model"], pretrained=False, num_classes=0, **{**spec["kwargs"], "img_size": 28})
    state = dict(model.state_dict())
    pos = state["pos_embed"]
    state["pos_embed"] = torch.cat([pos[:, :1], dino_interpolate(pos[:, 1:], (2, 2), offset=0.1)], 1)
    fixed.load_state_dict(state)
    torch.testing.assert_close(model(x), fixed.eval()(x))
    # without dynamic_img_size nothing changes: timm's own model
    assert type(build_vision_encoder(tiny_vit_spec(img_size=28))) is timm.models.vision_transformer.VisionTransformer


def test_dinov2_with_registers_interpolates_like_its_hub_model():
    """torch.hub's dinov2_*14_reg models are built with interpolate_offset=0 and interpolate_antialias=True: their
    table is resampled to the target grid size by antialiased bicubic (not by the (grid + 0.1) / M scale factor of the
    models without registers)."""
    spec = {**tiny_vit_spec(img_size=56), "model": "vit_small_patch14_reg4_dinov2"}
    spec["kwargs"] = {**spec["kwargs"], "dynamic_img_size": True}
    torch.manual_seed(0)
    model = build_vision_encoder(spec)  # 4 x 4 table of patch positions only (registers: no_embed_class)
    assert model.num_reg_tokens == 4 and model.pos_embed.shape == (1, 16, 48)
    x = torch.randn(2, 3, 42, 42)  # a 3 x 3 grid
    table = model.pos_embed.reshape(1, 4, 4, 48).permute(0, 3, 1, 2)
    hub = torch.nn.functional.interpolate(table, size=(3, 3), mode="bicubic", antialias=True, align_corners=False)
    patches = model.patch_embed(x).reshape(2, 9, 48) + hub.permute(0, 2, 3, 1).reshape(1, 9, 48)
    prefix = [model.cls_token.expand(2, -1, -1), model.reg_token.expand(2, -1, -1)]
    expected = torch.cat([*prefix, patches], 1)  # CLS, 4 registers, then the patches with their positions
    torch.testing.assert_close(model._pos_embed(model.patch_embed(x)), expected)


def test_dynamic_vit_subclass_keeps_timms_own_resampling():
    from timm.models.deit import VisionTransformerDistilled

    spec = {**tiny_vit_spec(img_size=56), "model": "deit_tiny_distilled_patch16_224"}
    spec["kwargs"] = {**spec["kwargs"], "patch_size": 14, "dynamic_img_size": True}
    spec["kwargs"].pop("init_values")
    model = build_vision_encoder(spec)
    assert type(model) is VisionTransformerDistilled and model(torch.randn(1, 3, 28, 28)).shape == (1, 48)


def test_batches_are_left_padded_with_eos_after_bos(tiny_text):
    """Spec g7: the ids the model sees are left-padded with the EOS id, each text starts with BOS, mask 0 on pads."""
    tokenizer, model, captions = tiny_text
    seen = []
    handle = model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs), with_kwargs=True)
    try:
        last_token_features(model, tokenizer, captions, batch_size=len(captions))
    finally:
        handle.remove()
    (inputs,) = seen
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    lengths = sorted(len(tokenizer(c)["input_ids"]) for c in captions)  # texts go in sorted by length
    assert mask.sum(1).tolist() == lengths and ids.shape[1] == max(lengths)
    for row, m, n in zip(ids.tolist(), mask.tolist(), lengths):
        pad = len(row) - n
        assert m == [0] * pad + [1] * n  # left padding: the last position is the last real token
        assert row[:pad] == [eos] * pad and row[pad] == bos and eos not in row[pad:]
    # positions follow the mask: 0 at the first real token whatever the padding
    torch.testing.assert_close(inputs["position_ids"], (mask.cumsum(1) - 1).clamp(min=0))
