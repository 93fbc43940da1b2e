"""In-context example selection for LLM intent classification (paper Sec. 5, Banking-77): pick the k training
examples whose FUNGI features are closest to the query, and build the few-shot prompt. No LLM is called here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from funai_common.search import nearest_neighbors
from fungi.projection import l2_normalize

DEFAULT_INSTRUCTION = "Classify the intent of the last query. Answer with one label from the examples."


@dataclass
class Example:
    """A selected demonstration: its text, label, cosine similarity to the query and index in the train set."""

    text: str
    label: str
    score: float
    index: int


def select_examples(
    query_features: torch.Tensor,
    train_features: torch.Tensor,
    train_texts: Sequence[str],
    train_labels: Sequence,
    k: int = 8,
) -> list[list[Example]]:
    """Top-k train examples by cosine similarity for each query: query (M, D), train (N, D) -> M lists of k."""
    if query_features.dim() == 1:
        query_features = query_features[None]
    if len(train_texts) != train_features.shape[0] or len(train_labels) != train_features.shape[0]:
        raise ValueError(
            f"{train_features.shape[0]} train features but {len(train_texts)} texts and {len(train_labels)} labels"
        )
    k = min(k, train_features.shape[0])
    scores, indices = nearest_neighbors(l2_normalize(query_features), l2_normalize(train_features), k)
    return [
        [Example(train_texts[i], str(train_labels[i]), float(s), int(i)) for s, i in zip(row_s, row_i.tolist())]
        for row_s, row_i in zip(scores.tolist(), indices)
    ]


def build_prompt(
    query: str, examples: Sequence[Example], instruction: str = DEFAULT_INSTRUCTION, most_similar_last: bool = True
) -> str:
    """Few-shot prompt: instruction, 'Query: ... / Label: ...' demonstrations (most similar closest to the query by
    default), then the query with an empty label."""
    shots = list(reversed(examples)) if most_similar_last else list(examples)
    parts = [instruction, ""]
    for ex in shots:
        parts += [f"Query: {ex.text}", f"Label: {ex.label}", ""]
    parts += [f"Query: {query}", "Label:"]
    return "\n".join(parts)
