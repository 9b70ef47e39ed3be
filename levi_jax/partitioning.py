"""Device meshes, T5X's logical-axis rules, and sharded state creation.

Parameters and activations carry T5X's logical axis names; `LOGICAL_RULES`
maps them onto a `("data", "model")` mesh the way T5X's
`standard_logical_axis_rules` does (batch -> data; vocab, mlp, heads,
joined_kv -> model; embed, kv, length -> replicated). With `fsdp=True` the
`embed` axis of parameters is also sharded over `data` (ZeRO-3 style), which
T5X calls parameter partitioning.

State is never built unsharded: `jax.eval_shape` gives the abstract tree and
its logical names, those become `NamedSharding`s, and the real initialiser
runs under `jax.jit(..., out_shardings=...)`.
"""

from __future__ import annotations

import dataclasses
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
  grid = np.asarray(devices).reshape(data, model)
  return Mesh(grid, (DATA, MODEL),
              axis_types=(jax.sharding.AxisType.Auto, jax.sharding.AxisType.Auto))


def rules_for(cfg: MeshConfig) -> tuple[tuple[str, str | None], ...]:
  """LOGICAL_RULES, with `embed` sharded over `data` when fsdp is on."""
  if not cfg.fsdp:
    return LOGICAL_RULES
  return tuple((k, DATA if k == "embed" else v) for k, v in LOGICAL_RULES)


def logical_to_sharding(tree: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree of abstract leaves, boxed or not.

  A `LogicallyPartitioned` leaf is sharded by its axis names (a dimension
  the mesh axis does not divide is kept whole); a leaf whose names don't fit
  its rank (e.g. Adafactor's factored moments, created by
  mapping over boxed params) and an unboxed leaf are replicated.
  """
  replicated = NamedSharding(mesh, P())

  def one(leaf):
    if not isinstance(leaf, nn.LogicallyPartitioned):
      return replicated
    if len(leaf.names) != np.ndim(leaf.value):
      return replicated
    spec = _fit(nn.logical_to_mesh_axes(leaf.names, rules))
    # A dimension the mesh axis doesn't divide (a 1-wide regression head,
    # a vocab of 1000 over 16 devices) stays whole.
    spec = P(*(ax if ax is None or dim % mesh.shape[ax] == 0 else None
               for ax, dim in zip(spec, np.shape(leaf.value))))
    return NamedSharding(mesh, spec)

  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def _fit(spec: P) -> P:
  """Drops a mesh axis used twice within one spec (e.g. embed and mlp on fsdp)."""
  seen, out = set(), []
  for ax in spec:
    out.append(None if ax is not None and ax in seen else ax)
    if ax is not None:
      seen.add(ax)
  return P(*out)


def sharded_init(init_fn: Callable[[], Any], mesh: Mesh, rules) -> tuple[Any, Any]:
  """Runs `init_fn` (returning a tree with boxed leaves) into sharded arrays.

  Nothing is materialised on one device first: the abstract tree from
  `jax.eval_shape` gives the shardings, and the initialiser runs under
  `jax.jit(out_shardings=...)`. Optimizer state built from boxed params
  inherits their axis names, so one call shards a whole train state.

  Returns:
    (unboxed tree, matching tree of NamedShardings).
  """
  abstract = jax.eval_shape(init_fn)
  shardings = nn.meta.unbox(logical_to_sharding(abstract, mesh, rules))
  with jax.set_mesh(mesh):
    tree = jax.jit(lambda: nn.meta.unbox(init_fn()), out_shardings=shardings)()
  return tree, shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch arrays are split over `data` along their first axis."""
  return NamedSharding(mesh, P(DATA))


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles this process's slice of the batch into global arrays."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}
