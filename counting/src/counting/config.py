"""YAML configs with ``key=value`` / ``--key value`` overrides (dotted keys for nested entries)."""

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


def make_dir(path: str | Path, what: str) -> Path:
    """Create the folder ``path`` (and its parents) for output; ValueError naming ``what`` (the key or option that
    gave it) when ``path`` or a folder above it is an existing file."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        raise ValueError(f"{what}: {blocker} is a file; expected a folder (or nothing) at {path}") from None
    return path


def config_dir() -> Path:
    """Folder of the shipped configs (inside the installed package)."""
    return Path(str(resources.files("counting") / "configs"))


def resolve_config_path(name_or_path: str) -> Path:
    """A config path as given, or a shipped config by name (``tiny`` or ``tiny.yaml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = config_dir() / (path.name if path.suffix else f"{path.name}.yaml")
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in config_dir().glob("*.yaml"))
    raise FileNotFoundError(f"config {name_or_path!r} not found: not a file, nor a shipped config ({names})")


def load_yaml(path: str | Path) -> dict:
    """The YAML mapping in ``path`` (``1e-4`` reads as a float; an empty file gives {}); ValueError if not valid YAML
    or not a mapping."""
    with open(path) as f:
        try:
            data = yaml.load(f, Loader=ConfigLoader) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"config {path} is not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must be a YAML mapping, got {type(data).__name__}")
    return data


def flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def empty_sections(cfg: dict, prefix: str = "") -> set[str]:
    """Dotted names of the empty mappings of ``cfg``: free-form sections (extra keyword arguments such as
    ``model.backbone_kwargs``) to which an override may add keys."""
    out: set[str] = set()
    for key, value in cfg.items():
        if isinstance(value, dict):
            out |= empty_sections(value, f"{prefix}{key}.") if value else {prefix + key}
    return out


# number keys that also take names: figures=NAME (one image) or figures=[a.jpg, b.jpg]
NUMBER_OR_NAMES = ("figures",)


# number and text keys whose null (also an empty `key=`) means something; null is refused for the others
NULLABLE = frozenset(
    {
        "train.keep_checkpoints",  # null: keep every checkpoint
        "data.image_root",  # null in tiny.yaml: the synthetic data reads no files
        "data.masks_dir",  # as data.image_root
        "data.clusters",  # as data.image_root
        "data.background_root",  # as data.image_root
        "train.standard_size",  # null: the loss normalises by the actual H x W
    }
)


# keys left null in some config that hold text (a path, a name, `latest`) when set: the kind their default
# cannot tell; a number or date keeps its text, false or null leaves them unset, true is an error
TEXT = frozenset(
    {
        "resume",  # latest | PATH
        "checkpoint",  # counting-eval: a run, checkpoint or release file
        "model_config",  # counting-eval's files and output folder
        "reference_args",
        "out",
        "model.checkpoint_path",  # local backbone weights
        "checkpoint_path",  # counting-preprocess, as model.checkpoint_path
        "mask_files",  # counting-preprocess: a folder
        "data.image_root",  # paths, null in tiny.yaml (synthetic data)
        "data.masks_dir",
        "data.clusters",
        "data.background_root",
    }
)


def check_kind(key: str, old: Any, value: Any, raw: str | None = None) -> Any:
    """Refuse an override or config-file value that cannot mean what the key holds: a scalar for a whole section, a
    scalar for a list (``optim.betas=0.9``), a flag, word, list or mapping for a number (``train.batch_size=abc``,
    ``train.epochs=true``; ``figures`` also takes image names), anything but true/false for a flag
    (``train.shared_mask=flase``), or null for a number or string key that ``NULLABLE`` does not list. Where YAML
    reads a number or a boolean for a string key, the key keeps ``raw``, the text typed on the command line
    (``name=2024``, ``name=yes``); in a file a number becomes its text and a boolean is an error (quote it). False
    is "no" for a ``mixed_precision`` key and null for a ``NULLABLE`` key whose default is text or null
    (``data.val_split=false``). A ``TEXT`` key left null holds text: a number or date keeps ``raw`` (in a file,
    its text), false or null leaves it unset (``run_dir=off``) and true is an error."""
    if key in TEXT and old is None and not isinstance(value, str | list | dict):  # run_dir=2024 / off / on
        if value is True:
            raise ValueError(f"{key}=True: expected text (a path or name), or null")
        return None if value is None or value is False else (raw.strip() if raw is not None else str(value))
    if value is None and isinstance(old, int | float | str) and not isinstance(old, bool) and key not in NULLABLE:
        kind = "text" if isinstance(old, str) else "a number"
        raise ValueError(f"{key}=null: expected {kind}, not null or an empty value (default {old!r})")
    if isinstance(old, dict) and old and not isinstance(value, dict):
        raise ValueError(f"{key}={value!r}: {key} is a section; set its keys, e.g. {key}.{next(iter(old))}=...")
    if isinstance(old, list) and not isinstance(value, list):
        raise ValueError(f"{key}={value!r}: expected a list, e.g. {key}=[{value}]")
    if isinstance(old, bool) and not isinstance(value, bool):  # a misspelt false would read as true, null as false
        raise ValueError(f"{key}={value!r}: expected true or false")
    if isinstance(old, int | float) and not isinstance(old, bool) and isinstance(value, bool | str | list | dict):
        if key not in NUMBER_OR_NAMES:
            raise ValueError(f"{key}={value!r}: expected a number")
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


def set_dotted(cfg: dict, key: str, value: Any, free: Collection[str] = (), raw: str | None = None) -> None:
    """Set ``cfg[a][b] = value`` for ``key = "a.b"``; a key that is not already a leaf of ``cfg`` is an error,
    unless it is new in one of the ``free`` sections (see ``empty_sections``); so is a value of the wrong kind
    (``check_kind``, ``raw``: the text typed)."""
    valid = flatten(cfg)
    target = cfg
    for part in key.split("."):
        target = target.get(part) if isinstance(target, dict) else None
    if isinstance(target, dict) and target:  # optim=3: a whole section
        check_kind(key, target, value)
    if key not in valid and not any(key.startswith(section + ".") for section in free):
        raise UnknownKeyError(key, valid)
    if key in valid:
        value = check_kind(key, valid[key], value, raw)
    node = cfg
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):  # a.b=1 set earlier, now a.b.c
            raise UnknownKeyError(key, valid)
    node[parts[-1]] = value


def parse_value(raw: str) -> Any:
    """YAML value of a command-line string (an empty one is null); also reads ``1e-4`` as a float (YAML 1.1 needs
    ``1.0e-4``)."""
    try:
        value = yaml.load(raw, Loader=ConfigLoader)
    except yaml.YAMLError as err:  # an unclosed [ or {, a stray character
        raise ValueError(f"cannot parse {raw!r} as a YAML value: {getattr(err, 'problem', None) or err}") from None
    if isinstance(value, dict) and any(isinstance(k, str) and ":" in k and v is None for k, v in value.items()):
        raise ValueError(f"{raw!r}: YAML reads 'key:value' without a space as one key; write {{key: value, ...}}")
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def split_overrides(argv: list[str]) -> tuple[str | None, list[tuple[str, Any, str]], list[str]]:
    """Parse ``--config PATH``/``config=PATH``, ``key=value`` and ``--key value``; returns (config, overrides as
    (key, parsed value, text typed), rest).

    ``rest`` keeps the positional arguments (tokens without '=' that do not follow a ``--key``).
    """
    config, overrides, rest = None, [], []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--"):
            body = token[2:]
            if "=" in body:
                key, raw = body.split("=", 1)
            else:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise ValueError(f"option {token} expects a value")
                key, raw = body, argv[i + 1]
                i += 1
        elif "=" in token:
            key, raw = token.split("=", 1)
        else:
            rest.append(token)
            i += 1
            continue
        key = key.replace("-", "_")
        if key == "config":
            config = raw
        else:
            overrides.append((key, parse_value(raw), raw))
        i += 1
    return config, overrides, rest


def merge_user_config(base: dict, update: dict, prefix: str = "") -> dict:
    """``update`` (a config file of the user's) laid over a copy of ``base`` (the command's default config): keys
    the file leaves out keep their defaults, keys the default lacks are an error (an empty mapping takes any)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if key not in out:
            raise UnknownKeyError(prefix + key, [prefix + k for k in out])
        if isinstance(out[key], dict) and out[key] and isinstance(value, dict):
            out[key] = merge_user_config(out[key], value, f"{prefix}{key}.")
        else:
            out[key] = check_kind(prefix + key, out[key], value)
    return out


def load_config(argv: list[str] | None, default: str = "uncountr", positional: str = "") -> tuple[dict, list[str]]:
    """Load the selected (or default) config and apply the overrides; returns (config, positional arguments).

    ``positional`` describes the positional arguments in the ``--help`` usage line (e.g. ``{masks,clusters,all}``).
    """
    argv = list(argv or [])
    if "-h" in argv or "--help" in argv:
        cfg = load_yaml(resolve_config_path(default))
        prefix = f"{positional} " if positional else ""
        print(
            f"usage: {program_name()} {prefix}[--config NAME|PATH] [key=value | --key value ...]"
            f"  (default config: {default})"
        )
        print("shipped configs: " + ", ".join(sorted(p.stem for p in config_dir().glob("*.yaml"))))
        print("keys (defaults):\n" + "\n".join(f"  {k} = {v!r}" for k, v in flatten(cfg).items()))
        raise SystemExit(0)
    config, overrides, rest = split_overrides(argv)
    path = resolve_config_path(default if config is None else config)  # config= (an empty $CFG) is no config
    cfg = load_yaml(path)
    if path.resolve().parent != config_dir().resolve():  # a user's file
        cfg = merge_user_config(load_yaml(resolve_config_path(default)), cfg)
    free = empty_sections(cfg)
    for key, value, raw in overrides:
        set_dotted(cfg, key, value, free, raw)
    train = cfg.get("train")
    if isinstance(train, dict) and train.get("mixed_precision") is False:
        train["mixed_precision"] = "no"  # YAML 1.1 reads `mixed_precision: no` in a file as false
    return cfg, rest


def save_config(cfg: dict, path: str | Path) -> None:
    """Write ``cfg`` to ``path`` as plain YAML (``yaml.safe_dump``), keys in their config order."""
    with open(path, "w") as f:
        yaml.safe_dump(copy.deepcopy(cfg), f, sort_keys=False)
