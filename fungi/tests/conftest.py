"""Shared tiny models."""

import pytest
import torch

from fungi.tiny import tiny_timm


@pytest.fixture(scope="session")
def timm_vit():
    torch.manual_seed(0)
    return tiny_timm()


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """The Hugging Face Hub offline with an empty cache: pretrained weights are unavailable, as on a machine with no
    network (timm and transformers both download through huggingface_hub)."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty_hub_cache"))


@pytest.fixture
def images():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def word_tokenizer():
    return WordTokenizer()


class WordTokenizer:
    """Minimal whitespace tokenizer with the HF call signature (no vocabulary files needed offline)."""

    def __init__(self, vocab_size: int = 64):
        self.vocab_size = vocab_size

    def __call__(self, texts, padding=True, truncation=True, max_length=128, return_tensors="pt"):
        ids = [
            [1] + [2 + (sum(map(ord, w)) % (self.vocab_size - 2)) for w in t.split()][: max_length - 1] for t in texts
        ]
        width = max(len(i) for i in ids)
        input_ids = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for r, row in enumerate(ids):
            input_ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}
