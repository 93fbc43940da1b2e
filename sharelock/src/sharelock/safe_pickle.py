"""Reading PyTorch Lightning `.ckpt` files (the official ShareLock weights) without running code from them.

`torch.load(weights_only=True)` is tried first. Lightning checkpoints often also hold objects (an OmegaConf
`DictConfig` of hyper-parameters, its class as `hparams_type`) that it refuses; then a restricted unpickler reads the
file: tensors and plain containers are rebuilt, an object of any other class becomes an `Opaque` record of its class
name and pickled data (no class is imported, no `__setstate__` of theirs runs), and a call to any function or class
outside a short allow-list (the usual payload of a malicious pickle) is refused with an error naming it.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import pickle
import types
from pathlib import Path
from typing import Any

import torch

# the only callables a checkpoint may invoke while loading: tensor rebuilding and plain containers
ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,  # OmegaConf's resolver cache
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): codecs.encode,  # bytes under pickle protocol 2
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
}


class Opaque:
    """A stored object whose class is never imported: `qualname`, and the data pickle gave it (`state`, dict items
    `mapping`, list items `sequence`). Created only through `__new__` (pickle's NEWOBJ); calling the class, i.e.
    running the stored object's constructor or a stored function, is refused."""

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:
        obj = super().__new__(cls)
        obj.state, obj.mapping, obj.sequence = None, {}, []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise pickle.UnpicklingError(
            f"the file calls {self.qualname}(...) while loading; refusing to run it (only tensors, plain containers "
            "and the data of stored objects are read)"
        )

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.mapping[key] = value

    def append(self, value: Any) -> None:
        """A list item of the stored object (pickle's APPEND), kept in `sequence`."""
        self.sequence.append(value)

    def extend(self, values: Any) -> None:
        """List items of the stored object (pickle's APPENDS), kept in `sequence`."""
        self.sequence.extend(values)

    def __repr__(self) -> str:
        return f"<{self.qualname}>"


_OPAQUE: dict[str, type] = {}  # one stand-in class per requested name


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose globals are the allow-list or `Opaque` subclasses named after the requested class."""

    def find_class(self, module: str, name: str) -> Any:
        """An allow-listed callable, else an `Opaque` subclass named `module.name` (nothing is imported)."""
        # protocol-2 files (torch.save's default) name builtins the Python 2 way (`__builtin__.set`)
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[module, name]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in ALLOWED:
            return ALLOWED[module, name]
        qualname = f"{module}.{name}"
        if qualname not in _OPAQUE:
            _OPAQUE[qualname] = type(name, (Opaque,), {"qualname": qualname})
        return _OPAQUE[qualname]


def _restricted_module() -> types.ModuleType:
    module = types.ModuleType("sharelock_restricted_pickle")  # torch.load's `pickle_module`
    module.Unpickler = RestrictedUnpickler
    module.load = lambda f, **kwargs: RestrictedUnpickler(f, **kwargs).load()
    return module


def load_checkpoint(path: str | Path) -> Any:
    """The object stored in a PyTorch/Lightning checkpoint, read without running code from it (see the module doc)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a folder, expected a Lightning .ckpt file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # objects beyond weights_only's set, e.g. an OmegaConf config among the hyper-parameters
    except RuntimeError as err:  # not a zip archive: a truncated download, or another kind of file
        raise ValueError(f"cannot read checkpoint {path}: {err}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_module())
    except Exception as err:  # a refused call, or a file that is not a checkpoint
        raise ValueError(f"cannot read checkpoint {path}: {err}") from None


def plain(obj: Any) -> Any:
    """`obj` as plain data (dict/list/str/number/bool/None); OmegaConf containers and value nodes are read from
    their pickled data (`_content`, `_val`), dict or list subclasses from their items. What stays not plain (tensors,
    other objects) is returned as it is."""
    if isinstance(obj, Opaque):
        state = obj.state if isinstance(obj.state, dict) else {}
        if "_content" in state:  # omegaconf DictConfig / ListConfig
            return plain(state["_content"])
        if "_val" in state:  # omegaconf value node
            return plain(state["_val"])
        if obj.mapping or obj.sequence:  # e.g. Lightning's AttributeDict (a dict subclass)
            return plain(obj.mapping) if obj.mapping else plain(obj.sequence)
        return obj
    if isinstance(obj, dict):
        return {key: plain(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(value) for value in obj]
    return obj
