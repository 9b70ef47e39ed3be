"""One training stage: its state, steps, periodic evaluation, checkpoints and metrics.

A method trains in one or more stages (LP then FT for LP-FT and WiSE-FT), each
with its own frozen set and optimizer over a share of the run's steps; the step
counter is global across stages, the learning-rate schedule restarts per stage.
`run_stage` runs one of them from its start or from the checkpoint it resumes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from clu import parameter_overview

from levi_jax import checkpointing, metric_logging, methods, partitioning, step as step_lib
from levi_jax.evaluator import Evaluator, Metrics
from levi_jax.optim import OptimizerConfig, make_optimizer
from levi_jax.step import LossConfig, TrainState
from levi_jax.train_setup import RunData, RunModel

log = logging.getLogger("levi_jax")


def stage_bounds(method: methods.Method, num_steps: int) -> list[tuple[int, int]]:
  """[start, end) global steps of each stage."""
  bounds, start = [], 0
  for i, s in enumerate(method.stages):
    end = num_steps if i == len(method.stages) - 1 else start + max(
        1, int(round(s.fraction * num_steps)))
    bounds.append((start, end))
    start = end
  return bounds


@dataclasses.dataclass(frozen=True)
class Resume:
  """The checkpoint a stage continues from: its step and metadata."""

  step: int
  meta: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class StageContext:
  """What every stage of a run shares.

  Attributes:
    run, run_data: the run's model and data (`train_setup`).
    evaluator: the periodic evaluation.
    ckpt: the training checkpoints of MODEL_DIR.
    metric_log: metrics.jsonl and TensorBoard.
    optimizer, loss: the optimizer and loss configs.
    num_steps, log_every, eval_every: the run's `LoopConfig` cadence.
    save_every: `CheckpointConfig.every_steps`.
    mesh, rules: the device mesh and logical axis rules.
    model_dir: the run's folder (for error messages).
    trajectory: the run's training settings (`train_setup.trajectory`),
      recorded in every checkpoint.
    model_config: the `ModelConfig` as a dict, recorded in every checkpoint.
  """

  run: RunModel
  run_data: RunData
  evaluator: Evaluator
  ckpt: checkpointing.Checkpointer
  metric_log: metric_logging.MetricLog
  optimizer: OptimizerConfig
  loss: LossConfig
  num_steps: int
  log_every: int
  eval_every: int
  save_every: int
  mesh: jax.sharding.Mesh
  rules: Any
  model_dir: str
  trajectory: Mapping[str, Any]
  model_config: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class StageOutcome:
  """How a stage ended.

  Attributes:
    params: all params (trainable and frozen) at the stage's end.
    frozen_hash: fingerprint of the stage's frozen params.
    evals: the stage's last evaluation ({} when it evaluated nothing).
    last_loss: the last training loss fetched (None when no step ran).
    train_time: seconds spent in training steps (evaluations excluded).
    steps_run: training steps run in this call.
  """

  params: Any
  frozen_hash: str
  evals: Metrics
  last_loss: float | None
  train_time: float
  steps_run: int


def init_stage_state(ctx: StageContext, stage: methods.Stage, params: Any, begin: int,
                     num_stage_steps: int) -> tuple[TrainState, Any]:
  """(state, its shardings) of a stage starting from `params` at global step `begin`.

  The state is built sharded: its shardings come from the abstract state of a
  fresh init, and `create_train_state` runs under `jax.jit(out_shardings=...)`.
  """
  opt = make_optimizer(ctx.optimizer, num_stage_steps)

  def fresh_state():
    trainable, frozen = methods.partition(ctx.run.init_params(), stage.frozen)
    return step_lib.create_train_state(trainable, frozen, opt)

  shardings = nn.meta.unbox(partitioning.logical_to_sharding(
      jax.eval_shape(fresh_state), ctx.mesh, ctx.rules))
  trainable, frozen = methods.partition(params, stage.frozen)
  state = jax.jit(lambda t, f: step_lib.create_train_state(t, f, opt),
                  out_shardings=shardings)(trainable, frozen)
  return state.replace(step=jnp.asarray(begin, jnp.int32)), shardings


def run_stage(ctx: StageContext, stage_idx: int, begin: int, end: int, params: Any,
              resume: Resume | None = None) -> StageOutcome:
  """Trains stage `stage_idx` over global steps [begin, end) from `params`, or
  from the checkpoint `resume` (a step of this stage).

  Training metrics are fetched (and checked finite) every `log_every` steps
  and at each save or evaluation; evaluations run every `eval_every` steps and
  at the stage's end, and the validation RMSE goes with the checkpoint saved
  at that step (the best one is kept).
  """
  stage = ctx.run.method.stages[stage_idx]
  state, shardings = init_stage_state(ctx, stage, params, begin, end - begin)
  frozen_hash = checkpointing.tree_fingerprint(state.frozen)
  if resume is not None:
    if not begin <= resume.step <= end:
      raise ValueError(f"checkpoint at step {resume.step} is from stage {stage_idx}, "
                       f"which now spans steps {begin}-{end}; the stage split "
                       "changed (num_steps or lp_fraction)")
    checkpointing.check_frozen(state.frozen, resume.meta["frozen_hash"], ctx.run.frozen_source)
    saved = ctx.ckpt.restore(resume.step, _saved_state(state))
    state = state.replace(**saved)
  train_step = partitioning.jit_train_step(step_lib.make_train_step(ctx.run.method, ctx.loss),
                                           shardings, ctx.mesh, ctx.rules)

  first = begin if resume is None else max(begin, resume.step)
  progress = metric_logging.Progress(ctx.num_steps, first, ctx.run_data.batch_size,
                                     ctx.log_every)
  last_ok, last_loss, evals = first, None, {}
  log.info("stage %s: steps %d-%d, %d trainable / %d params", stage.name, begin, end,
           parameter_overview.count_parameters(state.params),
           parameter_overview.count_parameters(params))
  t_loop = time.time()
  for s in range(first, end):
    state, metrics = train_step(
        state, partitioning.global_batch(ctx.run_data.train_batch(s), ctx.mesh),
        ctx.run.dropout_rng)
    done = s + 1
    save_now = done % ctx.save_every == 0 or done == end
    eval_now = done == end or (ctx.eval_every and done % ctx.eval_every == 0)
    if done % ctx.log_every == 0 or save_now or eval_now:
      metrics = jax.device_get(metrics)
      _finite_or_raise(metrics, done, last_ok, ctx.model_dir, ctx.ckpt)
      last_ok, last_loss = done, float(metrics["loss"])
      ctx.metric_log.write(done, {f"train/{k}": float(v) for k, v in metrics.items()})
      progress.update(done, last_loss)
    best_metric = None
    if eval_now:
      jax.block_until_ready(state.params)
      t_eval = time.time()
      evals = ctx.evaluator(state.all_params())
      ctx.metric_log.write(done, {f"{split}/{k}": v for split, m in evals.items()
                                  for k, v in m.items()})
      if "validation" in evals and ctx.loss.task == "regression":
        best_metric = {checkpointing.BEST_METRIC: evals["validation"]["rmse"]}
      t_loop += time.time() - t_eval  # evaluation is not training time
    if save_now:
      ctx.ckpt.save(done, _saved_state(state),
                    {"step": done, "stage": stage_idx, "fingerprint": ctx.run.fingerprint,
                     "frozen_hash": frozen_hash, "frozen_source": ctx.run.frozen_source,
                     "trajectory": ctx.trajectory, "model": ctx.model_config,
                     "method": ctx.run.method.name},
                    best_metric)
  progress.close()
  params = state.all_params()
  jax.block_until_ready(params)
  return StageOutcome(params, frozen_hash, evals, last_loss, time.time() - t_loop,
                      end - first)


def _saved_state(state: TrainState) -> dict[str, Any]:
  """The part of the state a checkpoint holds (frozen params are kept by pointer)."""
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def _finite_or_raise(metrics: Mapping[str, Any], step: int, last_ok: int, model_dir: str,
                     ckpt: checkpointing.Checkpointer):
  """Raises FloatingPointError for a non-finite loss or gradient norm, once the
  save in flight is committed; the message names the last good checkpoint."""
  loss = float(metrics["loss"])
  if not math.isfinite(loss) or not math.isfinite(float(metrics["grad_norm"])):
    ckpt.wait()
    kept = ckpt.latest_step()
    raise FloatingPointError(
        f"non-finite training loss ({loss}) at step {step} (the previous check passed at "
        f"step {last_ok}); stopping without saving. "
        + (f"The last good checkpoint, step {kept}, is kept in {model_dir}/checkpoints: "
           "lower the learning rate or check the data, then resume from it."
           if kept is not None else f"No checkpoint had been saved in {model_dir} yet."))
