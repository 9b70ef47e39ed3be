"""Runs short sharded trainings for `test_sharding.py`, in its own process.

The device count must be fixed before JAX starts, so the tests run this file
as a subprocess (`XLA_FLAGS=--xla_force_host_platform_device_count=8`, or as
one of several `jax.distributed` processes) and compare what it writes with a
single-device run of `run_training` in the test process.

    python tests/sharding_worker.py meshes OUT_DIR --method levi
    python tests/sharding_worker.py multiprocess OUT_DIR --port P --process_id I --num_processes N
    python tests/sharding_worker.py trainer OUT_DIR --data_dir WORLD --port P --process_id I
    python tests/sharding_worker.py distributed OUT_DIR --data_dir WORLD --port P --process_id I

`distributed` does what `multiprocess` and then `trainer` do, in one
`jax.distributed` session (one start-up of each process for both).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from levi_jax import checkpointing, methods, partitioning, step
from levi_jax.models import t5_encoder as t5
from levi_jax.models.task_net import CategoricalFeature, FeatureTower
from levi_jax.optim import OptimizerConfig, make_optimizer
from trainer_fixtures import TINY_BACKBONE

STEPS = 3
BATCH = 16
LENGTH = 8
VOCAB = 64
FEATS = (CategoricalFeature("user_id", 12), CategoricalFeature("genres", 6, bag_size=3))
# Every sharded dimension divides 8: heads, joined_kv, mlp and vocab. Dropout
# is on, so the random bits must not depend on the sharding either.
CONFIG = t5.T5Config(vocab_size=VOCAB, emb_dim=16, num_heads=8, head_dim=2, num_layers=2,
                     mlp_dim=32, mlp_activations=("gelu", "linear"), dropout_rate=0.1)
# (data, model, fsdp) meshes of the 8-device run.
MESHES = ((1, 8, False), (2, 4, False), (4, 2, False), (8, 1, False), (2, 4, True))
METHODS = ("levi", "ft")


def make_batch(seed: int = 0) -> dict[str, np.ndarray]:
  """The global batch (every process can build it; each feeds its own rows)."""
  rs = np.random.RandomState(seed)
  batch = {"inputs": rs.randint(1, VOCAB, (BATCH, LENGTH)).astype(np.int32),
           "user_id": rs.randint(0, 12, (BATCH,)).astype(np.int32),
           "genres": rs.randint(0, 6, (BATCH, 3)).astype(np.int32),
           "targets": (rs.randn(BATCH) + 3.0).astype(np.float32)}
  batch["inputs"][:, 6:] = 0
  return batch


def build(name: str) -> methods.Method:
  """The method around the small test backbone and feature tower."""
  return methods.make_method(name, backbone=t5.T5Encoder(CONFIG),
                             task_net=FeatureTower(FEATS, embed_dim=8, hidden=(16,)),
                             adapter_dim=8, fusion_hidden=(8,))


def _init_fn(method):
  """(TrainState initialiser with boxed leaves, its optimizer): plain Adam, no clipping."""
  optimizer = make_optimizer(
      OptimizerConfig(learning_rate=1e-2, schedule="constant", clip_norm=None), 100)
  batch = make_batch()

  def init():
    params = method.init(jax.random.PRNGKey(0), batch)
    trainable, frozen = methods.partition(params, method.stages[0].frozen)
    return step.create_train_state(trainable, frozen, optimizer)

  return init, optimizer


def to_host(tree) -> dict[str, np.ndarray]:
  """'/'-joined paths to full numpy arrays (gathered across processes)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    tree = multihost_utils.process_allgather(tree, tiled=True)
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def _layout(tree) -> dict:
  """Per leaf: global shape, PartitionSpec and the shapes of its device shards."""
  flat = traverse_util.flatten_dict(tree, sep="/")
  return {k: {"shape": list(v.shape),
              "spec": [list(a) if isinstance(a, tuple) else a for a in v.sharding.spec],
              "shard_shapes": sorted({tuple(s.data.shape) for s in v.addressable_shards})}
          for k, v in flat.items()}


def _constraint_count(jitted, args) -> int:
  """Sharding constraints naming the `model` axis in the lowered program."""
  return sum('"model"' in line for line in jitted.lower(*args).as_text().splitlines()
             if "sdy.sharding_constraint" in line)


def run_training(name: str, mesh, rules, inspect: bool = False, save_to: str | None = None
                 ) -> tuple[dict[str, np.ndarray], dict]:
  """Trains `STEPS` steps of a method on a mesh.

  Returns:
    (arrays, report): the loss per step, the gradients of the first step,
    the parameters at the end and eval sums with them, and whether the
    fingerprint of the final sharded parameters equals that of their host copy;
    the report holds the fingerprints of one-device init values, on the host
    and placed into this mesh's shardings, and, with `inspect`, the layout of
    the fresh state and the constraint counts of the lowered step.
  """
  method = build(name)
  init, optimizer = _init_fn(method)
  state, shardings = partitioning.sharded_init(init, mesh, rules)
  # The fingerprint of one set of values, placed into this mesh's shardings
  # (values of a sharded init may differ in the last bit from one device's).
  one_device = jax.device_get(nn.meta.unbox(init()).all_params())
  placed = jax.tree.map(
      lambda v, s: jax.make_array_from_callback(v.shape, s, lambda i: v[i]), one_device,
      nn.meta.unbox(methods.combine(shardings.params, shardings.frozen)))
  report = {"init_fingerprint": checkpointing.tree_fingerprint(placed),
            "host_fingerprint": checkpointing.tree_fingerprint(one_device)}
  train_step = step.make_train_step(method, step.LossConfig())
  local = make_batch()
  rows = partitioning.process_batch_slice(BATCH, mesh)
  batch = partitioning.global_batch({k: v[rows] for k, v in local.items()}, mesh)
  rng = jax.random.PRNGKey(1)
  jitted = partitioning.jit_train_step(train_step, shardings, mesh, rules)
  if inspect:
    report["layout"] = _layout({"params": state.params, "frozen": state.frozen,
                                "mu": state.opt_state[0].mu})
    bare = jax.jit(train_step)
    report["constraints"] = {"with_rules": _constraint_count(jitted, (state, batch, rng)),
                             "without_rules": _constraint_count(bare, (state, batch, rng))}
  losses = []
  for i in range(STEPS):
    state, metrics = jitted(state, batch, rng)
    losses.append(float(metrics["loss"]))
    if i == 0:
      # Adam's first moment after one unclipped step is (1 - b1) * gradient.
      arrays = {f"grad/{k}": v / 0.1 for k, v in to_host(state.opt_state[0].mu).items()}
  arrays["loss"] = np.asarray(losses)
  arrays.update({f"param/{k}": v for k, v in to_host(state.all_params()).items()})
  host = traverse_util.unflatten_dict(
      {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")}, sep="/")
  arrays["fingerprint_matches_host"] = np.asarray(
      checkpointing.tree_fingerprint(state.all_params()) == checkpointing.tree_fingerprint(host))
  eval_step = partitioning.jit_eval_step(
      step.make_eval_step(method, step.LossConfig()),
      methods.combine(shardings.params, shardings.frozen), mesh, rules)
  sums = eval_step(state.all_params(), batch)
  arrays.update({f"eval/{k}": np.asarray(v) for k, v in sums.items()})
  if save_to:
    import orbax.checkpoint as ocp
    ocp.Checkpointer(ocp.StandardCheckpointHandler()).save(
        save_to, args=ocp.args.StandardSave(state))
  return arrays, report


def restore_resharded(path: str, name: str, mesh, rules) -> tuple[dict, dict]:
  """Restores a saved TrainState into `mesh` (orbax reshards on read).

  Returns:
    (host parameters, {"shardings_match": bool, "devices": device count}).
  """
  import orbax.checkpoint as ocp
  init, _ = _init_fn(build(name))
  abstract = partitioning.abstract_state(init, mesh, rules)
  restored = ocp.Checkpointer(ocp.StandardCheckpointHandler()).restore(
      path, args=ocp.args.StandardRestore(abstract))
  leaves, targets = jax.tree.leaves(restored), jax.tree.leaves(abstract)
  info = {"shardings_match": len(leaves) == len(targets) and all(
              x.sharding == t.sharding for x, t in zip(leaves, targets)),
          "devices": sorted({len(x.sharding.device_set) for x in leaves})}
  return {f"param/{k}": v for k, v in to_host(restored.all_params()).items()}, info


class _ReadLog(np.ndarray):
  """A numpy array that records the shape of every slice read from it."""

  reads: list = []

  def __getitem__(self, index):
    out = np.asarray(np.ndarray.__getitem__(self, index))
    _ReadLog.reads.append(out.shape)
    return out


def put_backbone_report(mesh, rules) -> dict:
  """How `pretrained.put_backbone` places host weights into a sharded model.

  Per backbone leaf: the sharding is the one the model was built with, the
  values are the host ones, and every slice read from the host array is one
  device's shard (the whole leaf is never put on one device first).
  """
  from levi_jax import pretrained
  method = build("levi")
  params, _ = partitioning.sharded_init(
      lambda: method.init(jax.random.PRNGKey(0), make_batch()), mesh, rules)
  prefix = pretrained.backbone_prefixes(params)[0]
  flat = traverse_util.flatten_dict(params, sep="/")
  targets = {k[len(prefix) + 1:]: v for k, v in flat.items() if k.startswith(prefix + "/")}
  host = {k: (np.asarray(v) + 1).view(_ReadLog) for k, v in to_host(targets).items()}
  out = {"leaves": len(host), "sharding_kept": True, "values_equal": True,
         "reads_are_shards": True, "split_leaves": 0}
  for k, v in host.items():
    _ReadLog.reads = []
    placed = traverse_util.flatten_dict(pretrained.put_backbone(
        params, traverse_util.unflatten_dict({k: v}, sep="/")), sep="/")[f"{prefix}/{k}"]
    shard = tuple(targets[k].sharding.shard_shape(targets[k].shape))
    out["sharding_kept"] &= placed.sharding == targets[k].sharding
    out["values_equal"] &= bool(np.array_equal(to_host({"x": placed})["x"], np.asarray(v)))
    out["reads_are_shards"] &= bool(_ReadLog.reads) and all(r == shard for r in _ReadLog.reads)
    out["split_leaves"] += int(np.prod(shard)) < int(np.prod(v.shape))
  return out


def bad_batch_report(model_dir: str) -> dict:
  """`trainer.train` with a batch the 8-way data axis can't split: the error, and
  whether anything was written first."""
  from levi_jax import trainer
  from trainer_fixtures import task_data
  try:
    trainer.train(model_dir, data=trainer.DataConfig(batch_size=12), task_data=task_data(),
                  mesh=partitioning.MeshConfig(8, 1))
  except ValueError as e:
    return {"error": str(e), "written": os.path.exists(model_dir)}
  return {"error": None, "written": os.path.exists(model_dir)}


def meshes(out_dir: str, name: str):
  """One method's 8-device checks; arrays to `{name}.npz`, the rest to `{name}.json`.

  LEVI's run also reports the 2x4 layouts and lowered constraints, and its
  2x4 checkpoint is restored under 8x1 and 1x1.
  """
  devices = jax.devices()
  assert len(devices) == 8, devices
  arrays, report = {}, {}
  ckpt = os.path.join(os.path.abspath(out_dir), "ckpt")
  for data, model, fsdp in MESHES:
    cfg = partitioning.MeshConfig(data, model, fsdp)
    mesh = partitioning.make_mesh(cfg, devices)
    tag = f"{data}x{model}{'_fsdp' if fsdp else ''}"
    inspect = name == "levi" and (data, model) == (2, 4)
    got, info = run_training(name, mesh, partitioning.rules_for(cfg), inspect=inspect,
                             save_to=ckpt if inspect and not fsdp else None)
    arrays.update({f"{tag}/{name}/{k}": v for k, v in got.items()})
    report[f"{tag}/{name}"] = info
  if name == "levi":
    report["bad_batch"] = bad_batch_report(os.path.join(out_dir, "bad_batch"))
    cfg = partitioning.MeshConfig(2, 4, True)
    report["put_backbone"] = put_backbone_report(partitioning.make_mesh(cfg, devices),
                                                 partitioning.rules_for(cfg))
    for data, model, devs in ((8, 1, devices), (1, 1, devices[:1])):
      mesh = partitioning.make_mesh(partitioning.MeshConfig(data, model), devs)
      got, info = restore_resharded(ckpt, name, mesh, partitioning.LOGICAL_RULES)
      arrays.update({f"restored_{data}x{model}/{name}/{k}": v for k, v in got.items()})
      report[f"restored_{data}x{model}"] = info
  np.savez(os.path.join(out_dir, f"{name}.npz"), **arrays)
  with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
    json.dump(report, f)


def _initialize(port: int, process_id: int, num_processes: int):
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=60)


def multiprocess(out_dir: str, port: int, process_id: int, num_processes: int):
  """One of `num_processes` processes training LEVI on a mesh spanning them."""
  _initialize(port, process_id, num_processes)
  try:
    _multiprocess_checks(out_dir, process_id)
  finally:
    jax.distributed.shutdown()


def _multiprocess_checks(out_dir: str, process_id: int):
  """`multiprocess`'s trainings, in an initialised `jax.distributed` session."""
  n = jax.device_count()
  result = {"process_count": np.asarray(jax.process_count()),
            "device_count": np.asarray(n)}
  # Processes own rows of the batch (2x2), then the model axis spans them (1x4).
  for data, model in ((n // 2, 2), (1, n)):
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data, model))
    result[f"{data}x{model}/shard"] = np.asarray(partitioning.process_shard(mesh))
    arrays, report = run_training("levi", mesh, partitioning.LOGICAL_RULES)
    for k, v in arrays.items():
      result[f"{data}x{model}/{k}"] = v
    for k in ("init_fingerprint", "host_fingerprint"):
      result[f"{data}x{model}/{k}"] = np.asarray(report[k])
  np.savez(os.path.join(out_dir, f"process_{process_id}.npz"), **result)


TRAINER_TASK = "movielens_100k.gender_m_to_f"


def trainer_run(model_dir: str, data_dir: str, input_shards: int = 0,
                tap_cache_dir: str = "") -> dict:
  """A short LEVI run of `trainer.train` on a synthetic world at `data_dir`.

  On a mesh of every device, data-parallel; each process loads only its input
  shards (one per process unless `input_shards`).
  """
  from levi_jax import trainer
  from levi_jax.checkpointing import CheckpointConfig
  return trainer.train(
      model_dir,
      model=trainer.ModelConfig(
          method="levi", backbone="t5_1_1_tiny", taps=(0, -1), adapter_dim=8,
          fusion_hidden=(8,), task_hidden=(8,), feature_embed_dim=4, aux_heads=False,
          backbone_overrides=TINY_BACKBONE),
      data=trainer.DataConfig(task=TRAINER_TASK, data_dir=data_dir, batch_size=16,
                              eval_batch_size=32, seq_length=16, input_shards=input_shards,
                              tap_cache_dir=tap_cache_dir),
      optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=0),
      loop=trainer.LoopConfig(num_steps=6, log_every=3, eval_every=0),
      checkpoint=CheckpointConfig(every_steps=6, keep=1, async_save=False),
      mesh=partitioning.MeshConfig(-1, 1))


def trainer_process(out_dir: str, data_dir: str, port: int, process_id: int,
                    num_processes: int):
  """One of `num_processes` processes running `trainer_run` together."""
  _initialize(port, process_id, num_processes)
  try:
    _trainer_checks(out_dir, data_dir, process_id)
  finally:
    jax.distributed.shutdown()


def _trainer_checks(out_dir: str, data_dir: str, process_id: int):
  """`trainer_process`'s run, in an initialised `jax.distributed` session."""
  results = trainer_run(os.path.join(out_dir, "run"), data_dir,
                        tap_cache_dir=os.path.join(out_dir, "tap_cache"))
  with open(os.path.join(out_dir, f"trainer_{process_id}.json"), "w") as f:
    json.dump(results, f)


def distributed(out_dir: str, data_dir: str, port: int, process_id: int, num_processes: int):
  """`multiprocess`, then `trainer_process`, in one `jax.distributed` session.

  Both write into `out_dir`: `process_{id}.npz` first, then `trainer_{id}.json`
  with the run's `run/` and `tap_cache/` folders.
  """
  _initialize(port, process_id, num_processes)
  try:
    _multiprocess_checks(out_dir, process_id)
    _trainer_checks(out_dir, data_dir, process_id)
  finally:
    jax.distributed.shutdown()


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("mode", choices=("meshes", "multiprocess", "trainer", "distributed"))
  parser.add_argument("out_dir")
  parser.add_argument("--data_dir")
  parser.add_argument("--method", choices=METHODS, default="levi")
  parser.add_argument("--port", type=int)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--num_processes", type=int, default=2)
  args = parser.parse_args(argv)
  if args.mode == "meshes":
    meshes(args.out_dir, args.method)
  elif args.mode == "distributed":
    distributed(args.out_dir, args.data_dir, args.port, args.process_id, args.num_processes)
  elif args.mode == "trainer":
    trainer_process(args.out_dir, args.data_dir, args.port, args.process_id, args.num_processes)
  else:
    multiprocess(args.out_dir, args.port, args.process_id, args.num_processes)


if __name__ == "__main__":
  sys.exit(main())
