import pytest
import torch

from pin.methods import Method
from pin.model import PositionalInsert
from pin.pipeline import training_loss

SHAPES = ["circle", "square", "triangle", "cross"]


def _batch(vlm, n=2):
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.rand(n, 3, 224, 224, generator=g),
        "phrase": SHAPES[:n],
        "cells": torch.tensor([[2, 3, 5, 7], [0, 0, 15, 15]][:n]),
        "reconstruct": True,
    }


def test_blip2_shapes_of_the_paper():
    from transformers import Blip2Config

    v = Blip2Config().vision_config  # the defaults are BLIP-2's EVA ViT-g/14
    n = (224 // v.patch_size) ** 2 + 1
    assert (n, v.hidden_size) == (257, 1408)
    assert sum(p.numel() for p in PositionalInsert(n, v.hidden_size).parameters()) == 1_512_576


def test_hook_adds_the_insert_to_the_vision_output(tiny_blip2):
    vlm = tiny_blip2
    pv = torch.randn(2, 3, 224, 224)
    plain = vlm.model.vision_model(pixel_values=pv).last_hidden_state
    pin = vlm.build_insert(hidden_dims=(16,))
    vlm.attach(pin)
    hooked = vlm.model.vision_model(pixel_values=pv).last_hidden_state
    assert torch.allclose(hooked, plain + pin()[0], atol=1e-6)
    vlm.detach()
    assert torch.allclose(vlm.model.vision_model(pixel_values=pv).last_hidden_state, plain)


def test_gradients_reach_only_pin_and_vision_runs_without_autograd(tiny_blip2, codec):
    vlm = tiny_blip2
    method = Method(vlm, "pin", {"pin": {"hidden_dims": [16, 16]}})
    seen = {}

    def record(_module, _args, _output):
        seen["grad"] = torch.is_grad_enabled()

    handle = vlm.model.vision_model.encoder.register_forward_hook(record)
    loss = training_loss(vlm, codec, _batch(vlm), "cpu")
    loss.backward()
    handle.remove()
    assert seen["grad"] is False  # the vision tower ran under no_grad
    assert torch.is_grad_enabled()
    assert sum(p.requires_grad for p in vlm.model.parameters()) == 0
    assert all(p.grad is None for p in vlm.model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())
    assert set(method.state_dict()) == {"pos_enc"} | {k for k in method.module.state_dict() if k.startswith("mlp.")}


def test_pin_training_lowers_the_loss(tiny_blip2, codec):
    vlm = tiny_blip2
    method = Method(vlm, "pin", {"pin": {"hidden_dims": [32, 32]}})
    opt = torch.optim.Adam(method.parameters(), lr=3e-2)
    batch = _batch(vlm)
    losses = []
    for _ in range(8):
        loss = training_loss(vlm, codec, batch, "cpu")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # the drop is 0.05-0.06 for model seeds 0-3 (PIN only adds to the vision tokens of a random tiny VLM)
    assert losses[-1] < losses[0] - 0.03


def test_generate_with_the_hook(tiny_blip2, codec):
    from pin.pipeline import predict_boxes

    vlm = tiny_blip2
    Method(vlm, "pin", {"pin": {"hidden_dims": [16, 16]}})
    boxes, texts = predict_boxes(vlm, codec, torch.rand(2, 3, 224, 224), ["circle", "square"], 3, 6)
    assert len(boxes) == 2 and all(len(b) == 4 for b in boxes)
    assert texts[0].startswith("In the image is a circle located at")


def _sentencepiece_style_tokenizer():
    """Llama's tokenizer pipeline (transformers' LlamaTokenizer, as LLaVA-1.5 uses): BPE with byte fallback after a
    Metaspace pre-tokenizer, and a decoder that strips the one leading space of each decoded string; a character vocab.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for ch in "▁abcdefghijklmnopqrstuvwxyzI[],0123456789.":
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def test_generated_box_survives_a_decoder_that_strips_the_first_space(codec):
    """A continuation " [28,42,84,112]" decoded on its own reads "[28,..." under Llama's decoder; the box must still
    be parsed (it was the fallback [0, 0, 14, 14] for every LLaVA prediction)."""
    from torch import nn

    from pin.pipeline import predict_boxes
    from pin.vlm import FrozenVLM

    tok = _sentencepiece_style_tokenizer()
    continuation = tok(" [28,42,84,112]</s>", add_special_tokens=False)["input_ids"]
    assert tok.decode(continuation, skip_special_tokens=True) == "[28,42,84,112]"  # the space is gone

    class EchoModel(nn.Module):
        """generate() returns the prompt ids followed by a fixed continuation, as a decoder-only LM does."""

        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(1))

        def generate(self, pixel_values, input_ids, attention_mask, **kwargs):
            return torch.cat([input_ids, torch.tensor([continuation] * len(input_ids))], dim=1)

    vlm = FrozenVLM(EchoModel(), tok, "llava", 224, 16, 8, None, 0, "</s>")
    boxes, texts = predict_boxes(vlm, codec, torch.rand(2, 3, 224, 224), ["cat", "apple"])
    assert texts == [
        "In the image is a cat located at [28,42,84,112]",
        "In the image is an apple located at [28,42,84,112]",
    ]
    assert boxes == [[28.0, 42.0, 84.0, 112.0]] * 2


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-paligemma"])
def test_llava_and_paligemma_adapters(name, codec):
    from pin.zoo import build_vlm

    vlm = build_vlm(name, class_names=SHAPES, codec=codec)
    assert vlm.num_vision_tokens == 16  # (56 / 14)^2 patches, CLS dropped
    method = Method(vlm, "pin", {"pin": {"hidden_dims": [16]}})
    projector, mode = vlm.vision_site()
    seen = {}

    def record(_module, args):
        seen["x"] = args[0]

    handle = projector.register_forward_pre_hook(record)  # registered after PIN's hook: sees x + pi
    batch = _batch(vlm)
    loss = training_loss(vlm, codec, batch, "cpu")
    loss.backward()
    assert mode == "input" and seen["x"].shape[-2:] == (16, 32)
    assert all(p.grad is None for p in vlm.model.parameters())
    assert all(p.grad is not None for p in method.parameters())
    with torch.no_grad():
        hooked = seen["x"]
        vlm.detach()
        training_loss(vlm, codec, batch, "cpu")
        assert torch.allclose(hooked, seen["x"] + method.module()[0], atol=1e-5)
    handle.remove()


def test_vpt_baseline(tiny_blip2, codec):
    vlm = tiny_blip2
    method = Method(vlm, "vpt", {"vpt": {"num_tokens": 3, "dropout": 0.0}})
    assert sum(p.numel() for p in method.parameters()) == 3 * 32
    out = vlm.model.vision_model(pixel_values=torch.randn(1, 3, 224, 224)).last_hidden_state
    assert out.shape[1] == 1 + 3 + 64  # prompts are not removed at the output
    training_loss(vlm, codec, _batch(vlm), "cpu").backward()
    assert method.parameters()[0].grad.abs().sum() > 0
    assert all(p.grad is None for p in vlm.model.parameters() if p is not method.parameters()[0])


def test_lora_baseline(tiny_blip2, codec):
    pytest.importorskip("peft")
    vlm = tiny_blip2
    method = Method(vlm, "lora", {"lora": {"r": 2, "alpha": 4, "dropout": 0.0}})
    # per layer: qkv (32 -> 96), projection (32 -> 32), fc1 (32 -> 64), fc2 (64 -> 32); 2 layers; r (in + out) each
    expected = 2 * 2 * ((32 + 96) + (32 + 32) + (32 + 64) + (64 + 32))
    assert sum(p.numel() for p in method.parameters()) == expected
    training_loss(vlm, codec, _batch(vlm), "cpu").backward()
    trained = [n for n, p in vlm.model.named_parameters() if p.grad is not None]
    assert trained and all("lora_" in n for n in trained)
    assert all("lora_" in k for k in method.state_dict())


def test_lora_target_modules_typed_as_one_name(codec):
    """lora.target_modules=qkv on the command line is the text 'qkv': one module name, not the letters q, k, v; a name
    matching no module is an error naming the key."""
    pytest.importorskip("peft")
    from pin.zoo import build_vlm

    def build(targets):
        vlm = build_vlm("tiny-blip2", class_names=SHAPES, codec=codec, tiny_options={"patch_size": 28})
        return Method(vlm, "lora", {"lora": {"r": 2, "target_modules": targets}})

    wrapped = {k.split(".lora_")[0] for k in build("qkv").state_dict()}
    assert wrapped == {f"vision.encoder.layers.{i}.self_attn.qkv" for i in range(2)}
    with pytest.raises(ValueError, match=r"^lora.target_modules=\['nothere'\]: Target modules \{'nothere'\} not found"):
        build(["nothere"])


def test_unknown_method_is_an_error(tiny_blip2):
    with pytest.raises(ValueError, match="unknown method"):
        Method(tiny_blip2, "coop")


def test_blip2_at_a_larger_resolution_interpolates_positions(codec):
    from pin.zoo import _wrap, tiny_blip2, word_tokenizer

    tok = word_tokenizer(SHAPES, codec)
    vlm = _wrap(tiny_blip2(tok, image_size=224, patch_size=28), tok, "blip2", 280).freeze()
    assert vlm.interpolate_pos_encoding and vlm.num_vision_tokens == 10 * 10 + 1
    Method(vlm, "pin", {"pin": {"hidden_dims": [16]}})
    loss = training_loss(vlm, codec, _batch(vlm), "cpu")
    assert torch.isfinite(loss)


def test_overfitting_two_synthetic_images_emits_their_exact_box_strings():
    """Spec f: a pipeline check. PIN plus the tiny LM (unfrozen here only) trained on two compositions that share
    the object name, so only the image tells the boxes apart, until beam search writes each image's own box text;
    the parsed boxes are then the pasted cells' pixel rectangles."""
    from pin.config import load_config
    from pin.pipeline import codec_from_cfg, dataset_from_cfg, pools_from_cfg, predict_boxes, vlm_from_cfg
    from pin.prompts import eval_prompt
    from pin.synthetic import collate

    cfg, _ = load_config(["--config", "tiny"])
    codec, vlm = codec_from_cfg(cfg), vlm_from_cfg(cfg)
    method = Method(vlm, "pin", cfg)
    pool, _, _ = pools_from_cfg(cfg)
    batch = collate([dataset_from_cfg(cfg, pool, "train", length=2)[i] for i in range(2)])
    batch["phrase"] = [batch["phrase"][0]] * 2
    cells = batch["cells"].tolist()
    assert cells[0] != cells[1]
    vlm.model.language_model.requires_grad_(True)
    opt = torch.optim.Adam(method.parameters() + list(vlm.model.language_model.parameters()), lr=3e-3)
    torch.manual_seed(0)
    for step in range(1, 201):
        loss = training_loss(vlm, codec, batch, "cpu")
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0:
            boxes, texts = predict_boxes(vlm, codec, batch["image"], batch["phrase"], 3, 12)
            if boxes == [codec.cells_to_pixels(c) for c in cells]:
                break
    assert [t.strip() for t in texts] == [f"{eval_prompt(batch['phrase'][0])} {codec.encode(c)}" for c in cells]
    assert boxes == [codec.cells_to_pixels(c) for c in cells]


def test_reference_pt_checkpoints_load_for_pin_and_vpt(tiny_blip2, tmp_path):
    """QUVA-Lab/PIN saves torch.save({'mlp': MLP.state_dict(), 'pos_enc': S}) (S (1, N, 64), or an (N, 64)
    parameter when learned) and {'prompt': (1, T, D)} for VPT; its MLP is built by hand here in its layer order."""
    from torch import nn

    from pin.checkpoint import load_weights
    from pin.model import sincos_table

    vlm = tiny_blip2
    n, width = vlm.num_vision_tokens, vlm.vision_dim
    torch.manual_seed(3)
    ref_mlp = nn.Sequential(nn.Linear(64, 16), nn.SiLU(), nn.LayerNorm(16), nn.Linear(16, 8), nn.SiLU(),
                            nn.LayerNorm(8), nn.Linear(8, width))  # fmt: skip
    with torch.no_grad():
        for m in ref_mlp:
            if isinstance(m, nn.LayerNorm):  # non-trivial affine parameters
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    table = sincos_table(n, 64)[None]
    torch.save({"mlp": ref_mlp.state_dict(), "pos_enc": table}, tmp_path / "PIN_OF.pt")
    method = Method(vlm, "pin", {"pin": {"hidden_dims": [16, 8]}})
    method.load_state_dict(load_weights(tmp_path / "PIN_OF.pt"))
    with torch.no_grad():
        torch.testing.assert_close(method.module(), ref_mlp(table))
    learned = nn.Parameter(torch.rand(n, 64))
    torch.save({"mlp": ref_mlp.state_dict(), "pos_enc": learned}, tmp_path / "learned.pt")
    method = Method(vlm, "pin", {"pin": {"hidden_dims": [16, 8], "learned_table": True}})
    method.load_state_dict(load_weights(tmp_path / "learned.pt"))
    with torch.no_grad():
        torch.testing.assert_close(method.module(), ref_mlp(learned)[None])
    vlm.detach()
    prompt = torch.rand(1, 3, width)
    torch.save({"prompt": prompt}, tmp_path / "vpt.pt")
    vpt = Method(vlm, "vpt", {"vpt": {"num_tokens": 3}})
    vpt.load_state_dict(load_weights(tmp_path / "vpt.pt"))
    torch.testing.assert_close(vpt.module.prompts.detach(), prompt)
    (tmp_path / "page.pt").write_text("<html>a download's error page</html>")
    with pytest.raises(ValueError, match=r"checkpoint .*page.pt is not a readable PyTorch state dict"):
        load_weights(tmp_path / "page.pt")
    torch.save({"encoder": {"lora_A": torch.zeros(1)}}, tmp_path / "lora.pt")
    with pytest.raises(KeyError, match=r"lora.pt holds \['encoder'\]: expected a reference PIN checkpoint"):
        load_weights(tmp_path / "lora.pt")
    # a checkpoint of another backbone (PIN_OF.pt: 256 x 1024 tokens) is a clear error naming the file and shapes
    torch.save({"mlp": ref_mlp.state_dict(), "pos_enc": sincos_table(n + 1, 64)[None]}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=rf"other.pt does not fit method pin on this VLM: pos_enc \(1, {n + 1}, 64\)"):
        Method(vlm, "pin", {"pin": {"hidden_dims": [16, 8]}}).load_state_dict(
            load_weights(tmp_path / "other.pt"), source=tmp_path / "other.pt"
        )


def test_checkpoint_of_another_method_is_a_key_error_naming_the_file(tiny_blip2):
    """Missing or unexpected names (e.g. a VPT .pt given to method=pin) name the file, for every method (strict
    loading used to raise torch's RuntimeError without it for PIN and VPT)."""
    vlm = tiny_blip2
    pin = Method(vlm, "pin", {"pin": {"hidden_dims": [16]}})
    pin.load_state_dict(pin.state_dict())
    match = r"vpt.pt does not match method pin: missing \['pos_enc'.*unexpected \['prompts'\]"
    with pytest.raises(KeyError, match=match):
        pin.load_state_dict({"prompts": torch.zeros(1, 3, 32)}, source="vpt.pt")
    vlm.detach()
    pytest.importorskip("peft")
    lora = Method(vlm, "lora", {"lora": {"r": 2, "alpha": 4, "dropout": 0.0}})
    state = lora.state_dict()
    lora.load_state_dict(state)  # only the lora_* tensors are needed
    dropped = sorted(state)[0]
    del state[dropped]
    with pytest.raises(KeyError, match=rf"lora_run does not match method lora: missing \['{dropped}'\] \(1\)"):
        lora.load_state_dict(state, source="lora_run")


def test_hook_adds_the_insert_to_a_tuple_output(tiny_blip2):
    """With return_dict=False the vision tower returns a tuple; its first entry (the tokens) still gets the insert."""
    vlm = tiny_blip2
    pv = torch.randn(1, 3, 224, 224)
    plain = vlm.model.vision_model(pixel_values=pv, return_dict=False)
    pin = vlm.build_insert(hidden_dims=(16,))
    vlm.attach(pin)
    hooked = vlm.model.vision_model(pixel_values=pv, return_dict=False)
    assert isinstance(hooked, tuple) and len(hooked) == len(plain)
    assert torch.allclose(hooked[0], plain[0] + pin()[0], atol=1e-6)
    assert torch.equal(hooked[1], plain[1])  # the pooled output is left alone


def test_vpt_tokens_go_right_after_cls_and_their_dropout_follows_train_mode(tiny_blip2):
    from pin.methods import VisualPromptTokens

    vpt = VisualPromptTokens(2, 4, patch_size=2, dropout=0.0)
    emb = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)  # (B, 1 + N, D): CLS then two patches
    out = vpt.insert(emb).detach()
    prompts = vpt.prompts.detach()[0]
    for b in range(2):
        expected = torch.cat([emb[b, :1], prompts, emb[b, 1:]])  # [CLS, p1, p2, patch1, patch2]
        assert torch.equal(out[b], expected)

    vlm = tiny_blip2
    method = Method(vlm, "vpt", {"vpt": {"num_tokens": 3, "dropout": 0.5}})
    pv = torch.randn(1, 3, 224, 224)
    method.train(False)
    assert not method.module.dropout.training and not vlm.model.training
    first = vlm.model.vision_model(pixel_values=pv).last_hidden_state
    assert torch.equal(first, vlm.model.vision_model(pixel_values=pv).last_hidden_state)  # no dropout in eval
    method.train(True)
    assert method.module.dropout.training and not vlm.model.training  # only the method's dropout switches on
    torch.manual_seed(0)
    assert not torch.equal(first, vlm.model.vision_model(pixel_values=pv).last_hidden_state)


def _word_vlm(codec, kind="blip2", image_after_bos=False):
    from torch import nn

    from pin.vlm import FrozenVLM
    from pin.zoo import word_tokenizer

    tok = word_tokenizer(SHAPES, codec)
    return FrozenVLM(nn.Linear(1, 1), tok, kind, 224, 4, 8, 99, 2, "</s>", image_after_bos=image_after_bos)


def test_media_placeholders_follow_bos_only_where_the_vlm_wants_them(codec):
    """LLaVA: BOS, then the image placeholders, then the text; BLIP-2: the placeholders lead (before BOS)."""
    text = "In the image is a circle located at"
    llava, blip2 = _word_vlm(codec, "llava", True), _word_vlm(codec)
    ids = llava.tokenizer(text)["input_ids"]
    assert ids[0] == llava.tokenizer.bos_token_id and len(ids) > 2
    assert llava.token_ids(text) == ids[:1] + [99, 99] + ids[1:]
    assert blip2.token_ids(text) == [99, 99] + ids
    assert llava.prefix_length(text) == blip2.prefix_length(text) == len(ids) + 2


def test_batch_pads_right_for_training_and_left_for_generation(codec):
    vlm = _word_vlm(codec)
    texts = ["In the image is a circle located at", f"In the image is a circle located at {codec.encode([0, 0, 1, 1])}"]
    short, long = (vlm.token_ids(t) for t in texts)
    pad = len(long) - len(short)
    assert pad > 0
    ids, mask = vlm.batch(texts, padding_side="right")
    assert ids[0].tolist() == short + [vlm.pad_token_id] * pad and ids[1].tolist() == long
    assert mask[0].tolist() == [1] * len(short) + [0] * pad and mask[1].tolist() == [1] * len(long)
    ids, mask = vlm.batch(texts, padding_side="left")  # generation continues right after each prompt
    assert ids[0].tolist() == [vlm.pad_token_id] * pad + short and ids[1].tolist() == long
    assert mask[0].tolist() == [0] * pad + [1] * len(short)


def test_logits_are_the_last_positions_when_the_model_prepends_query_tokens():
    """Older BLIP-2 versions return logits for [query tokens, text]; the text's logits are the last L positions."""
    from types import SimpleNamespace

    from torch import nn

    from pin.vlm import FrozenVLM

    class Prepends(nn.Module):
        def forward(self, pixel_values, input_ids, attention_mask):
            b, length = input_ids.shape
            positions = torch.arange(length + 3, dtype=torch.float32)  # 3 query tokens first
            return SimpleNamespace(logits=positions.view(1, -1, 1).expand(b, -1, 5))

    vlm = FrozenVLM(Prepends(), None, "blip2", 224, 4, 8, None, 0, "</s>")
    out = vlm.logits(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4))
    assert out.shape == (2, 4, 5) and out[1, :, 0].tolist() == [3.0, 4.0, 5.0, 6.0]


def test_pixel_values_are_resized_and_normalised_with_the_vlm_statistics(codec):
    from pin.pipeline import pixel_values
    from pin.vlm import CLIP_MEAN, CLIP_STD

    vlm = _word_vlm(codec)  # 224 px, CLIP statistics
    pv = pixel_values(vlm, torch.full((2, 3, 112, 112), 0.75))
    assert pv.shape == (2, 3, 224, 224)
    expected = torch.tensor([(0.75 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)])
    assert torch.allclose(pv, expected.view(1, 3, 1, 1).expand_as(pv), atol=1e-6)


def test_lora_target_modules_typed_as_one_name_is_the_same_setting_as_its_list():
    """A LoRA run trained with lora.target_modules=qkv is evaluated with [qkv] (or the other way) without a refusal."""
    from pin.config import load_config
    from pin.pipeline import model_differences

    cfg, _ = load_config(["--config", "tiny", "method=lora", "lora.target_modules=[qkv]"])
    recorded, _ = load_config(["--config", "tiny", "method=lora", "lora.target_modules=qkv"])
    assert model_differences(cfg, recorded) == []
    other, _ = load_config(["--config", "tiny", "method=lora", "lora.target_modules=[proj]"])
    assert model_differences(other, recorded) == ["lora.target_modules=['proj'] (checkpoint: ['qkv'])"]
