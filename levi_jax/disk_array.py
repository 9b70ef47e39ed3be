"""Arrays on disk: written in chunks, read a batch of rows at a time.

The tap cache (`levi_jax.tap_cache`) and the examples on disk
(`levi_jax.data.example_cache`) store `[rows, ...]` arrays as members of
uncompressed `.npz` files (`write_npz`, which never holds the array whole) and
read them back by rows (`DiskArray`, one `os.pread` per run of consecutive
rows). `RowView` is a lazy view of such an array: a field of its records and a
subset of its rows (a process's input shards), read only when indexed. NumPy
only: no JAX, no TensorFlow.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import sys
import zipfile
from typing import Any, Iterable, Mapping, Sequence

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
CHUNK_ROWS = 1 << 16  # rows per read when an array is hashed or reduced whole


def _process_index() -> int:
  """This JAX process's index where JAX is in use, else 0 (this module does not import JAX)."""
  jax = sys.modules.get("jax")
  return jax.process_index() if jax is not None else 0


def all_processes_have(path: str) -> bool:
  """Whether the file `path` exists on every JAX process (on this one where JAX is not in
  use or runs one process), so that all of them read a cache entry or all recompute it."""
  have = np.asarray([os.path.isfile(path)])
  jax = sys.modules.get("jax")
  if jax is not None and jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    have = multihost_utils.process_allgather(have)
  return bool(np.all(have))


class _Rows:
  """What `DiskArray` and `RowView` share: a `shape` of `[rows, ...]` and a `dtype`."""

  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize

  def __len__(self) -> int:
    return self.shape[0]


class DiskArray(_Rows):
  """A read-only `[rows, ...]` array in a file, gathered a batch at a time.

  Indexing (`a[idx]`, `a[i:j]`, `a[i]`) reads just those rows, one positional
  read (`os.pread`) per run of consecutive rows, into a new array: the
  process holds the batch and nothing else of the file (the rows come through
  the page cache, which the kernel reclaims at will). Not a memory map: the
  pages a map touches stay in the process's resident set, and the kernel maps
  the page cache's large folios whole (Linux 6.18, ext4), so one gather of 256
  random rows from a 307 MB map made 120 MB of it resident and an epoch of
  batches all of it (experiments/tap_cache_memory.py; a map's gathers are
  ~10x faster from the page cache). `np.asarray(a)` reads the whole array.
  The file stays open: a file renamed over it later is not seen.
  """

  def __init__(self, path: str, offset: int, shape: tuple[int, ...], dtype):
    self.path, self.offset = path, offset
    self.shape, self.dtype = tuple(int(s) for s in shape), np.dtype(dtype)
    self._row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
    self._fd = os.open(path, os.O_RDONLY)

  def __del__(self, _close=os.close):  # os may be gone when the interpreter exits
    if getattr(self, "_fd", None) is not None:
      _close(self._fd)
      self._fd = None

  def __repr__(self) -> str:
    return f"DiskArray({self.path!r}, shape={self.shape}, dtype={self.dtype})"

  def __getitem__(self, index) -> np.ndarray:
    """Rows by a slice, an integer, an integer array (any shape) or a boolean mask."""
    if isinstance(index, slice):
      start, stop, step = index.indices(len(self))
      return self._run(start, stop) if step == 1 else self._read(np.arange(start, stop, step))
    rows = np.asarray(index)
    if rows.dtype == bool:
      rows = np.flatnonzero(rows)
    if rows.dtype.kind not in "iu":
      raise IndexError(f"a DiskArray is indexed by rows, not by {index!r}")
    rows = np.where(rows < 0, rows + len(self), rows).astype(np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
      raise IndexError(f"rows {index} out of range for {len(self)} rows")
    return self._read(rows.reshape(-1)).reshape(rows.shape + self.shape[1:])

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    if copy is False:
      raise ValueError("a DiskArray is read by copying it out of its file")
    out = self._run(0, len(self))
    return out if dtype is None else out.astype(dtype)

  def _read(self, rows: np.ndarray) -> np.ndarray:
    """The rows (int64 `[k]`, in range), in their order, repeats included."""
    starts = np.flatnonzero(np.diff(rows, prepend=rows[:1] - 2) != 1)  # runs of rows
    if len(starts) <= 1:  # one run (an evaluation batch, a slice): one read
      first = int(rows[0]) if len(rows) else 0
      return self._run(first, first + len(rows))
    sizes = (np.diff(starts, append=len(rows)) * self._row_bytes).tolist()
    offsets = (rows[starts] * self._row_bytes + self.offset).tolist()
    pread, fd = os.pread, self._fd  # a syscall per run: ~1 us a row from the page cache
    parts = [pread(fd, n, o) for n, o in zip(sizes, offsets)]
    if sum(map(len, parts)) != sum(sizes):  # a short read: finish the runs one by one
      parts = [self._bytes(n, o) for n, o in zip(sizes, offsets)]
    out = np.frombuffer(bytearray().join(parts), self.dtype)
    return out.reshape((len(rows),) + self.shape[1:])

  def _run(self, start: int, stop: int) -> np.ndarray:
    """Rows `start..stop-1`, read straight into a new array."""
    buf = np.empty((max(stop - start, 0),) + self.shape[1:], self.dtype)
    self._fill(memoryview(buf.reshape(-1).view(np.uint8)), self.offset + start * self._row_bytes)
    return buf

  def _bytes(self, size: int, offset: int) -> bytearray:
    out = bytearray(size)
    self._fill(memoryview(out), offset)
    return out

  def _fill(self, into: memoryview, offset: int):
    """Reads `len(into)` bytes of the file at `offset` into `into`."""
    done = 0
    while done < len(into):
      n = os.preadv(self._fd, [into[done:]], offset + done)
      if n <= 0:
        raise OSError(f"{self.path} ends {len(into) - done} bytes early (truncated?)")
      done += n


def _disk_dtype(dtype: np.dtype) -> np.dtype:
  """What a `.npy` header can name: bfloat16 is stored as its uint16 bits."""
  return np.dtype(np.uint16) if dtype == BFLOAT16 else dtype


def write_npz(path: str, small: Mapping[str, Any], name: str, shape: tuple[int, ...], dtype,
              chunks: Iterable[np.ndarray]) -> None:
  """Writes an uncompressed `.npz` at `path` without holding its big array in memory.

  The `small` arrays are written whole, then the array `name` of `shape`
  from `chunks` (consecutive rows, in order, cast to `dtype`) as they come.
  The file is renamed into place only once every row is written, so nothing
  incomplete is ever at `path`: an exception removes the temporary file, a
  kill leaves it (`<path>.tmp-<process>-<pid>`, never read; delete at will).
  A reader holding a previous file at `path` keeps reading that one.
  `np.load` reads the result.
  """
  dtype = np.dtype(dtype)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp-{_process_index()}-{os.getpid()}"
  try:
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
      for k, v in small.items():
        with zf.open(f"{k}.npy", "w", force_zip64=True) as f:
          np.lib.format.write_array(f, np.asarray(v), allow_pickle=False)
      with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_2_0(f, {
            "descr": np.lib.format.dtype_to_descr(_disk_dtype(dtype)),
            "fortran_order": False, "shape": tuple(shape)})
        done = 0
        for chunk in chunks:
          chunk = np.ascontiguousarray(np.asarray(chunk).astype(dtype, copy=False))
          if chunk.shape[1:] != tuple(shape[1:]) or done + len(chunk) > shape[0]:
            raise ValueError(f"{path}: a chunk of shape {chunk.shape} after {done} rows does "
                             f"not fit an array of shape {tuple(shape)}")
          f.write(chunk.reshape(-1).view(np.uint8))
          done += len(chunk)
        if done != shape[0]:
          raise ValueError(f"{path}: {done} rows written of {shape[0]}")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def read_npz_array(path: str, name: str, dtype=None) -> DiskArray:
  """The array `name` of an uncompressed `.npz`, read from the file as needed
  (`DiskArray`).

  `dtype`: what its bytes hold when the header names only their width
  (bfloat16, stored as uint16); None: the header's dtype.
  """
  with zipfile.ZipFile(path) as zf:
    info = zf.getinfo(f"{name}.npy")
  if info.compress_type != zipfile.ZIP_STORED:
    raise ValueError(f"{path}: {name} is compressed; its rows cannot be read in place")
  with open(path, "rb") as f:
    f.seek(info.header_offset)
    local = f.read(30)  # the local file header: name and extra-field lengths at 26 and 28
    if local[:4] != b"PK\x03\x04":
      raise ValueError(f"{path}: no zip member header at {info.header_offset}")
    f.seek(info.header_offset + 30 + sum(struct.unpack("<HH", local[26:30])))
    version = np.lib.format.read_magic(f)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, fortran, stored = read_header(f)
    offset = f.tell()
  dtype = stored if dtype is None else np.dtype(dtype)
  if fortran or stored.itemsize != dtype.itemsize:
    raise ValueError(f"{path}: {name} ({stored}, fortran={fortran}) cannot be read as {dtype}")
  return DiskArray(path, offset, shape, dtype)


class RowView(_Rows):
  """Rows `rows` (None: all) of `base`, its record field `field` (None: the records whole).

  `base` is a `DiskArray` (or an array) of `[n, ...]`; `rows` a `RowMap`
  (local position -> row of `base`). Indexing reads only the rows asked for:
  a batch of a process's shards, one field of a record file. `np.asarray`
  reads the view whole (`CHUNK_ROWS` records at a time, keeping only the field).
  Views of one base share a `source` (`gather` reads their fields at once).
  `sha256`: the field's recorded digest over every row of `base`, if known
  (`content_sha256` then names the view's content without reading it).
  """

  def __init__(self, base: Any, field: str | None = None, rows: "RowMap | None" = None,
               sha256: str | None = None):
    self.base, self.field, self.rows, self._sha256 = base, field, rows, sha256
    dtype = base.dtype if field is None else base.dtype.fields[field][0]
    self.dtype = np.dtype(dtype.base)
    self.shape = ((len(base) if rows is None else len(rows),)
                  + tuple(dtype.shape) + tuple(base.shape[1:]))

  @property
  def source(self) -> tuple[int, int]:
    """What the view reads from: views with equal sources gather together."""
    return id(self.base), id(self.rows)

  @property
  def content_sha256(self) -> str | None:
    """A digest naming the view's rows: the base field's recorded sha256, and the rows
    kept (None when no digest was recorded)."""
    if self._sha256 is None:
      return None
    if self.rows is None:
      return self._sha256
    spec = f"{self._sha256}/{self.rows.num_rows}/{self.rows.num_shards}/{self.rows.owned.tolist()}"
    return hashlib.sha256(spec.encode()).hexdigest()

  def __repr__(self) -> str:
    return f"RowView({self.base!r}, field={self.field!r}, shape={self.shape})"

  def records(self, index) -> np.ndarray:
    """The base's records at local positions `index` (an integer array or a slice)."""
    if isinstance(index, slice):
      index = np.arange(*index.indices(len(self)))
    index = np.asarray(index)
    if index.dtype.kind not in "iu":
      raise IndexError(f"a RowView is indexed by rows, not by {index!r}")
    index = np.where(index < 0, index + len(self), index).astype(np.int64)
    if index.size and (index.min() < 0 or index.max() >= len(self)):
      raise IndexError(f"rows out of range for {len(self)} rows")
    return self.base[index if self.rows is None else self.rows[index]]

  def pick(self, records: np.ndarray) -> np.ndarray:
    """This view's field of `records` (a copy: the records' memory is not kept)."""
    return records if self.field is None else np.array(records[self.field])

  def __getitem__(self, index) -> np.ndarray:
    if isinstance(index, (int, np.integer)):
      return self[np.asarray([index])][0]
    return self.pick(self.records(index))

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    if copy is False:
      raise ValueError("a RowView is read by copying it out of its file")
    out = np.empty(self.shape, self.dtype)
    for start in range(0, len(self), CHUNK_ROWS):
      stop = min(start + CHUNK_ROWS, len(self))
      out[start:stop] = self[np.arange(start, stop)]
    return out if dtype is None else out.astype(dtype)


class RowMap:
  """Local positions -> rows of a split: shards `owned` of `num_shards`, shard after shard.

  Row r of a split of `num_rows` belongs to shard r % num_shards
  (`input_pipeline.InputShards`); this computes the rows of a process's
  positions without holding them (O(shards) memory, not O(rows)).
  """

  def __init__(self, num_rows: int, num_shards: int, owned: Sequence[int]):
    self.num_rows, self.num_shards = int(num_rows), int(num_shards)
    self.owned = np.asarray(list(owned), np.int64)
    sizes = np.asarray([len(range(s, num_rows, num_shards)) for s in owned], np.int64)
    self._starts = np.concatenate([[0], np.cumsum(sizes)])

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getitem__(self, index: np.ndarray) -> np.ndarray:
    index = np.asarray(index, np.int64)
    k = np.searchsorted(self._starts, index, side="right") - 1
    return self.owned[k] + (index - self._starts[k]) * self.num_shards


def gather(arrays: Mapping[str, Any], index: np.ndarray) -> dict[str, np.ndarray]:
  """`{k: v[index]}`, reading the fields of `RowView`s of one record file in one pass."""
  out: dict[str, np.ndarray] = {}
  groups: dict[tuple[int, int], list[str]] = {}
  for k, v in arrays.items():
    if isinstance(v, RowView):
      groups.setdefault(v.source, []).append(k)
    else:
      out[k] = v[index]
  for keys in groups.values():
    records = arrays[keys[0]].records(index)
    for k in keys:
      out[k] = arrays[k].pick(records)
  return {k: out[k] for k in arrays}


def sha256_update(digest, array: Any) -> None:
  """Feeds `array`'s bytes, row-major, to `digest`, `CHUNK_ROWS` rows at a time.

  The same bytes as `np.ascontiguousarray(array)` whole, for numpy arrays and
  the arrays on disk alike.
  """
  for start in range(0, len(array), CHUNK_ROWS):
    chunk = np.ascontiguousarray(array[start:min(start + CHUNK_ROWS, len(array))])
    digest.update(chunk.reshape(-1).view(np.uint8))


def iter_chunks(array: Any, chunk_rows: int = CHUNK_ROWS) -> Iterable[np.ndarray]:
  """Consecutive row chunks of `array` (in memory or on disk), in order."""
  for start in range(0, len(array), chunk_rows):
    yield np.asarray(array[start:min(start + chunk_rows, len(array))])
