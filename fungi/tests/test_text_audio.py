import pytest
import torch
import torch.nn.functional as F

from fungi import FUNGIExtractor
from fungi.incontext import DEFAULT_INSTRUCTION, Example, build_prompt, select_examples
from fungi.models import Backbone, build_backbone
from fungi.tiny import tiny_ast, tiny_bert

TEXTS = ["my card was stolen", "how do i top up", "card not working at the shop", "exchange rate for euros"]


def test_text_extractor_kl_simclr(word_tokenizer):
    torch.manual_seed(0)
    backbone = Backbone(tiny_bert(), modality="text", tokenizer=word_tokenizer)
    opts = {"simclr": {"num_negatives": 3, "num_text_views": 4, "latent_dim": 16}}
    ex = FUNGIExtractor(backbone, objectives=("kl", "simclr"), seed=0, objective_options=opts)
    assert ex.layer == "model.encoder.layer.1.attention.output.dense"
    ex.setup(TEXTS)
    assert ex.objectives["simclr"].negatives.shape == (3 * 2, 16)
    feats = ex(TEXTS)
    assert feats.shape == (4, 3 * 32)
    assert torch.allclose(torch.cat([ex(TEXTS[:1]), ex(TEXTS[1:])]), feats, atol=1e-4)


def test_t5_extractor_from_a_hub_style_folder(t5_folder):
    from transformers import T5EncoderModel

    backbone = build_backbone(f"hf:{t5_folder}")  # the t5-small loading path: encoder only, the folder's tokenizer
    assert isinstance(backbone.model.model, T5EncoderModel) and backbone.tokenizer.padding_side == "right"
    opts = {"simclr": {"num_negatives": 3, "num_text_views": 4, "latent_dim": 16}}
    ex = FUNGIExtractor(backbone, objectives=("kl", "simclr"), seed=0, objective_options=opts)
    assert ex.layer == "model.encoder.block.1.layer.0.SelfAttention.o"
    ex.setup(TEXTS)
    enc = ex.tokenize(TEXTS)
    assert (enc["input_ids"][:, 0] > 2).all() and (enc["input_ids"][enc["attention_mask"] == 0] == 0).all()
    with torch.no_grad():  # first token of the encoder's last hidden state (T5 pads on the right)
        expected = backbone.model.model(**enc).last_hidden_state[:, 0]
    torch.testing.assert_close(ex.embed(TEXTS), expected)
    assert ex.gradients("kl", TEXTS).shape == (4, 32, 16) and ex.projection.shape == (32, 32 * 16)
    feats = ex(TEXTS)
    assert feats.shape == (4, 3 * 32)
    # each text alone (no padding) gives the features it has in a padded batch
    torch.testing.assert_close(torch.cat([ex(TEXTS[i : i + 1]) for i in range(4)]), feats, rtol=1e-4, atol=1e-5)


def test_long_texts_are_not_truncated_at_128_tokens(t5_folder):
    # the reference's text scripts tokenize with padding=True and no truncation: a 300-word text stays whole
    from fungi.extract import DEFAULTS

    backbone = build_backbone(f"hf:{t5_folder}")
    words = "my card was stolen how do i top up".split()  # in the tiny tokenizer's vocabulary: one piece each
    text = " ".join(words[i % len(words)] for i in range(300))
    whole = backbone.tokenizer([text], padding=True, return_tensors="pt")["input_ids"]
    assert whole.shape[1] == 301  # one piece per word and </s>
    ex = FUNGIExtractor(backbone, objectives=("kl",))
    assert torch.equal(ex.tokenize([text])["input_ids"], whole)
    assert DEFAULTS["max_length"] == ex.max_length  # fungi-extract's default is the extractor's


def test_audio_extractor_kl():
    torch.manual_seed(0)
    ex = FUNGIExtractor(
        Backbone(tiny_ast(), modality="audio"),
        objectives=("kl", "simclr"),
        seed=0,
        objective_options={"simclr": {"num_negatives": 2, "num_audio_views": 3}},
    )
    specs = torch.randn(3, 48, 32)
    ex.setup(list(specs))
    feats = ex(specs)
    assert feats.shape == (3, 96) and torch.isfinite(feats).all()


def test_audio_negative_bank_has_two_views_per_item():
    """As the reference's fungi-ssast/grads_simclr.py (ContrastiveNoiseTransform(num_views=2) for the comparison
    batch): each negative audio item contributes 2 noise views, not the 16 positive views."""
    from fungi.views import noise_roll_views

    torch.manual_seed(0)
    ex = FUNGIExtractor(
        Backbone(tiny_ast(), modality="audio"),
        objectives=("simclr",),
        seed=0,
        objective_options={"simclr": {"num_negatives": 2, "num_audio_views": 5, "latent_dim": 8}},
    )
    specs = torch.randn(3, 48, 32)
    ex.setup(list(specs))
    simclr = ex.objectives["simclr"]
    assert simclr.negatives.shape == (2 * 2, 8)
    picked = torch.randperm(3, generator=torch.Generator().manual_seed(0))[:2]
    with torch.no_grad():
        views = noise_roll_views(specs[picked], 2, 0)  # (2, 2, T, F)
        expected = simclr.head(ex.model(views.flatten(0, 1)))
    torch.testing.assert_close(simclr.negatives, expected, rtol=1e-5, atol=1e-6)


def test_select_examples_and_prompt():
    train = F.one_hot(torch.tensor([0, 1, 2, 3]), 4).float()
    query = torch.tensor([0.1, 0.9, 0.0, 0.5])
    labels = ["card_lost", "top_up", "card_broken", "exchange"]
    (picked,) = select_examples(query, train, TEXTS, labels, k=2)
    assert [e.index for e in picked] == [1, 3]
    assert picked[0].score > picked[1].score
    prompt = build_prompt("why is my card declined", picked)
    assert prompt.startswith(DEFAULT_INSTRUCTION)
    # most similar example closest to the query, query last with an empty label
    assert prompt.index("Label: exchange") < prompt.index("Label: top_up") < prompt.index("why is my card declined")
    assert prompt.endswith("Query: why is my card declined\nLabel:")
    assert (
        build_prompt("q", [Example("t", "l", 1.0, 0)], instruction="X") == "X\n\nQuery: t\nLabel: l\n\nQuery: q\nLabel:"
    )
    with pytest.raises(ValueError, match="train features"):
        select_examples(query, train, TEXTS[:3], labels, k=2)
