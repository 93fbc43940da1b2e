"""YAML configs with command-line overrides (``key=value``, ``--key value``, dotted keys for nested values)."""

from __future__ import annotations

import copy
import difflib
import re
import sys
from collections.abc import Callable, Iterable, Sequence
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

    def __init__(self, key: str, valid: Iterable[str], elsewhere: Iterable[str] = ()):
        """``elsewhere``: keys of other sections with the same last part (``teacher_temperature``), named first."""
        valid = sorted(valid)
        close = list(dict.fromkeys([*elsewhere, *difflib.get_close_matches(key, valid, n=3, cutoff=0.75)]))[:3]
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
    try:
        value = yaml.load(raw, Loader=ConfigLoader)
    except yaml.YAMLError as err:  # an unclosed [ or {, a stray character
        raise ValueError(f"cannot parse {raw!r} as a YAML value: {getattr(err, 'problem', None) or err}") from None
    # YAML reads {img_size:32} as the key 'img_size:32' with no value, which a free-form mapping would silently accept
    if isinstance(value, dict):
        glued = [k for k, v in value.items() if isinstance(k, str) and ":" in k and v is None]
        if glued:
            raise ValueError(f"cannot parse {raw!r}: key {glued[0]!r} has no value; YAML needs a space after ':'")
    return value


def config_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a config shipped in ``fungi/configs`` (with or without ``.yaml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = resources.files("fungi") / "configs" / (path.name if path.suffix else f"{path.name}.yaml")
    if shipped.is_file():
        return Path(str(shipped))
    available = sorted(p.name for p in (resources.files("fungi") / "configs").iterdir() if p.name.endswith(".yaml"))
    raise FileNotFoundError(f"config {name_or_path!r} not found (not a file, not one of the shipped {available})")


def load_yaml(path: Path) -> dict:
    """The YAML mapping in ``path`` (``1e-4`` reads as a float; an empty file gives {}); ValueError if not a mapping."""
    with open(path) as f:
        try:
            data = yaml.load(f, Loader=ConfigLoader) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping at top level, got {type(data).__name__}")
    return data


# number and text keys whose null (also an empty `key=`) means something; null is refused for the others
NULLABLE = frozenset(
    {
        "data.val_split",  # null: no validation split
        "val_split",  # fungi-eval: null chooses the linear probe's lambda on an 80/20 split of train
        "memory_size",  # fungi-hummingbird: null keeps every patch (hummingbird_tiny / _efficient)
        "data_dir",  # fungi-hummingbird: null in hummingbird_tiny.yaml, the synthetic scenes read no files
    }
)


# keys left null in some config that hold text (a path, a name, `latest`) when set: the kind their default
# cannot tell; a number or date keeps its text, false or null leaves them unset, true is an error
TEXT = frozenset(
    {
        "run_dir",  # null: runs/fungi/<name>
        "checkpoint",  # local weights
        "layer",  # the target nn.Linear's dotted name
        "state",  # fungi-extract: the heads' file
        "data.root",  # fungi-extract's data paths and names
        "data.name",
        "data.train_file",
        "data.test_file",
        "train_split",  # fungi-hummingbird: null is the dataset's training split
        "out",  # fungi-eval: null writes beside the features
        "ground_truth",  # fungi-eval: a retrieval file
    }
)


def check_kind(key: str, old: Any, value: Any, raw: str | None = None) -> Any:
    """Refuse a value that cannot mean what the key holds, as dora's overrides: a scalar for a whole section, a bare
    string for a list (``objectives=kl`` would read as the letters k, l), a flag, string, list or mapping for a
    number (``batch_size=four``, ``seed=true``), anything but true/false for a flag (``pretrained=flase``), or null
    for a number or string key that ``NULLABLE`` does not list. Where YAML reads a number or a boolean for a string
    key, the key keeps ``raw``, the text typed on the command line (``name=2024``, ``name=yes``); in a file a number
    becomes its text and a boolean is an error (quote it). False is "no" for a ``mixed_precision`` key and null for
    a ``NULLABLE`` key whose default is text or null (``data.val_split=false``). A ``TEXT`` key left null holds
    text: a number or date keeps ``raw`` (in a file, its text), false or null leaves it unset (``run_dir=off``) and
    true is an error."""
    if key in TEXT and old is None and not isinstance(value, str | list | dict):  # run_dir=2024 / off / on
        if value is True:
            raise ValueError(f"{key}=True: expected text (a path or name), or null")
        return None if value is None or value is False else (raw.strip() if raw is not None else str(value))
    if value is None and isinstance(old, int | float | str) and not isinstance(old, bool) and key not in NULLABLE:
        kind = "text" if isinstance(old, str) else "a number"
        raise ValueError(f"{key}=null: expected {kind}, not null or an empty value (default {old!r})")
    if isinstance(old, dict) and old and not isinstance(value, dict):
        raise ValueError(f"{key}={value!r}: {key} is a section; set its keys, e.g. {key}.{next(iter(old))}=...")
    if isinstance(old, list) and isinstance(value, str):
        raise ValueError(f"{key}={value!r}: expected a list, e.g. {key}=[{value}]")
    if isinstance(old, bool) and not isinstance(value, bool):  # a misspelt false would read as true
        raise ValueError(f"{key}={value!r}: expected true or false")
    if isinstance(old, (int, float)) and not isinstance(old, bool) and isinstance(value, (bool, str, list, dict)):
        raise ValueError(f"{key}={value!r}: expected a number (default {old!r})")
    if value is False and key in NULLABLE and (old is None or isinstance(old, str)):  # data.val_split=false: null
        return None
    if isinstance(old, str) and not isinstance(value, str | list | dict | None):  # YAML read a number, date or bool
        if value is False and key.rsplit(".", 1)[-1] == "mixed_precision":  # mixed_precision=no / off / false
            return "no"
        if raw is not None:
            return raw.strip()
        if not isinstance(value, bool):
            return str(value)
        word, words = ("yes", "yes/on/true") if value else ("no", "no/off/false")
        raise ValueError(
            f"{key}: {words} reads as {str(value).lower()}, but {key} holds text (default {old!r}); quote it: "
            f'{key}: "{word}"'
        )
    return value


def merge(
    base: dict,
    update: dict,
    prefix: str = "",
    strict: bool = True,
    schema: dict | None = None,
    root: dict | None = None,
    typed: dict[str, str] | None = None,
) -> dict:
    """Recursively merge ``update`` into a copy of ``base``; unknown keys are an error listing the valid ones and
    naming keys of the whole config ``root`` (default ``base``) with the same last part (an empty mapping in
    ``schema``, default ``base``, such as ``model_kwargs``, accepts any keys); a value of the wrong kind for its key
    (``check_kind``; null against the ``schema`` default; ``typed``: the text of command-line values by dotted key)
    is a ValueError."""
    out = copy.deepcopy(base)
    schema = base if schema is None else schema
    root = base if root is None else root
    typed = typed or {}
    for key, value in update.items():
        full = f"{prefix}{key}"
        if strict and key not in out:
            elsewhere = [k for k in _flatten(root) if k.rsplit(".", 1)[-1] == key]
            raise UnknownKeyError(full, [prefix + k for k in out], elsewhere)
        if isinstance(out.get(key), dict) and isinstance(value, dict):
            sub = schema[key] if isinstance(schema.get(key), dict) else out[key]
            out[key] = merge(out[key], value, f"{full}.", strict and bool(sub), sub, root, typed)
        else:
            old = out.get(key)
            kind = schema.get(key) if old is None or value is None else old  # null: checked against the default
            out[key] = check_kind(full, kind, value, typed.get(full))
    return out


def parse_overrides(argv: Sequence[str]) -> tuple[str | None, dict, dict[str, str]]:
    """``['--config', 'x.yaml', 'a.b=1', '--c', '2']`` -> ('x.yaml', {'a': {'b': 1}, 'c': 2}, {'a.b': '1', 'c': '2'}):
    the config, the parsed values (an empty value is null) and the text typed, by dotted key."""
    pairs: list[tuple[str, str]] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            key = arg[2:]
            if "=" in key:
                key, value = key.split("=", 1)
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                i += 1
                value = args[i]
            else:
                value = "true"  # bare flags such as --quick
        elif "=" in arg:
            key, value = arg.split("=", 1)
        else:
            raise ValueError(f"cannot parse argument {arg!r}: expected key=value or --key value")
        pairs.append((key.replace("-", "_"), value))
        i += 1
    config = None
    nested: dict = {}
    for key, value in pairs:
        if key == "config":
            config = value
            continue
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = parse_value(value)
    return config, nested, {key: value for key, value in pairs if key != "config"}


def _flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def print_help(defaults: dict, default_config: str | None) -> None:
    """Print the usage, the shipped configs and every key with its default (``defaults`` <- ``default_config``)."""
    cfg = merge(defaults, load_yaml(config_path(default_config))) if default_config else defaults
    names = sorted(p.name[:-5] for p in (resources.files("fungi") / "configs").iterdir() if p.name.endswith(".yaml"))
    print(
        f"usage: {program_name()} [--config NAME|PATH] [key=value | --key value ...]"
        f"  (default config: {default_config or 'none'})"
    )
    print("shipped configs: " + ", ".join(names))
    print("keys (defaults):\n" + "\n".join(f"  {k} = {v!r}" for k, v in _flatten(cfg).items()))


def resolve(argv: Sequence[str] | None, defaults: dict, default_config: str | None) -> dict:
    """Defaults <- YAML config (``--config``, else ``default_config``) <- command-line overrides.

    ``--help`` / ``-h`` prints the keys with their defaults and exits with status 0.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        print_help(defaults, default_config)
        raise SystemExit(0)
    config_name, overrides, typed = parse_overrides(argv)
    cfg = copy.deepcopy(defaults)
    name = default_config if config_name is None else config_name  # config= (an empty $CFG) is no config name
    if name is not None:
        cfg = merge(cfg, load_yaml(config_path(name)))
    return merge(cfg, overrides, schema=defaults, typed=typed)  # model_kwargs & co. stay free-form once filled


def save_config(cfg: dict, path: Path) -> None:
    """Write the resolved config as YAML."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
