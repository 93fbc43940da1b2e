"""YAML configs with `key=value` / `--key value` overrides (dotted keys for nested entries)."""

from __future__ import annotations

import copy
import difflib
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


DEFAULT_CONFIG = "blip2.yaml"


def config_path(name: str) -> Path:
    """Resolve a config given as a path or as the name of a shipped config (`tiny`, `tiny.yaml`, `blip2`)."""
    path = Path(name)
    if path.is_file():
        return path
    stem = name if name.endswith(".yaml") else f"{name}.yaml"
    shipped = resources.files("pin") / "configs" / stem
    if shipped.is_file():
        return Path(str(shipped))
    available = sorted(p.name for p in (resources.files("pin") / "configs").iterdir() if p.name.endswith(".yaml"))
    raise FileNotFoundError(f"config {name!r} is neither a file nor a shipped config; shipped configs: {available}")


def load_yaml(path: str | Path) -> dict:
    """The YAML mapping in `path` (`1e-4` reads as a float; an empty file gives {}); ValueError if not valid YAML or
    not a mapping."""
    with open(path) as f:
        try:
            data = yaml.load(f, Loader=ConfigLoader) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"config {path} is not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must hold a mapping at top level, got {type(data).__name__}")
    return data


def _flat_keys(cfg: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        keys.extend(_flat_keys(v, key + ".") if isinstance(v, dict) and v else [key])
    return keys


def empty_sections(cfg: dict, prefix: str = "") -> set[str]:
    """Dotted names of the empty mappings of ``cfg``: free-form sections (extra keyword arguments such as
    ``model.overrides``) to which an override may add keys."""
    out: set[str] = set()
    for key, value in cfg.items():
        if isinstance(value, dict):
            out |= empty_sections(value, f"{prefix}{key}.") if value else {prefix + key}
    return out


# list keys that also take a name: data.held_out=default (the COCO + PVOC classes) or data.held_out=[a, b]
LIST_OR_NAME = ("data.held_out",)


# number and text keys whose null (also an empty `key=`) means something; null is refused for the others
NULLABLE = frozenset(
    {
        "train.keep_checkpoints",  # null: keep every checkpoint
        "train.val_every_epochs",  # null: no validation
        "model.image_size",  # null: the VLM's own input size
        "data.held_out",  # null (as []): no held-out classes
        "data.objects",  # null: procedural objects (tiny.yaml)
        "data.backgrounds",  # null: procedural backgrounds (tiny.yaml)
        "data.val_backgrounds",  # null: data.backgrounds
        "data.synonyms_path",  # null: no synonym file (tiny.yaml)
    }
)


# keys left null in some config that hold text (a path, a name, `latest`) when set: the kind their default
# cannot tell; a number or date keeps its text, false or null leaves them unset, true is an error
TEXT = frozenset(
    {
        "data.objects",  # paths, null in tiny.yaml (procedural data)
        "data.backgrounds",
        "data.val_backgrounds",
        "data.synonyms_path",
        "eval.checkpoint",  # a run or checkpoint directory
        "resume",  # command-line switches (`flags` of load_config): latest | auto | PATH
        "checkpoint",
        "out",
    }
)


def check_kind(dotted: str, old: Any, value: Any, raw: str | None = None) -> Any:
    """`value`, checked against the key's default `old`: a scalar for a whole section, a bare string for a list
    (`eval.datasets=coco` would read as letters), anything but a number for a number, anything but true/false for a
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
    if isinstance(old, list) and isinstance(value, str) and dotted not in LIST_OR_NAME:
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


def set_key(cfg: dict, dotted: str, value: Any, free: Collection[str] = (), raw: str | None = None) -> None:
    """Set `a.b.c` in a nested dict; the key must already exist (unknown keys are an error listing valid ones),
    unless it is new in one of the `free` sections (see `empty_sections`); a value of the wrong kind (`check_kind`,
    `raw`: the text typed) is a ValueError."""
    node = cfg
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if isinstance(node, dict) and part not in node and ".".join(parts[:i]) in free:  # a free-form section
            for sub in parts[i:-1]:
                node = node.setdefault(sub, {})
            node[parts[-1]] = value
            return
        if not isinstance(node, dict) or part not in node:
            raise UnknownKeyError(dotted, _flat_keys(cfg))
        if i == len(parts) - 1:
            node[part] = check_kind(dotted, node[part], value, raw)
        else:
            node = node[part]


def split_argv(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Split argv into positional arguments and (key, value) overrides (`k=v`, `--k v`, `--k=v`)."""
    positional, pairs = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            body = arg[2:]
            if "=" in body:
                key, value = body.split("=", 1)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                key, value = body, argv[i + 1]
                i += 1
            else:
                key, value = body, "true"
            pairs.append((key.replace("-", "_"), value))
        elif "=" in arg and not arg.startswith("="):
            key, value = arg.split("=", 1)
            pairs.append((key, value))
        else:
            positional.append(arg)
        i += 1
    return positional, pairs


_REQUIRED = object()


def get_key(cfg: dict, dotted: str, default: Any = _REQUIRED) -> Any:
    """``cfg[a][b]`` for ``dotted = 'a.b'``; ``default`` if a part is missing (a KeyError without one)."""
    for part in dotted.split("."):
        if default is not _REQUIRED and (not isinstance(cfg, dict) or part not in cfg):
            return default
        cfg = cfg[part]
    return cfg


def print_help(default: str = DEFAULT_CONFIG, flags: tuple[str, ...] = (), usage_args: str = "") -> None:
    """Print the usage, the shipped configs, the CLI-only `flags` and every key of config `default` with its value."""
    cfg = load_yaml(config_path(default))
    names = sorted(p.name[:-5] for p in (resources.files("pin") / "configs").iterdir() if p.name.endswith(".yaml"))
    args = f"{usage_args} " if usage_args else ""
    print(
        f"usage: {program_name()} {args}[--config NAME|PATH] [key=value | --key value ...]  (default config: {default})"
    )
    print("shipped configs: " + ", ".join(names))
    if flags:
        print("options: " + ", ".join(f"{f}=..." for f in flags))
    print("keys (defaults):\n" + "\n".join(f"  {k} = {get_key(cfg, k)!r}" for k in _flat_keys(cfg)))


TINY_ONLY = ("model.tiny",)  # tiny.yaml's options of the tiny random model, absent from the paper configs


def merge_user_config(base: dict, update: dict, prefix: str = "") -> dict:
    """``update`` (a config file of the user's) laid over a copy of ``base`` (the command's default config): keys
    the file leaves out keep their defaults, keys the default lacks are an error (an empty mapping takes any)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if prefix + key in TINY_ONLY and isinstance(value, dict):  # a copy of tiny.yaml
            out[key] = value
            continue
        if key not in out:
            raise UnknownKeyError(prefix + key, [prefix + k for k in out])
        if isinstance(out[key], dict) and out[key] and isinstance(value, dict):
            out[key] = merge_user_config(out[key], value, f"{prefix}{key}.")
        else:
            out[key] = check_kind(prefix + key, out[key], value)
    return out


def load_config(
    argv: list[str] | None, default: str = DEFAULT_CONFIG, flags: tuple[str, ...] = (), usage_args: str = ""
) -> tuple[dict, list]:
    """Defaults from the YAML chosen by `--config` (or `config=`), then overrides. Returns (config, positionals).

    `argv=None` reads sys.argv[1:] (console scripts).

    `flags` are CLI-only switches (e.g. `resume`, `out`) kept in `cfg["_cli"]` instead of the config tree, read as
    `TEXT` keys: the text typed (empty, null or false: None; true: an error).
    `--help` / `-h` prints the keys with their defaults (`usage_args` names the positional arguments in the usage
    line) and exits with status 0.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print_help(default, flags, usage_args)
        raise SystemExit(0)
    positional, pairs = split_argv(argv)
    chosen = default
    for key, value in pairs:
        if key == "config":
            chosen = value
    path = config_path(chosen)
    cfg = copy.deepcopy(load_yaml(path))
    if path.resolve().parent != Path(str(resources.files("pin") / "configs")).resolve():  # a user's file
        cfg = merge_user_config(load_yaml(config_path(default)), cfg)
    cli: dict[str, Any] = {}
    free = empty_sections(cfg)
    for key, value in pairs:
        if key == "config":
            continue
        try:
            parsed = parse_value(value)
        except yaml.YAMLError as err:
            raise ValueError(f"{key}: {value!r} is not valid YAML ({_yaml_problem(err)})") from None
        if key in flags:  # paths, latest, auto: TEXT keys left null (resume=null or =no is unset)
            cli[key] = check_kind(key, None, parsed, value)
        else:
            set_key(cfg, key, parsed, free, value)
    cfg["_cli"] = cli
    return string_mixed_precision(cfg), positional


def dump_config(cfg: dict, path: str | Path) -> None:
    """Write the resolved config (without CLI-only switches) as YAML."""
    clean = {k: v for k, v in cfg.items() if k != "_cli"}
    with open(path, "w") as f:
        yaml.safe_dump(clean, f, sort_keys=False)


def string_mixed_precision(cfg: Any) -> Any:
    """YAML 1.1 reads ``mixed_precision: no`` in a config file as False: give accelerate its "no"."""
    if isinstance(cfg, dict):
        for key, value in cfg.items():
            if key == "mixed_precision" and value is False:
                cfg[key] = "no"
            else:
                string_mixed_precision(value)
    return cfg
