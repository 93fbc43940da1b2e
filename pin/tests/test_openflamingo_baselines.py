"""VPT and LoRA on a stand-in with open_clip's ViT layout, called under no_grad as OpenFlamingo's _encode_vision_x."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

from pin.methods import Method
from pin.vlm import FrozenVLM

W, P, G = 16, 4, 3  # width, patch size, patches per side (9 patch tokens)


class Block(nn.Module):
    """open_clip ResidualAttentionBlock: ln_1, attn (nn.MultiheadAttention, LND), ln_2, mlp (c_fc, gelu, c_proj)."""

    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(W), nn.MultiheadAttention(W, 2), nn.LayerNorm(W)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(W, 4 * W), gelu=nn.GELU(), c_proj=nn.Linear(4 * W, W)))

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Visual(nn.Module):
    """open_clip VisionTransformer with output_tokens: conv1, CLS + positions, ln_pre, blocks, ln_post, proj."""

    def __init__(self, depth: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, W, P, P, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(W))
        self.positional_embedding = nn.Parameter(torch.randn(G * G + 1, W))
        self.ln_pre, self.ln_post = nn.LayerNorm(W), nn.LayerNorm(W)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(Block() for _ in range(depth))
        self.proj = nn.Parameter(torch.randn(W, 8))

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.ln_pre(x).permute(1, 0, 2)
        for block in self.transformer.resblocks:
            x = block(x)
        x = self.ln_post(x.permute(1, 0, 2))
        return x[:, 0] @ self.proj, x[:, 1:]


class Flamingo(nn.Module):
    """vision_encoder under no_grad -> (B, T, F, N, D) -> perceiver (mean over tokens) -> LM logits."""

    def __init__(self, vocab: int = 11) -> None:
        super().__init__()
        self.vision_encoder, self.perceiver = Visual(), nn.Linear(W, W)
        self.embed, self.head = nn.Embedding(vocab, W), nn.Linear(W, vocab)
        self.seen_tokens = 0

    def forward(self, vision_x, lang_x, attention_mask=None):
        b = vision_x.shape[0]
        with torch.no_grad():
            tokens = self.vision_encoder(vision_x.flatten(0, 2))[1]
        self.seen_tokens = tokens.shape[1]
        media = self.perceiver(tokens.view(b, 1, 1, *tokens.shape[1:])).mean(dim=(1, 2, 3))
        return type("Out", (), {"logits": self.head(self.embed(lang_x) + media[:, None])})()


def _run(method_kind: str, cfg: dict) -> tuple[Flamingo, Method]:
    torch.manual_seed(0)
    vlm = FrozenVLM(Flamingo(), None, "openflamingo", G * P, G * G, W, None, 0, "<|endofchunk|>").freeze()
    method = Method(vlm, method_kind, cfg)
    for p in method.parameters():
        if p.abs().sum() == 0:  # LoRA's B starts at zero; make the adapters act so that every A gets a gradient
            nn.init.normal_(p)
    logits = vlm.logits(torch.randn(2, 3, G * P, G * P), torch.tensor([[1, 2], [3, 4]]), torch.ones(2, 2))
    logits.sum().backward()
    return vlm.model, method


def test_lora_adapts_attention_and_mlp_of_every_block():
    pytest.importorskip("peft")
    r = 2
    model, method = _run("lora", {"lora": {"r": r, "alpha": 4, "dropout": 0.0}})
    names = {n for n, p in model.vision_encoder.named_parameters() if p.requires_grad}
    for i in range(2):
        wrapped = {n.split(".lora_")[0] for n in names if n.startswith(f"transformer.resblocks.{i}.")}
        assert wrapped == {
            f"transformer.resblocks.{i}.attn",  # in_proj (the reference's qkv)
            f"transformer.resblocks.{i}.attn.base_layer.out_proj",  # the reference's proj
            f"transformer.resblocks.{i}.mlp.c_fc",
            f"transformer.resblocks.{i}.mlp.c_proj",
        }
    # per block r * (in + out) for qkv (W -> 3W), proj (W -> W), c_fc (W -> 4W), c_proj (4W -> W) = 16 r W
    assert sum(p.numel() for p in method.parameters()) == 2 * 16 * r * W == 1024
    # trained although the encoder is called under no_grad; the VLM's own weights stay untouched
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_vpt_on_openflamingo_adds_tokens_after_cls():
    model, method = _run("vpt", {"vpt": {"num_tokens": 5, "dropout": 0.0}})
    assert method.module.prompts.shape == (1, 5, W)
    assert model.seen_tokens == 5 + G * G  # prompts are kept at the output (reference)
    assert method.module.prompts.grad is not None and method.module.prompts.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    bound = (6.0 / (3 * P * P + W)) ** 0.5
    assert method.module.prompts.abs().max() <= bound


def test_vpt_is_refused_where_the_token_count_is_fixed():
    vlm = FrozenVLM(nn.Linear(1, 1), None, "llava", 28, 4, 8, 0, 4, "</s>")
    with pytest.raises(ValueError, match="VPT.*'llava'"):
        Method(vlm, "vpt", {})
