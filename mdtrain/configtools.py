"""Machinery behind the typed config tree: documented fields, YAML + dotted overrides, validation, dump.

Section dataclasses live next to the code that reads them (``models/config.py`` ...); ``mdtrain.config``
composes them into the root ``Config``. Everything here is generic over dataclasses.
"""
from __future__ import annotations

import dataclasses
import difflib
import io
import os
import stat
import tempfile
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config problem a user can fix; the message names the key, the value and what to do."""


def doc(default: Any, help: str, choices: tuple | None = None, *, ge: float | None = None, gt: float | None = None,
        le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with a one-line doc (shown by ``mdtrain train --help-config``).

    Mutable defaults (lists, dicts) are copied per instance. ``choices`` restricts a string field; ``ge`` / ``gt`` /
    ``le`` / ``lt`` bound a number (each element of a list; None passes), checked by :func:`validate_tree`."""
    meta = {"doc": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if bounds:
        meta["bounds"] = bounds
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda d=default: dataclasses.replace(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


_BOUND_TEXT = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_BOUND_OK = {"ge": lambda v, b: v >= b, "gt": lambda v, b: v > b, "le": lambda v, b: v <= b,
             "lt": lambda v, b: v < b}


def check_bounds(f: dataclasses.Field, value: Any, key: str) -> None:
    """A ConfigError naming ``key`` if ``value`` (or an element of it) is a non-finite float or outside the
    field's declared bounds."""
    import math

    values = value if isinstance(value, (list, tuple)) else [value]
    bounds = f.metadata.get("bounds", {})
    for v in values:
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        for kind, b in bounds.items():
            if not _BOUND_OK[kind](v, b):
                rule = " and ".join(f"{_BOUND_TEXT[k]} {x}" for k, x in bounds.items())
                raise ConfigError(f"{key} must be {rule}, got {value!r}")


def section(cls: type, help: str) -> Any:
    """A nested section field (default-constructed)."""
    return dataclasses.field(default_factory=cls, metadata={"doc": help})


# ----------------------------------------------------------------------------------------------------
# keys


def all_keys(cls_or_obj: Any, prefix: str = "") -> list[str]:
    """Every dotted key (leaves and sections) of a dataclass tree."""
    cls = cls_or_obj if isinstance(cls_or_obj, type) else type(cls_or_obj)
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        out.append(key)
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out.extend(all_keys(tp, key + "."))
    return out


def _unknown(key: str, root: Any) -> ConfigError:
    keys = all_keys(root)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not close:  # also try the last component against leaf names of the same section
        head, _, tail = key.rpartition(".")
        same = [k for k in keys if k.rpartition(".")[0] == head]
        names = [k.rpartition(".")[2] for k in same]
        near = difflib.get_close_matches(tail, names, n=1, cutoff=0.5)
        close = [(head + "." if head else "") + near[0]] if near else []
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown key '{key}'{hint}")


# ----------------------------------------------------------------------------------------------------
# type conversion


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return repr(tp).replace("typing.", "")
    return getattr(tp, "__name__", repr(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or the command line) to ``tp`` or raise a ConfigError naming the key."""
    bad = ConfigError(f"key '{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("null", "none", "~") and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"key '{key}' expects {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):  # "1,2,3" or "[1, 2]" from the command line
            parsed = yaml.safe_load(value if value.strip().startswith("[") else "[" + value + "]")
            value = parsed
        if not isinstance(value, (list, tuple)):
            raise bad
        (inner, *_rest) = get_args(tp) or (Any,)
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                raise bad from None
            if f.is_integer():
                return int(f)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise bad


def _check_choices(f: dataclasses.Field, value: Any, key: str) -> None:
    choices = f.metadata.get("choices")
    if choices is not None and value is not None and value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"key '{key}' must be one of {list(choices)}, got {value!r}{hint}")


# ----------------------------------------------------------------------------------------------------
# building a tree


def from_dict(cls: type, data: dict | None, prefix: str = "", root: Any = None) -> Any:
    """Build ``cls`` from a nested dict, converting types; unknown keys fail naming the closest valid key."""
    root = root if root is not None else cls
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        key = prefix + str(name)
        if name not in fields:
            raise _unknown(key, root)
        tp = hints[name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"key '{key}' is a section; give it a mapping, not {value!r}")
            kwargs[name] = from_dict(tp, value, key + ".", root)
        else:
            kwargs[name] = _coerce(value, tp, key)
            _check_choices(fields[name], kwargs[name], key)
    return cls(**kwargs)


def set_dotted(obj: Any, key: str, raw: Any, root: Any = None) -> None:
    """Apply one override ``a.b.c=value`` in place (value converted to the field's type)."""
    root = root if root is not None else obj
    parts = key.split(".")
    target = obj
    for i, p in enumerate(parts):
        if not dataclasses.is_dataclass(target) or p not in {f.name for f in dataclasses.fields(target)}:
            raise _unknown(key, root)
        if i == len(parts) - 1:
            f = next(f for f in dataclasses.fields(target) if f.name == p)
            tp = typing.get_type_hints(type(target))[p]
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                value = yaml.safe_load(raw) if isinstance(raw, str) else raw
                if not isinstance(value, dict):
                    raise ConfigError(f"key '{key}' is a section; set its fields ({key}.NAME=VALUE)")
                setattr(target, p, from_dict(tp, {**to_dict(getattr(target, p)), **value}, key + ".", root))
                return
            value = _parse_scalar(raw, tp) if isinstance(raw, str) else raw
            value = _coerce(value, tp, key)
            _check_choices(f, value, key)
            setattr(target, p, value)
        else:
            target = getattr(target, p)


def _parse_scalar(raw: str, tp: Any) -> Any:
    """Command-line strings: YAML rules (so 3e-4, true, null, [1,2] work), but keep str fields verbatim."""
    if tp is str:
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def parse_overrides(items: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. optim.lr=3e-4)")
        k, v = item.split("=", 1)
        out.append((k.strip(), v))
    return out


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def validate_tree(obj: Any, prefix: str = "") -> None:
    """Check every field's bounds (``doc(..., ge=...)``) and finiteness, then call ``validate()`` on every section
    that defines one (leaves first, then the root)."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            validate_tree(v, prefix + f.name + ".")
        else:
            check_bounds(f, v, prefix + f.name)
    if hasattr(obj, "validate"):
        obj.validate()


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=False)


def current_umask() -> int:
    """The process's umask, read without changing it (``/proc/self/status`` on Linux; elsewhere set and restored)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(path: str, executable: bool = False) -> int:
    """The mode a plain ``open()`` (or ``mkdir``) under the current umask gives ``path``: 0o666 & ~umask for a file,
    0o777 & ~umask for a directory or with ``executable``."""
    full = 0o777 if executable or os.path.isdir(path) else 0o666
    return full & ~current_umask()


def share_like_open(path: str | os.PathLike) -> None:
    """Give a file that a library wrote 0600 (safetensors, tempfile) the mode ``open()`` would have: colleagues on a
    shared machine read checkpoints and exports as the user's umask allows."""
    path = os.fspath(path)
    os.chmod(path, default_mode(path))


def share_tree_like_open(root: str | os.PathLike) -> None:
    """:func:`share_like_open` for every file and directory under ``root`` (a checkpoint that this process and
    DeepSpeed / DCP wrote); files with the owner's execute bit (DeepSpeed's scripts) keep it, as 0o777 & ~umask."""
    mask = current_umask()
    for d, dirs, files in os.walk(os.fspath(root)):
        os.chmod(d, 0o777 & ~mask)
        for f in files:
            full = os.path.join(d, f)
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode):
                os.chmod(full, (0o777 if st.st_mode & stat.S_IXUSR else 0o666) & ~mask)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so that readers see the old or the new content, never a half-written one; it gets the mode a
    plain ``open()`` would (mkstemp's 0600 would hide it from everyone the umask lets read it)."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-" + os.path.basename(path))
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def describe(cls: type, prefix: str = "") -> str:
    """Every key with its type, default and doc: the text of ``--help-config``."""
    buf = io.StringIO()
    hints = typing.get_type_hints(cls)
    inst = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = prefix + f.name
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            buf.write(f"\n[{key}] {f.metadata.get('doc', '')}\n")
            buf.write(describe(tp, key + "."))
        else:
            default = getattr(inst, f.name)
            choices = f.metadata.get("choices")
            ch = f" {{{'|'.join(map(str, choices))}}}" if choices else ""
            buf.write(f"  {key} = {default!r}  ({_type_name(tp)}{ch})  {f.metadata.get('doc', '')}\n")
    return buf.getvalue()
