"""Reading checkpoint files without executing anything in them, whatever engine wrote them.

A pickle is a program: its ``GLOBAL`` opcodes name callables that ``REDUCE`` calls, so a crafted checkpoint file can
run code the moment it is unpickled. torch's DCP reads ``dcp/.metadata`` with plain ``pickle.load`` and the
non-tensor entries of its ``.distcp`` files (the optimizer's ``param_groups``) with ``torch.load(weights_only=False)``;
DeepSpeed loads its files with ``weights_only=False``. Here:

* :class:`SafeReader` (a DCP ``StorageReader``) unpickles ``.metadata`` with a restricted unpickler that admits only
  the classes DCP's metadata is made of, reads every entry with ``torch.load(weights_only=True)``, refuses storage
  entries that point outside the checkpoint or past the end of a file, and is the only reader mdtrain gives DCP;
* :func:`torch_file` is ``torch.load(weights_only=True)`` (plus an explicit allowlist where DeepSpeed needs one);
* :func:`scan_checkpoint` proves, before anything is loaded, that every pickle of a checkpoint directory (client
  state, EMA fragments, DeepSpeed files, DCP metadata and bytes entries) references only admitted globals. It reads
  the pickles, never the tensor data (``mmap``), so it costs little even for a large checkpoint.

Every refusal is a :class:`~mdtrain.faults.CheckpointError` naming the file.
"""
from __future__ import annotations

import importlib
import io
import os
import pickle
import re
import stat
from typing import Any, Callable, Iterable

import torch

from mdtrain.faults import CheckpointError

ADVICE = "mdtrain never loads a checkpoint file that could run code; restore the checkpoint from a trusted copy"


def reason(e: BaseException) -> str:
    """One line out of torch's (multi-paragraph) weights-only refusal, or the exception's first line."""
    text = str(e)
    for line in text.splitlines():
        low = line.lower()
        if "unsupported" in low or "not an allowed" in low or "blocked" in low:
            return line.strip()
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(e).__name__}: {first}"


def check_regular(path: str) -> os.stat_result:
    """The file's stat; a CheckpointError if it is missing, a symlink, a device or anything but a regular file."""
    try:
        st = os.lstat(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"refusing to read {path}: not a regular file (a symlink, device or directory); "
                              f"a checkpoint holds regular files only")
    return st


def torch_file(path: str, allowed: Iterable = (), mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` admitting also the globals ``allowed``; refusals name the file."""
    check_regular(path)
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - any refusal or damage: this file is not loaded
        raise CheckpointError(f"refusing to load {path}: {reason(e)}. {ADVICE}") from None


def torch_bytes(data: bytes, where: str) -> Any:
    """``torch.load(weights_only=True)`` of one serialized object held in memory (a DCP bytes entry)."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"refusing to load {where}: {reason(e)}. {ADVICE}") from None


def deepspeed_globals() -> list:
    """The globals DeepSpeed's checkpoint pickles legitimately reference (beyond tensors and containers)."""
    import argparse
    import collections

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [collections.OrderedDict, argparse.Namespace, LossScaler, DynamicLossScaler, ZeroStageEnum,
            fragment_address]


# ------------------------------------------------------------------------------------------------------------------
# DCP metadata: the only globals a .metadata pickle legitimately names

_DCP_MD = "torch.distributed.checkpoint.metadata"
_METADATA_GLOBALS = {
    (_DCP_MD, name) for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                                 "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # called with a layout's name, e.g. "torch.strided"
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, fh, path: str):
        super().__init__(fh)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS:
            return getattr(importlib.import_module(module), name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(f"refusing to load {self.path}: it references {module}.{name}, which DCP metadata "
                              f"never holds (a file crafted to run code?). {ADVICE}")

    def persistent_load(self, pid):
        raise CheckpointError(f"refusing to load {self.path}: persistent ids do not occur in DCP metadata")


def dcp_metadata(dcp_dir: str):
    """The ``Metadata`` of the DCP checkpoint in ``dcp_dir``, unpickled with the restricted unpickler."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = os.path.join(dcp_dir, ".metadata")
    check_regular(path)
    try:
        with open(path, "rb") as fh:
            md = _MetadataUnpickler(fh, path).load()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated, not a pickle, ...
        raise CheckpointError(f"{path}: not a readable DCP metadata file ({reason(e)})") from None
    if not isinstance(md, Metadata) or not isinstance(getattr(md, "storage_data", None), dict):
        raise CheckpointError(f"{path}: not DCP metadata (it holds a {type(md).__name__})")
    return md


def _check_storage(dcp_dir: str, md) -> dict:
    """Every storage entry names a plain file of ``dcp_dir`` and a byte range inside it: {file: size}."""
    sizes: dict = {}
    for index, info in md.storage_data.items():
        rel = getattr(info, "relative_path", None)
        where = f"{os.path.join(dcp_dir, '.metadata')} (entry {getattr(index, 'fqn', index)!r})"
        if not isinstance(rel, str) or not rel or rel != os.path.basename(rel) or rel.startswith("."):
            raise CheckpointError(f"refusing to load {where}: it points to {rel!r}, outside the checkpoint's files")
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"refusing to load {where}: stream transforms {info.transform_descriptors} are "
                                  f"not used by mdtrain checkpoints")
        if rel not in sizes:
            sizes[rel] = check_regular(os.path.join(dcp_dir, rel)).st_size
        off, length = getattr(info, "offset", -1), getattr(info, "length", -1)
        if not (isinstance(off, int) and isinstance(length, int) and 0 <= off and 0 <= length
                and off + length <= sizes[rel]):
            raise CheckpointError(f"refusing to load {where}: bytes {off}..{off}+{length} lie outside {rel} "
                                  f"({sizes[rel]} bytes; truncated or crafted)")
    return sizes


def scan_dcp(dcp_dir: str):
    """Check the metadata and every non-tensor (bytes) entry of a DCP checkpoint without loading any tensor."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    md = dcp_metadata(dcp_dir)
    _check_storage(dcp_dir, md)
    for fqn, meta in md.state_dict_metadata.items():
        if isinstance(meta, BytesStorageMetadata):
            info = md.storage_data[MetadataIndex(fqn)]
            path = os.path.join(dcp_dir, info.relative_path)
            with open(path, "rb") as fh:
                fh.seek(info.offset)
                torch_bytes(fh.read(info.length), f"{path} (entry {fqn!r})")
    return md


class _Window(io.RawIOBase):
    """Bytes [offset, offset + length) of an open file, as a seekable file of its own (what torch.load reads)."""

    def __init__(self, fh, offset: int, length: int):
        super().__init__()
        self.fh, self.offset, self.length, self.pos = fh, offset, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, pos, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = min(max(0, base + pos), self.length)
        return self.pos

    def readinto(self, b):
        n = min(len(b), self.length - self.pos)
        if n <= 0:
            return 0
        self.fh.seek(self.offset + self.pos)
        got = self.fh.readinto(memoryview(b)[:n])
        self.pos += got
        return got


def _make_reader_classes():
    from torch.distributed._shard._utils import narrow_tensor_by_index
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.planner import LoadItemType
    from torch.distributed.checkpoint.metadata import StorageMeta
    from torch.futures import Future

    class SafeLoadPlanner(DefaultLoadPlanner):
        """DCP's default load planner, but non-tensor entries are read with ``weights_only=True``."""

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            obj = torch.load(value, map_location="cpu", weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element  # noqa: PLC0415
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    class SafeReader(FileSystemReader):
        """torch's filesystem reader with the restricted metadata unpickler and weights-only entries (module doc)."""

        def read_metadata(self, *args, **kwargs):
            dcp_dir = str(self.path)
            if kwargs.get("rank") is not None:
                raise CheckpointError(f"{dcp_dir}: per-rank DCP metadata is not used by mdtrain checkpoints")
            md = dcp_metadata(dcp_dir)
            _check_storage(dcp_dir, md)
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

        def read_data(self, plan, planner):
            if not isinstance(planner, SafeLoadPlanner):
                raise TypeError("SafeReader reads with SafeLoadPlanner only (DCP's default one unpickles code)")
            per_file: dict = {}
            for item in plan.items:
                per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
            for rel, items in per_file.items():
                path = os.path.join(str(self.path), rel)
                check_regular(path)
                with open(path, "rb") as fh:
                    for req in sorted(items, key=lambda r: self.storage_data[r.storage_index].offset):
                        info = self.storage_data[req.storage_index]
                        where = f"{path} (entry {req.storage_index.fqn!r})"
                        if req.type == LoadItemType.BYTE_IO:
                            fh.seek(info.offset)
                            data = fh.read(info.length)
                            torch_bytes(data, where)  # refuses before the planner sees it
                            planner.load_bytes(req, io.BytesIO(data))
                            continue
                        try:
                            tensor = torch.load(io.BufferedReader(_Window(fh, info.offset, info.length)),
                                                map_location="cpu", weights_only=True)
                        except Exception as e:  # noqa: BLE001
                            raise CheckpointError(f"refusing to load {where}: {reason(e)}. {ADVICE}") from None
                        if not isinstance(tensor, torch.Tensor):
                            raise CheckpointError(f"{where}: a tensor entry holds a {type(tensor).__name__}")
                        tensor = narrow_tensor_by_index(tensor, req.storage_offsets, req.lengths)
                        target = planner.resolve_tensor(req).detach()
                        if target.size() != tensor.size():
                            raise CheckpointError(f"{where}: holds shape {tuple(tensor.size())}, this model "
                                                  f"expects {tuple(target.size())}")
                        target.copy_(tensor)
                        planner.commit_tensor(req, target)
            fut: Future = Future()
            fut.set_result(None)
            return fut

    return SafeReader, SafeLoadPlanner


_CLASSES: list = []


def dcp_load(state: dict, dcp_dir: str, **kwargs) -> None:
    """``torch.distributed.checkpoint.load`` through :class:`SafeReader` (fills ``state`` in place)."""
    import torch.distributed.checkpoint as dcp

    if not _CLASSES:
        _CLASSES.extend(_make_reader_classes())
    reader_cls, planner_cls = _CLASSES
    try:
        dcp.load(state, storage_reader=reader_cls(dcp_dir), planner=planner_cls(), **kwargs)
    except CheckpointError:
        raise
    except (Exception, dcp_exception()) as e:  # DCP wraps every rank's read error (a BaseException): surface ours
        inner = _inner_refusal(e)
        if inner is None:
            raise
        raise CheckpointError(str(inner)) from None


def dcp_exception() -> type:
    from torch.distributed.checkpoint.api import CheckpointException
    return CheckpointException


def _inner_refusal(e: BaseException):
    seen, stack = set(), [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, CheckpointError):
            return x
        for f in (getattr(x, "failures", None) or {}).values():  # rank -> (exception, traceback)
            inner = f[0] if isinstance(f, tuple) and f else getattr(f, "exc", f)
            stack.append(inner if isinstance(inner, BaseException) else None)
        stack.extend([x.__cause__, x.__context__])
    return None


# ------------------------------------------------------------------------------------------------------------------
# the whole checkpoint, before anything is loaded

_OWNER_RES = (re.compile(r"rank_(\d+)\.pt$"), re.compile(r"__(\d+)_\d+\.distcp$"))
_DS_OPTIM = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_")
_DS_MODEL = re.compile(r"(?:^|/)mp_rank_(\d+)_model_states\.pt$")


def file_owner(rel: str, world_size: int, tp_size: int = 1) -> int:
    """The rank that wrote ``rel`` (and so hashes it, from its page cache): from the rank in the file name
    (client/ema ``rank_N.pt``, DCP ``__N_0.distcp``, DeepSpeed ``zero_pp_rank_D_mp_rank_T``), else rank 0."""
    for pattern in _OWNER_RES:
        m = pattern.search(rel)
        if m:
            return int(m.group(1)) % world_size
    m = _DS_OPTIM.search(rel)
    if m:
        return (int(m.group(1)) * tp_size + int(m.group(2))) % world_size
    m = _DS_MODEL.search(rel)
    if m:
        return int(m.group(1)) % world_size
    return 0



def _files(root: str) -> list[str]:
    out = []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        out.extend(os.path.join(d, f) for f in sorted(files))
    return out


def scan_checkpoint(path: str, mine: Callable[[str], bool] = lambda rel: True) -> None:
    """Refuse (CheckpointError naming the file) a checkpoint directory any of whose pickles names a global that
    plain tensor data does not need: ``*.pt`` files (DeepSpeed's with DeepSpeed's allowlist), DCP metadata and
    DCP bytes entries. Tensor data is not read. ``mine(rel)``: scan only those files (a rank's share)."""
    ds_allowed = None
    for f in _files(path):
        rel = os.path.relpath(f, path)
        if not mine(rel):
            continue
        if os.path.basename(f) == ".metadata" and os.path.dirname(rel) == "dcp":
            scan_dcp(os.path.dirname(f))
        elif f.endswith(".pt"):
            if rel.split(os.sep)[0] == "deepspeed":
                if ds_allowed is None:
                    ds_allowed = deepspeed_globals()
                torch_file(f, ds_allowed, mmap=True)
            else:
                torch_file(f, mmap=True)
