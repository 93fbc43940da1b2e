"""YAML configs with ``key=value`` / ``--key value`` overrides (dotted keys for nested sections)."""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG = "wt_venice.yaml"


def config_path(name_or_path: str | Path) -> Path:
    """A config file by path, or by name among the configs shipped in the package (``tiny`` or ``tiny.yaml``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    name = p.name if p.suffix == ".yaml" else f"{p.name}.yaml"
    shipped = Path(str(resources.files("dora") / "configs" / name))
    if shipped.is_file():
        return shipped
    available = sorted(
        f.name for f in resources.files("dora").joinpath("configs").iterdir() if f.name.endswith(".yaml")
    )
    raise FileNotFoundError(
        f"config {name_or_path!r} not found (not a file, nor one of the shipped configs {available})"
    )


def _flat_keys(d: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            keys += _flat_keys(v, f"{prefix}{k}.")
        else:
            keys.append(f"{prefix}{k}")
    return keys


def set_key(cfg: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict; unknown keys raise a KeyError listing the valid keys."""
    node = cfg
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"unknown config key {dotted!r}; valid keys: {', '.join(_flat_keys(cfg))}")
        if i == len(parts) - 1:
            node[part] = value
        else:
            node = node[part]


def parse_value(raw: str) -> Any:
    """YAML scalar/list/dict; also accepts floats YAML 1.1 reads as strings (``1e-4``)."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_overrides(argv: list[str]) -> tuple[str | None, list[tuple[str, Any]]]:
    """Split argv into (config path or None, [(dotted key, yaml-parsed value), ...])."""
    config, pairs, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            body = arg[2:]
            if "=" in body:
                key, raw = body.split("=", 1)
            else:
                if i + 1 >= len(argv):
                    raise ValueError(f"option {arg} needs a value")
                key, raw = body, argv[i + 1]
                i += 1
        elif "=" in arg:
            key, raw = arg.split("=", 1)
        else:
            raise ValueError(f"cannot parse argument {arg!r}; expected key=value or --key value")
        key = key.replace("-", "_")
        if key == "config":
            config = raw
        else:
            pairs.append((key, parse_value(raw)))
        i += 1
    return config, pairs


def load_config(argv: list[str] | None = None, default: str = DEFAULT_CONFIG) -> dict:
    """Resolve a config: the YAML given by ``--config`` / ``config=`` (else ``default``) plus overrides."""
    config, pairs = parse_overrides(list(argv or []))
    with open(config_path(config or default)) as f:
        cfg = yaml.safe_load(f) or {}
    cfg = copy.deepcopy(cfg)
    for key, value in pairs:
        set_key(cfg, key, value)
    return cfg


def save_config(cfg: dict, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
