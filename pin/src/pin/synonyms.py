"""Class synonyms for `data.synonyms_description` (the reference's option to describe objects by a synonym)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from .synthetic import normalise_name


@functools.cache
def load_synonyms(path: str) -> dict[str, list[str]]:
    """{name: [synonyms]}, all normalised like the pool's names ("_" -> " ", " (...)" dropped), from an LVIS
    annotation json (the `synonyms` of its `categories`; train and val hold the same ones) or from a plain
    {name: [synonyms]} mapping such as the reference's utils/object_categories_synonyms.json. Names that normalise
    alike ("bow (weapon)", "bow (decorative ribbons)") pool their synonyms, as the pool pools their cut-outs.
    Cached per path: the result is shared, do not modify it."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"data.synonyms_path={path} not found; data.synonyms_description needs an LVIS annotation json "
            "(e.g. lvis_v1_val.json) or a {name: [synonyms]} json"
        )
    with open(file) as f:
        data = json.load(f)
    pairs = [(c["name"], c["synonyms"]) for c in data["categories"]] if "categories" in data else data.items()
    out: dict[str, list[str]] = {}
    for name, words in pairs:
        merged = out.setdefault(normalise_name(name), [])
        merged += [w for w in dict.fromkeys(map(normalise_name, words)) if w not in merged]
    return out
