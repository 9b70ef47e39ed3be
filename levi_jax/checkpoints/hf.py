"""Hugging Face checkpoints: T5 / T5 1.1 / Flan-T5 encoders and BERT-family encoders.

A HF folder holds `config.json` and the weights as `model.safetensors` (or a
sharded `model.safetensors.index.json`) or `flax_model.msgpack`. Weights are
read without `transformers` or `torch`: from safetensors files (`safetensors.
safe_open`) only the tensors the encoder needs are read; flax msgpack files are
streamed and only the encoder subtrees are decoded.

Names are first brought to the PyTorch spelling (`encoder.block.0.layer.0.
SelfAttention.q.weight`, Linear weights `[out, in]`), then mapped to our trees:

* T5 -> `T5Encoder` (T5X's tree): kernels transposed to `[in, out]`; HF's
  q/k/v/o are already head-major `[heads * head_dim]`, which is T5X's
  `joined_kv`; the relative attention bias lives in block 0 only and is
  transposed to `[heads, buckets]`; the embedding is `shared`.
* BERT -> `BertEncoder`: the names mirror HF's, Linear weights transposed.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
import safetensors

from levi_jax.checkpoints import msgpack_stream
from levi_jax.checkpoints.common import Flat, abstract_params, merge_params
from levi_jax.models.bert import ACTIVATIONS, BertConfig, BertEncoder
from levi_jax.models.t5_encoder import T5Config, T5Encoder

# HF `feed_forward_proj` -> T5Config.mlp_activations. HF's gated-gelu is the
# tanh approximation ("gelu_new"), which is flax's `nn.gelu` default.
_T5_ACTIVATIONS = {
    "relu": ("relu",),
    "gated-gelu": ("gelu", "linear"),
    "gated-relu": ("relu", "linear"),
    "gated-silu": ("silu", "linear"),
    "silu": ("silu",),
}


def read_config(folder: str) -> dict:
  """The folder's `config.json`."""
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{folder} is not a Hugging Face model folder: no config.json")
  with open(path) as f:
    return json.load(f)


def _safetensors_index(file: str) -> dict[str, str]:
  """`{name: file}` for the tensors of a safetensors file (reads its header only)."""
  with safetensors.safe_open(file, framework="numpy") as f:
    return {name: file for name in f.keys()}


def _read_safetensors(index: Mapping[str, str], names: Sequence[str]) -> Flat:
  """Reads the named tensors (only their bytes) from safetensors files."""
  by_file: dict[str, list[str]] = {}
  for name in names:
    by_file.setdefault(index[name], []).append(name)
  out = {}
  for file, file_names in by_file.items():
    with safetensors.safe_open(file, framework="numpy") as f:
      for name in file_names:
        out[name] = f.get_tensor(name)
  return {name: out[name] for name in names}


def _torch_name(flax_name: str) -> tuple[str, bool]:
  """HF Flax name -> (HF PyTorch name, whether the layout is transposed)."""
  parts = flax_name.split("/")
  leaf = parts[-1]
  if leaf in ("kernel", "embedding", "scale"):
    parts[-1] = "weight"
  return ".".join(parts), leaf == "kernel"


def read_weights(folder: str, keep: Callable[[str], bool]) -> tuple[Flat, list[str]]:
  """Reads the tensors whose PyTorch-style name passes `keep`.

  Args:
    folder: a HF model folder.
    keep: selects the names to read (in PyTorch spelling, e.g.
      `encoder.block.0.layer.0.SelfAttention.q.weight`).

  Returns:
    `({name: array in PyTorch layout}, all names in the checkpoint)`.
  """
  index_file = os.path.join(folder, "model.safetensors.index.json")
  single = os.path.join(folder, "model.safetensors")
  flax_file = os.path.join(folder, "flax_model.msgpack")
  if os.path.isfile(index_file) or os.path.isfile(single):
    if os.path.isfile(index_file):
      with open(index_file) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
      index = {}
      for file in files:
        index.update(_safetensors_index(os.path.join(folder, file)))
    else:
      index = _safetensors_index(single)
    return _read_safetensors(index, [n for n in index if keep(n)]), sorted(index)
  if os.path.isfile(flax_file):
    # A first pass lists the names (skipping every value), a second decodes the kept.
    _, names = msgpack_stream.read(flax_file, ())
    torch_names = {n: _torch_name(n) for n in names}
    arrays, _ = msgpack_stream.read(
        flax_file, [n + "/" for n in names if keep(torch_names[n][0])])
    out = {}
    for k, v in arrays.items():
      name, transposed = torch_names[k]
      out[name] = np.swapaxes(v, -1, -2) if transposed else np.asarray(v)
    return out, sorted(n for n, _ in torch_names.values())
  raise FileNotFoundError(
      f"no weights in {folder}: expected model.safetensors, model.safetensors.index.json "
      "or flax_model.msgpack (convert PyTorch .bin files with `safetensors` first)")


# ---------------------------------------------------------------------------
# T5


def t5_config_from_hf(folder: str, **overrides) -> T5Config:
  """`T5Config` from a HF T5 / T5 1.1 / Flan-T5 `config.json` (overrides win)."""
  c = read_config(folder)
  if c.get("model_type") not in ("t5", "mt5", "umt5", None):
    raise ValueError(f"{folder}: model_type {c.get('model_type')!r} is not T5")
  proj = c.get("feed_forward_proj", "relu")
  if proj not in _T5_ACTIVATIONS:
    raise ValueError(f"{folder}: feed_forward_proj {proj!r} is not supported; expected one "
                     f"of {sorted(_T5_ACTIVATIONS)}")
  cfg = dict(
      vocab_size=c["vocab_size"], emb_dim=c["d_model"], num_heads=c["num_heads"],
      num_layers=c["num_layers"], head_dim=c["d_kv"], mlp_dim=c["d_ff"],
      mlp_activations=_T5_ACTIVATIONS[proj],
      num_relpos_buckets=c.get("relative_attention_num_buckets", 32),
      relpos_max_distance=c.get("relative_attention_max_distance", 128),
      layer_norm_epsilon=c.get("layer_norm_epsilon", 1e-6))
  cfg.update(overrides)
  return T5Config(**cfg)


_T5_LAYER = {
    "layer.0.layer_norm.weight": ("pre_attention_layer_norm/scale", False),
    "layer.0.SelfAttention.q.weight": ("attention/query/kernel", True),
    "layer.0.SelfAttention.k.weight": ("attention/key/kernel", True),
    "layer.0.SelfAttention.v.weight": ("attention/value/kernel", True),
    "layer.0.SelfAttention.o.weight": ("attention/out/kernel", True),
    "layer.1.layer_norm.weight": ("pre_mlp_layer_norm/scale", False),
    "layer.1.DenseReluDense.wi.weight": ("mlp/wi/kernel", True),
    "layer.1.DenseReluDense.wi_0.weight": ("mlp/wi_0/kernel", True),
    "layer.1.DenseReluDense.wi_1.weight": ("mlp/wi_1/kernel", True),
    "layer.1.DenseReluDense.wo.weight": ("mlp/wo/kernel", True),
}


def _t5_name(name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  """HF T5 (PyTorch spelling) -> `T5Encoder` name and layout."""
  if name == "shared.weight":
    return "token_embedder/embedding", value
  if name == "encoder.final_layer_norm.weight":
    return "encoder/encoder_norm/scale", value
  if name == "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
    return "encoder/relpos_bias/rel_embedding", value.T  # [buckets, heads] -> [heads, buckets]
  m = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", name)
  if m and m.group(2) in _T5_LAYER:
    ours, transpose = _T5_LAYER[m.group(2)]
    return f"encoder/layers_{m.group(1)}/{ours}", value.T if transpose else value
  return f"(hf) {name}", value  # Not ours: reported as unexpected.


def _is_t5_encoder(name: str) -> bool:
  return name.startswith("encoder.") or name == "shared.weight"


def load_hf_t5(init_params: Mapping[str, Any], folder: str, *,
               dont_load: Sequence[str] = ()) -> dict:
  """Loads a HF T5 encoder (and its shared embedding) into `T5Encoder` params.

  Args:
    init_params: `T5Encoder` params, concrete or abstract.
    folder: the HF folder; the decoder and LM head in it are not read.
    dont_load: regexes of our names to keep from `init_params`.

  Returns:
    `{"token_embedder": ..., "encoder": ...}` of numpy arrays.
  """
  raw, names = read_weights(folder, _is_t5_encoder)
  if "shared.weight" not in raw and "encoder.embed_tokens.weight" in names:
    raw.update(read_weights(folder, lambda n: n == "encoder.embed_tokens.weight")[0])
    raw["shared.weight"] = raw.pop("encoder.embed_tokens.weight")
  raw.pop("encoder.embed_tokens.weight", None)  # The tied copy of `shared`.
  loaded = dict(_t5_name(k, v) for k, v in raw.items())
  return merge_params(init_params, loaded, source=f"Hugging Face T5 folder {folder}",
                      dont_load=dont_load)


def hf_t5_encoder(folder: str, **overrides) -> tuple[T5Encoder, dict]:
  """`(T5Encoder, params)` from a HF T5 folder (config from its config.json)."""
  model = T5Encoder(t5_config_from_hf(folder, **overrides))
  return model, load_hf_t5(abstract_params(model, jnp.zeros((1, 1), jnp.int32)), folder)


# ---------------------------------------------------------------------------
# BERT family


def bert_config_from_hf(folder: str, **overrides) -> BertConfig:
  """`BertConfig` from a HF BERT-family `config.json` (overrides win)."""
  c = read_config(folder)
  if c.get("model_type") not in ("bert", None):
    raise ValueError(f"{folder}: model_type {c.get('model_type')!r} is not BERT")
  if c.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError(f"{folder}: only absolute position embeddings are supported, got "
                     f"{c['position_embedding_type']!r}")
  if c["hidden_size"] % c["num_attention_heads"]:
    raise ValueError(f"{folder}: hidden_size {c['hidden_size']} is not a multiple of "
                     f"num_attention_heads {c['num_attention_heads']}")
  act = c.get("hidden_act", "gelu")
  if act not in ACTIVATIONS:
    raise ValueError(f"{folder}: hidden_act {act!r} is not supported; expected one of "
                     f"{sorted(ACTIVATIONS)}")
  cfg = dict(
      vocab_size=c["vocab_size"], emb_dim=c["hidden_size"],
      num_heads=c["num_attention_heads"], num_layers=c["num_hidden_layers"],
      head_dim=c["hidden_size"] // c["num_attention_heads"],
      mlp_dim=c["intermediate_size"], max_position=c["max_position_embeddings"],
      type_vocab_size=c.get("type_vocab_size", 2), activation=act,
      layer_norm_epsilon=c.get("layer_norm_eps", 1e-12))
  cfg.update(overrides)
  return BertConfig(**cfg)


def _bert_name(name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  """HF BERT (PyTorch spelling) -> `BertEncoder` name and layout."""
  name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name))
  parts = re.sub(r"\.layer\.(\d+)\.", r".layer_\1.", name).split(".")
  module = parts[-2]
  if parts[-1] == "weight":
    if module == "LayerNorm":
      parts[-1] = "scale"
    elif module.endswith("_embeddings"):
      parts[-1] = "embedding"
    else:
      parts[-1], value = "kernel", value.T
  return "/".join(parts), value


def _bert_prefix(names: Sequence[str]) -> str:
  """'bert.' for task-model checkpoints (BertForMaskedLM, ...), else ''."""
  return "bert." if any(n.startswith("bert.embeddings.") for n in names) else ""


def load_hf_bert(init_params: Mapping[str, Any], folder: str, *,
                 dont_load: Sequence[str] = ()) -> dict:
  """Loads a HF BERT-family encoder into `BertEncoder` params.

  The pooler, pre-training heads and the `position_ids` buffer are not read.

  Args:
    init_params: `BertEncoder` params, concrete or abstract.
    folder: the HF folder.
    dont_load: regexes of our names to keep from `init_params`.

  Returns:
    `{"embeddings": ..., "encoder": ...}` of numpy arrays.
  """
  _, names = read_weights(folder, lambda n: False)
  prefix = _bert_prefix(names)
  keep = lambda n: (n.startswith((prefix + "embeddings.", prefix + "encoder."))
                    and not n.endswith(("position_ids", "token_type_ids")))
  raw, _ = read_weights(folder, keep)
  loaded = dict(_bert_name(k[len(prefix):], v) for k, v in raw.items())
  return merge_params(init_params, loaded, source=f"Hugging Face BERT folder {folder}",
                      dont_load=dont_load)


def hf_bert_encoder(folder: str, **overrides) -> tuple[BertEncoder, dict]:
  """`(BertEncoder, params)` from a HF BERT-family folder."""
  model = BertEncoder(bert_config_from_hf(folder, **overrides))
  return model, load_hf_bert(abstract_params(model, jnp.zeros((1, 1), jnp.int32)), folder)


