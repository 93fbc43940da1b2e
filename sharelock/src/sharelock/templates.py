"""Prompt templates for zero-shot classification (`{}` is the class name)."""

from __future__ import annotations

import json
from pathlib import Path

# The reference's single template (precompute_image_features_hf.py default; note the capital A, no full stop).
REFERENCE = ["A photo of a {}"]

# The 7-template ImageNet ensemble selected in the CLIP paper's prompt-engineering notebook.
CLIP_ENSEMBLE = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]

NAMED = {"reference": REFERENCE, "clip": CLIP_ENSEMBLE}


def resolve_templates(spec: str | list[str]) -> list[str]:
    """Templates from a name (`reference`, `clip`), a JSON list / .txt file (one per line), a list, or one template."""
    if isinstance(spec, list):
        return [str(t) for t in spec]
    if isinstance(spec, dict) and len(spec) <= 1 and not any(spec.values()):
        # `templates={}` (the names are the prompts) or `templates={c}` given on a command line: YAML reads a bare
        # placeholder as a mapping
        return ["{" + next(iter(spec), "") + "}"]
    if spec in NAMED:
        return list(NAMED[spec])
    path = Path(spec)
    if path.suffix in (".json", ".txt"):
        if not path.is_file():
            raise FileNotFoundError(f"templates file not found: {path}")
        if path.suffix == ".json":
            return [str(t) for t in json.loads(path.read_text(encoding="utf-8"))]
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if "{}" in spec or "{c}" in spec:
        return [spec]
    raise ValueError(f"templates={spec!r}: expected one of {sorted(NAMED)}, a .json/.txt file, or a template with {{}}")
