"""Evaluation: metrics of params on every evaluation split, and of a saved checkpoint.

`Evaluator` streams each split (validation, ID test, OOD...) through one
jitted eval step and sums exactly across batches, padding and processes; the
trainer calls it for its periodic and final evaluations. `evaluate(...)`
evaluates a training checkpoint of MODEL_DIR on its own: it rebuilds the
frozen params as the trainer does, restores only the trainable params (no
optimizer state is read or built, no training loop runs) and writes
`eval_results.json`.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from levi_jax import checkpointing, methods, partitioning, step as step_lib, train_setup
from levi_jax.input_pipeline import TaskData, eval_batches
from levi_jax.partitioning import MeshConfig
from levi_jax.step import LossConfig

if TYPE_CHECKING:
  from levi_jax import trainer

log = logging.getLogger("levi_jax")

Metrics = dict[str, dict[str, float]]

# Seconds between the progress lines of one evaluation split.
PROGRESS_EVERY_S = 60.0


class Evaluator:
  """Metrics of a params tree on each evaluation split of a run.

  Args:
    method: the method whose predictions are scored.
    loss: the task (regression: RMSE/MAE; classification: accuracy).
    run_data: the splits (this process's rows) and their batching.
    param_shardings: shardings of the full params tree the evaluator is called with.
    mesh, rules: the device mesh and logical axis rules.
  """

  def __init__(self, method: methods.Method, loss: LossConfig, run_data: train_setup.RunData,
               param_shardings: Any, mesh: jax.sharding.Mesh, rules):
    self.task = loss.task
    self.run_data = run_data
    self.mesh = mesh
    self._eval_step = partitioning.jit_eval_step(step_lib.make_eval_step(method, loss),
                                                 param_shardings, mesh, rules)

  def __call__(self, params: Any) -> Metrics:
    """{split: {metric: value}} for the full (trainable and frozen) `params`.

    A split that takes longer than `PROGRESS_EVERY_S` logs its progress (batches done,
    seconds, ETA) every `PROGRESS_EVERY_S` and its time when done, so that a long
    evaluation (a fine-tuned encoder over a large OOD split) is not silent."""
    out = {}
    for name, split in self.run_data.evals.items():
      sums, total = None, self.run_data.eval_steps[name]
      t0 = last = time.time()
      for k, b in enumerate(eval_batches(split, self.run_data.eval_batch, total), 1):
        part = self._eval_step(params, partitioning.global_batch(b, self.mesh))
        sums = part if sums is None else jax.tree.map(jnp.add, sums, part)
        if time.time() - last >= PROGRESS_EVERY_S and k < total:
          jax.block_until_ready(sums)  # the batches done, not the batches dispatched
          last = time.time()
          log.info("evaluating %s: batch %d/%d, %.0fs, ETA %.0fs", name, k, total,
                   last - t0, (last - t0) / k * (total - k))
      out[name] = step_lib.finalize_metrics(jax.device_get(sums), self.task)
      if last > t0:
        log.info("evaluated %s: %d batches in %.0fs", name, total, time.time() - t0)
    return out


def wise_ft(evaluate_params: Evaluator, stage0_params: Any, params: Any,
            alphas: tuple[float, ...]) -> dict[str, Metrics]:
  """WiSE-FT: metrics of the interpolation between the end of stage 0 and `params`, per alpha."""
  return {f"{alpha:g}": evaluate_params(methods.wise_interpolate(stage0_params, params, alpha))
          for alpha in alphas}


def evaluate(
    model_dir: str,
    *,
    model: trainer.ModelConfig,
    data: trainer.DataConfig,
    loop: trainer.LoopConfig,
    loss: LossConfig = LossConfig(),
    mesh: MeshConfig = MeshConfig(),
    initial_checkpoint_path: str | None = None,
    task_data: TaskData | None = None,
    restore_step: int | None = None,
    output_dir: str | None = None,
) -> dict[str, Any]:
  """Evaluates a training checkpoint of MODEL_DIR; returns (and writes) its results.

  Restores the trainable params of the checkpoint (the latest, or
  `restore_step`) onto the frozen params rebuilt from their source, checked
  against the hash the checkpoint recorded. Nothing but `eval_results.json`
  is written, so a read-only MODEL_DIR can be evaluated.

  Args:
    model_dir: the training run's folder (holding `checkpoints/`).
    model, data, loss, loop, mesh, initial_checkpoint_path, task_data: as the
      run was trained with (`trainer.train`); `loop` gives the init seed that
      rebuilds frozen params of a fresh init, and the reported `num_steps`.
    restore_step: which checkpoint step to evaluate (default: the latest).
    output_dir: where `eval_results.json` goes (default: MODEL_DIR).
  """
  from levi_jax.data import paths
  t_start = time.time()
  initial_checkpoint_path = paths.shipped_path(initial_checkpoint_path)
  train_setup.check_filesystem_paths(model_dir, model, data, initial_checkpoint_path)
  device_mesh, rules = partitioning.make_mesh(mesh), partitioning.rules_for(mesh)
  train_setup.check_batch_sizes(data, device_mesh)
  out_dir = output_dir or model_dir
  probe = out_dir if os.path.isdir(out_dir) else os.path.dirname(os.path.abspath(out_dir))
  if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
    raise PermissionError(f"evaluation writes eval_results.json into {out_dir}, which is not "
                          "a writable folder; give another (levi_jax.eval --output_dir=DIR)")

  # --- Data and model, as trained --------------------------------------------------
  pretrained = train_setup.load_pretrained(model)
  run_data = train_setup.load_data(data, device_mesh, pretrained, initial_checkpoint_path,
                                   task_data)
  run = train_setup.build_model(model, run_data, loss.task, loop.seed, pretrained,
                                initial_checkpoint_path)

  # --- The checkpoint ----------------------------------------------------------------
  ckpt = checkpointing.Checkpointer(os.path.join(model_dir, "checkpoints"), read_only=True)
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint to evaluate in {model_dir}/checkpoints")
  if restore_step is not None:
    if restore_step not in ckpt.all_steps():
      raise FileNotFoundError(f"no checkpoint at step {restore_step} in {model_dir}; "
                              f"it has steps {ckpt.all_steps()}")
    step = restore_step
  meta = ckpt.read_meta(step)
  train_setup.check_same_model(meta, run.fingerprint, model_dir, step)
  stage = int(meta["stage"])

  with jax.set_mesh(device_mesh), ckpt:
    # --- Params: frozen rebuilt, trainable restored --------------------------------
    params, param_shardings = run.initial_params(device_mesh, rules)
    run_data, tap_stats = train_setup.attach_tap_cache(run_data, data, run.method, params,
                                                       device_mesh, rules)
    trainable, frozen = methods.partition(params, run.method.stages[stage].frozen)
    checkpointing.check_frozen(frozen, meta["frozen_hash"], run.frozen_source)
    frozen_hash = checkpointing.tree_fingerprint(frozen)
    trainable = ckpt.restore_params(step, train_setup.as_abstract(trainable))
    params = methods.combine(trainable, frozen)
    log.info("evaluating step %d of %s", step, model_dir)

    # --- Evaluations ---------------------------------------------------------------
    evaluate_params = Evaluator(run.method, loss, run_data, param_shardings, device_mesh, rules)
    metrics = evaluate_params(params)
    extra: dict[str, Any] = {}
    if run.method.wise_alphas and stage == 1:
      stage0 = checkpointing.restore_tree(os.path.join(model_dir, "stage_0_params"),
                                          train_setup.as_abstract(params))
      extra["wise_ft"] = wise_ft(evaluate_params, stage0, params, run.method.wise_alphas)
  if tap_stats:
    extra["tap_cache"] = tap_stats

  results = train_setup.results_record(
      run, run_data, data.task, loop.num_steps, params, frozen_hash, metrics,
      wall_time_s=time.time() - t_start, train_time_s=0.0, examples_per_s=0.0,
      final_train_loss=None, extra=extra)
  train_setup.write_results(out_dir, "eval_results.json", results)
  return results
