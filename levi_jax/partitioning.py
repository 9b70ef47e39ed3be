"""Device meshes, T5X's logical-axis rules, and sharded state creation.

Parameters and activations carry T5X's logical axis names; `LOGICAL_RULES`
maps them onto a `("data", "model")` mesh the way T5X's
`standard_logical_axis_rules` does (batch -> data; vocab, mlp, heads,
joined_kv -> model; embed, kv, length -> replicated). With `fsdp=True` the
`embed` axis of parameters is also sharded over `data` (ZeRO-3 style), which
T5X calls parameter partitioning.

State is never built unsharded: `jax.eval_shape` gives the abstract tree and
its logical names, those become `NamedSharding`s, and the real initialiser
runs under `jax.jit(..., out_shardings=...)`. The train and eval steps are
jitted with explicit shardings (`jit_train_step`, `jit_eval_step`), and each
process feeds only its shard of the batch (`process_shard`, `global_batch`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"

# T5X's standard rules, plus our own names (all replicated).
LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", DATA),
    ("vocab", MODEL),
    ("mlp", MODEL),
    ("heads", MODEL),
    ("joined_kv", MODEL),
    ("kv", None),
    ("embed", None),
    ("length", None),
    ("relpos_buckets", None),
    ("feature_vocab", None),
    ("feature_embed", None),
    ("lora_rank", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape. -1 on one axis means "all remaining devices".

  Attributes:
    data: data-parallel axis size.
    model: model-parallel axis size.
    fsdp: also shard parameters' `embed` axis over `data`.
  """

  data: int = -1
  model: int = 1
  fsdp: bool = False

  def __post_init__(self):
    if self.data == 0 or self.model == 0 or (self.data < 0 and self.model < 0):
      raise ValueError(f"MeshConfig: axis sizes must be positive, one may be -1; got {self}")


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None
              ) -> Mesh:
  """Builds a ("data", "model") mesh with Auto axes (what logical rules assume)."""
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  data = n // cfg.model if cfg.data == -1 else cfg.data
  model = n // cfg.data if cfg.model == -1 else cfg.model
  if data * model != n:
    raise ValueError(f"mesh {data}x{model} (data x model) does not use the {n} devices "
                     "available; choose sizes whose product is the device count")
  # jax.make_mesh orders devices by the physical topology on TPU (rings for
  # the `model` axis); on CPU/GPU it is a plain reshape.
  return jax.make_mesh((data, model), (DATA, MODEL),
                       axis_types=(jax.sharding.AxisType.Auto, jax.sharding.AxisType.Auto),
                       devices=devices)


def rules_for(cfg: MeshConfig) -> tuple[tuple[str, str | None], ...]:
  """LOGICAL_RULES, with `embed` sharded over `data` when fsdp is on."""
  if not cfg.fsdp:
    return LOGICAL_RULES
  return tuple((k, DATA if k == "embed" else v) for k, v in LOGICAL_RULES)


def logical_to_sharding(tree: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree of abstract leaves, boxed or not.

  A `LogicallyPartitioned` leaf is sharded by its axis names through
  `nn.logical_to_mesh_sharding` (a dimension the mesh axis does not divide is
  kept whole); a leaf whose names don't fit its rank (e.g. Adafactor's
  factored moments, created by mapping over boxed params) and an unboxed leaf
  are replicated.
  """
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)

  def logical_spec(leaf):
    if is_box(leaf) and len(leaf.names) == np.ndim(leaf.value):
      return P(*leaf.names)
    return P()

  def divisible(sharding, leaf):
    # jax.jit and device_put reject a sharding whose mesh axis does not divide
    # the dimension (a 1-wide regression head, a vocab of 1000 over 16
    # devices), so such a dimension stays replicated.
    shape = np.shape(leaf.value if is_box(leaf) else leaf)
    return NamedSharding(mesh, P(*(ax if ax is None or dim % mesh.shape[ax] == 0 else None
                                   for ax, dim in zip(sharding.spec, shape))))

  shardings = nn.logical_to_mesh_sharding(
      jax.tree.map(logical_spec, tree, is_leaf=is_box), mesh, rules)
  return jax.tree.map(divisible, shardings, tree, is_leaf=is_box)


def abstract_state(init_fn: Callable[[], Any], mesh: Mesh, rules) -> Any:
  """`jax.ShapeDtypeStruct`s (with shardings) of what `init_fn` would build.

  Nothing is computed; this is the target for restoring a checkpoint into
  a mesh (orbax reshards to the given shardings) and the source of the
  shardings `sharded_init` creates state with.
  """
  abstract = jax.eval_shape(init_fn)
  shardings = logical_to_sharding(abstract, mesh, rules)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      nn.meta.unbox(abstract), nn.meta.unbox(shardings))


def sharded_init(init_fn: Callable[[], Any], mesh: Mesh, rules) -> tuple[Any, Any]:
  """Runs `init_fn` (returning a tree with boxed leaves) into sharded arrays.

  Nothing is materialised on one device first: the abstract tree from
  `jax.eval_shape` gives the shardings, and the initialiser runs under
  `jax.jit(out_shardings=...)`. Optimizer state built from boxed params
  inherits their axis names, so one call shards a whole train state.

  Returns:
    (unboxed tree, matching tree of NamedShardings).
  """
  shardings = jax.tree.map(lambda x: x.sharding, abstract_state(init_fn, mesh, rules))
  with jax.set_mesh(mesh):
    tree = jax.jit(lambda: nn.meta.unbox(init_fn()), out_shardings=shardings)()
  return tree, shardings


def process_shard(mesh: Mesh) -> tuple[int, int]:
  """Which shard of the data this process reads: `(index, count)`.

  Pass it to `seqio.ShardInfo(index=..., num_shards=...)`. It is
  `(jax.process_index(), jax.process_count())` whenever each process holds
  its own rows of the batch; processes whose devices hold the same rows (a
  `model` axis spanning hosts) get the same index, so they read the same
  examples, as `jax.make_array_from_process_local_data` requires.
  """
  grid = np.vectorize(lambda d: d.process_index, otypes=[int])(mesh.devices)
  grid = np.moveaxis(grid, mesh.axis_names.index(DATA), 0).reshape(mesh.shape[DATA], -1)
  return shard_of(grid, jax.process_index())


def shard_of(process_grid: np.ndarray, process_index: int) -> tuple[int, int]:
  """`process_shard` for a `[data, rest]` grid of the processes owning each device.

  Raises:
    ValueError: the process's rows of the data axis are not one contiguous
      block, or processes hold different numbers of rows.
  """
  rows_of: dict[int, list[int]] = {}
  for row, procs in enumerate(np.asarray(process_grid)):
    for p in set(procs.tolist()):
      rows_of.setdefault(p, []).append(row)
  for p, rows in rows_of.items():
    if rows[-1] - rows[0] + 1 != len(rows):
      raise ValueError(f"process {p} holds non-contiguous rows {rows} of the data axis; "
                       "build the mesh with `make_mesh`")
  sizes = {len(rows) for rows in rows_of.values()}
  if len(sizes) != 1:
    raise ValueError(f"processes hold different numbers of data rows: {rows_of}")
  per_process = sizes.pop()
  return rows_of[process_index][0] // per_process, len(process_grid) // per_process


def global_max(value: int) -> int:
  """The largest of every process's `value` (the value itself on one process)."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils
  return int(np.max(multihost_utils.process_allgather(np.asarray(value))))


def local_batch_size(global_batch_size: int, mesh: Mesh, what: str = "global batch size"
                     ) -> int:
  """Examples per process: global batch / number of data shards.

  Raises:
    ValueError: the global batch does not split over the `data` axis (`what`
      names the setting in the message).
  """
  shards = mesh.shape[DATA]
  if global_batch_size % shards:
    raise ValueError(
        f"{what} = {global_batch_size} does not split over the mesh: its data axis has "
        f"{shards} shards ({mesh.devices.size} devices, {jax.process_count()} processes); "
        f"use a multiple of {shards}")
  return global_batch_size // process_shard(mesh)[1]


def process_batch_slice(global_batch_size: int, mesh: Mesh) -> slice:
  """The rows of a global batch that this process feeds to `global_batch`.

  For data every process can compute whole (synthetic batches, tests).
  """
  index, _ = process_shard(mesh)
  size = local_batch_size(global_batch_size, mesh)
  return slice(index * size, (index + 1) * size)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch arrays are split over `data` along their first axis."""
  return NamedSharding(mesh, P(DATA))


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles this process's slice of the batch into global arrays.

  `local` holds `local_batch_size(global, mesh)` examples: this process's
  shard (see `process_shard`). The same call runs on one process or many.
  """
  sharding = batch_sharding(mesh)
  count = process_shard(mesh)[1]

  def one(v):
    v = np.asarray(v)
    return jax.make_array_from_process_local_data(
        sharding, v, (v.shape[0] * count,) + v.shape[1:])

  return {k: one(v) for k, v in local.items()}


def with_logical_rules(fn: Callable, mesh: Mesh, rules) -> Callable:
  """`fn`, traced with the logical rules and the mesh in context (then `jax.jit` it).

  Flax's `nn.with_logical_constraint` is a no-op unless both are set while
  tracing; entering them inside the jitted function makes the constraints
  apply however the step is called.
  """

  @functools.wraps(fn)
  def wrapped(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      return fn(*args)

  return wrapped


def jit_train_step(train_step: Callable, state_shardings: Any, mesh: Mesh,
                   rules=LOGICAL_RULES) -> Callable:
  """`jax.jit` of `train_step(state, batch, rng) -> (state, metrics)` with shardings.

  The state keeps `state_shardings` (from `sharded_init`) in and out and is
  donated; the batch is split over `data`; the rng and the metrics are
  replicated. Activations follow their logical constraints under `rules`.
  """
  replicated = NamedSharding(mesh, P())
  return jax.jit(with_logical_rules(train_step, mesh, rules),
                 in_shardings=(state_shardings, batch_sharding(mesh), replicated),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)


def jit_eval_step(eval_step: Callable, param_shardings: Any, mesh: Mesh,
                  rules=LOGICAL_RULES) -> Callable:
  """`jax.jit` of `eval_step(params, batch) -> sums` with shardings.

  `param_shardings` matches the combined parameter tree (e.g.
  `methods.combine(shardings.params, shardings.frozen)`); the sums come back
  replicated.
  """
  replicated = NamedSharding(mesh, P())
  return jax.jit(with_logical_rules(eval_step, mesh, rules),
                 in_shardings=(param_shardings, batch_sharding(mesh)),
                 out_shardings=replicated)
