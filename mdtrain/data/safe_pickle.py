"""Read numeric data out of Python pickles without executing anything they contain (CIFAR's python batches).

A pickle is a program: every ``GLOBAL`` opcode names a callable the unpickler fetches and every ``REDUCE`` calls it,
so ``pickle.load`` on a downloaded file runs whatever the file says. :func:`load_plain_pickle` runs the standard
unpickler with :meth:`find_class` restricted to five names, each mapped to a function of this module rather than
to the real one: numpy's array and dtype reconstruction (``_reconstruct``, ``ndarray``, ``dtype``,
``_frombuffer``) and ``_codecs.encode`` (how Python 3 writes bytes at protocol 2). Those stand-ins only record
their arguments; after the load, :func:`_materialise` turns the records into arrays with ``np.frombuffer`` for plain
numeric dtypes (no object, structured or void arrays, whose reconstruction would be arbitrary code again).
Everything else a pickle can build without a global (dicts, lists, tuples, ints, floats, strings, bytes) is inert.
Any other global is refused with :class:`UnsafePickleError` naming it.
"""
from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np

# numeric kinds an array may have: bool, signed / unsigned integers, floats
_NUMERIC_KINDS = "biuf"


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references something beyond plain containers and numeric numpy arrays."""


class _NDArrayType:
    """Stands in for ``numpy.ndarray`` as the first argument of ``_reconstruct``."""


_NDARRAY = _NDArrayType()


class _DTypeRecord:
    def __init__(self, name, align=False, copy=True):
        if isinstance(name, bytes):
            name = name.decode("ascii", errors="replace")
        if not isinstance(name, str):
            raise UnsafePickleError(f"numpy dtype given as {type(name).__name__}, expected a type string")
        self.name, self.byteorder = name, "="

    def __setstate__(self, state):
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags) since numpy's version 3
        if isinstance(state, tuple) and len(state) >= 2 and isinstance(state[1], (str, bytes)):
            order = state[1].decode("ascii") if isinstance(state[1], bytes) else state[1]
            if order not in "<>=|" or len(order) != 1:
                raise UnsafePickleError(f"numpy dtype with byte order {order!r}")
            if len(state) >= 5 and any(s is not None for s in state[2:5]):
                raise UnsafePickleError("structured or sub-array numpy dtype (only plain numeric arrays are read)")
            self.byteorder = order
        else:
            raise UnsafePickleError(f"unrecognised numpy dtype state {type(state).__name__}")

    def resolve(self) -> np.dtype:
        try:
            dt = np.dtype(self.name)
        except TypeError:
            raise UnsafePickleError(f"unknown numpy dtype {self.name!r}") from None
        if dt.kind not in _NUMERIC_KINDS or dt.fields is not None or dt.subdtype is not None:
            raise UnsafePickleError(f"numpy dtype {self.name!r} (kind {dt.kind!r}) is not a plain numeric type")
        return dt.newbyteorder(self.byteorder) if self.byteorder in "<>" else dt


class _ArrayRecord:
    """What ``_reconstruct(ndarray, ...)`` / ``_frombuffer`` return; filled by BUILD's ``__setstate__``."""

    def __init__(self):
        self.state = None

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise UnsafePickleError("unrecognised numpy array state")
        if len(state) == 5:  # (version, shape, dtype, is_fortran, data)
            state = state[1:]
        self.state = state


def _reconstruct(cls, shape, typecode):
    if cls is not _NDARRAY:
        raise UnsafePickleError("numpy _reconstruct of something other than an ndarray")
    return _ArrayRecord()


def _frombuffer(buf, dtype, shape, order):
    rec = _ArrayRecord()
    rec.state = (shape, dtype, order == "F", buf)
    return rec


def _codecs_encode(text, encoding="utf-8"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,   # numpy < 2 (CIFAR's own files)
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # numpy >= 2
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DTypeRecord,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,        # protocol 5
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _codecs_encode,                     # bytes written by Python 3 at protocol <= 2
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        fn = _ALLOWED.get((module, name))
        if fn is None:
            raise UnsafePickleError(f"it references {module}.{name}, which a data file has no reason to contain "
                                    f"(refused: only plain containers and numeric numpy arrays are read)")
        return fn

    def persistent_load(self, pid):
        raise UnsafePickleError("it uses persistent ids (refused)")


def _array(rec: _ArrayRecord) -> np.ndarray:
    if rec.state is None:
        raise UnsafePickleError("a numpy array without its data")
    shape, dtype, fortran, data = rec.state
    if not isinstance(dtype, _DTypeRecord):
        raise UnsafePickleError("a numpy array whose dtype is not a numpy dtype")
    dt = dtype.resolve()
    if not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)):
        raise UnsafePickleError(f"a numpy array with shape {shape!r}")
    if isinstance(data, str):  # Python 2 str read with encoding='latin1'
        data = data.encode("latin1")
    if isinstance(data, pickle.PickleBuffer):
        data = bytes(data)
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError(f"a numpy array whose data is a {type(data).__name__}, not raw bytes")
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) != count * dt.itemsize:
        raise UnsafePickleError(f"a numpy array of shape {shape} {dt} holds {len(data)} bytes, expected "
                                f"{count * dt.itemsize}")
    arr = np.frombuffer(bytes(data), dtype=dt, count=count)
    return arr.reshape(shape, order="F" if fortran else "C")


def _materialise(obj: Any) -> Any:
    if isinstance(obj, _ArrayRecord):
        return _array(obj)
    if isinstance(obj, (_DTypeRecord, _NDArrayType)):
        raise UnsafePickleError("a bare numpy type outside an array")
    if isinstance(obj, dict):
        return {_materialise(k): _materialise(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialise(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialise(v) for v in obj)
    return obj


def load_plain_pickle(data: bytes) -> Any:
    """Unpickle ``data`` admitting only containers, scalars, strings, bytes and numeric numpy arrays.

    Python 2 strings come back as ``bytes`` (CIFAR's keys are ``b"data"``, ``b"labels"``). Raises
    :class:`UnsafePickleError` for anything else, before any of it is called, and ``pickle.UnpicklingError`` /
    ``EOFError`` / ``ValueError`` for a file that is not a pickle or is truncated.
    """
    return _materialise(_RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load())
