"""The OpenFlamingo hook site on a stand-in with OF's module names (the real package is optional)."""

import torch
from torch import nn

from pin.methods import Method
from pin.vlm import FrozenVLM


class FakeFlamingo(nn.Module):
    """vision_encoder -> (pooled, tokens); tokens (B*T*F, N, D) -> (B, T, F, N, D) -> perceiver -> LM logits."""

    def __init__(self, n=9, d=8, vocab=11):
        super().__init__()
        self.vision_encoder = nn.Linear(3, d)
        self.perceiver = nn.Linear(d, d)
        self.embed = nn.Embedding(vocab, d)
        self.head = nn.Linear(d, vocab)
        self.n = n

    def forward(self, vision_x, lang_x, attention_mask=None):
        b, t, f = vision_x.shape[:3]
        pixels = vision_x.flatten(0, 2).flatten(2).transpose(1, 2)[:, : self.n]  # (BTF, N, 3)
        tokens = self.vision_encoder(pixels).view(b, t, f, self.n, -1)
        media = self.perceiver(tokens).mean(dim=(1, 2, 3))  # (B, D)
        return type("Out", (), {"logits": self.head(self.embed(lang_x) + media[:, None])})()


def test_pin_reaches_the_perceiver_input_broadcast_over_media_and_frames():
    model = FakeFlamingo()
    vlm = FrozenVLM(model, None, "openflamingo", 3, 9, 8, None, 0, "<|endofchunk|>").freeze()
    method = Method(vlm, "pin", {"pin": {"hidden_dims": [16]}})
    seen = {}

    def record(_module, args):
        seen["x"] = args[0]

    model.perceiver.register_forward_pre_hook(record)
    pixels = torch.randn(2, 3, 3, 3)
    logits = vlm.logits(pixels, torch.tensor([[1, 2], [3, 4]]), torch.ones(2, 2, dtype=torch.long))
    logits.sum().backward()
    x = seen["x"]
    assert x.shape == (2, 1, 1, 9, 8)
    plain = model.vision_encoder(pixels[:, None, None].flatten(0, 2).flatten(2).transpose(1, 2)[:, :9])
    assert torch.allclose(x.flatten(0, 2), plain + method.module()[0], atol=1e-6)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in method.parameters())
