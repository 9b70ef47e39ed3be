"""Low-rank adapters (LoRA) on a backbone's kernels, as a parameter transform.

LoRA is kept outside the backbone module so the backbone's parameter tree
stays exactly T5X's (checkpoints restore unchanged). A separate tree mirrors
the targeted kernels with factors `a: [in, rank]` and `b: [rank, out]`;
before a forward pass `merge` replaces each targeted kernel `W` with
`W + (alpha / rank) * a @ b`. `b` starts at zero, so a fresh LoRA model equals
its base model. Gradients reach `a` and `b` through the merge; the base
kernels are frozen by the method's trainable set.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

# Kernel paths (relative to the backbone) of T5's attention and MLP blocks.
T5_TARGETS = (r"attention/(query|key|value|out)/kernel$", r"mlp/(wi|wi_0|wi_1|wo)/kernel$")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA hyperparameters.

  Attributes:
    rank: rank of the update.
    alpha: the update is scaled by alpha / rank.
    targets: regexes searched in '/'-joined backbone kernel paths.
  """

  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = T5_TARGETS

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
           if jnp.ndim(nn.meta.unbox(v)) == 2 and any(re.search(t, p) for t in cfg.targets)]
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


def merge(backbone_params: Any, lora_params: Any, cfg: LoraConfig) -> Any:
  """Returns backbone params with `W + scale * a @ b` for each adapted kernel."""
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
