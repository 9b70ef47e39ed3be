"""Training checkpoints: orbax `CheckpointManager`, frozen params by pointer.

A training checkpoint holds the train state (step, trainable params, optimizer
state) and a JSON metadata item. Frozen parameters (a frozen backbone) are not
written: the metadata records where they come from (the initial checkpoint
path, or the init seed) and a content hash, and `check_frozen` fails if the
rebuilt tree no longer matches. Saves are atomic (orbax writes to a temporary
directory and renames), so a crash mid-save leaves the previous checkpoint
intact; the last N and the best on the validation metric are kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

STATE, META = "state", "meta"
BEST_METRIC = "val_rmse"


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """When and what to keep.

  Attributes:
    every_steps: save period in steps (the last step is always saved).
    keep: how many of the latest checkpoints to keep (plus the best one).
    async_save: write in a background thread while training continues.
  """

  every_steps: int = 100
  keep: int = 2
  async_save: bool = True

  def __post_init__(self):
    if self.every_steps < 1 or self.keep < 1:
      raise ValueError(f"CheckpointConfig: every_steps and keep must be >= 1, got {self}")


def tree_hash(tree: Any) -> str:
  """sha256 over every leaf's path, dtype, shape and bytes (order-independent of dict order)."""
  h = hashlib.sha256()
  flat = traverse_util.flatten_dict(jax.device_get(dict(tree)), sep="/") if tree else {}
  for path in sorted(flat):
    x = np.asarray(flat[path])
    h.update(f"{path}:{x.dtype}:{x.shape};".encode())
    h.update(np.ascontiguousarray(x).tobytes())
  return h.hexdigest()


def check_frozen(frozen: Any, expected_hash: str, source: str):
  """Raises if rebuilt frozen params differ from those the run trained with."""
  got = tree_hash(frozen)
  if got != expected_hash:
    raise ValueError(
        f"the frozen parameters rebuilt from {source} have hash {got[:16]}..., but the "
        f"checkpoint was trained with {expected_hash[:16]}...: the source changed since "
        "the run started; restore the original source or start a new MODEL_DIR")


class Checkpointer:
  """Save/restore of (train state, metadata) in `directory`."""

  def __init__(self, directory: str, cfg: CheckpointConfig = CheckpointConfig()):
    self.directory = os.path.abspath(directory)
    policy = pp.AnyPreservationPolicy([
        pp.LatestN(cfg.keep),
        pp.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=True, n=1,
                 keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=cfg.async_save,
        create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=(STATE, META))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: Mapping[str, Any],
           metrics: Mapping[str, float] | None = None):
    """Saves asynchronously; `wait()` or the next save completes it."""
    self.manager.save(step, args=ocp.args.Composite(
        **{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(dict(meta))}),
        metrics=dict(metrics) if metrics else None, force=True)

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(
        **{META: ocp.args.JsonRestore()}))[META]

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores the state onto the shardings carried by `abstract_state`."""
    return self.manager.restore(step, args=ocp.args.Composite(
        **{STATE: ocp.args.StandardRestore(abstract_state)}))[STATE]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def save_tree(path: str, tree: Any):
  """Writes a params tree as a standalone orbax checkpoint (synchronously)."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(path), tree, force=True)


def restore_tree(path: str, abstract: Any | None = None) -> Any:
  """Reads a tree written by `save_tree` (onto `abstract`'s shardings if given)."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint directory at {path}")
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path, abstract) if abstract is not None else ckptr.restore(path)


def config_fingerprint(cfg: Any) -> str:
  """A short stable hash of a (dataclass) config, for results and mismatch checks."""
  blob = json.dumps(cfg, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]
