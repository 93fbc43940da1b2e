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


T5_WORDS = "my card was stolen how do i top up not working at the shop exchange rate for euros".split()


@pytest.fixture(scope="session")
def t5_folder(tmp_path_factory):
    """A folder laid out as google-t5/t5-small: a tiny random T5ForConditionalGeneration (encoder and decoder) and a
    T5 tokenizer (pad 0, eos 1, unk 2) whose vocabulary is the words above and single letters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5ForConditionalGeneration, T5TokenizerFast

    from fungi.tiny import tiny_t5_config

    path = tmp_path_factory.mktemp("tiny_t5")
    torch.manual_seed(0)
    T5ForConditionalGeneration(tiny_t5_config()).save_pretrained(path)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(f"\u2581{w}", -1.0) for w in T5_WORDS] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))  # built with `tokenizers`: the same on transformers 4 and 5
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    T5TokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0
    ).save_pretrained(path)
    return path


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
