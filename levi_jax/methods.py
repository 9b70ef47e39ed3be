"""One factory from a method name to (model, which parameters train).

Every method is built from the same parts (`ViewFusionModel`, `EnsembleModel`,
`lora`) so that comparisons are like for like:

| name      | model                                           | trains                    |
|-----------|-------------------------------------------------|---------------------------|
| levi      | backbone taps + task net, adapters, fusion MLP  | all but the backbone      |
| levi_ft   | the same (paper's Remark 5)                     | everything                |
| levi_lora | the same + LoRA on the backbone (Remark 6)      | all but the base backbone |
| ft        | backbone, pooled final output, linear head      | everything                |
| lp        | the same                                        | the head                  |
| lpft      | the same; stage 1 LP, stage 2 FT from there     | head, then everything     |
| wiseft    | LP-FT, then interpolate LP and FT weights       | as lpft                   |
| lora      | FT model + LoRA on the backbone                 | head + LoRA factors       |
| scratch   | task net + MLP head                             | everything                |
| ensemble  | mean of an LP (or FT) model and a Scratch model | each member on its loss   |

Parameter paths are '/'-joined; a stage's `frozen` lists path prefixes that
get no update and no optimizer state.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from levi_jax.models import lora as lora_lib
from levi_jax.models.levi import EnsembleModel, ViewFusionModel, Tap

METHODS = ("levi", "levi_ft", "levi_lora", "ft", "lp", "lpft", "wiseft", "lora",
           "scratch", "ensemble")
BACKBONE = "backbone"
LORA = "lora"


@dataclasses.dataclass(frozen=True)
class Stage:
  """A phase of training with one trainable set.

  Attributes:
    name: shown in logs and checkpoints.
    frozen: '/'-joined parameter path prefixes held fixed in this stage.
    fraction: this stage's share of the run's training steps.
  """

  name: str
  frozen: tuple[str, ...] = ()
  fraction: float = 1.0


@dataclasses.dataclass(frozen=True)
class Method:
  """A model plus the plan for training it.

  Attributes:
    name: one of `METHODS`.
    module: the flax module (`ViewFusionModel` or `EnsembleModel`).
    stages: training phases (one for most methods, two for lpft/wiseft).
    lora: LoRA config when the backbone carries adapters.
    wise_alphas: WiSE-FT mixing weights of the final (FT) weights with the
      weights at the end of the first stage (LP); empty for other methods.
  """

  name: str
  module: nn.Module
  stages: tuple[Stage, ...]
  lora: lora_lib.LoraConfig | None = None
  wise_alphas: tuple[float, ...] = ()

  def __post_init__(self):
    total = sum(s.fraction for s in self.stages)
    if not self.stages or abs(total - 1.0) > 1e-6:
      raise ValueError(f"method {self.name!r}: stage fractions must sum to 1, got {total}")

  def init(self, rng: jax.Array, batch: Mapping[str, Any]) -> dict[str, Any]:
    """Initialises parameters (boxed with logical axis names)."""
    params = self.module.init(rng, batch, deterministic=True)["params"]
    params = dict(params)
    if self.lora is not None:
      params[LORA] = lora_lib.init(jax.random.fold_in(rng, 1), params[BACKBONE], self.lora)
      unread = lora_lib.unread(lambda lo: self.apply({**params, LORA: lo}, batch), params[LORA])
      if unread:
        raise ValueError(f"method {self.name!r}: the backbone never reads the LoRA factors "
                         f"{unread[:4]}{'...' if len(unread) > 4 else ''}; its projection "
                         "modules must add `lora.low_rank` to their outputs")
    return params

  def apply(self, params: Mapping[str, Any], batch: Mapping[str, Any], *,
            train: bool = False, rng: jax.Array | None = None) -> dict[str, Any]:
    """Runs the model.

    LoRA factors go to the backbone as the `lora` variable collection, and
    each adapted projection adds its low-rank term beside its kernel
    (`lora.low_rank`): the kernels themselves are used as they are, so a
    frozen kernel gets no weight gradient.
    """
    params = dict(params)
    variables = {}
    if self.lora is not None:
      variables[lora_lib.COLLECTION] = {
          BACKBONE: lora_lib.variables(params.pop(LORA), self.lora)}
    variables["params"] = params
    rngs = {"dropout": rng} if (train and rng is not None) else {}
    return self.module.apply(variables, batch, deterministic=not train, rngs=rngs)


def is_frozen(path: str, frozen: Sequence[str]) -> bool:
  """Whether a '/'-joined parameter path falls under a frozen prefix."""
  return any(path == p.rstrip("/") or path.startswith(p.rstrip("/") + "/") for p in frozen)


def partition(params: Mapping[str, Any], frozen: Sequence[str]) -> tuple[dict, dict]:
  """Splits params into (trainable, frozen) nested dicts by path prefix."""
  flat = traverse_util.flatten_dict(dict(params), sep="/")
  train = {k: v for k, v in flat.items() if not is_frozen(k, frozen)}
  fixed = {k: v for k, v in flat.items() if is_frozen(k, frozen)}
  return (traverse_util.unflatten_dict(train, sep="/"),
          traverse_util.unflatten_dict(fixed, sep="/"))


def combine(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict:
  """Inverse of `partition`."""
  flat = traverse_util.flatten_dict(dict(trainable), sep="/")
  flat.update(traverse_util.flatten_dict(dict(frozen), sep="/"))
  return traverse_util.unflatten_dict(flat, sep="/")


def wise_interpolate(params0: Any, params1: Any, alpha: float) -> Any:
  """WiSE-FT: (1 - alpha) * params0 + alpha * params1, leaf by leaf."""
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"WiSE-FT alpha must be in [0, 1], got {alpha}")
  return jax.tree.map(lambda a, b: (1.0 - alpha) * a + alpha * b, params0, params1)


def make_method(
    name: str,
    *,
    backbone: nn.Module | None = None,
    task_net: nn.Module | None = None,
    taps: Sequence[Tap] = ("middle", -1),
    pooling: str = "mean",
    adapter_dim: int | None = 64,
    fusion_hidden: Sequence[int] = (64,),
    num_outputs: int = 1,
    aux_heads: bool = False,
    fusion: str = "late",
    lora: lora_lib.LoraConfig | None = None,
    ensemble_member: str = "lp",
    lp_fraction: float = 0.5,
    wise_alphas: Sequence[float] = (0.25, 0.5, 0.75),
    output_bias: float = 0.0,
    dtype: Any = jnp.float32,
) -> Method:
  """Builds the named method from a backbone module and a small task network.

  Args:
    name: one of `METHODS`.
    backbone: encoder module returning `EncoderOutput` (e.g. `T5Encoder`).
    task_net: small model trained from scratch (`FeatureTower`/`TokenTower`).
    taps, pooling, adapter_dim, fusion_hidden, aux_heads, fusion: LEVI's
      settings (see `ViewFusionModel`); the probe baselines use a linear head on the
      pooled final output and the same pooling.
    num_outputs: 1 for regression, class count for classification.
    lora: LoRA settings for lora/levi_lora (default `LoraConfig()`).
    ensemble_member: "lp" or "ft": the backbone member of the ensemble.
    lp_fraction: share of steps spent in the LP stage of lpft/wiseft.
    wise_alphas: WiSE-FT interpolation weights to report.
    output_bias: initial bias of every prediction head (e.g. the mean rating).
    dtype: activation dtype.

  Raises:
    ValueError: unknown method name, or a part the method needs is missing.
  """
  if name not in METHODS:
    close = difflib.get_close_matches(name, METHODS, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(f"unknown method {name!r}{hint}; expected one of {', '.join(METHODS)}")
  needs_backbone = name != "scratch"
  needs_task_net = name in ("levi", "levi_ft", "levi_lora", "scratch", "ensemble")
  if needs_backbone and backbone is None:
    raise ValueError(f"method {name!r} needs a backbone")
  if needs_task_net and task_net is None:
    raise ValueError(f"method {name!r} needs a task_net (the small model)")
  if ensemble_member not in ("lp", "ft"):
    raise ValueError(f"ensemble_member must be 'lp' or 'ft', got {ensemble_member!r}")
  if not 0.0 < lp_fraction < 1.0:
    raise ValueError(f"lp_fraction must be in (0, 1), got {lp_fraction}")

  fusion_hidden = tuple(fusion_hidden)
  frozen_backbone = (BACKBONE,)
  if name.startswith("levi") and not tuple(taps):
    raise ValueError(f"method {name!r} with taps=(): LEVI without backbone taps is the small "
                     "model alone (use method 'scratch' for that); give at least one tap, "
                     "e.g. taps=('middle', -1)")

  def levi(freeze: bool) -> ViewFusionModel:
    return ViewFusionModel(backbone=backbone, task_net=task_net, taps=tuple(taps),
                           pooling=pooling, adapter_dim=adapter_dim,
                           fusion_hidden=fusion_hidden, num_outputs=num_outputs,
                           aux_heads=aux_heads, freeze_backbone=freeze,
                           output_bias=output_bias, fusion=fusion, dtype=dtype)

  def probe(freeze: bool) -> ViewFusionModel:
    return ViewFusionModel(backbone=backbone, taps=("final",), pooling=pooling,
                           adapter_dim=None, fusion_hidden=(), num_outputs=num_outputs,
                           freeze_backbone=freeze, output_bias=output_bias, dtype=dtype)

  def scratch() -> ViewFusionModel:
    return ViewFusionModel(task_net=task_net, fusion_hidden=fusion_hidden,
                           num_outputs=num_outputs, output_bias=output_bias, dtype=dtype)

  one = lambda *frozen: (Stage("train", tuple(frozen)),)
  two = (Stage("lp", frozen_backbone, lp_fraction), Stage("ft", (), 1.0 - lp_fraction))
  lora_cfg = lora or lora_lib.LoraConfig()
  if name == "levi":
    return Method(name, levi(True), one(BACKBONE))
  if name == "levi_ft":
    return Method(name, levi(False), one())
  if name == "levi_lora":
    return Method(name, levi(False), one(BACKBONE), lora=lora_cfg)
  if name == "ft":
    return Method(name, probe(False), one())
  if name == "lp":
    return Method(name, probe(True), one(BACKBONE))
  if name == "lpft":
    return Method(name, probe(False), two)
  if name == "wiseft":
    return Method(name, probe(False), two, wise_alphas=tuple(wise_alphas))
  if name == "lora":
    return Method(name, probe(False), one(BACKBONE), lora=lora_cfg)
  if name == "scratch":
    return Method(name, scratch(), one())
  member = probe(ensemble_member == "lp")
  frozen = ("members_0/backbone",) if ensemble_member == "lp" else ()
  return Method(name, EnsembleModel(members=(member, scratch())), one(*frozen))
