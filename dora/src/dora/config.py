"""YAML configs with ``key=value`` / ``--key value`` overrides (dotted keys for nested sections)."""

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

DEFAULT_CONFIG = "wt_venice.yaml"


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


# number keys that also take a list: one probability per global view
PER_VIEW = ("augment.global_blur_p", "augment.global_solarize_p")


# number and text keys whose null (also an empty `key=`) means something; null is refused for the others
NULLABLE = frozenset(
    {
        "keep_checkpoints",  # null: keep every checkpoint
        "keep_every_epochs",  # null: no epoch milestones kept beside the newest checkpoints
        "optim.steps_per_epoch",  # null: the whole video dataset per epoch
        "optim.clip_grad",  # null (as 0): no gradient clipping
        "augment.precrop_size",  # null: no pre-crop (the DINO baseline's config)
        "data.decode_short_side",  # null: decode at the video's full resolution
        "data.seek_gap",  # null: 4 x data.step
    }
)


# keys left null in some config that hold text (a path, a name, `latest`) when set: the kind their default
# cannot tell; a number or date keeps its text, false or null leaves them unset, true is an error
TEXT = frozenset(
    {
        "run_dir",  # null: runs/dora/<name>
        "resume",  # latest | PATH
        "data.cache_dir",  # a folder of decoded frames
        "checkpoint",  # dora-eval and dora-visualise: a run or checkpoint
        "out_dir",  # null in eval.yaml: runs/dora/eval/<name>
        "video",  # dora-visualise: a video file or frame folder
        "arch",  # dora-eval and dora-visualise: a timm name (null: the checkpoint's own)
    }
)


def _check_kind(dotted: str, old: Any, value: Any, raw: str | None = None) -> Any:
    """Refuse an override or config-file value that cannot mean what the key holds: a scalar for a whole section, a
    bare string for a list (``tasks=knn`` would read as the letters k, n, n), a flag, string, list or mapping for a
    number (``optim.epochs=true``; ``PER_VIEW`` keys take a list), anything but true/false for a flag
    (``model.norm_last_layer=flase`` would read as true), or null for a number or string key that ``NULLABLE`` does
    not list. Where YAML reads a number or a boolean for a string key, the key keeps ``raw``, the text typed on the
    command line (``name=2024``, ``name=yes``); in a file a number becomes its text and a boolean is an error (quote
    it). False is "no" for a ``mixed_precision`` key and null for a ``NULLABLE`` key whose default is text or null
    (``data.val_split=false``). A ``TEXT`` key left null holds text: a number or date keeps ``raw`` (in a file,
    its text), false or null leaves it unset (``run_dir=off``) and true is an error."""
    if dotted in TEXT and old is None and not isinstance(value, str | list | dict):  # run_dir=2024 / off / on
        if value is True:
            raise ValueError(f"{dotted}=True: expected text (a path or name), or null")
        return None if value is None or value is False else (raw.strip() if raw is not None else str(value))
    if value is None and isinstance(old, int | float | str) and not isinstance(old, bool) and dotted not in NULLABLE:
        kind = "text" if isinstance(old, str) else "a number"
        raise ValueError(f"{dotted}=null: expected {kind}, not null or an empty value (default {old!r})")
    if isinstance(old, dict) and old and not isinstance(value, dict):
        raise ValueError(
            f"{dotted}={value!r}: {dotted} is a section; set its keys, e.g. {dotted}.{next(iter(old))}=..."
        )
    if isinstance(old, list) and isinstance(value, str):
        raise ValueError(f"{dotted}={value!r}: expected a list, e.g. {dotted}=[{value}]")
    if isinstance(old, bool) and not isinstance(value, bool):
        raise ValueError(f"{dotted}={value!r}: expected true or false")
    if isinstance(old, (int, float)) and not isinstance(old, bool) and isinstance(value, (bool, str, list, dict)):
        if not (isinstance(value, list) and dotted in PER_VIEW):
            raise ValueError(f"{dotted}={value!r}: expected a number")
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


def empty_sections(cfg: dict, prefix: str = "") -> set[str]:
    """Dotted names of the empty mappings of ``cfg``: free-form sections (extra keyword arguments such as
    ``model.overrides``) to which an override may add keys."""
    out: set[str] = set()
    for key, value in cfg.items():
        if isinstance(value, dict):
            out |= empty_sections(value, f"{prefix}{key}.") if value else {prefix + key}
    return out


def set_key(cfg: dict, dotted: str, value: Any, free: Collection[str] = (), raw: str | None = None) -> None:
    """Set ``a.b.c`` in a nested dict; unknown keys raise a KeyError listing the valid keys (new keys are welcome
    in the ``free`` sections, see ``empty_sections``), an override of the wrong kind (``_check_kind``, ``raw``: the
    text typed) a ValueError."""
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
            node[part] = _check_kind(dotted, node[part], value, raw)
        else:
            node = node[part]


class ConfigLoader(yaml.SafeLoader):
    """YAML safe loader that also reads exponent floats without a dot (``1e-4``, which YAML 1.1 leaves a string)."""


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)

MIXED_PRECISION = ("no", "fp16", "bf16", "fp8")
METHODS = ("dora", "dino")


def parse_value(raw: str) -> Any:
    """YAML scalar/list/dict of a command-line value (``1e-4`` is a float)."""
    try:
        value = yaml.load(raw, Loader=ConfigLoader)
    except yaml.YAMLError as err:  # an unclosed [ or {, a stray character
        raise ValueError(f"cannot parse {raw!r} as a YAML value: {getattr(err, 'problem', None) or err}") from None
    if isinstance(value, dict) and any(isinstance(k, str) and ":" in k and v is None for k, v in value.items()):
        raise ValueError(f"{raw!r}: YAML reads 'key:value' without a space as one key; write {{key: value, ...}}")
    return value


def read_yaml(path: str | Path) -> dict:
    """The YAML mapping of a config file (an empty file gives {}); ValueError naming it if it is not valid YAML or
    not a mapping."""
    with open(path) as f:
        try:
            data = yaml.load(f, Loader=ConfigLoader) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"config {path} is not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must be a YAML mapping of keys to values, got a {type(data).__name__}")
    return data


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


def _check(cfg: dict) -> None:
    """Undo YAML 1.1 booleans where a string is meant (``mixed_precision: no`` reads as False); check that the
    training ``method`` and the number of global views agree."""
    if "method" in cfg:
        method, views = cfg["method"], cfg.get("augment", {}).get("num_global_crops", 1)
        if method not in METHODS:
            raise ValueError(f"method={method!r}: expected one of {', '.join(METHODS)}")
        if (method == "dora") != (views == 1):
            need = "1 (the teacher tracks objects in one global view)" if method == "dora" else "2 or more"
            raise ValueError(f"augment.num_global_crops={views} with method={method}: expected {need}")
    optim = cfg.get("optim")
    if isinstance(optim, dict) and "mixed_precision" in optim:
        value = optim["mixed_precision"]
        if value is False:
            optim["mixed_precision"] = "no"
        elif value not in MIXED_PRECISION:
            raise ValueError(f"optim.mixed_precision={value!r}: expected one of {', '.join(MIXED_PRECISION)}")


def parse_overrides(argv: list[str]) -> tuple[str | None, list[tuple[str, Any, str]]]:
    """Split argv into (config path or None, [(dotted key, yaml-parsed value, text typed), ...]); an empty value is
    null."""
    config, pairs, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            body = arg[2:]
            if "=" in body:
                key, raw = body.split("=", 1)
            else:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
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
            pairs.append((key, parse_value(raw), raw))
        i += 1
    return config, pairs


def print_help(default: str) -> None:
    """Print the usage, the shipped configs and every key of config ``default`` (the one ``--config`` names, else
    the script's default) with its value."""
    with open(config_path(default)) as f:
        cfg = yaml.load(f, Loader=ConfigLoader) or {}
    names = sorted(p.stem for p in Path(str(resources.files("dora") / "configs")).glob("*.yaml"))
    print(f"usage: {program_name()} [--config NAME|PATH] [key=value | --key value ...]  (default config: {default})")
    print("shipped configs: " + ", ".join(names))
    print("keys (defaults):\n" + "\n".join(f"  {k} = {get_key(cfg, k)!r}" for k in _flat_keys(cfg)))


_REQUIRED = object()


def get_key(cfg: dict, dotted: str, default: Any = _REQUIRED) -> Any:
    """``cfg[a][b]`` for ``dotted = 'a.b'``; ``default`` if a part is missing (a KeyError without one)."""
    for part in dotted.split("."):
        if default is not _REQUIRED and (not isinstance(cfg, dict) or part not in cfg):
            return default
        cfg = cfg[part]
    return cfg


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
            out[key] = _check_kind(prefix + key, out[key], value)
    return out


def load_config(argv: list[str] | None = None, default: str = DEFAULT_CONFIG) -> dict:
    """Resolve a config: the YAML given by ``--config`` / ``config=`` (else ``default``) plus overrides.

    ``--help`` / ``-h`` prints the keys with their defaults and exits with status 0.
    """
    argv = list(argv or [])
    if "--help" in argv or "-h" in argv:
        config, _ = parse_overrides([a for a in argv if a not in ("--help", "-h")])
        print_help(config or default)
        raise SystemExit(0)
    config, pairs = parse_overrides(argv)
    path = config_path(default if config is None else config)  # config= (an empty $CFG) is no config
    cfg = read_yaml(path)
    if path.resolve().parent != Path(str(resources.files("dora") / "configs")).resolve():  # a user's file
        cfg = merge_user_config(read_yaml(config_path(default)), cfg)
    cfg, free = copy.deepcopy(cfg), empty_sections(cfg)
    for key, value, raw in pairs:
        set_key(cfg, key, value, free, raw)
    _check(cfg)
    return cfg


def save_config(cfg: dict, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
