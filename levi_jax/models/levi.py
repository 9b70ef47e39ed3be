"""LEVI: a layer-wise ensemble of a frozen backbone and a small task model.

What the paper (Roh et al., "LEVI: Generalizable Fine-tuning via Layer-wise
Ensemble of Different Views", ICML 2024) states [paper] and what we chose [ours]:

* [paper] A large pre-trained model is adaptively ensembled, layer-wise, with
  a small task-specific model trained from scratch; the backbone is frozen by
  default; one loss is optimised over the combined output.
* [ours] Taps: a configurable set of backbone layers, default the middle layer
  and the last one (`("middle", -1)`). A tap is an encoder layer index
  (negative counts from the end), `"middle"` (layer `(L - 1) // 2`) or
  `"final"` (the output after `encoder_norm`).
* [ours] Each tap is pooled per example over non-padding tokens (mean, or the
  first token) and goes through its own adapting layer: LayerNorm, Dense to a
  common width, GELU. The LayerNorm is ours: raw T5 residual streams grow
  large with depth, and normalising lets one width/learning rate fit all taps.
* [ours] Two ways to join the views, `fusion`:
  - "late" (default): the adapted taps are concatenated with the small
    model's final representation and a fusion MLP produces the prediction (a
    scalar for rating regression, logits for classification);
  - "layerwise": each tap, in depth order, is assigned to a hidden layer of the
    small model (spread evenly over its depth: `tap_layers`); its adapting
    layer (LayerNorm, Dense, GELU, Dense to that layer's width) is added to the
    small model's hidden state there, and the fused state flows on through the
    small model to the fusion MLP. This is the closer reading of "layer-wise
    ensemble ... across multiple intermediate representations": the views meet
    at several depths, not only at the end. The paper's text supports both
    readings; it gives no equations for the join. The default, "late", is
    the variant with the lowest validation RMSE on real MovieLens-100K with
    all-MiniLM-L6-v2 (experiments/results/ml100k_minilm: late 1.0255,
    layer-wise 1.0281, late + auxiliary losses 1.0297, mean over the two
    gender shifts x 3 seeds). Training the small model with OOV dropout
    (`experiments.runs.oov_dropout`, 0.1) lowers validation RMSE further
    (-0.0027 over 8 shifts, experiments/results/ml100k_variants) but not OOD;
    feature dropout 0.1 on top (`FeatureTower.feature_dropout`) lowers it by
    another 0.0008, again not OOD.
* [ours] Loss: the task loss on the fused output; optional auxiliary heads
  (one linear head per view) add `aux_weight` x their task losses. Default
  off, because the paper describes one shared loss.
* [ours] Freezing: `jax.lax.stop_gradient` on the backbone outputs, and the
  train step differentiates only the trainable subtree, so no gradient is
  computed for (nor optimizer state kept for) the backbone.
* Beyond the paper: a frozen backbone's pooled taps depend on the example
  only, so they can be computed once (`ViewFusionModel.pooled_taps`) and passed in
  the batch under `CACHED_TAPS`; the backbone then does not run.

The same module, with other settings, is every baseline (see
`levi_jax.methods`): FT/LP are `taps=("final",)`, no adapter, no task net, a
linear head; Scratch is the task net alone.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from levi_jax.models.task_net import MLP

Array = jax.Array
Tap = int | str

# Batch key of precomputed pooled taps, `[batch, num_taps, embed]`.
CACHED_TAPS = "pooled_taps"


def resolve_taps(taps: Sequence[Tap], num_layers: int) -> tuple[int | str, ...]:
  """Maps tap specs to layer indices in [0, num_layers) or "final"; dedupes.

  Raises:
    ValueError: a tap index outside [-num_layers, num_layers) or an unknown name.
  """
  out: list[int | str] = []
  for t in taps:
    if t == "final":
      r: int | str = "final"
    elif t == "middle":
      r = (num_layers - 1) // 2
    elif isinstance(t, int) and not isinstance(t, bool):
      if not -num_layers <= t < num_layers:
        raise ValueError(
            f"tap layer index {t} is out of range for a backbone with {num_layers} "
            f"layers; expected an integer in [{-num_layers}, {num_layers - 1}], "
            "'middle' or 'final'")
      r = t % num_layers
    else:
      raise ValueError(f"unknown tap {t!r}; expected a layer index, 'middle' or 'final'")
    if r not in out:
      out.append(r)
  return tuple(out)


FUSIONS = ("late", "layerwise")


def tap_layers(num_taps: int, num_layers: int) -> list[int]:
  """The small-model layer each tap (in depth order) joins under layer-wise fusion:
  spread evenly, the deepest tap at the last layer (several may share one)."""
  return [min(num_layers - 1, ((k + 1) * num_layers - 1) // num_taps)
          for k in range(num_taps)]


def pool(x: Array, mask: Array, pooling: str) -> Array:
  """Pools `[batch, length, d]` over the non-padding tokens to `[batch, d]`."""
  if pooling == "mean":
    keep = mask[..., None].astype(x.dtype)
    return (x * keep).sum(1) / jnp.maximum(keep.sum(1), 1.0).astype(x.dtype)
  if pooling == "first":
    return x[:, 0]
  raise ValueError(f"unknown pooling {pooling!r}; expected 'mean' or 'first'")


class ViewFusionModel(nn.Module):
  """Views (pooled backbone taps, a small task model) fused by adapting layers and a head.

  LEVI is both views; with other settings the same module is each
  single-model baseline (`levi_jax.methods`): FT/LP/LP-FT/LoRA are the final
  tap alone with a linear head, Scratch is the task net alone with an MLP head.

  Attributes:
    backbone: an encoder returning `EncoderOutput` (e.g. `T5Encoder`), or None.
    task_net: the small model (`FeatureTower`/`TokenTower`), or None.
    taps: backbone taps (see module docstring).
    pooling: "mean" over non-padding tokens, or "first".
    adapter_dim: width of each adapting layer; None feeds the pooled tap as is.
    fusion_hidden: hidden widths of the fusion MLP; () is a linear head.
    num_outputs: 1 for regression, the class count for classification.
    aux_heads: add a linear head per view (returned under "aux").
    freeze_backbone: stop gradients at the backbone outputs.
    output_bias: initial bias of the prediction (and auxiliary) heads; the
      training targets' mean for regression, so training starts at the mean.
    dtype: activation dtype of the adapters and head.
  """

  backbone: nn.Module | None = None
  task_net: nn.Module | None = None
  taps: tuple[Tap, ...] = ("middle", -1)
  pooling: str = "mean"
  adapter_dim: int | None = 64
  fusion_hidden: tuple[int, ...] = (64,)
  num_outputs: int = 1
  aux_heads: bool = False
  freeze_backbone: bool = True
  output_bias: float = 0.0
  fusion: str = "late"
  dtype: Any = jnp.float32

  def pooled_taps(self, batch: Mapping[str, Array], deterministic: bool = True) -> Array:
    """The pooled backbone taps, `[batch, num_taps, embed]` (what the cache stores)."""
    taps = resolve_taps(self.taps, self.backbone.config.num_layers)
    enc = self.backbone(batch["inputs"], deterministic=deterministic)
    pooled = [pool(enc.final if t == "final" else enc.layers[t], enc.mask, self.pooling)
              for t in taps]
    return jnp.stack(pooled, axis=1)

  def _pooled(self, batch: Mapping[str, Array], deterministic: bool) -> list[Array]:
    """The pooled taps, one `[batch, embed]` array per tap (cached or computed)."""
    if self.backbone is None or not self.taps:
      return []
    taps = resolve_taps(self.taps, self.backbone.config.num_layers)
    if CACHED_TAPS in batch:  # precomputed by `pooled_taps`; backbone skipped
      pooled = jnp.asarray(batch[CACHED_TAPS])
      if pooled.shape[1] != len(taps):
        raise ValueError(f"batch['{CACHED_TAPS}'] holds {pooled.shape[1]} taps, the "
                         f"model taps {len(taps)} ({taps})")
    else:
      pooled = self.pooled_taps(batch, deterministic)
    if self.freeze_backbone:
      pooled = jax.lax.stop_gradient(pooled)
    return [pooled[:, i].astype(self.dtype) for i in range(len(taps))]

  def _layerwise_views(self, batch: Mapping[str, Array], pooled: list[Array],
                       deterministic: bool) -> list[Array]:
    """Taps injected into the small model's hidden layers; returns [taps..., fused]."""
    hidden = getattr(self.task_net, "hidden", None)
    if self.task_net is None or not hidden or self.backbone is None or not self.taps:
      raise ValueError("fusion='layerwise' needs a backbone with taps and a task_net with "
                       "hidden layers (FeatureTower)")
    taps = resolve_taps(self.taps, self.backbone.config.num_layers)
    depth = lambda i: math.inf if taps[i] == "final" else taps[i]
    order = sorted(range(len(taps)), key=depth)  # shallowest first
    layers = tap_layers(len(taps), len(hidden))
    injections: list[Array | None] = [None] * len(hidden)
    adapted = []
    for rank, i in enumerate(order):
      v = pooled[i]
      layer = layers[rank]
      name = f"adapter_{taps[i]}"
      v = nn.LayerNorm(dtype=self.dtype, name=f"{name}_norm")(v)
      v = MLP((self.adapter_dim or hidden[layer], hidden[layer]), dtype=self.dtype,
              name=name)(v)
      adapted.append(v)
      injections[layer] = v if injections[layer] is None else injections[layer] + v
    fused = self.task_net(batch, injections, deterministic=deterministic).astype(self.dtype)
    return adapted + [fused]

  def _views(self, batch: Mapping[str, Array], deterministic: bool) -> list[Array]:
    if self.fusion not in FUSIONS:
      raise ValueError(f"unknown fusion {self.fusion!r}; expected one of {FUSIONS}")
    pooled = self._pooled(batch, deterministic)
    if self.fusion == "layerwise":
      return self._layerwise_views(batch, pooled, deterministic)
    views = []
    if pooled:
      taps = resolve_taps(self.taps, self.backbone.config.num_layers)
      for t, v in zip(taps, pooled):
        if self.adapter_dim is not None:
          name = f"adapter_{t}"
          v = nn.LayerNorm(dtype=self.dtype, name=f"{name}_norm")(v)
          v = MLP((self.adapter_dim,), final_activation=True, dtype=self.dtype,
                  name=name)(v)
        views.append(v)
    if self.task_net is not None:
      views.append(self.task_net(batch, deterministic=deterministic).astype(self.dtype))
    if not views:
      raise ValueError("ViewFusionModel needs a backbone with taps, a task_net, or both")
    return views

  @nn.compact
  def __call__(self, batch: Mapping[str, Array], deterministic: bool = True
               ) -> dict[str, Any]:
    """Returns {"prediction": [batch, num_outputs], "aux": tuple of the same}."""
    views = self._views(batch, deterministic)
    # Late fusion joins every view here; layer-wise fusion already joined them
    # inside the small model, whose fused state is the last view.
    x = views[-1] if self.fusion == "layerwise" else jnp.concatenate(views, axis=-1)
    pred = MLP(self.fusion_hidden + (self.num_outputs,), final_bias=self.output_bias,
               dtype=self.dtype, output_axis=None, name="head")(x)
    aux = ()
    if self.aux_heads:
      aux = tuple(MLP((self.num_outputs,), final_bias=self.output_bias, dtype=self.dtype,
                      output_axis=None, name=f"aux_head_{i}")(v)
                  for i, v in enumerate(views))
    return {"prediction": pred.astype(jnp.float32),
            "aux": tuple(a.astype(jnp.float32) for a in aux)}


class EnsembleModel(nn.Module):
  """Vanilla output ensemble: the average of independently trained members.

  Each member is trained on its own task loss (the loss sums the members'
  losses and no parameter is shared, so no gradient crosses members); the
  prediction is the mean of the members' predictions.
  """

  members: tuple[nn.Module, ...]

  @nn.compact
  def __call__(self, batch: Mapping[str, Array], deterministic: bool = True
               ) -> dict[str, Any]:
    preds = tuple(m(batch, deterministic)["prediction"] for m in self.members)
    return {"prediction": sum(preds) / len(preds), "aux": (), "members": preds}
