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
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
from flax import traverse_util

from levi_jax import checkpointing
from levi_jax.checkpoints import common, hf, t5x


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
  return common.merge_params(init_backbone, common.flatten(tree), source=path)


def backbone_prefixes(params: dict) -> list[str]:
  """'/'-joined paths of the backbone subtrees of a method's params."""
  flat = traverse_util.flatten_dict(dict(params), sep="/")
  return sorted({k[: k.index("backbone/") + len("backbone")] for k in flat
                 if "backbone/" in k and not k.startswith("lora/")})


def put_backbone(params: dict, backbone: Any) -> dict:
  """Replaces every backbone subtree of `params` with `backbone`."""
  prefixes = backbone_prefixes(params)
  if not prefixes:
    raise ValueError("the model has no backbone to load weights into")
  flat = traverse_util.flatten_dict(dict(params), sep="/")
  for prefix in prefixes:
    for k, v in traverse_util.flatten_dict(dict(backbone), sep="/").items():
      flat[f"{prefix}/{k}"] = jnp.asarray(v, flat[f"{prefix}/{k}"].dtype)
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
