import pytest
import torch
import torch.nn.functional as F

from fungi import FUNGIExtractor
from fungi.incontext import DEFAULT_INSTRUCTION, Example, build_prompt, select_examples
from fungi.models import Backbone
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
