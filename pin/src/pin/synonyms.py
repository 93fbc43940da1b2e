"""Class synonyms for `data.synonyms_description` (the reference's option to describe objects by a synonym)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from .synthetic import normalise_name

# the reference adds these two aliases after loading its synonyms file (pool names spelt otherwise)
REFERENCE_ALIASES = {"baguet": "baguette", "icecream": "ice cream"}


@functools.cache
def load_synonyms(path: str | None) -> dict[str, list[str]]:
    """{name: [synonyms]}, all normalised like the pool's names ("_" -> " ", " (...)" dropped), from an LVIS
    annotation json (the `synonyms` of its `categories`; train and val hold the same ones) or from a plain
    {name: [synonyms]} mapping such as the reference's utils/object_categories_synonyms.json, with the reference's
    aliases (``REFERENCE_ALIASES``) added where missing. Names that normalise alike ("bow (weapon)", "bow
    (decorative ribbons)") pool their synonyms, as the pool pools their cut-outs.
    Cached per path: the result is shared, do not modify it."""
    if path is None:
        raise ValueError("data.synonyms_description is on but data.synonyms_path is not set (an LVIS annotation json)")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"data.synonyms_path={path} not found; data.synonyms_description needs an LVIS annotation json "
            "(e.g. lvis_v1_val.json) or a {name: [synonyms]} json"
        )
    with open(file) as f:
        data = json.load(f)
    try:
        pairs = [(c["name"], c["synonyms"]) for c in data["categories"]] if "categories" in data else data.items()
    except (KeyError, TypeError) as err:
        raise ValueError(f"{file}: LVIS categories need a name and a synonyms list ({err!r})") from None
    out: dict[str, list[str]] = {}
    for name, words in pairs:
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise ValueError(f"{file}: the synonyms of {name!r} must be a list of strings, got {words!r}")
        merged = out.setdefault(normalise_name(name), [])
        merged += [w for w in dict.fromkeys(map(normalise_name, words)) if w not in merged]
    for alias, source in REFERENCE_ALIASES.items():
        if alias not in out and source in out:
            out[alias] = out[source]
    return out
