"""A BERT-family encoder (BERT, MiniLM) with the same taps as `T5Encoder`.

Absolute learned positions, post-layer-norm residual blocks, GELU MLPs and
biases everywhere, as Hugging Face's `BertModel`. Module names mirror HF's
Flax BERT (with `layer_{i}` for its `layer/{i}`), so loading a HF checkpoint
is a rename plus a transpose of the torch kernels:

    embeddings/word_embeddings/embedding           [vocab, embed]
    embeddings/position_embeddings/embedding       [max_position, embed]
    embeddings/token_type_embeddings/embedding     [type_vocab, embed]
    embeddings/LayerNorm/{scale, bias}             [embed]
    encoder/layer_{i}/attention/self/{query,key,value}/{kernel [embed, joined_kv], bias}
    encoder/layer_{i}/attention/output/dense/{kernel [joined_kv, embed], bias}
    encoder/layer_{i}/attention/output/LayerNorm/{scale, bias}
    encoder/layer_{i}/intermediate/dense/{kernel [embed, mlp], bias}
    encoder/layer_{i}/output/dense/{kernel [mlp, embed], bias}
    encoder/layer_{i}/output/LayerNorm/{scale, bias}

The pooler and the pre-training heads are not part of the backbone. Token id
0 is padding (BERT's `[PAD]`, as T5's); all tokens get token type 0.
`BertEncoder` returns `EncoderOutput(final, layers, mask)` where `final` is
the last layer's output (BERT has no final norm).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from levi_jax.models import lora as lora_lib
from levi_jax.models.t5_encoder import EncoderOutput

Array = jax.Array
Dtype = Any

_weight_init = nn.initializers.normal(stddev=0.02)  # HF's initializer_range.

# Activation names as in HF configs (`hidden_act`).
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Hyperparameters of a BERT-family encoder.

  Attributes:
    vocab_size: WordPiece vocabulary size.
    emb_dim: model width (HF `hidden_size`).
    num_heads: attention heads.
    num_layers: encoder layers.
    head_dim: width of each head (HF: hidden_size / num_attention_heads).
    mlp_dim: hidden width of the feed-forward block (HF `intermediate_size`).
    max_position: learned absolute positions (the longest input).
    type_vocab_size: token-type (segment) embeddings.
    activation: MLP activation, an `ACTIVATIONS` key ("gelu" is exact erf GELU).
    layer_norm_epsilon: LayerNorm epsilon (BERT: 1e-12).
    dropout_rate: dropout used when `deterministic=False`.
    dtype: activation dtype; parameters are always float32.
  """

  vocab_size: int = 30522
  emb_dim: int = 768
  num_heads: int = 12
  num_layers: int = 12
  head_dim: int = 64
  mlp_dim: int = 3072
  max_position: int = 512
  type_vocab_size: int = 2
  activation: str = "gelu"
  layer_norm_epsilon: float = 1e-12
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  def __post_init__(self):
    for name in ("vocab_size", "emb_dim", "num_heads", "num_layers", "head_dim",
                 "mlp_dim", "max_position", "type_vocab_size"):
      if getattr(self, name) <= 0:
        raise ValueError(f"BertConfig.{name} must be positive, got {getattr(self, name)}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"BertConfig.activation: unknown {self.activation!r}; "
                       f"expected one of {sorted(ACTIVATIONS)}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"BertConfig.dropout_rate must be in [0, 1), got {self.dropout_rate}")
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype))

  def replace(self, **kwargs) -> "BertConfig":
    """Returns a copy with some fields changed."""
    return dataclasses.replace(self, **kwargs)


PRESETS: dict[str, BertConfig] = {
    # all-MiniLM-L6-v2 (nreimers/MiniLM-L6-H384-uncased, sentence-transformers).
    "minilm_l6": BertConfig(emb_dim=384, num_heads=12, num_layers=6, head_dim=32,
                            mlp_dim=1536),
    "bert_base": BertConfig(),
    "bert_tiny": BertConfig(vocab_size=64, emb_dim=8, num_heads=2, num_layers=2,
                            head_dim=4, mlp_dim=16, max_position=32),
}


def preset(name: str, **overrides) -> BertConfig:
  """Returns the named preset (see `PRESETS`), with optional field overrides."""
  if name not in PRESETS:
    raise ValueError(f"Unknown BERT preset {name!r}; expected one of {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


def _param(module: nn.Module, name: str, init: Callable, shape: Sequence[int],
           axes: tuple[str | None, ...]) -> Array:
  """A float32 parameter annotated with logical axis names."""
  return module.param(name, nn.with_logical_partitioning(init, axes), tuple(shape),
                      jnp.float32)


class Dense(nn.Module):
  """`x @ kernel + bias` over the last axis, kernel stored `[in, out]`.

  LoRA factors in the `lora` variable collection add their low-rank term
  beside the kernel (`lora.low_rank`).
  """

  features: int
  kernel_axes: tuple[str, str]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = _param(self, "kernel", _weight_init, (x.shape[-1], self.features),
                    self.kernel_axes)
    bias = _param(self, "bias", nn.initializers.zeros, (self.features,),
                  (self.kernel_axes[1],))
    x = jnp.asarray(x, self.dtype)
    y = x @ jnp.asarray(kernel, self.dtype) + jnp.asarray(bias, self.dtype)
    delta = lora_lib.low_rank(self, x, 1, (self.features,), self.dtype)
    return y if delta is None else y + delta


class LayerNorm(nn.Module):
  """LayerNorm with scale and bias, computed in float32."""

  epsilon: float = 1e-12
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.asarray(x, jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
    scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",))
    bias = _param(self, "bias", nn.initializers.zeros, (x.shape[-1],), ("embed",))
    return jnp.asarray(y * scale + bias, self.dtype)


class Embed(nn.Module):
  """A lookup table named `embedding`, as Flax's `nn.Embed`."""

  num_embeddings: int
  features: int
  axes: tuple[str | None, str]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, ids: Array) -> Array:
    table = _param(self, "embedding", _weight_init, (self.num_embeddings, self.features),
                   self.axes)
    return jnp.take(jnp.asarray(table, self.dtype), ids, axis=0)


class Embeddings(nn.Module):
  """Word + absolute position + token type (0), then LayerNorm."""

  config: BertConfig

  @nn.compact
  def __call__(self, tokens: Array, deterministic: bool) -> Array:
    cfg = self.config
    length = tokens.shape[1]
    if length > cfg.max_position:
      raise ValueError(f"BertEncoder: input length {length} exceeds max_position "
                       f"{cfg.max_position}")
    x = Embed(cfg.vocab_size, cfg.emb_dim, ("vocab", "embed"), cfg.dtype,
              name="word_embeddings")(tokens)
    x = x + Embed(cfg.max_position, cfg.emb_dim, ("abspos_buckets", "embed"), cfg.dtype,
                  name="position_embeddings")(jnp.arange(length))[None]
    x = x + Embed(cfg.type_vocab_size, cfg.emb_dim, (None, "embed"), cfg.dtype,
                  name="token_type_embeddings")(jnp.zeros((1, length), jnp.int32))
    x = LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="LayerNorm")(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class SelfAttention(nn.Module):
  """Multi-head attention with biases and 1/sqrt(head_dim) scaling."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: Array, bias: Array, deterministic: bool) -> Array:
    cfg = self.config
    joined = cfg.num_heads * cfg.head_dim
    proj = functools.partial(Dense, joined, ("embed", "joined_kv"), cfg.dtype)
    split = lambda t: t.reshape(t.shape[:-1] + (cfg.num_heads, cfg.head_dim))
    q, k, v = (split(proj(name=n)(x)) for n in ("query", "key", "value"))
    q, k, v = (nn.with_logical_constraint(t, ("batch", "length", "heads", "kv"))
               for t in (q, k, v))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(cfg.head_dim)) + bias
    weights = jax.nn.softmax(logits).astype(cfg.dtype)
    weights = nn.Dropout(cfg.dropout_rate)(weights, deterministic)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return out.reshape(out.shape[:-2] + (joined,))


class ResidualOutput(nn.Module):
  """`LayerNorm(dropout(dense(y)) + residual)`: HF's `*Output` modules."""

  config: BertConfig
  kernel_axes: tuple[str, str]

  @nn.compact
  def __call__(self, y: Array, residual: Array, deterministic: bool) -> Array:
    cfg = self.config
    y = Dense(cfg.emb_dim, self.kernel_axes, cfg.dtype, name="dense")(y)
    y = nn.Dropout(cfg.dropout_rate)(y, deterministic)
    return LayerNorm(cfg.layer_norm_epsilon, cfg.dtype, name="LayerNorm")(y + residual)


class Attention(nn.Module):
  """`self` attention and its residual `output`."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: Array, bias: Array, deterministic: bool) -> Array:
    y = SelfAttention(self.config, name="self")(x, bias, deterministic)
    return ResidualOutput(self.config, ("joined_kv", "embed"), name="output")(
        y, x, deterministic)


class Intermediate(nn.Module):
  """The MLP's first projection and activation."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    h = Dense(cfg.mlp_dim, ("embed", "mlp"), cfg.dtype, name="dense")(x)
    return nn.with_logical_constraint(ACTIVATIONS[cfg.activation](h),
                                      ("batch", "length", "mlp"))


class Layer(nn.Module):
  """Post-LN block: LN(x + attn(x)), then LN(h + mlp(h))."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: Array, bias: Array, deterministic: bool) -> Array:
    cfg = self.config
    x = Attention(cfg, name="attention")(x, bias, deterministic)
    h = Intermediate(cfg, name="intermediate")(x)
    x = ResidualOutput(cfg, ("mlp", "embed"), name="output")(h, x, deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class _Encoder(nn.Module):
  """The `encoder` subtree: layer_{i}."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool) -> tuple[Array, ...]:
    # HF adds dtype-min at padded keys; -1e10 in float32 logits is the same.
    bias = jnp.where(mask[:, None, None, :], 0.0, -1e10).astype(jnp.float32)
    outs = []
    for i in range(self.config.num_layers):
      x = Layer(self.config, name=f"layer_{i}")(x, bias, deterministic)
      outs.append(x)
    return tuple(outs)


class BertEncoder(nn.Module):
  """BERT-family encoder: `embeddings` + `encoder`, returning an `EncoderOutput`."""

  config: BertConfig

  @nn.compact
  def __call__(self, tokens: Array, deterministic: bool = True) -> EncoderOutput:
    if tokens.ndim != 2:
      raise ValueError(f"BertEncoder expects tokens of shape [batch, length], got {tokens.shape}")
    tokens = tokens.astype(jnp.int32)
    mask = tokens > 0
    x = Embeddings(self.config, name="embeddings")(tokens, deterministic)
    layers = _Encoder(self.config, name="encoder")(x, mask, deterministic)
    return EncoderOutput(final=layers[-1], layers=layers, mask=mask)
