"""Initial backbone weights for training: read a checkpoint, put it in place.

`load_backbone(path, params)` reads the backbone from `path`, whatever its
format, and puts it in place of every backbone subtree of `params`
(`backbone`, or `members_0/backbone` in an ensemble):

* a T5X checkpoint (a `checkpoint_N` folder or a model dir of them; legacy
  msgpack/tensorstore or orbax), read by `levi_jax.checkpoints.load_t5x`;
* a Hugging Face T5 folder (`config.json` + weights), `load_hf_t5`;
* a tree `{token_embedder, encoder}` written by `checkpointing.save_tree`
  (what `experiments/pretrain_synthetic.py` writes).

Names, shapes and dtypes must match; a mismatch raises
`CheckpointMismatchError` listing every difference, before training starts.

A backbone is only meaningful with the vocabulary it was trained on, so
`checkpoint_vocabulary(path)` finds the one a checkpoint carries: a tree's
`vocabulary.json` (written by `attach_vocabulary`: the file next to it and its
sha256, checked on load), a Hugging Face folder's `spiece.model`, or the
`sentencepiece_model_file` a T5X model dir's `config.gin` names.
`resolve_vocabulary` then picks the file that tokenizes `inputs`: the
backbone's, never a regenerated one; an explicitly configured vocabulary with
another hash is a `VocabularyMismatchError` naming both.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from levi_jax import checkpointing
from levi_jax.checkpoints import common, hf, t5x
from levi_jax.data.paths import file_sha256

log = logging.getLogger("levi_jax")
VOCAB_MANIFEST = "vocabulary.json"
_GIN_SPM = re.compile(r"sentencepiece_model_file\s*=\s*['\"]([^'\"]+)['\"]")

def _saved_tree_roots(path: str) -> set[str]:
  """Top-level keys of an orbax tree written directly at `path` (else empty)."""
  meta = os.path.join(path, "_METADATA")
  if not os.path.isfile(meta):
    return set()
  with open(meta) as f:
    keys = json.load(f).get("tree_metadata", {})
  return {k.strip("()").split(",")[0].strip(" '\"") for k in keys}


def _format(path: str) -> str:
  roots = _saved_tree_roots(path)
  if roots and "target" not in roots:
    return "tree"
  if os.path.isfile(os.path.join(path, "config.json")):
    with open(os.path.join(path, "config.json")) as f:
      model_type = json.load(f).get("model_type", "")
    if model_type not in ("t5", "mt5"):
      raise ValueError(f"{path} is a Hugging Face {model_type!r} folder; a T5 backbone "
                       "needs a T5 folder (BERT-family models: ModelConfig.pretrained)")
    return "hf_t5"
  try:
    t5x.find_checkpoint(path)
    return "t5x"
  except (FileNotFoundError, ValueError):
    return "tree"


def read_backbone(path: str, init_backbone: Any) -> dict:
  """The backbone weights at `path`, checked against `init_backbone`."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"initial checkpoint {path} does not exist")
  fmt = _format(path)
  if fmt == "t5x":
    return t5x.load_t5x(init_backbone, path)
  if fmt == "hf_t5":
    return hf.load_hf_t5(init_backbone, path)
  tree = checkpointing.restore_tree(path)
  if "backbone" in tree and "token_embedder" not in tree:
    tree = tree["backbone"]
  return common.merge_params(init_backbone, traverse_util.flatten_dict(tree, sep="/"),
                             source=path)


def backbone_prefixes(params: dict) -> list[str]:
  """'/'-joined paths of the backbone subtrees of a method's params."""
  flat = traverse_util.flatten_dict(dict(params), sep="/")
  return sorted({k[: k.index("backbone/") + len("backbone")] for k in flat
                 if "backbone/" in k and not k.startswith("lora/")})


def _placed_like(value: Any, target: Any) -> Any:
  """`value` in `target`'s dtype, and in its sharding when `target` is a jax.Array.

  Host (numpy) values go straight into their shardings, each device receiving
  only its shard (`jax.make_array_from_callback`): a backbone is never built
  whole on one device before it is sharded.
  """
  if not isinstance(target, jax.Array):
    return jnp.asarray(value, target.dtype)
  if isinstance(value, jax.Array):
    return jax.device_put(value.astype(target.dtype), target.sharding)
  value = np.asarray(value) if not isinstance(value, np.ndarray) else value
  if value.shape != target.shape:
    raise ValueError(f"backbone leaf has shape {value.shape}, the model expects {target.shape}")
  return jax.make_array_from_callback(target.shape, target.sharding,
                                      lambda index: np.asarray(value[index], target.dtype))


def put_backbone(params: dict, backbone: Any) -> dict:
  """Replaces every backbone subtree of `params` with `backbone`.

  Each leaf takes the dtype and sharding of the leaf it replaces (`params` as
  built by `partitioning.sharded_init`), host leaves copied shard by shard.
  """
  prefixes = backbone_prefixes(params)
  if not prefixes:
    raise ValueError("the model has no backbone to load weights into")
  flat = traverse_util.flatten_dict(dict(params), sep="/")
  for prefix in prefixes:
    for k, v in traverse_util.flatten_dict(dict(backbone), sep="/").items():
      flat[f"{prefix}/{k}"] = _placed_like(v, flat[f"{prefix}/{k}"])
  return traverse_util.unflatten_dict(flat, sep="/")


def load_backbone(path: str, params: dict) -> dict:
  """Loads the backbone at `path` (see module docstring) into `params`."""
  prefixes = backbone_prefixes(params)
  if not prefixes:
    raise ValueError(f"the model has no backbone to load {path} into")
  current = traverse_util.unflatten_dict(
      {k[len(prefixes[0]) + 1:]: v for k, v in
       traverse_util.flatten_dict(dict(params), sep="/").items()
       if k.startswith(prefixes[0] + "/")}, sep="/")
  return put_backbone(params, read_backbone(path, current))


# ------------------------------------------------------------------------------
# The vocabulary a backbone was trained with.
# ------------------------------------------------------------------------------
class VocabularyMismatchError(ValueError):
  """A backbone paired with a vocabulary it was not trained with."""


@dataclasses.dataclass(frozen=True)
class BackboneVocabulary:
  """The vocabulary a checkpoint carries or names.

  Attributes:
    path: the vocabulary file (a SentencePiece model or a WordPiece vocab.txt).
    sha256: its content hash; None when the file is named but cannot be read
      here (a T5X gin naming a `gs://` model).
    source: where it was found (for messages).
  """

  path: str
  sha256: str | None
  source: str


def attach_vocabulary(checkpoint_dir: str, vocabulary_file: str) -> dict:
  """Copies `vocabulary_file` into a tree checkpoint and records its sha256.

  Writes `<checkpoint_dir>/<file name>` and `<checkpoint_dir>/vocabulary.json`
  (`{"file", "sha256"}`); returns that record.
  """
  name = os.path.basename(vocabulary_file)
  if name == VOCAB_MANIFEST:
    raise ValueError(f"a vocabulary file cannot be called {VOCAB_MANIFEST}")
  shutil.copyfile(vocabulary_file, os.path.join(checkpoint_dir, name))
  record = {"file": name, "sha256": file_sha256(vocabulary_file)}
  with open(os.path.join(checkpoint_dir, VOCAB_MANIFEST), "w") as f:
    json.dump(record, f, indent=1)
  return record


def _t5x_model_dir_gin(path: str) -> str | None:
  """The `config.gin` T5X wrote for the checkpoint at `path` (model dir or step dir)."""
  path = os.path.abspath(path)
  if os.path.isfile(path):
    path = os.path.dirname(path)
  for d in (path, os.path.dirname(path)):
    gin_file = os.path.join(d, "config.gin")
    if os.path.isfile(gin_file):
      return gin_file
  return None


def checkpoint_vocabulary(path: str) -> BackboneVocabulary | None:
  """The vocabulary the backbone checkpoint at `path` carries (see module docstring).

  Raises:
    VocabularyMismatchError: if a tree's recorded hash does not match its file.
  """
  manifest = os.path.join(path, VOCAB_MANIFEST)
  if os.path.isfile(manifest):
    with open(manifest) as f:
      record = json.load(f)
    vocab = os.path.join(path, record["file"])
    if not os.path.isfile(vocab):
      raise FileNotFoundError(f"{manifest} names the vocabulary {record['file']}, which is "
                              f"missing from {path}")
    got = file_sha256(vocab)
    if got != record["sha256"]:
      raise VocabularyMismatchError(
          f"the vocabulary {vocab} has sha256 {got}, but {manifest} records "
          f"{record['sha256']}: the checkpoint is damaged; restore it from its source")
    return BackboneVocabulary(vocab, got, manifest)
  spiece = os.path.join(path, "spiece.model")
  if os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(spiece):
    return BackboneVocabulary(spiece, file_sha256(spiece), spiece)
  gin_file = _t5x_model_dir_gin(path) if os.path.exists(path) else None
  if gin_file:
    with open(gin_file) as f:
      named = _GIN_SPM.findall(f.read())
    if named:
      vocab = named[-1]
      readable = os.path.isfile(vocab)
      return BackboneVocabulary(vocab, file_sha256(vocab) if readable else None, gin_file)
  return None


def resolve_vocabulary(backbone: BackboneVocabulary | None, explicit: str | None,
                       backbone_name: str) -> str | None:
  """The vocabulary file that tokenizes `inputs` for a backbone.

  Args:
    backbone: what the backbone checkpoint carries (`checkpoint_vocabulary`).
    explicit: a configured vocabulary (`DataConfig.vocabulary_path` or
      `LEVI_VOCAB_PATH`), if any.
    backbone_name: the checkpoint, for messages.

  Returns:
    The backbone's vocabulary file; else `explicit`; else None (the data's own).

  Raises:
    VocabularyMismatchError: `explicit` has another hash than the backbone's,
      or the backbone's cannot be read here and nothing explicit replaces it.
  """
  if backbone is None:
    if explicit is None:
      log.warning("the backbone checkpoint %s carries no vocabulary; `inputs` are tokenized "
                  "with the data's own, which must be the one it was trained with",
                  backbone_name)
    return explicit
  if backbone.sha256 is None:
    if explicit is None:
      raise VocabularyMismatchError(
          f"the backbone {backbone_name} was trained with the vocabulary {backbone.path} "
          f"(named in {backbone.source}), which cannot be read here; copy it to a local path "
          f"(or mount its bucket) and set DataConfig.vocabulary_path to it")
    log.warning("using vocabulary %s for backbone %s, which names %s (unreadable here: its "
                "hash cannot be compared)", explicit, backbone_name, backbone.path)
    return explicit
  if explicit is not None:
    got = file_sha256(explicit)
    if got != backbone.sha256:
      raise VocabularyMismatchError(
          f"the backbone {backbone_name} was trained with the vocabulary {backbone.path} "
          f"(sha256 {backbone.sha256}), but the configured vocabulary {explicit} has sha256 "
          f"{got}; tokenizing with another vocabulary makes the pre-trained weights "
          f"meaningless. Unset the configured vocabulary to use the backbone's.")
  return backbone.path
