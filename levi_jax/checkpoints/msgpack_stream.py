"""Flax's msgpack checkpoint encoding, read as a stream and written.

Flax (`flax.serialization.msgpack_serialize`) writes a nested map whose array
leaves are msgpack extension values (`shape, dtype name, bytes`), splitting
arrays over 2**30 bytes into `__msgpack_chunked_array__` maps. T5X's legacy
`checkpoint` files and Hugging Face's `flax_model.msgpack` both use it.
`read` walks the file as a stream and decodes only the wanted subtrees, so the
rest is skipped without being decoded into memory.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import msgpack
import numpy as np

from levi_jax.checkpoints.common import Flat

# Flax's msgpack ext codes (flax/serialization.py `_MsgpackExtType`).
_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR = 1, 2, 3
# msgpack buffers one whole value; flax's values stay under 2**30 bytes.
_MAX_BUFFER = 2**31 - 1
_CHUNKED = "__msgpack_chunked_array__"


def wanted(name: str, prefixes: Sequence[str]) -> bool:
  """Whether `name` lies under one of the '/'-joined `prefixes`."""
  return any(name.startswith(p) or name + "/" == p for p in prefixes)


def is_ts_spec(node: Any) -> bool:
  """Whether a decoded map is a tensorstore spec (T5X's array reference)."""
  return isinstance(node, dict) and {"driver", "kvstore"} <= node.keys()


def _ext_hook(code: int, data: bytes) -> Any:
  """Decodes flax's extension types (arrays, numpy scalars, complex)."""
  if code in (_EXT_NDARRAY, _EXT_NPSCALAR):
    shape, dtype, buf = msgpack.unpackb(data, raw=True)
    arr = np.frombuffer(buf, dtype=jnp.dtype(dtype.decode())).reshape(shape)
    return arr if code == _EXT_NDARRAY else arr[()]
  if code == _EXT_COMPLEX:
    real, imag = msgpack.unpackb(data)
    return complex(real, imag)
  return msgpack.ExtType(code, data)


def ext_pack(x: Any) -> Any:
  """Flax's encoding of numpy arrays and scalars (a msgpack `default`)."""
  if isinstance(x, (np.ndarray, np.generic)):
    arr = np.asarray(x)
    data = msgpack.packb((arr.shape, arr.dtype.name, arr.tobytes()), use_bin_type=True)
    return msgpack.ExtType(_EXT_NDARRAY if isinstance(x, np.ndarray) else _EXT_NPSCALAR,
                           data)
  raise TypeError(f"cannot write {type(x)} in flax's msgpack encoding")


def _is_chunked(node: Any) -> bool:
  return isinstance(node, dict) and _CHUNKED in node


def _unchunk(node: dict) -> np.ndarray:
  """Reassembles an array that flax split into chunks."""
  shape = tuple(node["shape"][str(i)] for i in range(len(node["shape"])))
  chunks = [node["chunks"][str(i)] for i in range(len(node["chunks"]))]
  return np.concatenate(chunks).reshape(shape)


def _leaves(tree: dict) -> Flat:
  """Flattens to '/'-joined names; tensorstore specs and chunked arrays are leaves."""
  out: Flat = {}

  def visit(prefix, node):
    for k, v in node.items():
      name = f"{prefix}/{k}" if prefix else k
      if isinstance(v, dict) and not (is_ts_spec(v) or _is_chunked(v)):
        visit(name, v)
      else:
        out[name] = v

  visit("", tree)
  return out


def read(file: str, prefixes: Sequence[str]) -> tuple[Flat, list[str]]:
  """Reads the leaves under `prefixes` from a flax msgpack file.

  Returns:
    `({name: leaf}, names)`: the wanted leaves (arrays, scalars, or tensorstore
    spec dicts), and the names of all leaves in the file. Other leaves are
    skipped undecoded.
  """

  def visit(unpacker, name: str):
    try:
      n = unpacker.read_map_header()
    except msgpack.UnpackValueError:  # Not a map: a leaf.
      if wanted(name, prefixes):
        return unpacker.unpack()
      unpacker.skip()
      return None
    node = {}
    for _ in range(n):
      key = unpacker.unpack()
      key = key.decode() if isinstance(key, bytes) else str(key)
      node[key] = visit(unpacker, f"{name}/{key}" if name else key)
    return node

  with open(file, "rb") as f:
    unpacker = msgpack.Unpacker(f, raw=False, ext_hook=_ext_hook, strict_map_key=False,
                                max_buffer_size=_MAX_BUFFER)
    root = visit(unpacker, "")
  leaves = _leaves(root)
  out = {k: _unchunk(v) if _is_chunked(v) else v for k, v in leaves.items()
         if v is not None and wanted(k, prefixes)}
  return out, list(leaves)
