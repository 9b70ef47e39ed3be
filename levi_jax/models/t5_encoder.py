"""The T5 encoder, with T5X's parameter tree and numerics, returning layer taps.

The parameters are exactly the `token_embedder` and `encoder` subtrees of T5X's
`t5x/examples/t5/network.py` `Transformer`: same module names, shapes, dtypes
(float32), initialisers and logical axis names, so a T5X checkpoint's encoder
restores into `T5Encoder` unchanged:

    token_embedder/embedding                       [vocab, embed]
    encoder/relpos_bias/rel_embedding              [heads, relpos_buckets]
    encoder/layers_{i}/pre_attention_layer_norm/scale          [embed]
    encoder/layers_{i}/attention/{query,key,value}/kernel      [embed, joined_kv]
    encoder/layers_{i}/attention/out/kernel                    [joined_kv, embed]
    encoder/layers_{i}/pre_mlp_layer_norm/scale                [embed]
    encoder/layers_{i}/mlp/{wi | wi_0, wi_1}/kernel            [embed, mlp]
    encoder/layers_{i}/mlp/wo/kernel                           [mlp, embed]
    encoder/encoder_norm/scale                                 [embed]

Unlike T5X's encoder, `T5Encoder` returns the output of every layer (the taps
LEVI consumes) next to the final normed output and the padding mask, the way
big_vision's ViT returns `(output, intermediates)`.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from levi_jax.models import lora as lora_lib

Array = jax.Array
Dtype = Any

# T5X's initialisers (t5x/examples/t5/layers.py).
_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
_attn_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
_relpos_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
_embed_init = nn.initializers.normal(stddev=1.0)


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyperparameters of a T5 encoder (the encoder half of T5X's `T5Config`).

  Attributes:
    vocab_size: rows of the shared token embedding.
    emb_dim: model width.
    num_heads: attention heads.
    num_layers: encoder layers.
    head_dim: width of each head.
    mlp_dim: hidden width of the feed-forward block.
    mlp_activations: ('gelu', 'linear') is T5 1.1's gated-GELU; ('relu',) T5 1.0.
    dropout_rate: dropout used when `deterministic=False`.
    dtype: activation dtype (bfloat16 on TPU); parameters are always float32.
    float32_attention_logits: compute attention logits in float32.
    num_relpos_buckets: relative position buckets (T5X: 32).
    relpos_max_distance: distance beyond which buckets merge (T5X: 128).
    layer_norm_epsilon: RMS norm epsilon (T5X: 1e-6).
    one_hot_embedding: embed by one-hot contraction (T5X's choice, which
      partitions the vocab axis cleanly on TPU) instead of a gather; the two
      give identical values.
  """

  vocab_size: int = 32128
  emb_dim: int = 512
  num_heads: int = 8
  num_layers: int = 6
  head_dim: int = 64
  mlp_dim: int = 2048
  mlp_activations: tuple[str, ...] = ("relu",)
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  float32_attention_logits: bool = False
  num_relpos_buckets: int = 32
  relpos_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  one_hot_embedding: bool = False

  def __post_init__(self):
    for name in ("vocab_size", "emb_dim", "num_heads", "num_layers", "head_dim",
                 "mlp_dim"):
      if getattr(self, name) <= 0:
        raise ValueError(f"T5Config.{name} must be positive, got {getattr(self, name)}")
    if not self.mlp_activations:
      raise ValueError("T5Config.mlp_activations must name at least one activation")
    for act in self.mlp_activations:
      if act != "linear" and not callable(getattr(nn, act, None)):
        raise ValueError(
            f"T5Config.mlp_activations: unknown activation {act!r}; expected "
            "'linear' or a flax.linen function name such as 'gelu' or 'relu'")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"T5Config.dropout_rate must be in [0, 1), got {self.dropout_rate}")
    # Accept gin/YAML spellings such as 'bfloat16'.
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
    object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))

  def replace(self, **kwargs) -> "T5Config":
    """Returns a copy with some fields changed (e.g. dtype or vocab_size)."""
    return dataclasses.replace(self, **kwargs)


_GATED_GELU = ("gelu", "linear")
_RELU = ("relu",)

# T5X's numbers (t5x/examples/t5/t5_1_1/*.gin, t5_1_0/*.gin); vocab 32128.
# The one place levi_jax keeps T5 sizes: gin files name a preset (BACKBONE =
# 't5_1_1_base') rather than bind T5Config, because the trainer, the T5X model,
# the checkpoint loaders and the tests all build configs from a name; tests/
# test_t5x_golden.py checks each preset against T5X's own gin file.
PRESETS: dict[str, T5Config] = {
    "t5_1_1_tiny": T5Config(emb_dim=8, num_heads=4, num_layers=2, head_dim=3,
                            mlp_dim=16, mlp_activations=_GATED_GELU),
    "t5_1_1_small": T5Config(emb_dim=512, num_heads=6, num_layers=8, head_dim=64,
                             mlp_dim=1024, mlp_activations=_GATED_GELU),
    "t5_1_1_base": T5Config(emb_dim=768, num_heads=12, num_layers=12, head_dim=64,
                            mlp_dim=2048, mlp_activations=_GATED_GELU),
    "t5_1_1_large": T5Config(emb_dim=1024, num_heads=16, num_layers=24, head_dim=64,
                             mlp_dim=2816, mlp_activations=_GATED_GELU),
    "t5_1_1_xl": T5Config(emb_dim=2048, num_heads=32, num_layers=24, head_dim=64,
                          mlp_dim=5120, mlp_activations=_GATED_GELU),
    "t5_1_1_xxl": T5Config(emb_dim=4096, num_heads=64, num_layers=24, head_dim=64,
                           mlp_dim=10240, mlp_activations=_GATED_GELU),
    "t5_1_0_small": T5Config(emb_dim=512, num_heads=8, num_layers=6, head_dim=64,
                             mlp_dim=2048, mlp_activations=_RELU),
    "t5_1_0_base": T5Config(emb_dim=768, num_heads=12, num_layers=12, head_dim=64,
                            mlp_dim=3072, mlp_activations=_RELU),
}


def preset(name: str, **overrides) -> T5Config:
  """Returns the named preset (see `PRESETS`), with optional field overrides."""
  if name not in PRESETS:
    raise ValueError(f"Unknown T5 preset {name!r}; expected one of {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


def _param(module: nn.Module, name: str, init: Callable, shape: Sequence[int],
           axes: tuple[str, ...]) -> Array:
  """A float32 parameter annotated with logical axis names."""
  return module.param(name, nn.with_logical_partitioning(init, axes), tuple(shape),
                      jnp.float32)


class RMSNorm(nn.Module):
  """T5's layer norm: scale only, no mean subtraction, no bias."""

  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.asarray(x, jnp.float32)
    mean2 = jnp.mean(jax.lax.square(x), axis=-1, keepdims=True)
    y = jnp.asarray(x * jax.lax.rsqrt(mean2 + self.epsilon), self.dtype)
    scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",))
    return y * jnp.asarray(scale, self.dtype)


class DenseGeneral(nn.Module):
  """Bias-free linear map over the trailing `len(in_shape)` axes.

  The kernel is stored 2-D, `[prod(in_shape), prod(out_shape)]`, as T5X does
  (so `joined_kv` = heads * head_dim is one axis in checkpoints). LoRA
  factors in the `lora` variable collection add their low-rank term beside
  the kernel (`lora.low_rank`).
  """

  out_shape: tuple[int, ...]
  in_ndim: int = 1
  kernel_axes: tuple[str, str] = ("embed", "mlp")
  kernel_init: Callable = _kernel_init
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_shape = x.shape[-self.in_ndim:]
    kernel = _param(self, "kernel", self.kernel_init,
                    (int(np.prod(in_shape)), int(np.prod(self.out_shape))),
                    self.kernel_axes)
    kernel = jnp.reshape(jnp.asarray(kernel, self.dtype), in_shape + self.out_shape)
    x = jnp.asarray(x, self.dtype)
    contract = tuple(range(x.ndim - self.in_ndim, x.ndim))
    y = jax.lax.dot_general(x, kernel, ((contract, tuple(range(self.in_ndim))), ((), ())))
    delta = lora_lib.low_rank(self, x, self.in_ndim, self.out_shape, self.dtype)
    return y if delta is None else y + delta


def relative_position_bucket(relative_position: np.ndarray, num_buckets: int,
                             max_distance: int) -> np.ndarray:
  """T5's bidirectional relative-position bucketing (memory - query offsets)."""
  num_buckets //= 2
  n = -relative_position
  ret = (n < 0).astype(np.int32) * num_buckets
  n = np.abs(n)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  val_if_large = max_exact + (
      np.log(n.astype(np.float32) / max_exact + np.finfo(np.float32).eps)
      / np.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(np.int32)
  val_if_large = np.minimum(val_if_large, num_buckets - 1)
  return ret + np.where(is_small, n, val_if_large)


class RelativePositionBiases(nn.Module):
  """Per-head learned attention bias from bucketed relative positions."""

  num_buckets: int
  max_distance: int
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, length: int) -> Array:
    pos = np.arange(length, dtype=np.int32)
    buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.num_buckets,
                                       self.max_distance)
    table = _param(self, "rel_embedding", _relpos_init,
                   (self.num_heads, self.num_buckets), ("heads", "relpos_buckets"))
    # One-hot contraction instead of a gather, as T5X (partitions cleanly).
    one_hot = jnp.asarray(buckets[None] == np.arange(self.num_buckets)[:, None, None],
                          self.dtype)
    bias = jax.lax.dot_general(jnp.asarray(table, self.dtype), one_hot,
                               (((1,), (0,)), ((), ())))
    return bias[None]  # [1, heads, q, k]


class SelfAttention(nn.Module):
  """T5 multi-head self-attention (no 1/sqrt(d) on logits: it is in the init)."""

  num_heads: int
  head_dim: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  float32_logits: bool = False

  @nn.compact
  def __call__(self, x: Array, bias: Array, deterministic: bool) -> Array:
    depth_scaling = jnp.sqrt(self.head_dim).astype(self.dtype)
    query_init = lambda *a: _attn_kernel_init(*a) / depth_scaling
    proj = functools.partial(DenseGeneral, out_shape=(self.num_heads, self.head_dim),
                             kernel_axes=("embed", "joined_kv"), dtype=self.dtype)
    q = proj(kernel_init=query_init, name="query")(x)
    k = proj(kernel_init=_attn_kernel_init, name="key")(x)
    v = proj(kernel_init=_attn_kernel_init, name="value")(x)
    q, k, v = (nn.with_logical_constraint(t, ("batch", "length", "heads", "kv"))
               for t in (q, k, v))
    if self.float32_logits:
      q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    logits = logits + bias.astype(logits.dtype)
    weights = jax.nn.softmax(logits).astype(self.dtype)
    if not deterministic and self.dropout_rate > 0.0:
      keep = 1.0 - self.dropout_rate
      shape = list(weights.shape)
      shape[-2] = 1  # T5 broadcasts attention dropout over queries.
      mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
      weights = weights * (mask.astype(weights.dtype) / jnp.asarray(keep, self.dtype))
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return DenseGeneral(out_shape=(x.shape[-1],), in_ndim=2,
                        kernel_axes=("joined_kv", "embed"),
                        kernel_init=_attn_kernel_init, dtype=self.dtype,
                        name="out")(out)


class MlpBlock(nn.Module):
  """T5 feed-forward block; several activations are multiplied (gated GELU)."""

  mlp_dim: int
  activations: tuple[str, ...]
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    hidden = []
    for i, act in enumerate(self.activations):
      name = "wi" if len(self.activations) == 1 else f"wi_{i}"
      h = DenseGeneral(out_shape=(self.mlp_dim,), kernel_axes=("embed", "mlp"),
                       dtype=self.dtype, name=name)(x)
      hidden.append(h if act == "linear" else getattr(nn, act)(h))
    h = functools.reduce(operator.mul, hidden)
    h = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(h, deterministic)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    return DenseGeneral(out_shape=(x.shape[-1],), kernel_axes=("mlp", "embed"),
                        dtype=self.dtype, name="wo")(h)


class EncoderLayer(nn.Module):
  """Pre-norm attention and MLP blocks with residuals."""

  config: T5Config

  @nn.compact
  def __call__(self, x: Array, bias: Array, deterministic: bool) -> Array:
    cfg = self.config
    drop = lambda y: nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(y, deterministic)
    norm = functools.partial(RMSNorm, epsilon=cfg.layer_norm_epsilon, dtype=cfg.dtype)
    y = norm(name="pre_attention_layer_norm")(x)
    y = SelfAttention(cfg.num_heads, cfg.head_dim, cfg.dropout_rate, cfg.dtype,
                      cfg.float32_attention_logits, name="attention")(y, bias, deterministic)
    x = x + drop(y)
    y = norm(name="pre_mlp_layer_norm")(x)
    y = MlpBlock(cfg.mlp_dim, cfg.mlp_activations, cfg.dropout_rate, cfg.dtype,
                 name="mlp")(y, deterministic)
    x = x + drop(y)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


@dataclasses.dataclass(frozen=True)
class EncoderOutput:
  """What `T5Encoder` returns.

  Attributes:
    final: `[batch, length, embed]`, the output after `encoder_norm`.
    layers: one `[batch, length, embed]` array per encoder layer (layer i's
      output, before any final norm); `layers[-1]` is the last layer's.
    mask: `[batch, length]` bool, True at non-padding tokens (token id != 0).
  """

  final: Array
  layers: tuple[Array, ...]
  mask: Array


jax.tree_util.register_dataclass(EncoderOutput, data_fields=["final", "layers", "mask"],
                                 meta_fields=[])


class _Encoder(nn.Module):
  """The `encoder` subtree: relpos bias, layers_{i}, encoder_norm."""

  config: T5Config

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool):
    cfg = self.config
    rel = RelativePositionBiases(cfg.num_relpos_buckets, cfg.relpos_max_distance,
                                 cfg.num_heads, cfg.dtype, name="relpos_bias")
    pad = mask[:, None, None, :] & mask[:, None, :, None]  # [b, 1, q, k]
    # T5X turns its padding mask into a -1e10 bias; same constant here.
    bias = jnp.where(pad, 0.0, -1e10).astype(cfg.dtype) + rel(x.shape[-2])
    x = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic)
    x = x.astype(cfg.dtype)
    outs = []
    for i in range(cfg.num_layers):
      x = EncoderLayer(cfg, name=f"layers_{i}")(x, bias, deterministic)
      outs.append(x)
    x = RMSNorm(cfg.layer_norm_epsilon, cfg.dtype, name="encoder_norm")(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic)
    return x, tuple(outs)


class T5Encoder(nn.Module):
  """T5 encoder: `token_embedder` + `encoder`, returning an `EncoderOutput`.

  Token id 0 is padding (as in T5X); padded positions are masked out of
  attention.
  """

  config: T5Config

  @nn.compact
  def __call__(self, tokens: Array, deterministic: bool = True) -> EncoderOutput:
    cfg = self.config
    if tokens.ndim != 2:
      raise ValueError(f"T5Encoder expects tokens of shape [batch, length], got {tokens.shape}")
    tokens = tokens.astype(jnp.int32)
    x = _TokenEmbedder(cfg.vocab_size, cfg.emb_dim, cfg.dtype, cfg.one_hot_embedding,
                       name="token_embedder")(tokens)
    mask = tokens > 0
    final, layers = _Encoder(cfg, name="encoder")(x, mask, deterministic)
    return EncoderOutput(final=final, layers=layers, mask=mask)


class _TokenEmbedder(nn.Module):
  """The shared token embedding (a gather, or T5X's one-hot contraction)."""

  vocab_size: int
  features: int
  dtype: Dtype = jnp.float32
  one_hot: bool = False

  @nn.compact
  def __call__(self, tokens: Array) -> Array:
    table = _param(self, "embedding", _embed_init, (self.vocab_size, self.features),
                   ("vocab", "embed"))
    table = jnp.asarray(table, self.dtype)
    if self.one_hot:
      x = jnp.dot(jax.nn.one_hot(tokens, self.vocab_size, dtype=self.dtype), table)
    else:
      x = jnp.take(table, tokens, axis=0)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))
