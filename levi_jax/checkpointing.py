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

import atexit
import dataclasses
import hashlib
import json
import logging
import os
import socket
import time
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

log = logging.getLogger("levi_jax")
STATE, META = "state", "meta"
BEST_METRIC = "val_rmse"


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """When and what to keep.

  Attributes:
    every_steps: save period in steps (the last step is always saved).
    keep: how many of the latest checkpoints to keep (plus the best one).
    async_save: write in a background thread while training continues.
    fallback_on_damage: when the newest checkpoint does not restore (a
      truncated or missing file), move it aside to
      `MODEL_DIR/damaged_checkpoints/` (never delete it) and resume from the
      newest one that restores; False: stop with the error instead.
  """

  every_steps: int = 100
  keep: int = 2
  async_save: bool = True
  fallback_on_damage: bool = True

  def __post_init__(self):
    if self.every_steps < 1 or self.keep < 1:
      raise ValueError(f"CheckpointConfig: every_steps and keep must be >= 1, got {self}")


def tree_hash(tree: Any) -> str:
  """sha256 over every leaf's path, dtype, shape and bytes (order-independent of dict order).

  Gathers every leaf to this host: for trees held in host memory (a committed
  backbone's manifest). Sharded trees on a mesh use `tree_fingerprint`.
  """
  h = hashlib.sha256()
  flat = traverse_util.flatten_dict(jax.device_get(dict(tree)), sep="/") if tree else {}
  for path in sorted(flat):
    x = np.asarray(flat[path])
    h.update(f"{path}:{x.dtype}:{x.shape};".encode())
    h.update(np.ascontiguousarray(x).tobytes())
  return h.hexdigest()


# ------------------------------------------------------------------------------
# A content fingerprint of a tree on any mesh.
# ------------------------------------------------------------------------------
FINGERPRINT_PREFIX = "fp1:"
_SEEDS = (0x9E3779B9, 0x7F4A7C15)  # two 32-bit lanes: a 64-bit checksum per leaf


def _mix(v, xp):
  """murmur3's 32-bit finalizer: a bijection of uint32 (odd multiplies, xor-shifts)."""
  v = v * xp.uint32(0x85EBCA6B)
  v = v ^ (v >> xp.uint32(13))
  v = v * xp.uint32(0xC2B2AE35)
  return v ^ (v >> xp.uint32(16))


def _leaf_lanes(x, xp, bitcast, iota):
  """The leaf's 64-bit checksum: sum over elements of mix(bits ^ mix(index + seed))."""
  size = x.dtype.itemsize
  if x.dtype == bool:
    x = x.astype(xp.uint8)
  words = bitcast(x, {8: xp.uint32, 4: xp.uint32, 2: xp.uint16, 1: xp.uint8}[size])
  words = words.astype(xp.uint32)  # 8-byte dtypes: a trailing axis of 2 words
  index = xp.zeros(words.shape, xp.uint32)
  stride = 1
  for d in reversed(range(words.ndim)):
    index = index + iota(words.shape, d) * xp.uint32(stride % 2**32)
    stride *= words.shape[d]
  return xp.stack([xp.sum(_mix(words ^ _mix(index + xp.uint32(seed), xp), xp), dtype=xp.uint32)
                   for seed in _SEEDS])


def _np_iota(shape, d):
  return np.broadcast_to(np.arange(shape[d], dtype=np.uint32).reshape(
      [-1 if i == d else 1 for i in range(len(shape))]), shape)


def _np_lanes(x: np.ndarray) -> np.ndarray:
  x = np.ascontiguousarray(x)
  with np.errstate(over="ignore"):  # uint32 arithmetic wraps, as on device
    return _leaf_lanes(x, np, lambda a, t: a.view(t).reshape(
      a.shape + ((2,) if a.dtype.itemsize == 8 else ())), _np_iota)


@jax.jit
def _device_lanes(leaves):
  import jax.numpy as jnp
  bitcast = jax.lax.bitcast_convert_type
  iota = lambda shape, d: jax.lax.broadcasted_iota(jnp.uint32, shape, d)
  return [_leaf_lanes(x, jnp, bitcast, iota) for x in leaves]


def tree_fingerprint(tree: Any) -> str:
  """A content fingerprint of `tree` that any process of any mesh can compute.

  Per leaf, a 64-bit checksum over its elements, each element's bits mixed
  with its global index (a bijection of the bits for each index, so changing
  any one element always changes it; any other change is missed with
  probability ~2^-64). Sums of 32-bit words are exact and order-free, so the
  checksum of a sharded array is computed where its shards live (one jitted
  reduction, nothing gathered to the host) and is the same under every mesh
  and process count; numpy leaves are summed on the host the same way. The
  result is a sha256 over the leaves' paths, dtypes, shapes and checksums.
  (`tree_hash` gathers every leaf, which fails for arrays not fully
  addressable by one process: FSDP or a model axis across hosts.)
  """
  flat = traverse_util.flatten_dict(dict(tree), sep="/") if tree else {}
  paths = sorted(flat)
  on_device = [p for p in paths if isinstance(flat[p], jax.Array)]
  lanes = {p: _np_lanes(np.asarray(flat[p])) for p in paths if p not in on_device}
  if on_device:
    for p, out in zip(on_device, _device_lanes([flat[p] for p in on_device])):
      lanes[p] = np.asarray(out.addressable_shards[0].data)  # replicated: every process
  h = hashlib.sha256()
  for p in paths:
    x = flat[p]
    h.update(f"{p}:{np.dtype(x.dtype)}:{tuple(x.shape)}:".encode())
    h.update(np.asarray(lanes[p], np.uint32).tobytes())
  return FINGERPRINT_PREFIX + h.hexdigest()


def check_frozen(frozen: Any, expected_hash: str, source: str):
  """Raises if rebuilt frozen params differ from those the run trained with.

  `expected_hash` is a `tree_fingerprint`, or a `tree_hash` in checkpoints
  written before fingerprints.
  """
  legacy = not expected_hash.startswith(FINGERPRINT_PREFIX)
  got = tree_hash(frozen) if legacy else tree_fingerprint(frozen)
  if got != expected_hash:
    raise ValueError(
        f"the frozen parameters rebuilt from {source} have hash {got[:20]}..., but the "
        f"checkpoint was trained with {expected_hash[:20]}...: the source changed since "
        "the run started; restore the original source or start a new MODEL_DIR")


class DamagedCheckpointError(RuntimeError):
  """A checkpoint step that exists but does not restore."""

  def __init__(self, directory: str, step: int, reason: BaseException):
    self.directory, self.step = directory, step
    self.path = os.path.join(directory, str(step))
    super().__init__(f"checkpoint {self.path} does not restore: "
                     f"{type(reason).__name__}: {str(reason)[:300]}")

  def move_aside(self) -> str:
    """Moves the step out of the checkpoints folder (kept, never deleted); returns where."""
    dest_dir = os.path.join(os.path.dirname(self.directory), "damaged_checkpoints")
    os.makedirs(dest_dir, exist_ok=True)
    dest = os.path.join(dest_dir, f"{self.step}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(self.path, dest)
    return dest


class Checkpointer:
  """Save/restore of (train state, metadata) in `directory`.

  `read_meta` and `restore` raise `DamagedCheckpointError` for a step whose
  files do not restore."""

  def __init__(self, directory: str, cfg: CheckpointConfig = CheckpointConfig(),
               read_only: bool = False):
    self.directory = os.path.abspath(directory)
    policy = pp.AnyPreservationPolicy([
        pp.LatestN(cfg.keep),
        pp.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=True, n=1,
                 keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=None if read_only else policy,
        enable_async_checkpointing=cfg.async_save and not read_only,
        create=not read_only, read_only=read_only)
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
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(
          **{META: ocp.args.JsonRestore()}))[META]
    except Exception as e:  # noqa: BLE001  (any storage error: the step is damaged)
      raise DamagedCheckpointError(self.directory, step, e) from e
    if not isinstance(meta, dict) or "step" not in meta:
      raise DamagedCheckpointError(self.directory, step, ValueError(f"metadata {meta!r}"))
    return meta

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores the state onto the shardings carried by `abstract_state`."""
    try:
      return self.manager.restore(step, args=ocp.args.Composite(
          **{STATE: ocp.args.StandardRestore(abstract_state)}))[STATE]
    except Exception as e:  # noqa: BLE001
      raise DamagedCheckpointError(self.directory, step, e) from e

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Restores only the state's trainable `params` (onto `abstract_params`'
    shardings): the optimizer state and step are neither read nor allocated.
    Use a Checkpointer of its own (orbax fixes the item's handler on first use)."""
    target = {"params": abstract_params}
    args = ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**{STATE: args}))[STATE]
    except Exception as e:  # noqa: BLE001
      raise DamagedCheckpointError(self.directory, step, e) from e
    return restored["params"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    """Finishes the save in flight (so it is committed, not left as a temporary
    folder) and closes the manager; idempotent."""
    if self.manager is None:
      return
    try:
      self.manager.wait_until_finished()
    finally:
      self.manager.close()
      self.manager = None

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info):
    # Also on an error or Ctrl-C: an async save still running would otherwise
    # be cut off at interpreter shutdown, losing the newest checkpoint.
    self.close()


class ModelDirLockedError(RuntimeError):
  """Another live process is training in this MODEL_DIR."""


class ModelDirLock:
  """`MODEL_DIR/train.lock`: one training process per MODEL_DIR.

  The lock file records the holder's host, pid and start time. Acquiring fails
  at once, naming the holder, while a live process on this host (or any process
  on another host: its liveness can't be checked from here) holds it; a lock
  left by a dead process on this host is taken over with a warning; one held
  by this process (an earlier call that stopped on an error) is simply reused.
  Released by `release()` or at interpreter exit.
  """

  NAME = "train.lock"

  def __init__(self, model_dir: str):
    self.path = os.path.join(os.path.abspath(model_dir), self.NAME)
    self.held = False

  def _holder(self) -> dict | None:
    try:
      with open(self.path) as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {"host": "?", "pid": -1, "unreadable": True}

  def acquire(self):
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._holder()
        if holder is None:
          continue  # released meanwhile
        same_host = holder.get("host") == me["host"]
        pid = int(holder.get("pid", -1))
        if same_host and pid == me["pid"]:
          break  # ours, from an earlier call of this process
        if (same_host and not _pid_alive(pid)) or holder.get("unreadable"):
          log.warning(
              "taking over %s: its holder (host %s, pid %s) is not running", self.path,
              holder.get("host"), pid)
          os.remove(self.path)
          continue
        raise ModelDirLockedError(
            f"MODEL_DIR {os.path.dirname(self.path)} is in use by another training process "
            f"(host {holder.get('host')}, pid {pid}, since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('since', 0)))}); "
            "wait for it, stop it, or use another MODEL_DIR. If that process is gone (another "
            f"host), delete {self.path}.")
      else:
        with os.fdopen(fd, "w") as f:
          json.dump(me, f)
        break
    else:
      raise ModelDirLockedError(f"could not take the lock {self.path}")
    self.held = True
    atexit.register(self.release)

  def release(self):
    if self.held:
      holder = self._holder()
      if holder and holder.get("pid") == os.getpid():
        try:
          os.remove(self.path)
        except FileNotFoundError:
          pass
      self.held = False


def _pid_alive(pid: int) -> bool:
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


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
