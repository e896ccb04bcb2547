"""Reading other projects' weight files without executing anything they contain.

``.safetensors`` files are read by safetensors. ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` files are pickles: they go
through ``torch.load(weights_only=True)`` first, which rebuilds tensors and plain containers only. A PyTorch
Lightning checkpoint usually fails that (its ``hyper_parameters`` hold an OmegaConf config and a tokenizer
object); such a file is then read by :class:`InertUnpickler`, which rebuilds tensors itself and turns every other
class the file names into an inert record of its arguments and state (:class:`Opaque`): nothing named in the file
is imported or called. A file naming a function that could run code (``os.system``, ``builtins.eval``,
``subprocess.*``, ...) is refused outright with :class:`UnsafeCheckpointError`, naming the file and the function.
"""
from __future__ import annotations

import collections
import io
import json
import os
import pickle
import re
import warnings
import zipfile
from typing import Any

import torch


class UnsafeCheckpointError(ValueError):
    """A weight file that cannot be read without executing code it names."""


# Modules whose functions are code-execution gadgets: a checkpoint that names any of them is refused.
_REFUSED_MODULES = ("os", "posix", "nt", "subprocess", "sys", "importlib", "runpy", "shutil", "socket", "pty",
                    "code", "codeop", "pickle", "_pickle", "marshal", "ctypes", "types", "functools", "operator",
                    "webbrowser", "multiprocessing", "tempfile", "pathlib", "io", "_io", "signal", "threading",
                    "asyncio", "inspect", "pydoc", "timeit", "trace", "pdb", "bdb", "torch.serialization",
                    "torch.hub", "torch._C", "torch.jit", "torch.ops", "torch.utils.cpp_extension")
_HARMLESS_BUILTINS = {"set", "frozenset", "slice", "complex", "bytearray", "range"}  # harmless constructors


def _refused(module: str, name: str) -> bool:
    if module in ("builtins", "__builtin__"):
        return name not in _HARMLESS_BUILTINS
    if module == "torch" and name in ("load", "save", "compile", "hub", "ops"):
        return True
    return any(module == m or module.startswith(m + ".") for m in _REFUSED_MODULES)


class Opaque:
    """An object of a class a checkpoint names but that is never imported: what the file says about it, as data.

    ``qualname`` is the class (``module.name``); ``args`` its constructor arguments, ``state`` what
    ``__setstate__`` would have received, ``items`` / ``entries`` what list / dict subclasses were filled with.
    """

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.state, obj.items, obj.entries = args, None, [], {}
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def append(self, value):
        self.items.append(value)

    def extend(self, values):
        self.items.extend(values)

    def __setitem__(self, key, value):
        self.entries[key] = value

    def __repr__(self):
        return f"<opaque {self.qualname}>"


def _opaque_class(qualname: str) -> type:
    return type("Opaque", (Opaque,), {"qualname": qualname})


_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}


class _StorageType:
    """Stands for ``torch.FloatStorage`` etc. in a persistent id: only its dtype is read."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _Stored:
    """One raw buffer of the archive and the dtype its persistent id gives it."""

    def __init__(self, untyped: torch.UntypedStorage, dtype: torch.dtype):
        self.untyped, self.dtype = untyped, dtype


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    if not isinstance(storage, _Stored):
        raise pickle.UnpicklingError("a tensor whose storage is not a stored tensor buffer")
    t = torch.empty((0,), dtype=storage.dtype)
    return t.set_(storage.untyped, storage_offset, torch.Size(size), tuple(stride))


def _rebuild_parameter(data, *unused):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args) if func in (_rebuild_tensor, _rebuild_parameter) else Opaque()


_ALLOWED = {
    "collections.OrderedDict": collections.OrderedDict,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "torch.Size": torch.Size,
    "torch.device": torch.device,
    "builtins.set": set, "builtins.frozenset": frozenset, "builtins.slice": slice, "builtins.complex": complex,
    "builtins.bytearray": bytearray, "builtins.range": range,
}


class InertUnpickler(pickle.Unpickler):
    """Unpickles a ``torch.save`` zip archive's ``data.pkl``: tensors rebuilt from the archive's raw buffers,
    gadget functions refused, every other class an :class:`Opaque` record."""

    def __init__(self, fh, archive: zipfile.ZipFile, prefix: str, path: str):
        super().__init__(fh)
        self.archive, self.prefix, self.path = archive, prefix, path
        self.storages: dict = {}

    def find_class(self, module: str, name: str):
        qual = f"{module}.{name}"
        if qual in _ALLOWED:
            return _ALLOWED[qual]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if _refused(module, name):
            raise UnsafeCheckpointError(
                f"{self.path}: refusing to load: unpickling it would call {qual}, which can execute code. "
                f"Load only checkpoints you trust; re-save its weights with safetensors to import them")
        return _opaque_class(qual)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid[:5]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"storage of unknown type {storage_type!r}")
        if key not in self.storages:
            data = bytearray(self.archive.read(f"{self.prefix}data/{key}"))
            raw = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
            self.storages[key] = _Stored(raw.untyped_storage(), storage_type.dtype)
        return self.storages[key]


def _read_inert(path: str) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if not pkl:
            raise ValueError(f"{path}: a zip file without the data.pkl of a torch.save archive")
        prefix = pkl[0][: -len("data.pkl")]
        order = prefix + "byteorder"
        if order in names and zf.read(order).decode().strip() != "little":
            raise ValueError(f"{path}: a big-endian torch archive; re-save it on a little-endian machine")
        with zf.open(pkl[0]) as fh:
            return InertUnpickler(io.BytesIO(fh.read()), zf, prefix, path).load()


def _named_globals(path: str) -> list:
    """``module.name`` of every class or function a pickle names, read off its opcodes (nothing is executed)."""
    import pickletools

    names, strings = [], []
    try:
        with open(path, "rb") as fh:
            for op, arg, _ in pickletools.genops(fh):
                if op.name == "GLOBAL":
                    names.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # noqa: BLE001 - a malformed stream: report what was read before it
        pass
    return names


def load_pickled(path: str) -> Any:
    """A ``torch.save`` file's contents without executing code (see the module docstring)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickle-protocol notes
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not zipfile.is_zipfile(path):
            found = [g for g in _named_globals(path) if _refused(*g.rsplit(".", 1))]
            named = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = (f"unpickling it would call {found[0]}, which can execute code" if found else
                    f"it names {named.group(1)}" if named else "it holds objects that need code to rebuild")
            raise UnsafeCheckpointError(f"{path}: refusing to load: {what}, and torch's weights-only loader "
                                        "rebuilds tensors and plain containers only; re-save its weights as a "
                                        "plain state dict or with safetensors") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a readable torch checkpoint ({e})") from None
    try:
        return _read_inert(path)
    except (pickle.UnpicklingError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable torch checkpoint ({e})") from None


def load_tensor_file(path: str) -> Any:
    """A weight file by extension: safetensors -> {name: tensor}; anything else through :func:`load_pickled`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    return load_pickled(path)


def load_sharded_safetensors(index_path: str) -> dict:
    """The tensors of every shard a ``model.safetensors.index.json`` lists."""
    try:
        with open(index_path) as fh:
            files = sorted(set(json.load(fh)["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index_path}: not a readable safetensors index ({e})") from None
    out = {}
    for name in files:
        out.update(load_tensor_file(os.path.join(os.path.dirname(index_path), name)))
    return out
