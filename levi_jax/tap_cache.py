"""Cached pooled backbone taps: run a frozen backbone once per split, not every step.

A frozen backbone's pooled taps (`LeviModel.pooled_taps`) depend on the
example only, so for methods whose backbone is frozen for the whole run
(`levi`, `lp`, `ensemble` with its LP member) they can be computed once per
split and read from the batch (`models.levi.CACHED_TAPS`) in every step,
evaluation, method variant and seed. Training on cached taps follows the same
trajectory as running the backbone (tests/test_tap_cache.py).

Entries are `.npz` files under `cache_dir/<task>/`, named by a key over
everything the taps depend on: the task and split, the split's `inputs`
(content hash, so the sequence length and any change in the data count),
the backbone's weights (`checkpointing.tree_fingerprint`) and architecture, the
resolved tap set and the pooling. A change in any of them gives a new key,
so a stale entry is never read (it can be deleted at will). Taps are computed
batch-sharded over the mesh's `data` axis, each process feeding its rows (as
the evaluation does); the cache folder must be visible to every process.

Beneath the split entries, a row store (`cache_dir/rows/<digest>/`, keyed by
the same backbone, architecture, pooling and token shape, not by task or tap
set) holds the pooled output of *every* layer (and "final") of every token row
computed so far, under the sha1 of the row: a split entry that is missing is
assembled from it (its taps picked from the layers), and only rows it lacks run
through the backbone. The shifts of one dataset deal the same ratings into
different splits, and methods and ablations tap different layers, so the
backbone runs over each rating's text once for all of them (`RowStore`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np

from levi_jax import checkpointing, methods, partitioning
from levi_jax.models.levi import CACHED_TAPS, EnsembleModel, LeviModel, resolve_taps

log = logging.getLogger("levi_jax")
Arrays = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class TapSource:
  """The part of a method that reads taps: its module and backbone params path."""

  module: LeviModel
  prefix: str  # '/'-joined path of the LeviModel's params ("" at the root)


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
             if isinstance(m, LeviModel) and m.backbone is not None and m.taps]
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
              source: TapSource) -> dict[str, Any]:
  """What the taps of one split depend on (hashed into the entry's name)."""
  inputs = np.ascontiguousarray(inputs)
  cfg = source.module.backbone.config
  return {
      "task": task, "split": split, "rows": int(inputs.shape[0]),
      "inputs_sha256": hashlib.sha256(
          f"{inputs.dtype}{inputs.shape}".encode() + inputs.tobytes()).hexdigest(),
      "backbone_fingerprint": backbone_hash,
      "backbone": {k: str(v) for k, v in sorted(vars(cfg).items())},
      "taps": [str(t) for t in resolve_taps(source.module.taps, cfg.num_layers)],
      "pooling": source.module.pooling,
  }


def entry_path(cache_dir: str, key: Mapping[str, Any]) -> str:
  """The `.npz` file of a key."""
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
  task = key["task"].replace("/", "_") or "task"
  return os.path.join(cache_dir, task, f"{key['split']}-{digest}.npz")


def compute_taps(source: TapSource, backbone: Any, inputs: np.ndarray, mesh: jax.sharding.Mesh,
                 rules, batch_size: int) -> np.ndarray:
  """Pooled taps `[rows, num_taps, embed]` (float32) of this process's `inputs`.

  Batch-sharded: every process feeds `batch_size / data shards` of its own
  rows per global batch (as many batches as the process with the most rows
  needs) and keeps the taps of its rows.
  """
  module = source.module

  def fn(bb, batch):
    with nn.logical_axis_rules(rules):
      return module.apply({"params": {methods.BACKBONE: bb}}, batch,
                          method=LeviModel.pooled_taps)

  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  taps_fn = jax.jit(fn, in_shardings=(None, partitioning.batch_sharding(mesh)),
                    out_shardings=replicated)
  n = len(inputs)
  local = partitioning.local_batch_size(batch_size, mesh)
  mine = partitioning.process_batch_slice(batch_size, mesh)
  steps = partitioning.global_max(-(-n // local))  # the process with the most rows
  filler = inputs[-1:] if n else np.zeros((1,) + inputs.shape[1:], inputs.dtype)
  padded = np.concatenate([inputs, filler])
  out = []
  for start in range(0, steps * local, local):
    idx = np.minimum(np.arange(start, start + local), n)  # padded with the last row
    batch = partitioning.global_batch({"inputs": padded[idx]}, mesh)
    out.append(np.asarray(jax.device_get(taps_fn(backbone, batch)), np.float32)[mine])
  return np.concatenate(out)[:n] if out else np.zeros((0, 0, 0), np.float32)


def row_hashes(inputs: np.ndarray) -> np.ndarray:
  """The sha1 of every token row, as `S20` bytes `[rows]`."""
  inputs = np.ascontiguousarray(inputs)
  return np.array([hashlib.sha1(r.tobytes()).digest() for r in inputs], dtype="S20")


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
  """The taps of token rows computed so far under one row-store key (read once).

  Parts are `.npz` files of (`hashes`, `taps`); a lookup computes the rows no
  part holds, adds them as a new part and returns every row's taps.
  """

  def __init__(self, path: str):
    self.path = path
    self.index: dict[bytes, tuple[int, int]] = {}  # row hash -> (part, row in part)
    self.parts: list[np.ndarray] = []
    if os.path.isdir(path):
      for name in sorted(os.listdir(path)):
        if name.endswith(".npz") and ".tmp" not in name:
          with np.load(os.path.join(path, name)) as f:
            self._add(f["hashes"], f["taps"])

  def _add(self, hashes: np.ndarray, taps: np.ndarray):
    for j, h in enumerate(hashes.tolist()):
      self.index.setdefault(h, (len(self.parts), j))
    self.parts.append(taps)

  def lookup(self, inputs: np.ndarray, compute_rows) -> tuple[np.ndarray, int]:
    """Taps of `inputs`, computing (and adding) only rows not held yet.

    `compute_rows(inputs_subset)` runs the backbone; every process calls it
    (with its own, possibly empty, subset). Returns (taps, rows computed).
    """
    hashes = row_hashes(inputs)
    todo: dict[bytes, int] = {}  # a row repeated within `inputs` is computed once
    for i, h in enumerate(hashes.tolist()):
      if h not in self.index:
        todo.setdefault(h, i)
    rows = sorted(todo.values())
    new = compute_rows(inputs[rows]) if rows or jax.process_count() > 1 else None
    if rows:
      os.makedirs(self.path, exist_ok=True)
      stem = f"part-{time.time_ns()}-{jax.process_index()}-{os.getpid()}"
      tmp = os.path.join(self.path, f"{stem}.tmp.npz")
      np.savez(tmp, hashes=hashes[rows], taps=new)
      os.replace(tmp, os.path.join(self.path, f"{stem}.npz"))
      self._add(hashes[rows], new)
    if not len(inputs):
      return np.zeros((0, 0, 0), np.float32), 0
    where = np.array([self.index[h] for h in hashes.tolist()])
    out = np.empty((len(inputs),) + self.parts[where[0, 0]].shape[1:], np.float32)
    for part in np.unique(where[:, 0]):
      sel = where[:, 0] == part
      out[sel] = self.parts[part][where[sel, 1]]
    return out, len(rows)


def _everyone_has(path: str) -> bool:
  have = np.asarray([os.path.isfile(path)])
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    have = multihost_utils.process_allgather(have)
  return bool(np.all(have))


def load_or_compute(cache_dir: str, key: Mapping[str, Any], compute, writer: bool = False
                    ) -> tuple[np.ndarray, bool]:
  """The entry of `key` (read, or computed by `compute()` and written); (taps, hit).

  Process 0 writes a computed entry, and so does every process with `writer`
  (processes holding different rows have entries of their own).
  """
  path = entry_path(cache_dir, key)
  if _everyone_has(path):
    with np.load(path) as f:
      if json.loads(str(f["key"])) == dict(key):
        return f["taps"], True
    log.warning("tap cache entry %s holds another key; recomputing", path)
  taps = compute()
  if jax.process_index() == 0 or writer:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{jax.process_index()}-{os.getpid()}.npz"
    np.savez(tmp, taps=taps, key=json.dumps(dict(key), sort_keys=True))
    os.replace(tmp, path)
  return taps, False


def attach(cache_dir: str, task: str, method: methods.Method, params: Mapping[str, Any],
           splits: Mapping[str, Arrays], mesh: jax.sharding.Mesh, rules, batch_size: int,
           shards=None) -> tuple[dict[str, Arrays], dict[str, Any]]:
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

  Returns:
    (splits, each with `CACHED_TAPS` where cacheable, else unchanged;
     stats: {"used", and "reason" if not, else "hits", "misses", "seconds"}).
  """
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
    key = cache_key(task, name, arrays["inputs"], backbone_hash, source)
    sharded = shards is not None and shards.num_shards > 1
    if sharded:
      key["shards"] = [shards.index, shards.count, shards.num_shards]

    def assemble(a=arrays, key=key):
      nonlocal computed
      path = row_store_dir(cache_dir, key, a["inputs"])
      if path not in stores:
        stores[path] = RowStore(path)
      layers, n = stores[path].lookup(
          a["inputs"], lambda rows: compute_taps(every_layer, backbone, rows, mesh, rules,
                                                 batch_size))
      computed += n
      return np.ascontiguousarray(layers[:, pick]) if len(layers) else layers

    taps, hit = load_or_compute(cache_dir, key, assemble, writer=sharded)
    hits += hit
    out[name] = {**arrays, CACHED_TAPS: taps}
  stats = {"used": True, "hits": hits, "misses": len(splits) - hits,
           "rows_computed": computed, "seconds": time.time() - t0}
  log.info("tap cache %s: %d hits, %d assembled (%d rows computed) in %.1fs", cache_dir, hits,
           stats["misses"], computed, stats["seconds"])
  return out, stats
