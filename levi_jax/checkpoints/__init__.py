"""Pretrained weights for the backbones: T5X checkpoints and Hugging Face folders.

Each loader reads only what the backbone needs, maps it to our parameter tree
and merges it into the model's (abstract) init with `merge_params`, failing
with a `CheckpointMismatchError` that lists every difference.

* `t5x`: `load_t5x` / `read_t5x` / `save_t5x` (T5X legacy and orbax formats).
* `hf`: `load_hf_t5`, `load_hf_bert`, `hf_t5_encoder`, `hf_bert_encoder`.
* `backbones`: `PretrainedConfig` -> `load_pretrained` (incl. all-MiniLM-L6-v2).
* `levi_jax.data.wordpiece`: `WordPieceVocabulary`, the BERT vocabulary (imports TensorFlow).
"""

from levi_jax.checkpoints.common import CheckpointMismatchError, abstract_params, merge_params
from levi_jax.checkpoints.hf import (bert_config_from_hf, hf_bert_encoder, hf_t5_encoder,
                                     load_hf_bert, load_hf_t5, t5_config_from_hf)
from levi_jax.checkpoints.t5x import find_checkpoint, load_t5x, read_t5x, save_t5x

__all__ = [
    "CheckpointMismatchError", "abstract_params", "bert_config_from_hf", "find_checkpoint",
    "hf_bert_encoder", "hf_t5_encoder", "load_hf_bert", "load_hf_t5", "load_t5x",
    "merge_params", "read_t5x", "save_t5x", "t5_config_from_hf",
]
