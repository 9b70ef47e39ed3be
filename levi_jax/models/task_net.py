"""The small task-specific models LEVI trains from scratch.

Two towers, both returning a `[batch, out_dim]` representation:

* `FeatureTower`: one embedding table per categorical feature (user id, item
  id, side features), bags such as genres mean-pooled, concatenated, then an
  MLP. The recommendation default. `feature_dropout` drops whole features'
  embeddings in training (regularising towards rows with features missing).
* `TokenTower`: for text-only tasks; a bag of token embeddings (`num_layers=0`)
  or a tiny pre-norm transformer over the tokens, mean-pooled.

Feature id conventions (shared with `levi_jax.data`): id 0 is padding/missing
(ignored in bags, embedded like any id for scalar features), id 1 is the
out-of-vocabulary bucket, ids 2.. are known values.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

PAD_ID = 0
OOV_ID = 1


@dataclasses.dataclass(frozen=True)
class CategoricalFeature:
  """One categorical input of the feature tower.

  Attributes:
    name: key of the feature in the batch.
    vocab_size: number of ids, padding (0) and OOV (1) included.
    bag_size: None for a scalar feature (batch shape `[batch]`); K for a bag
      (batch shape `[batch, K]`, padded with 0 and mean-pooled).
    embed_dim: width of this feature's embedding (None: the tower's default).
  """

  name: str
  vocab_size: int
  bag_size: int | None = None
  embed_dim: int | None = None

  def __post_init__(self):
    if self.vocab_size < 2:
      raise ValueError(f"feature {self.name!r}: vocab_size must be >= 2 (pad + OOV), "
                       f"got {self.vocab_size}")
    if self.bag_size is not None and self.bag_size < 1:
      raise ValueError(f"feature {self.name!r}: bag_size must be >= 1, got {self.bag_size}")


def validate_features(batch: Mapping[str, Any], features: Sequence[CategoricalFeature]):
  """Checks a host batch against the feature specs; raises a readable error.

  Run on the first batch of every run (inside `jit` an out-of-range id would
  silently clamp), so a data/vocabulary mismatch fails before training.
  """
  for f in features:
    if f.name not in batch:
      raise KeyError(f"batch has no feature {f.name!r}; it has {sorted(batch)}")
    x = np.asarray(batch[f.name])
    want_ndim = 1 if f.bag_size is None else 2
    if x.ndim != want_ndim or (f.bag_size is not None and x.shape[1] != f.bag_size):
      want = "[batch]" if f.bag_size is None else f"[batch, {f.bag_size}]"
      raise ValueError(f"feature {f.name!r}: expected shape {want}, got {x.shape}")
    if not np.issubdtype(x.dtype, np.integer):
      raise ValueError(f"feature {f.name!r}: expected integer ids, got dtype {x.dtype}")
    if x.size and (x.min() < 0 or x.max() >= f.vocab_size):
      raise ValueError(
          f"feature {f.name!r}: ids must lie in [0, {f.vocab_size}) (its vocab_size), "
          f"but the batch has ids in [{x.min()}, {x.max()}]: the model's feature vocab "
          "does not match the data's")


def check_feature_dropout(rate: float, owner: str):
  """Raises a ValueError naming `owner` unless `rate` is a dropout rate in [0, 1)."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"{owner}.feature_dropout must be in [0, 1), got {rate!r}")


class MLP(nn.Module):
  """Dense layers with a nonlinearity between them (none after the last).

  `final_bias` initialises the last layer's bias (e.g. to the mean rating).
  `output_axis` is the logical axis name of the last layer's outputs: "mlp"
  (sharded like hidden units), or None for a prediction head, whose few
  outputs (1 for a rating) no mesh axis divides.
  """

  widths: tuple[int, ...]
  activation: str = "gelu"
  final_activation: bool = False
  final_bias: float = 0.0
  dtype: Any = jnp.float32
  output_axis: str | None = "mlp"

  @nn.compact
  def __call__(self, x: Array, injections: Sequence[Array | None] = ()) -> Array:
    """Applies the layers; `injections[i]` (if given) is added after layer i."""
    for i, w in enumerate(self.widths):
      last = i == len(self.widths) - 1
      out_axis = self.output_axis if last else "mlp"
      x = nn.Dense(w, dtype=self.dtype, param_dtype=jnp.float32, name=f"dense_{i}",
                   kernel_init=nn.with_logical_partitioning(
                       nn.initializers.lecun_normal(), ("embed", out_axis)),
                   bias_init=nn.with_logical_partitioning(
                       nn.initializers.constant(self.final_bias) if last
                       else nn.initializers.zeros, (out_axis,)))(x)
      if i < len(self.widths) - 1 or self.final_activation:
        x = getattr(nn, self.activation)(x)
      if i < len(injections) and injections[i] is not None:
        x = x + injections[i].astype(x.dtype)
    return x


class FeatureTower(nn.Module):
  """Embeddings of categorical features, concatenated, through an MLP.

  Attributes:
    features: the categorical inputs.
    embed_dim: default embedding width per feature.
    hidden: MLP widths; the last is the representation width.
    feature_dropout: in training (`deterministic=False`, a "dropout" rng), each
      example's embedding of each feature (a bag's pooled one) is zeroed with
      this probability, the kept ones scaled by 1 / (1 - rate) (inverted
      dropout, so evaluation needs no rescaling). The model learns to predict
      from any subset of the features, e.g. without the user id of an unseen
      user. 0 (default): off.
  """

  features: tuple[CategoricalFeature, ...]
  embed_dim: int = 16
  hidden: tuple[int, ...] = (64, 64)
  feature_dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, batch: Mapping[str, Array],
               injections: Sequence[Array | None] = (), deterministic: bool = True) -> Array:
    """The representation; `injections[i]` is added to hidden layer i's output
    (layer-wise fusion: `ViewFusionModel(fusion="layerwise")`)."""
    if not self.features:
      raise ValueError("FeatureTower needs at least one CategoricalFeature")
    check_feature_dropout(self.feature_dropout, "FeatureTower")
    parts = []
    for f in self.features:
      table = self.param(
          f"embed_{f.name}",
          nn.with_logical_partitioning(nn.initializers.normal(0.1),
                                       ("feature_vocab", "feature_embed")),
          (f.vocab_size, f.embed_dim or self.embed_dim), jnp.float32)
      ids = jnp.asarray(batch[f.name], jnp.int32)
      e = jnp.take(jnp.asarray(table, self.dtype), ids, axis=0)
      if f.bag_size is not None:  # mean over non-padding members of the bag
        keep = (ids != PAD_ID)[..., None].astype(self.dtype)
        e = (e * keep).sum(-2) / jnp.maximum(keep.sum(-2), 1.0)
      if self.feature_dropout:  # one keep/drop draw per example and feature
        e = nn.Dropout(self.feature_dropout, broadcast_dims=(e.ndim - 1,),
                       name=f"dropout_{f.name}")(e, deterministic=deterministic)
      parts.append(e)
    x = jnp.concatenate(parts, axis=-1)
    return MLP(self.hidden, final_activation=True, dtype=self.dtype, name="mlp")(
        x, injections)


class TokenTower(nn.Module):
  """Text-only small model: bag of token embeddings or a tiny transformer.

  Attributes:
    vocab_size: token vocabulary size (id 0 is padding).
    embed_dim: token embedding width (and transformer width).
    num_layers: 0 for a bag of embeddings, 1-2 for a tiny transformer.
    num_heads: heads of the tiny transformer.
    out_dim: representation width.
    max_length: maximum sequence length (learned positions, transformer only).
    tokens_key: the batch key holding `[batch, length]` token ids.
  """

  vocab_size: int
  embed_dim: int = 64
  num_layers: int = 0
  num_heads: int = 4
  out_dim: int = 64
  max_length: int = 512
  tokens_key: str = "inputs"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, batch: Mapping[str, Array], deterministic: bool = True) -> Array:
    del deterministic  # no dropout in this tower
    tokens = jnp.asarray(batch[self.tokens_key], jnp.int32)
    mask = tokens > 0
    table = self.param("token_embed", nn.with_logical_partitioning(
        nn.initializers.normal(0.1), ("vocab", "feature_embed")),
                       (self.vocab_size, self.embed_dim), jnp.float32)
    x = jnp.take(jnp.asarray(table, self.dtype), tokens, axis=0)
    if self.num_layers:
      if tokens.shape[1] > self.max_length:
        raise ValueError(f"TokenTower: sequence length {tokens.shape[1]} exceeds "
                         f"max_length {self.max_length}")
      pos = self.param("pos_embed", nn.with_logical_partitioning(
          nn.initializers.normal(0.02), ("length", "feature_embed")),
                       (self.max_length, self.embed_dim), jnp.float32)
      x = x + jnp.asarray(pos[: tokens.shape[1]], self.dtype)[None]
      attn_mask = nn.make_attention_mask(mask, mask)
      for i in range(self.num_layers):
        y = nn.LayerNorm(dtype=self.dtype, name=f"ln_attn_{i}")(x)
        y = nn.MultiHeadDotProductAttention(self.num_heads, dtype=self.dtype,
                                            name=f"attn_{i}")(y, y, mask=attn_mask)
        x = x + y
        y = nn.LayerNorm(dtype=self.dtype, name=f"ln_mlp_{i}")(x)
        x = x + MLP((4 * self.embed_dim, self.embed_dim), dtype=self.dtype,
                    name=f"mlp_{i}")(y)
    keep = mask[..., None].astype(x.dtype)
    pooled = (x * keep).sum(1) / jnp.maximum(keep.sum(1), 1.0)
    return MLP((self.out_dim,), final_activation=True, dtype=self.dtype,
               name="proj")(pooled)
