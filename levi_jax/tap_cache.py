"""Cached pooled backbone taps: run a frozen backbone once per split, not every step.

A frozen backbone's pooled taps (`ViewFusionModel.pooled_taps`) depend on the
example only, so for methods whose backbone is frozen for the whole run
(`levi`, `lp`, `ensemble` with its LP member) they can be computed once per
split and read from the batch (`models.levi.CACHED_TAPS`) in every step,
evaluation, method variant and seed. Training on cached taps follows the same
trajectory as running the backbone (tests/test_tap_cache.py).

Entries are `.npz` files under `cache_dir/<task>/`, named by a key over
everything the taps depend on: the task and split, the split's `inputs`
(content hash, so the sequence length and any change in the data count; for
examples on disk, the digest their entry recorded, so nothing is re-read),
the backbone's weights (`checkpointing.tree_fingerprint`) and architecture, the
resolved tap set, the pooling, and the storage (dtype and `LAYOUT`). A change
in any of them gives a new key, so a stale entry is never read (it can be
deleted at will). Taps are computed batch-sharded over the mesh's `data` axis,
each process feeding its rows (as the evaluation does); with input shards,
each process's entry holds only the rows of the shards it feeds. The cache
folder must be visible to every process.

Beneath the split entries, a row store (`cache_dir/rows/<digest>/`, keyed by
the same backbone, architecture, pooling, storage and token shape, not by task
or tap set) holds the pooled output of *every* layer (and "final") of every
token row computed so far, under the sha1 of the row: a split entry that is
missing is assembled from it (its taps picked from the layers), and only rows
it lacks run through the backbone. The shifts of one dataset deal the same
ratings into different splits, and methods and ablations tap different layers,
so the backbone runs over each rating's text once for all of them (`RowStore`).

Storage is bounded in host memory, whatever the number of rows: taps go to
disk a batch (or `CHUNK_BYTES`) at a time as they are computed, into an
uncompressed `.npz` whose `taps` member is one `.npy` array (`write_npz`),
float32 (exact) or bfloat16 (half the bytes; `attach(dtype=...)`); a file is
renamed into place only once every row is written, so an interrupted run
leaves no entry. Entries and row-store parts stay on disk (`DiskArray`): a
batch reads only its rows, so reading an epoch of an entry larger than the
host's memory holds no more of it than a batch. Only the row hashes of the row
store (20 bytes a row) are held in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

import flax.linen as nn
import jax
import numpy as np

from levi_jax import checkpointing, methods, partitioning
from levi_jax.disk_array import (BFLOAT16, DiskArray, all_processes_have, iter_chunks,
                                 read_npz_array, sha256_update, write_npz)
from levi_jax.models.levi import CACHED_TAPS, EnsembleModel, ViewFusionModel, resolve_taps

log = logging.getLogger("levi_jax")
# How often a long backbone pass logs its progress (INFO; the study scripts print it).
PROGRESS_EVERY_S = 60.0
Arrays = dict[str, np.ndarray]

LAYOUT = 2  # 1: whole-split `np.savez` entries read into memory; 2: chunked, read by rows
STORAGE_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": BFLOAT16}
CHUNK_BYTES = 64 << 20  # taps gathered from the row store per write of an entry


# --- Which methods read taps, and what an entry depends on -------------------------


@dataclasses.dataclass(frozen=True)
class TapSource:
  """The part of a method that reads taps: its module and backbone params path."""

  module: ViewFusionModel
  prefix: str  # '/'-joined path of the ViewFusionModel's params ("" at the root)


def tap_source(method: methods.Method) -> tuple[TapSource | None, str]:
  """Where a method reads backbone taps, or (None, why its taps can't be cached).

  Cacheable: one training stage that freezes every backbone, no LoRA, no
  backbone dropout, and a single module with backbone taps.
  """
  if method.lora is not None:
    return None, "LoRA changes the backbone"
  if len(method.stages) != 1:
    return None, "the backbone trains in a later stage"
  root = method.module
  members = root.members if isinstance(root, EnsembleModel) else (root,)
  readers = [(m, f"members_{i}" if isinstance(root, EnsembleModel) else "")
             for i, m in enumerate(members)
             if isinstance(m, ViewFusionModel) and m.backbone is not None and m.taps]
  if len(readers) != 1:
    return None, "no single module reads backbone taps"
  module, prefix = readers[0]
  backbone = "/".join(p for p in (prefix, methods.BACKBONE) if p)
  if not methods.is_frozen(backbone, method.stages[0].frozen):
    return None, "the backbone trains"
  if getattr(module.backbone.config, "dropout_rate", 0.0):
    return None, "the backbone applies dropout in training"
  return TapSource(module, prefix), ""


def backbone_params(source: TapSource, params: Mapping[str, Any]) -> dict:
  """The backbone subtree of a method's params."""
  tree = dict(params)
  for part in filter(None, source.prefix.split("/")):
    tree = dict(tree[part])
  return tree[methods.BACKBONE]


def cache_key(task: str, split: str, inputs: np.ndarray, backbone_hash: str,
              source: TapSource, dtype: str = "float32") -> dict[str, Any]:
  """What the taps of one split depend on, and how they are stored (hashed into the
  entry's name)."""
  digest = hashlib.sha256(f"{np.dtype(inputs.dtype)}{tuple(inputs.shape)}".encode())
  known = getattr(inputs, "content_sha256", None)  # examples on disk: their recorded digest
  if known:
    digest.update(f"examples {known}".encode())
  else:
    sha256_update(digest, inputs)  # by chunks: inputs may be on disk
  cfg = source.module.backbone.config
  return {
      "task": task, "split": split, "rows": int(inputs.shape[0]),
      "inputs_sha256": digest.hexdigest(),
      "backbone_fingerprint": backbone_hash,
      "backbone": {k: str(v) for k, v in sorted(vars(cfg).items())},
      "taps": [str(t) for t in resolve_taps(source.module.taps, cfg.num_layers)],
      "pooling": source.module.pooling,
      "storage": {"dtype": dtype, "layout": LAYOUT},
  }


def entry_path(cache_dir: str, key: Mapping[str, Any]) -> str:
  """The `.npz` file of a key."""
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
  task = key["task"].replace("/", "_") or "task"
  return os.path.join(cache_dir, task, f"{key['split']}-{digest}.npz")


# --- Running the backbone ----------------------------------------------------------


def tap_shape(source: TapSource, backbone: Any, inputs: np.ndarray) -> tuple[int, ...]:
  """One row's pooled taps' shape, `(num_taps, embed)` (traced, nothing runs)."""
  row = jax.ShapeDtypeStruct((1,) + inputs.shape[1:], inputs.dtype)
  out = jax.eval_shape(
      lambda bb, x: source.module.apply({"params": {methods.BACKBONE: bb}}, {"inputs": x},
                                       method=ViewFusionModel.pooled_taps), backbone, row)
  return tuple(out.shape[1:])


def iter_taps(source: TapSource, backbone: Any, inputs: np.ndarray, mesh: jax.sharding.Mesh,
              rules, batch_size: int, rows: np.ndarray | None = None
              ) -> Iterator[np.ndarray]:
  """Pooled taps (float32) of this process's `inputs[rows]` (default: every row),
  in row order, one global batch's share `[<= local batch, num_taps, embed]` at a time.

  Batch-sharded: every process feeds `batch_size / data shards` of its own
  rows per global batch (as many batches as the process with the most rows
  needs, the last padded with its last row) and keeps the taps of its rows.
  Every process must run the iterator to its end (each batch is collective).
  """
  module = source.module

  def fn(bb, batch):
    with nn.logical_axis_rules(rules):
      return module.apply({"params": {methods.BACKBONE: bb}}, batch,
                          method=ViewFusionModel.pooled_taps)

  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  taps_fn = jax.jit(fn, in_shardings=(None, partitioning.batch_sharding(mesh)),
                    out_shardings=replicated)
  rows = np.arange(len(inputs)) if rows is None else np.asarray(rows, np.int64)
  n = len(rows)
  src = inputs if n else np.zeros((1,) + inputs.shape[1:], inputs.dtype)
  rows = rows if n else np.zeros((1,), np.int64)
  local = partitioning.local_batch_size(batch_size, mesh)
  mine = partitioning.process_batch_slice(batch_size, mesh)
  steps = partitioning.global_max(-(-n // local))  # the process with the most rows
  t0 = last = time.time()
  for start in range(0, steps * local, local):
    idx = rows[np.minimum(np.arange(start, start + local), len(rows) - 1)]
    batch = partitioning.global_batch({"inputs": src[idx]}, mesh)
    taps = np.asarray(jax.device_get(taps_fn(backbone, batch)), np.float32)[mine]
    if time.time() - last >= PROGRESS_EVERY_S and jax.process_index() == 0:
      last, done = time.time(), min(start + local, n)
      rate = done / (last - t0)
      log.info("backbone taps: %d/%d rows, %.0f rows/s, ETA %.0fs", done, n, rate,
               (n - done) / max(rate, 1e-9))
    if start < n:
      yield taps[:n - start]


def compute_taps(source: TapSource, backbone: Any, inputs: np.ndarray, mesh: jax.sharding.Mesh,
                 rules, batch_size: int) -> np.ndarray:
  """Pooled taps `[rows, num_taps, embed]` (float32) of this process's `inputs`, in
  memory (`iter_taps`, gathered)."""
  out = list(iter_taps(source, backbone, inputs, mesh, rules, batch_size))
  return np.concatenate(out) if out else np.zeros((0, 0, 0), np.float32)


# --- The row store -------------------------------------------------------------------


def row_hashes(inputs: np.ndarray) -> np.ndarray:
  """The sha1 of every token row, as `S20` bytes `[rows]`."""
  out = np.empty((len(inputs),), "S20")
  i = 0
  for chunk in iter_chunks(inputs):  # inputs may be on disk
    for r in np.ascontiguousarray(chunk):
      out[i] = hashlib.sha1(r.tobytes()).digest()
      i += 1
  return out


def all_taps(source: TapSource) -> tuple[int | str, ...]:
  """What the row store holds per row: every layer of the backbone, then "final"."""
  return tuple(range(source.module.backbone.config.num_layers)) + ("final",)


def row_store_dir(cache_dir: str, key: Mapping[str, Any], inputs: np.ndarray) -> str:
  """The row store of a split key: what the taps depend on except task, split
  and the tap set (the store holds every layer)."""
  store_key = {k: v for k, v in key.items()
               if k not in ("task", "split", "rows", "inputs_sha256", "shards", "taps")}
  store_key["layers"] = "all"
  store_key["row"] = [str(inputs.dtype), list(inputs.shape[1:])]
  digest = hashlib.sha256(json.dumps(store_key, sort_keys=True).encode()).hexdigest()[:20]
  return os.path.join(cache_dir, "rows", digest)


class RowStore:
  """The taps of token rows computed so far under one row-store key.

  Parts are `.npz` files of (`hashes` `[k]`, `taps` `[k, layers, embed]` in the
  storage dtype), each written as the backbone runs over the rows no part held
  (`add`) and read row by row (`DiskArray`); in memory only a sorted index of the
  row hashes.
  """

  def __init__(self, path: str, dtype: str = "float32"):
    self.path, self.dtype = path, STORAGE_DTYPES[dtype]
    self.parts: list[DiskArray] = []
    self._keys = np.zeros((0,), "S20")  # sorted row hashes, each once
    self._part = np.zeros((0,), np.int32)  # ... the part holding it
    self._row = np.zeros((0,), np.int64)  # ... and its row there
    if os.path.isdir(path):
      for name in sorted(os.listdir(path)):
        if name.endswith(".npz") and ".tmp" not in name:
          file = os.path.join(path, name)
          with np.load(file) as f:
            hashes = f["hashes"]
          self._add(hashes, read_npz_array(file, "taps", self.dtype))

  def _add(self, hashes: np.ndarray, taps: DiskArray):
    keys = np.concatenate([self._keys, hashes])
    part = np.concatenate([self._part, np.full(len(hashes), len(self.parts), np.int32)])
    row = np.concatenate([self._row, np.arange(len(hashes))])
    self._keys, first = np.unique(keys, return_index=True)  # the first part holding a row
    self._part, self._row = part[first], row[first]
    self.parts.append(taps)

  def locate(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(part, row in part, held) of each row hash; part and row are 0 where not held."""
    if not len(self._keys):
      zeros = np.zeros(len(hashes), np.int64)
      return zeros, zeros, np.zeros(len(hashes), bool)
    pos = np.minimum(np.searchsorted(self._keys, hashes), len(self._keys) - 1)
    held = self._keys[pos] == hashes
    return (np.where(held, self._part[pos], 0), np.where(held, self._row[pos], 0), held)

  def add(self, hashes: np.ndarray, row_shape: tuple[int, ...],
          compute_rows: Callable[[np.ndarray], Iterable[np.ndarray]]) -> int:
    """Computes the rows (of the split whose row hashes are `hashes`) no part holds
    into a new part; returns how many.

    `compute_rows(positions)` runs the backbone over those positions of the
    split, yielding their taps in order; every process calls it (with its
    own, possibly empty, positions) and runs it to its end.
    """
    missing = np.flatnonzero(~self.locate(hashes)[2])
    _, first = np.unique(hashes[missing], return_index=True)  # a repeated row runs once
    rows = np.sort(missing[first])
    if not len(rows) and jax.process_count() == 1:
      return 0
    chunks = compute_rows(rows)
    if not len(rows):
      for _ in chunks:  # the other processes' rows: this one joins each batch
        pass
      return 0
    stem = f"part-{time.time_ns()}-{jax.process_index()}-{os.getpid()}"
    path = os.path.join(self.path, f"{stem}.npz")
    write_npz(path, {"hashes": hashes[rows]}, "taps", (len(rows),) + tuple(row_shape),
              self.dtype, chunks)
    self._add(hashes[rows], read_npz_array(path, "taps", self.dtype))
    return len(rows)

  def gather(self, hashes: np.ndarray, pick: list[int]) -> Iterator[np.ndarray]:
    """The taps `pick` of rows held (by their hashes), in order, `CHUNK_BYTES` at a time."""
    part, row, held = self.locate(hashes)
    if not held.all():
      raise KeyError(f"{int((~held).sum())} rows are not in the row store {self.path}")
    if not len(hashes):
      return
    row_bytes = self.parts[0].nbytes // max(len(self.parts[0]), 1) or 1
    step = max(1, CHUNK_BYTES // row_bytes)
    for start in range(0, len(hashes), step):
      p, r = part[start:start + step], row[start:start + step]
      out = None
      for i in np.unique(p):
        sel = p == i
        taps = self.parts[i][r[sel]][:, pick]
        if out is None:
          out = np.empty((len(p),) + taps.shape[1:], self.dtype)
        out[sel] = taps
      yield out


# --- Split entries -----------------------------------------------------------------


def read_entry(path: str, key: Mapping[str, Any]) -> DiskArray | None:
  """The taps of the entry at `path` (on disk), or None if it holds another key."""
  with np.load(path) as f:
    if json.loads(str(f["key"])) != dict(key):
      return None
  return read_npz_array(path, "taps", STORAGE_DTYPES[key["storage"]["dtype"]])


def load_or_compute(cache_dir: str, key: Mapping[str, Any],
                    compute: Callable[[], tuple[tuple[int, ...], Iterable[np.ndarray]]],
                    writer: bool = False) -> tuple[DiskArray, bool]:
  """The entry of `key`, read or computed and written; (its taps on disk, hit).

  `compute()` runs on every process (its collective part, the backbone, runs
  before it returns) and returns (the entry's shape, its taps in chunks of
  rows). Process 0 writes a computed entry, and so does every process with
  `writer` (processes holding different rows have entries of their own);
  then every process opens the entry.
  """
  path = entry_path(cache_dir, key)
  if all_processes_have(path):
    taps = read_entry(path, key)
    if taps is not None:
      return taps, True
    log.warning("tap cache entry %s holds another key; recomputing", path)
  shape, chunks = compute()
  if jax.process_index() == 0 or writer:
    write_npz(path, {"key": json.dumps(dict(key), sort_keys=True)}, "taps", shape,
              STORAGE_DTYPES[key["storage"]["dtype"]], chunks)
  if jax.process_count() > 1:  # process 0's entry is written before the others open it
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"tap cache {key['task']} {key['split']}")
  taps = read_entry(path, key)
  if taps is None:
    raise RuntimeError(f"tap cache entry {path} was replaced by another key while written")
  return taps, False


def attach(cache_dir: str, task: str, method: methods.Method, params: Mapping[str, Any],
           splits: Mapping[str, Arrays], mesh: jax.sharding.Mesh, rules, batch_size: int,
           shards=None, dtype: str = "float32") -> tuple[dict[str, Arrays], dict[str, Any]]:
  """Adds cached pooled taps (`CACHED_TAPS`) to each split, if the method allows.

  Args:
    cache_dir: the cache folder.
    task: task name (part of the key; also the entry's subfolder).
    method: the method being trained.
    params: its full params (the backbone as it will stay, e.g. pretrained).
    splits: split name -> arrays with `inputs` (this process's rows).
    mesh, rules: where to compute and the logical axis rules.
    batch_size: global batch size of the computation.
    shards: the `input_pipeline.InputShards` the splits hold (part of the
      key); None: every row.
    dtype: how taps are stored and read, "float32" (exact) or "bfloat16"
      (rounded to nearest; half the disk and memory). Part of the key.

  Returns:
    (splits, each with `CACHED_TAPS` where cacheable (a `DiskArray` of the
     split's rows: batches gather from it), else unchanged;
     stats: {"used", and "reason" if not, else "hits", "misses",
     "rows_computed", "seconds", "dtype", "bytes"}).
  """
  if dtype not in STORAGE_DTYPES:
    raise ValueError(f"tap cache dtype {dtype!r}: one of {sorted(STORAGE_DTYPES)}")
  source, reason = tap_source(method)
  if source is None:
    log.info("tap cache not used for %s: %s", method.name, reason)
    return dict(splits), {"used": False, "reason": reason}
  backbone = backbone_params(source, params)
  backbone_hash = checkpointing.tree_fingerprint(backbone)
  every_layer = TapSource(source.module.clone(taps=all_taps(source)), source.prefix)
  pick = [all_taps(source).index(t) for t in
          resolve_taps(source.module.taps, source.module.backbone.config.num_layers)]
  out, hits, computed, t0 = {}, 0, 0, time.time()
  stores: dict[str, RowStore] = {}  # opened on the first miss, then shared by the splits
  for name, arrays in splits.items():
    key = cache_key(task, name, arrays["inputs"], backbone_hash, source, dtype)
    sharded = shards is not None and shards.num_shards > 1
    if sharded:
      key["shards"] = [shards.index, shards.count, shards.num_shards]

    def assemble(inputs=arrays["inputs"], key=key):
      nonlocal computed
      path = row_store_dir(cache_dir, key, inputs)
      if path not in stores:
        stores[path] = RowStore(path, dtype)
      hashes = row_hashes(inputs)
      layers = tap_shape(every_layer, backbone, inputs)
      computed += stores[path].add(hashes, layers, lambda rows: iter_taps(
          every_layer, backbone, inputs, mesh, rules, batch_size, rows))
      return (len(inputs), len(pick)) + layers[1:], stores[path].gather(hashes, pick)

    taps, hit = load_or_compute(cache_dir, key, assemble, writer=sharded)
    hits += hit
    out[name] = {**arrays, CACHED_TAPS: taps}
  stats = {"used": True, "hits": hits, "misses": len(splits) - hits,
           "rows_computed": computed, "seconds": time.time() - t0, "dtype": dtype,
           "bytes": sum(a[CACHED_TAPS].nbytes for a in out.values())}
  log.info("tap cache %s: %d hits, %d assembled (%d rows computed) in %.1fs", cache_dir, hits,
           stats["misses"], computed, stats["seconds"])
  return out, stats
