"""YAML configs with ``key=value`` / ``--key value`` overrides (dotted keys for nested sections)."""

from __future__ import annotations

import copy
import difflib
import os
import re
import sys
from collections.abc import Callable, Collection, Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


class ConfigLoader(yaml.SafeLoader):
    """YAML safe loader that also reads exponent floats without a dot (``1e-4``, a string to plain YAML 1.1)."""


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)

DEFAULT_CONFIG = "dinov2r_vits14"


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


def config_dir() -> str:
    """Directory of the configs shipped inside the package."""
    return str(resources.files("neco") / "configs")


def resolve_config_path(name_or_path: str) -> str:
    """A YAML path, or the name of a shipped config (``tiny``, ``dinov2r_vits14``, ``configs/tiny.yaml``)."""
    if os.path.isfile(name_or_path):
        return name_or_path
    stem = os.path.splitext(os.path.basename(name_or_path))[0]
    shipped = os.path.join(config_dir(), f"{stem}.yaml")
    if os.path.isfile(shipped):
        return shipped
    names = sorted(f[:-5] for f in os.listdir(config_dir()) if f.endswith(".yaml"))
    raise FileNotFoundError(f"config {name_or_path!r} not found; give a YAML path or one of {names}")


def _flat_keys(cfg: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in cfg.items():
        keys.append(prefix + key)
        if isinstance(value, dict) and value:
            keys.extend(_flat_keys(value, f"{prefix}{key}."))
    return keys


def empty_sections(cfg: dict, prefix: str = "") -> set[str]:
    """Dotted names of the empty mappings of ``cfg``: free-form sections (extra keyword arguments such as
    ``model.overrides``) to which an override may add keys."""
    out: set[str] = set()
    for key, value in cfg.items():
        if isinstance(value, dict):
            out |= empty_sections(value, f"{prefix}{key}.") if value else {prefix + key}
    return out


# number and text keys whose null (also an empty `key=`) means something; null is refused for the others
NULLABLE = frozenset(
    {
        "train.keep_checkpoints",  # null: keep every checkpoint
        "val.every_epochs",  # null: validate by val.every_steps only
        "model.checkpoint",  # null: timm's weights (set by leopart_vits16 / timetuning_vits16)
        "data.root",  # null in tiny.yaml / eval_tiny.yaml: the synthetic data reads no files
        "data.train_split",  # null: the dataset's training split (VOC: trainaug)
        "data.num_classes",  # null: the dataset's number of classes
        "hummingbird.memory_size",  # null: every patch in memory
    }
)


# keys left null in some config that hold text (a path, a name, `latest`) when set: the kind their default
# cannot tell; a number or date keeps its text, false or null leaves them unset, true is an error
TEXT = frozenset(
    {
        "train.run_dir",  # null: runs/neco/<name>
        "train.resume",  # latest | PATH
        "model.checkpoint",  # local weights
        "data.root",  # paths, null in tiny.yaml / eval_tiny.yaml
        "val.root",
        "data.train_split",  # a split name, null in eval_voc.yaml
        "hummingbird.train_file_set",  # a file list
        "checkpoint",  # neco-eval and neco-export: a run or checkpoint directory
        "output",
    }
)


def check_kind(dotted: str, old: Any, value: Any, raw: str | None = None) -> Any:
    """Refuse a value that cannot mean what the key holds, as dora's overrides: a bare string for a list
    (``evals=linear`` would read as letters), a flag, string, list or mapping for a number
    (``optim.batch_size=four``, ``optim.epochs=true``), anything but true/false for a flag
    (``loss.use_teacher=flase``), or null for a number or string key that ``NULLABLE`` does not list. Where YAML
    reads a number or a boolean for a string key, the key keeps ``raw``, the text typed on the command line
    (``name=2024``, ``name=yes``); in a file a number becomes its text and a boolean is an error (quote it). False
    is "no" for a ``mixed_precision`` key and null for a ``NULLABLE`` key whose default is text or null
    (``data.val_split=false``). A ``TEXT`` key left null holds text: a number or date keeps ``raw`` (in a file,
    its text), false or null leaves it unset (``run_dir=off``) and true is an error."""
    if dotted in TEXT and old is None and not isinstance(value, str | list | dict):  # run_dir=2024 / off / on
        if value is True:
            raise ValueError(f"{dotted}=True: expected text (a path or name), or null")
        return None if value is None or value is False else (raw.strip() if raw is not None else str(value))
    if value is None and isinstance(old, int | float | str) and not isinstance(old, bool) and dotted not in NULLABLE:
        kind = "text" if isinstance(old, str) else "a number"
        raise ValueError(f"{dotted}=null: expected {kind}, not null or an empty value (default {old!r})")
    if isinstance(old, list) and isinstance(value, str):
        raise ValueError(f"{dotted}={value!r}: expected a list, e.g. {dotted}=[{value}]")
    if isinstance(old, bool) and not isinstance(value, bool):  # a misspelt false would read as true
        raise ValueError(f"{dotted}={value!r}: expected true or false")
    if isinstance(old, (int, float)) and not isinstance(old, bool) and isinstance(value, (bool, str, list, dict)):
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


def set_key(cfg: dict[str, Any], dotted: str, value: Any, free: Collection[str] = (), raw: str | None = None) -> None:
    """Set ``cfg[a][b] = value`` for ``dotted = 'a.b'``; unknown keys raise KeyError listing the valid ones (new
    keys are welcome in the ``free`` sections, see ``empty_sections``), a value of the wrong kind (``check_kind``,
    ``raw``: the text typed) a ValueError."""
    node = cfg
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if isinstance(node, dict) and part not in node and ".".join(parts[:i]) in free:  # a free-form section
            for sub in parts[i:-1]:
                node = node.setdefault(sub, {})
            node[parts[-1]] = value
            return
        if not isinstance(node, dict) or part not in node:
            valid = [k for k in _flat_keys(cfg) if not isinstance(get_key(cfg, k), dict) or not get_key(cfg, k)]
            raise UnknownKeyError(dotted, valid)
        if i == len(parts) - 1:
            if isinstance(node[part], dict) and node[part] and not isinstance(value, dict):
                example = f"{dotted}.{next(iter(node[part]))}"
                raise ValueError(f"{dotted}={value!r}: {dotted} is a section; set its fields, e.g. {example}=...")
            node[part] = check_kind(dotted, node[part], value, raw)
        else:
            node = node[part]


_REQUIRED = object()


def get_key(cfg: dict[str, Any], dotted: str, default: Any = _REQUIRED) -> Any:
    """``cfg[a][b]`` for ``dotted = 'a.b'``; ``default`` if a part is missing (a KeyError without one)."""
    node = cfg
    for part in dotted.split("."):
        if default is not _REQUIRED and (not isinstance(node, dict) or part not in node):
            return default
        node = node[part]
    return node


def parse_value(text: str) -> Any:
    """YAML value, with YAML 1.1's gap filled: ``1e-4`` (no dot) is a float, not a string."""
    try:
        value = yaml.load(text, Loader=ConfigLoader)
    except yaml.YAMLError as err:  # an unclosed [ or {, a stray character
        raise ValueError(f"cannot parse {text!r} as a YAML value: {getattr(err, 'problem', None) or err}") from None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_overrides(argv: list[str]) -> tuple[str | None, list[tuple[str, Any, str]]]:
    """Split ``argv`` into the ``--config``/``config=`` path and a list of (dotted key, YAML-parsed value, text
    typed); an empty value is null."""
    config, pairs, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "=" not in arg:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ValueError(f"option {arg} needs a value")
            key, value = arg[2:], argv[i + 1]
            i += 2
        elif "=" in arg:
            key, value = arg.lstrip("-").split("=", 1)
            i += 1
        else:
            raise ValueError(f"cannot parse argument {arg!r}; expected key=value or --key value")
        if key == "config":
            config = value
        else:
            pairs.append((key.replace("-", "_"), parse_value(value), value))
    return config, pairs


def wants_help(argv: list[str]) -> bool:
    """Whether ``--help`` or ``-h`` is among the arguments."""
    return "--help" in argv or "-h" in argv


def print_help(defaults: dict[str, Any], default: str | None = None) -> None:
    """Print the usage, the shipped configs and every key with its default value."""
    names = sorted(f[:-5] for f in os.listdir(config_dir()) if f.endswith(".yaml"))
    keys = [k for k in _flat_keys(defaults) if not isinstance(get_key(defaults, k), dict) or not get_key(defaults, k)]
    if default is not None:
        print(
            f"usage: {program_name()} [--config NAME|PATH] [key=value | --key value ...]  (default config: {default})"
        )
        print("shipped configs: " + ", ".join(names))
    else:
        print(f"usage: {program_name()} [key=value | --key value ...]")
    print("keys (defaults):\n" + "\n".join(f"  {k} = {get_key(defaults, k)!r}" for k in keys))


def load_config(argv: list[str] | None = None, default: str = DEFAULT_CONFIG) -> dict[str, Any]:
    """Config from ``--config`` (default: the paper recipe) with command-line overrides applied.

    ``--help`` / ``-h`` prints the keys with their defaults and exits with status 0.
    """
    argv = list(argv or [])
    if wants_help(argv):
        with open(resolve_config_path(default)) as f:
            print_help(yaml.load(f, Loader=ConfigLoader) or {}, default)
        raise SystemExit(0)
    config, pairs = parse_overrides(argv)
    path = resolve_config_path(default if config is None else config)  # config= (an empty $CFG) is no config
    cfg = read_yaml_mapping(path)
    if os.path.dirname(os.path.realpath(path)) != os.path.realpath(config_dir()):  # a user's file: may set some keys
        with open(resolve_config_path(default)) as f:
            cfg = merge_user_config(yaml.load(f, Loader=ConfigLoader), cfg)
    cfg, free = copy.deepcopy(cfg), empty_sections(cfg)
    for key, value, raw in pairs:
        set_key(cfg, key, value, free, raw)
    cfg["config_path"] = os.path.abspath(path)
    return string_mixed_precision(cfg)


def read_yaml_mapping(path: str) -> dict[str, Any]:
    """The YAML mapping of a config file (an empty file gives {}); ValueError naming the file for invalid YAML or
    another top level (a list, a number)."""
    with open(path) as f:
        try:
            data = yaml.load(f, Loader=ConfigLoader)
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict) and data is not None:
        raise ValueError(f"{path}: expected a YAML mapping of config keys at top level, got {type(data).__name__}")
    return data or {}


def merge_user_config(base: dict[str, Any], update: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``update`` (a config file) laid over a copy of ``base`` (the default config): keys a file leaves out keep
    their defaults, keys the default lacks are an error (an empty mapping, such as ``model.overrides``, takes any)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if key not in out:
            raise UnknownKeyError(prefix + key, [prefix + k for k in out])
        if isinstance(out[key], dict) and out[key] and isinstance(value, dict):
            out[key] = merge_user_config(out[key], value, f"{prefix}{key}.")
        elif isinstance(out[key], dict) and out[key]:
            raise ValueError(f"{prefix}{key}: {value!r} in the config file, but {prefix}{key} is a section of keys")
        else:
            out[key] = check_kind(prefix + key, out[key], value)
    return out


def string_mixed_precision(cfg: Any) -> Any:
    """YAML 1.1 reads ``mixed_precision: no`` in a config file as False: give accelerate its "no"."""
    if isinstance(cfg, dict):
        for key, value in cfg.items():
            if key == "mixed_precision" and value is False:
                cfg[key] = "no"
            else:
                string_mixed_precision(value)
    return cfg
