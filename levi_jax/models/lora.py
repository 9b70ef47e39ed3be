"""Low-rank adapters (LoRA) on a backbone's kernels, applied beside the kernel.

LoRA is kept outside the backbone's parameters so the backbone's tree stays
exactly T5X's (checkpoints restore unchanged). A separate tree mirrors the
targeted kernels with factors `a: [in, rank]` and `b: [rank, out]`. In
training and evaluation the factors reach the backbone as the flax variable
collection `COLLECTION` (`variables`), and each adapted projection computes

    y = x W + (alpha / rank) (x a) b

with `low_rank`. The backward pass then needs activation gradients through
the frozen `W` but never `W`'s own weight gradient (a frozen kernel is no
input of the differentiated function), so a LoRA step is about a forward and
an activation backward: 0.60x a full fine-tuning step with T5 1.1 small on
CPU (`experiments/benchmark.py`), where merging `W + (alpha / rank) a b`
before every forward cost 0.94x. `merge` forms that sum, for inference or
export. `b` starts at zero, so a fresh LoRA model equals its base model.

A backbone supports LoRA where its projection modules call `low_rank`
(`T5Encoder`'s `DenseGeneral`, `BertEncoder`'s `Dense`); `unread` finds
factors a backbone never reads, so a method can refuse them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.extend import core as jax_core

# The flax variable collection that carries the factors into the backbone.
COLLECTION = "lora"

# Kernel paths (relative to the backbone) of T5's attention and MLP blocks.
T5_TARGETS = (r"attention/(query|key|value|out)/kernel$", r"mlp/(wi|wi_0|wi_1|wo)/kernel$")
# The same for BERT/MiniLM (`BertEncoder`): q/k/v, attention output, both MLP kernels.
BERT_TARGETS = (r"attention/(self/(query|key|value)|output/dense)/kernel$",
                r"(intermediate|layer_\d+/output)/dense/kernel$")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA hyperparameters.

  Attributes:
    rank: rank of the update.
    alpha: the update is scaled by alpha / rank.
    targets: regexes searched in '/'-joined backbone kernel paths; the
      default adapts every attention and MLP kernel of a T5 or BERT backbone.
  """

  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = T5_TARGETS + BERT_TARGETS

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"LoraConfig.rank must be >= 1, got {self.rank}")
    for t in self.targets:
      re.compile(t)

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def _targeted(flat: dict[str, Any], cfg: LoraConfig) -> list[str]:
  paths = [p for p, v in flat.items()
           if p.endswith("/kernel") and jnp.ndim(nn.meta.unbox(v)) == 2
           and any(re.search(t, p) for t in cfg.targets)]
  if not paths:
    raise ValueError(f"LoRA targets {cfg.targets} match no 2-D kernel of the backbone; "
                     f"its kernels include {sorted(flat)[:6]}...")
  return paths


def init(rng: jax.Array, backbone_params: Any, cfg: LoraConfig) -> dict[str, Any]:
  """Creates LoRA factors for the targeted kernels (boxed with axis names)."""
  flat = traverse_util.flatten_dict(backbone_params, sep="/")
  out = {}
  for i, path in enumerate(_targeted(flat, cfg)):
    leaf = flat[path]
    names = getattr(leaf, "names", (None, None))
    d_in, d_out = nn.meta.unbox(leaf).shape
    a = jax.random.normal(jax.random.fold_in(rng, i), (d_in, cfg.rank), jnp.float32)
    a = a / jnp.sqrt(jnp.float32(d_in))
    prefix = path[: -len("/kernel")]
    out[f"{prefix}/a"] = nn.LogicallyPartitioned(a, (names[0], "lora_rank"))
    out[f"{prefix}/b"] = nn.LogicallyPartitioned(
        jnp.zeros((cfg.rank, d_out), jnp.float32), ("lora_rank", names[1]))
  return traverse_util.unflatten_dict(out, sep="/")


def variables(lora_params: Any, cfg: LoraConfig) -> dict[str, Any]:
  """The backbone's `COLLECTION` variables: per adapted kernel, `a` and `scale * b`."""
  flat = traverse_util.flatten_dict(nn.meta.unbox(lora_params), sep="/")
  return traverse_util.unflatten_dict(
      {k: cfg.scale * v if k.endswith("/b") else v for k, v in flat.items()}, sep="/")


def low_rank(module: nn.Module, x: jax.Array, in_ndim: int, out_shape: Sequence[int],
             dtype: Any) -> jax.Array | None:
  """The LoRA term `(x a) b` of a projection, or None when it has no factors.

  A projection module calls this with its own input and adds the result to
  `x W`; its factors are read from the `COLLECTION` variables at the
  module's path (`variables` has folded the scale into `b`).

  Args:
    module: the projection; its kernel is `[prod(in axes), prod(out_shape)]`.
    x: the projection's input, in `dtype`; its last `in_ndim` axes contract.
    in_ndim: how many trailing axes of `x` the kernel contracts.
    out_shape: the output axes the kernel's second axis splits into.
    dtype: compute dtype.

  Returns:
    `[*x.shape[:-in_ndim], *out_shape]`, or None.
  """
  if not module.has_variable(COLLECTION, "a"):
    return None
  a = jnp.asarray(module.get_variable(COLLECTION, "a"), dtype)
  b = jnp.asarray(module.get_variable(COLLECTION, "b"), dtype)
  lead = x.shape[:x.ndim - in_ndim]
  # 2-D matmuls: the factor gradients then contract one (batch x length) axis;
  # contracting batch and length as two axes made XLA:CPU transpose whole
  # activations and cotangents, which cost more than the weight gradients saved.
  h = jnp.reshape(x, (-1, a.shape[0])) @ a
  return jnp.reshape(h @ b, lead + tuple(out_shape))


def unread(fn: Callable[[Any], Any], lora_params: Any) -> list[str]:
  """The '/'-joined factor paths `fn(lora_params)` never reads (traced, not run)."""
  flat = traverse_util.flatten_dict(nn.meta.unbox(lora_params), sep="/")
  keys = list(flat)
  rebuild = lambda leaves: traverse_util.unflatten_dict(dict(zip(keys, leaves)), sep="/")
  jaxpr = jax.make_jaxpr(lambda leaves: fn(rebuild(leaves)))([flat[k] for k in keys]).jaxpr
  is_var = lambda v: isinstance(v, jax_core.Var)
  live = {v for v in jaxpr.outvars if is_var(v)}
  for eqn in reversed(jaxpr.eqns):  # an input is read if an output depends on it
    if any(v in live for v in eqn.outvars):
      live |= {v for v in eqn.invars if is_var(v)}
  return [k for k, v in zip(keys, jaxpr.invars) if v not in live]


def merge(backbone_params: Any, lora_params: Any, cfg: LoraConfig) -> Any:
  """Returns backbone params with `W + scale * a @ b` for each adapted kernel.

  The same function as the factors applied beside the kernels, in one
  kernel per projection: for inference or export, not for training.
  """
  flat = traverse_util.flatten_dict(backbone_params, sep="/")
  lora = traverse_util.flatten_dict(lora_params, sep="/")
  for key in lora:
    if not key.endswith("/a"):
      continue
    prefix = key[:-2]
    kpath = f"{prefix}/kernel"
    if kpath not in flat:
      raise KeyError(f"LoRA factor {prefix} has no kernel {kpath} in the backbone")
    w = flat[kpath]
    flat[kpath] = w + cfg.scale * (lora[f"{prefix}/a"] @ lora[f"{prefix}/b"]).astype(w.dtype)
  return traverse_util.unflatten_dict(flat, sep="/")
