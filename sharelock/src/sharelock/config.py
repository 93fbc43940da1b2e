"""YAML configs with `key=value` / `--key value` command-line overrides (dotted keys for nested values)."""

from __future__ import annotations

import copy
import difflib
import json
import re
import sys
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


class ConfigLoader(yaml.SafeLoader):
    """YAML safe loader that also reads exponent floats without a dot (``1e-4``, a string to plain YAML 1.1)."""


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def program_name() -> str:
    """The command as typed, for usage lines: the console script's name, or ``python -m package.module``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None:
        return "python -m " + spec.name.removesuffix(".__main__")
    return Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "<command>"


class UnknownKeyError(KeyError):
    """An unknown config key, printed as its message (a plain KeyError prints in quotes) with the closest valid keys."""

    def __init__(self, key: str, valid: Iterable[str]):
        valid = sorted(valid)
        same_leaf = [k for k in valid if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]  # run_dir: train.run_dir
        close = list(dict.fromkeys(same_leaf + difflib.get_close_matches(key, valid, n=3, cutoff=0.75)))[:3]
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        super().__init__(f"unknown config key {key!r}{hint}; valid keys: {', '.join(valid)}")

    def __str__(self) -> str:
        return self.args[0]


def run_cli(main: Callable[[], object], prog: str, *more_errors: type[Exception]) -> None:
    """Run a command's ``main``: a bad path, key or value (or ``more_errors``) exits with ``prog: error: ...``."""
    try:
        main()
    except (FileNotFoundError, KeyError, ValueError, *more_errors) as err:
        message = str(err.args[0] if isinstance(err, KeyError) and err.args else err)  # str(KeyError) adds quotes
        if "\nOriginal Traceback" in message:  # raised in a DataLoader worker: its last line is the error
            message = message.rstrip().rsplit("\n", 1)[-1].split(": ", 1)[-1]
        raise SystemExit(f"{prog}: error: {message}") from None


def parse_value(raw: str) -> Any:
    """YAML value of a command-line string; ``1e-4`` (a string to YAML 1.1, which needs ``1.0e-4``) is a float."""
    return yaml.load(raw, Loader=ConfigLoader)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line from a YAML error: the problem and where (PyYAML's message spans several lines)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def _read_config(path: Path) -> dict:
    """A YAML config file as a dict; invalid YAML or a top level that is not a mapping is a ValueError naming it."""
    try:
        with open(path) as f:
            cfg = yaml.load(f, Loader=ConfigLoader) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys to values, not a {type(cfg).__name__}")
    return cfg


def read_json(path: str | Path) -> Any:
    """The JSON in `path`; malformed JSON is a ValueError naming the file and where (json's message names neither)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from None


def check_output_dir(path: str | Path) -> None:
    """Refuse an output folder that is, or lies under, an existing file (mkdir would raise FileExistsError or
    NotADirectoryError deep inside the command)."""
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ValueError(f"output folder {path}: {existing} is a file, expected a folder or a path that does not exist")


def _packaged(name: str) -> Path:
    return Path(str(resources.files("sharelock") / "configs" / f"{name}.yaml"))


def default_config_path(name: str) -> Path:
    """Path of a config shipped inside the package (`configs/<name>.yaml`), editable or wheel install."""
    path = _packaged(name)
    if not path.is_file():
        raise FileNotFoundError(f"no packaged config {name!r} (looked for {path})")
    return path


def resolve_config_path(given: str) -> Path:
    """`--config` as a YAML path, else a packaged config by name (`cc3m`, `cc3m.yaml` or `configs/cc3m.yaml`)."""
    path = Path(given)
    if path.is_file():
        return path
    if str(path.parent) not in (".", "configs"):
        raise FileNotFoundError(f"config file not found: {path.absolute()}")
    packaged = _packaged(path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name)
    if packaged.is_file():
        return packaged
    names = ", ".join(sorted(p.stem for p in packaged.parent.glob("*.yaml")))
    raise FileNotFoundError(f"config {given!r} not found: no file {path.absolute()}, nor a packaged config ({names})")


def print_help(default: str) -> None:
    """Print the usage, the packaged configs and every key of config `default` with its value (`--help`, `-h`)."""
    with open(default_config_path(default)) as f:
        cfg = yaml.load(f, Loader=ConfigLoader) or {}
    names = sorted(p.stem for p in default_config_path(default).parent.glob("*.yaml"))
    print(f"usage: {program_name()} [--config NAME|PATH] [key=value | --key value ...]  (default config: {default})")
    print("packaged configs: " + ", ".join(names))
    print("keys (defaults):\n" + "\n".join(f"  {k} = {v!r}" for k, v in flatten(cfg).items()))


def flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
    """``{dotted key: value}`` of a nested config (an empty section is one value)."""
    out = {}
    for key, value in cfg.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, full + "."))
        else:
            out[full] = value
    return out


def valid_keys(cfg: dict) -> list[str]:
    """All dotted keys a config accepts."""
    return sorted(flatten(cfg))


# number and text keys whose null (also an empty `key=`) means something; null is refused for the others
NULLABLE = frozenset(
    {
        "keep_checkpoints",  # null: keep every checkpoint
        "optim.grad_clip",  # null (as 0): no gradient clipping
        "language.dtype",  # null: bfloat16 on GPU, float32 on CPU (convert.yaml sets float32)
        "vision.dtype",  # as language.dtype
        "split",  # null: an hf: dataset given without :<split> takes its first split
        "source.split",  # as split
        "model.embedding_dim",  # null: the vision feature size
    }
)


# keys left null in some config that hold text (a path, a name, `latest`) when set: the kind their default
# cannot tell; a number or date keeps its text, false or null leaves them unset, true is an error
TEXT = frozenset(
    {
        "run_dir",  # null: runs/sharelock/<name>
        "resume",  # latest | auto | PATH
        "name",  # sharelock-eval: null names the dataset by its folder
        "checkpoint",  # a run or checkpoint directory (convert: the .ckpt file)
        "out",  # null: a folder beside the checkpoint (convert, features: required)
        "data",  # sharelock-winoground: the release's data/ folder (a section in the training configs)
        "features",  # sharelock-eval's stores, image root or hf: dataset and class-name files
        "images",
        "class_names",
        "class_features",
        "language_model",  # an HF id or local path
        "eval.features",  # the training run's zero-shot stores
        "eval.class_features",
        "probe.features",  # sharelock-probe's stores and files
        "probe.test_features",
        "probe.class_names",
        "probe.class_features",
        "probe.splits",
        "source.path",  # sharelock-features: the data to encode
        "source.captions",
        "vision.model",  # convert: null reads the names from the checkpoint
        "language.model",
        "vision.checkpoint",  # local weights
        "vision.dtype",  # float32 | bfloat16 (NULLABLE too)
        "language.dtype",
    }
)


def check_kind(dotted: str, old: Any, value: Any, raw: str | None = None) -> Any:
    """`value`, checked against the key's default `old`: a scalar for a whole section, a bare string for a list
    (`data.datasets=store` would read as letters), anything but a number for a number, anything but true/false for a
    flag, and null for a number or text key that `NULLABLE` does not list are a ValueError. Where YAML reads a
    number or a boolean for a text key, the key keeps `raw`, the text typed on the command line (`name=2024`,
    `name=yes`); in a file a number becomes its text and a boolean is an error (quote it). False is "no" for a
    ``mixed_precision`` key and null for a ``NULLABLE`` key whose default is text or null
    (``data.val_split=false``). A ``TEXT`` key left null holds text: a number or date keeps ``raw`` (in a file,
    its text), false or null leaves it unset (``run_dir=off``) and true is an error."""
    if dotted in TEXT and old is None and not isinstance(value, str | list | dict):  # run_dir=2024 / off / on
        if value is True:
            raise ValueError(f"{dotted}=True: expected text (a path or name), or null")
        return None if value is None or value is False else (raw.strip() if raw is not None else str(value))
    if value is None and not isinstance(old, bool):
        if isinstance(old, int | float | str) and dotted not in NULLABLE:
            kind = "text" if isinstance(old, str) else "a number"
            raise ValueError(f"{dotted}=null: expected {kind}, not null or an empty value (default {old!r})")
        return value
    if isinstance(old, dict) and old and not isinstance(value, dict):
        raise ValueError(
            f"{dotted}={value!r}: {dotted} is a section; set its keys, e.g. {dotted}.{next(iter(old))}=..."
        )
    if isinstance(old, list) and isinstance(value, str):
        raise ValueError(f"{dotted}={value!r}: expected a list, e.g. {dotted}=[{value}]")
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(old, bool) and not isinstance(value, bool):
        raise ValueError(f"{dotted}={value!r}: expected true or false")
    if isinstance(old, int | float) and not isinstance(old, bool) and not number:
        raise ValueError(f"{dotted}={value!r}: expected a number (default {old!r})")
    if value is False and dotted in NULLABLE and (old is None or isinstance(old, str)):  # data.val_split=false: null
        return None
    if isinstance(old, str) and not isinstance(value, str | list | dict | None):  # YAML read a number, date or bool
        if value is False and dotted.rsplit(".", 1)[-1] == "mixed_precision":  # mixed_precision=no / off / false
            return "no"
        if raw is not None:
            return raw.strip()
        if not isinstance(value, bool):
            return str(value)
        word, words = ("yes", "yes/on/true") if value else ("no", "no/off/false")
        raise ValueError(
            f"{dotted}: {words} reads as {str(value).lower()}, but {dotted} holds text (default {old!r}); quote it: "
            f'{dotted}: "{word}"'
        )
    return value


def set_key(cfg: dict, dotted: str, value: Any, raw: str | None = None) -> None:
    """Set `a.b.c` in a nested dict; unknown keys raise KeyError listing the valid ones, a value of the wrong kind
    (`check_kind`, `raw`: the text typed) a ValueError."""
    parts = dotted.split(".")
    node = cfg
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            raise UnknownKeyError(dotted, valid_keys(cfg))
        if i == len(parts) - 1:
            node[part] = check_kind(dotted, node[part], value, raw)
        else:
            node = node[part]


def parse_overrides(argv: list[str]) -> tuple[str | None, list[tuple[str, Any, str]]]:
    """Split argv into (config path or None, [(dotted key, parsed value, text typed)]). Accepts `k=v`, `--k v` and
    `--k=v`; an empty value is null."""
    config_path, pairs, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            arg = arg[2:]
            if "=" not in arg:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise ValueError(f"option --{arg} expects a value")
                arg = f"{arg}={argv[i + 1]}"
                i += 1
        if "=" not in arg:
            raise ValueError(f"cannot parse argument {argv[i]!r}: expected key=value or --key value")
        key, raw = arg.split("=", 1)
        key = key.replace("-", "_")
        if key == "config":
            config_path = raw
        else:
            try:
                pairs.append((key, parse_value(raw), raw))
            except yaml.YAMLError as err:
                raise ValueError(f"{key}: {raw!r} is not valid YAML ({_yaml_problem(err)})") from None
        i += 1
    return config_path, pairs


def load_config(argv: list[str] | None, default: str) -> dict:
    """Load the packaged config `default` (or `--config NAME|PATH`) and apply the overrides in argv.

    `--help` / `-h` prints the keys with their defaults and exits with status 0.
    """
    argv = list(argv or [])
    if "--help" in argv or "-h" in argv:
        print_help(default)
        raise SystemExit(0)
    config_path, pairs = parse_overrides(argv)
    path = resolve_config_path(config_path) if config_path is not None else default_config_path(default)
    cfg = _read_config(path)
    if config_path is not None:
        # user configs may omit keys: start from the packaged defaults so every key exists
        with open(default_config_path(default)) as f:
            base = yaml.load(f, Loader=ConfigLoader)
        cfg = merge(base, cfg)
    for key, value, raw in pairs:
        set_key(cfg, key, value, raw)
    return string_mixed_precision(cfg)


def merge(base: dict, update: dict, prefix: str = "") -> dict:
    """Recursive merge of `update` into a copy of `base`; keys absent from `base` are an error, and so is a value of
    the wrong kind (`check_kind`)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if key not in out:
            raise UnknownKeyError(prefix + key, [prefix + k for k in valid_keys(base)])
        if isinstance(value, dict) and isinstance(out[key], dict) and out[key]:
            out[key] = merge(out[key], value, prefix + key + ".")
        else:
            out[key] = check_kind(prefix + key, out[key], value)
    return out


def save_config(cfg: dict, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)


def string_mixed_precision(cfg: Any) -> Any:
    """YAML 1.1 reads ``mixed_precision: no`` in a config file as False: give accelerate its "no"."""
    if isinstance(cfg, dict):
        for key, value in cfg.items():
            if key == "mixed_precision" and value is False:
                cfg[key] = "no"
            else:
                string_mixed_precision(value)
    return cfg
