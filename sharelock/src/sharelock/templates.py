"""Prompt templates for zero-shot classification (`{}` is the class name)."""

from __future__ import annotations

from pathlib import Path

from sharelock.config import read_json

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


def _has_placeholder(template: str) -> bool:
    return "{}" in template or "{c}" in template


def _checked(templates: list[str], where: str) -> list[str]:
    """The templates, each holding the class-name placeholder: without it every class gets the same prompt and the
    zero-shot classifier silently scores at chance."""
    if not templates:
        raise ValueError(f"templates from {where}: no templates")
    bad = [t for t in templates if not _has_placeholder(t)]
    if bad:
        raise ValueError(
            f"templates from {where}: each template needs the class-name placeholder {{}} or {{c}}; {bad[0]!r} has none"
        )
    return templates


def _json_templates(path: Path, key: str) -> list:
    """A JSON list of templates, or the list under ``key`` of a JSON object keyed by dataset (CLIP_benchmark's
    ``en_zeroshot_classification_templates.json``, read as ``FILE.json#imagenet1k``)."""
    data = read_json(path)
    if isinstance(data, dict):
        if not key:
            raise ValueError(
                f"{path} maps datasets to templates: choose one as templates={path}#KEY (keys: {list(data)})"
            )
        if key not in data:
            raise KeyError(f"{key!r} not in {path} (keys: {list(data)})")
        data = data[key]
    elif key:
        raise ValueError(f"{path} is a list of templates, not keyed by dataset: drop #{key}")
    if not isinstance(data, list):
        raise ValueError(f"templates in {path}{'#' + key if key else ''} must be a list of strings")
    return data


def resolve_templates(spec: str | list[str] | dict) -> list[str]:
    """Templates from a name (`reference`, `clip`), a JSON list / .txt file (one per line), `FILE.json#KEY` for a
    JSON object of lists keyed by dataset, a list, or one template; each must hold the class-name placeholder `{}` or
    `{c}` (ValueError otherwise)."""
    if isinstance(spec, list):
        return _checked([str(t) for t in spec], "the list")
    if isinstance(spec, dict):
        # `templates={}` (the names are the prompts) or `templates={c}` given on a command line: YAML reads a bare
        # placeholder as a mapping
        if len(spec) <= 1 and not any(spec.values()) and all(k in ("", "c") for k in spec):
            return ["{" + next(iter(spec), "") + "}"]
        raise ValueError(f"templates={spec!r}: a mapping is only read as the bare placeholder {{}} or {{c}}")
    if spec in NAMED:
        return list(NAMED[spec])
    name, _, key = str(spec).partition("#")
    path = Path(name)
    if path.suffix in (".json", ".txt"):
        if not path.is_file():
            raise FileNotFoundError(f"templates file not found: {path}")
        if path.suffix == ".json":
            return _checked([str(t) for t in _json_templates(path, key)], f"{path}#{key}" if key else str(path))
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return _checked(lines, str(path))
    if _has_placeholder(spec):
        return [spec]
    raise ValueError(f"templates={spec!r}: expected one of {sorted(NAMED)}, a .json/.txt file, or a template with {{}}")
