"""Pretrained backbone weights: merge a checkpoint's backbone into fresh params.

`load_backbone(path, params)` reads backbone weights written by
`checkpointing.save_tree` (a tree with `token_embedder` and `encoder`, as
`experiments/pretrain_synthetic.py` writes) and puts them in place of every
backbone subtree of `params` (`backbone`, or `members_0/backbone` in an
ensemble). Names and shapes must match exactly; a mismatch fails with the
full list of differences before training starts.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from levi_jax import checkpointing


def diff_trees(expected: Any, got: Any, what: str = "checkpoint") -> list[str]:
  """Readable differences (missing, unexpected, mis-shaped, wrong dtype)."""
  want = traverse_util.flatten_dict(dict(expected), sep="/")
  have = traverse_util.flatten_dict(dict(got), sep="/")
  out = [f"missing in {what}: {k} {tuple(np.shape(want[k]))}" for k in sorted(want.keys() - have.keys())]
  out += [f"unexpected in {what}: {k} {tuple(np.shape(have[k]))}"
          for k in sorted(have.keys() - want.keys())]
  for k in sorted(want.keys() & have.keys()):
    if tuple(np.shape(want[k])) != tuple(np.shape(have[k])):
      out.append(f"shape mismatch at {k}: model {tuple(np.shape(want[k]))}, "
                 f"{what} {tuple(np.shape(have[k]))}")
  return out


def merge_backbone(params: dict, backbone: Any, source: str) -> dict:
  """Replaces each backbone subtree of `params` with `backbone` (checked)."""
  flat = traverse_util.flatten_dict(dict(params), sep="/")
  prefixes = sorted({k[: k.index("backbone/") + len("backbone")]
                     for k in flat if "backbone/" in k and not k.startswith("lora/")})
  if not prefixes:
    raise ValueError(f"the model has no backbone to load {source} into")
  new = dict(flat)
  for prefix in prefixes:
    current = traverse_util.unflatten_dict(
        {k[len(prefix) + 1:]: v for k, v in flat.items() if k.startswith(prefix + "/")},
        sep="/")
    problems = diff_trees(current, backbone, source)
    if problems:
      raise ValueError(f"backbone weights in {source} do not fit the model "
                       f"({len(problems)} differences):\n  " + "\n  ".join(problems))
    for k, v in traverse_util.flatten_dict(dict(backbone), sep="/").items():
      old = flat[f"{prefix}/{k}"]
      new[f"{prefix}/{k}"] = jax.numpy.asarray(v, dtype=old.dtype)
  return traverse_util.unflatten_dict(new, sep="/")


def load_backbone(path: str, params: dict) -> dict:
  """Loads backbone weights from `path` into `params` (see module docstring)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"initial checkpoint {path} does not exist")
  tree = checkpointing.restore_tree(path)
  if "backbone" in tree and "token_embedder" not in tree:
    tree = tree["backbone"]
  return merge_backbone(params, tree, path)
