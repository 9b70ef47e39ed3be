"""The trainer: one function, top to bottom (gin binds it at the edge).

`train(...)` builds the mesh, loads the task's splits, builds the method
(`train_setup`), creates (or resumes) sharded state and runs each training
stage (`train_loop.run_stage`) with periodic evaluation on the validation,
ID-test and OOD splits (`evaluator.Evaluator`), checkpoints, and writes
`results.json`. Resume order: the latest checkpoint in MODEL_DIR, else the
initial checkpoint for the backbone, else a fresh init.

Batches are a pure function of (seed, step): an epoch's order is a seeded
permutation, so a restarted run sees exactly the batches an uninterrupted one
would have, and the per-step dropout key is `fold_in(rng, step)`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
import time
from typing import Any, Callable, Mapping

import jax

from levi_jax import (checkpointing, evaluator, metric_logging, methods, partitioning,
                      train_loop, train_setup)
from levi_jax.checkpointing import CheckpointConfig
from levi_jax.input_pipeline import TaskData
from levi_jax.models import t5_encoder
from levi_jax.models import task_net as task_net_lib
from levi_jax.optim import OptimizerConfig
from levi_jax.partitioning import MeshConfig
from levi_jax.step import LossConfig

log = logging.getLogger("levi_jax")


# ------------------------------------------------------------------------------
# Configuration.
# ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Which method, backbone and small model to build (see `methods.make_method`).

  Attributes:
    method: one of `methods.METHODS`.
    backbone: a T5 preset name (`t5_encoder.PRESETS`).
    backbone_overrides: T5Config fields to change, e.g. {"num_layers": 4}.
      `vocab_size` defaults to the data's vocabulary size when the preset's
      is smaller or no initial checkpoint fixes it.
    dtype: activation dtype ("float32", "bfloat16").
    task_net: "features" (FeatureTower over categorical features) or
      "tokens" (TokenTower over the input text).
    feature_embed_dim, task_hidden: FeatureTower sizes.
    feature_dropout: FeatureTower's whole-feature embedding dropout in training
      (a regulariser of the from-scratch view; 0: off).
    token_layers, token_embed_dim: TokenTower sizes.
    taps, pooling, adapter_dim, fusion_hidden, aux_heads: LEVI settings.
    fusion: how LEVI joins the views: "late" (adapted taps concatenated with
      the small model's output) or "layerwise" (each tap added to a hidden
      layer of the small model; see `levi_jax.models.levi`).
    lora_rank, lora_alpha: LoRA settings (lora, levi_lora).
    ensemble_member, lp_fraction, wise_alphas: baseline settings.
    pretrained: a `levi_jax.checkpoints.backbones.PretrainedConfig` (e.g. the
      packaged all-MiniLM-L6-v2, a Hugging Face BERT/T5 folder, a T5X
      checkpoint): the backbone module, its weights and the vocabulary that
      tokenizes `inputs` all come from it, and `backbone` is ignored.
  """

  method: str = "levi"
  backbone: str = "t5_1_1_tiny"
  backbone_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  dtype: str = "float32"
  task_net: str = "features"
  feature_embed_dim: int = 16
  task_hidden: tuple[int, ...] = (64, 64)
  feature_dropout: float = 0.0
  token_layers: int = 0
  token_embed_dim: int = 64
  taps: tuple[int | str, ...] = ("middle", -1)
  pooling: str = "mean"
  adapter_dim: int | None = 64
  fusion_hidden: tuple[int, ...] = (64,)
  aux_heads: bool = False
  fusion: str = "late"
  lora_rank: int = 8
  lora_alpha: float = 16.0
  ensemble_member: str = "lp"
  lp_fraction: float = 0.5
  wise_alphas: tuple[float, ...] = (0.25, 0.5, 0.75)
  pretrained: Any = None

  def __post_init__(self):
    if self.method not in methods.METHODS:
      methods.make_method(self.method)  # raises with close matches
    if self.backbone not in t5_encoder.PRESETS:
      raise ValueError(f"ModelConfig.backbone: unknown preset {self.backbone!r}; "
                       f"expected one of {sorted(t5_encoder.PRESETS)}")
    from levi_jax.models import levi as levi_lib
    if self.fusion not in levi_lib.FUSIONS:
      raise ValueError(f"ModelConfig.fusion must be one of {levi_lib.FUSIONS}, "
                       f"got {self.fusion!r}")
    task_net_lib.check_feature_dropout(self.feature_dropout, "ModelConfig")
    if self.feature_dropout and self.task_net != "features":
      raise ValueError(f"ModelConfig.feature_dropout={self.feature_dropout!r} needs "
                       f"task_net='features' (it drops FeatureTower embeddings), got "
                       f"task_net={self.task_net!r}")
    if self.task_net not in ("features", "tokens"):
      raise ValueError(f"ModelConfig.task_net must be 'features' or 'tokens', "
                       f"got {self.task_net!r}")
    object.__setattr__(self, "backbone_overrides", dict(self.backbone_overrides))
    for k in ("taps", "task_hidden", "fusion_hidden", "wise_alphas"):
      object.__setattr__(self, k, tuple(getattr(self, k)))


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the examples come from and how they are batched.

  Attributes:
    task: a registered task name (`python -m levi_jax.data.inspect --list`).
    data_dir: folder of the raw files (or the synthetic world).
    batch_size: global training batch size (split over processes).
    eval_batch_size: global evaluation batch size (padded, masked).
    seq_length: `inputs` length in tokens.
    validation_fraction: share of the training rows held out for validation
      (checkpoint selection) when task data passed to `train` has no
      validation split (registered tasks have their own).
    seed: seed of the validation split and of the batch order.
    tap_cache_dir: where a frozen backbone's pooled taps are cached
      (`levi_jax.tap_cache`); batches then carry them and the backbone does
      not run. Empty: off. Methods that train the backbone ignore it.
    example_cache_dir: where the task's parsed, tokenized examples are kept
      on disk (`levi_jax.data.example_cache`): the first run writes them,
      every run reads its batches from there (nothing parsed or tokenized,
      host memory independent of the data's size). Empty: every split is
      parsed and held in memory. The batches are the same either way.
    tap_cache_dtype: how cached taps are stored: "float32" (the taps as
      computed) or "bfloat16" (half the disk and page cache; the taps rounded).
    vocabulary_path: the vocabulary that tokenizes `inputs`. Empty: the one
      the backbone checkpoint carries (`pretrained.checkpoint_vocabulary`),
      else `LEVI_VOCAB_PATH`, else the data's own. A backbone that carries a
      vocabulary with another hash is an error.
    input_shards: how many input shards every split is dealt into
      (`input_pipeline.InputShards`); each process loads only the shards it
      feeds. 0: one per process feeding data. The batches depend on this
      number, not on the process count: a run on one process with
      `input_shards = N` sees the batches of a run on N processes.
    duplicates: rating rows of the raw files that repeat an earlier (user,
      item, timestamp): 'keep' (counted, a warning), 'drop' (the first of each
      kept) or 'error' (`levi_jax.data.datasets.load_table`).
  """

  task: str = "movielens_100k.gender_m_to_f"
  data_dir: str = ""
  batch_size: int = 64
  eval_batch_size: int = 256
  seq_length: int = 64
  validation_fraction: float = 0.1
  seed: int = 0
  tap_cache_dir: str = ""
  example_cache_dir: str = ""
  tap_cache_dtype: str = "float32"
  vocabulary_path: str = ""
  input_shards: int = 0
  duplicates: str = "keep"

  def __post_init__(self):
    if self.batch_size < 1 or self.eval_batch_size < 1 or self.seq_length < 1:
      raise ValueError(f"DataConfig: sizes must be positive, got {self}")
    from levi_jax.data import formats
    if self.tap_cache_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"DataConfig.tap_cache_dtype must be 'float32' or 'bfloat16', "
                       f"got {self.tap_cache_dtype!r}")
    if self.duplicates not in formats.DUPLICATE_POLICIES:
      raise ValueError(f"DataConfig.duplicates must be one of {formats.DUPLICATE_POLICIES}, "
                       f"got {self.duplicates!r}")
    if self.input_shards < 0:
      raise ValueError(f"DataConfig.input_shards must be >= 0 (0: one per process), "
                       f"got {self.input_shards}")
    if not 0.0 <= self.validation_fraction < 1.0:
      raise ValueError(f"DataConfig.validation_fraction must be in [0, 1), "
                       f"got {self.validation_fraction}")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """Training length and cadence.

  Attributes:
    num_steps: training steps of this fine-tuning run (relative: counted from
      the start of fine-tuning, not from the backbone's pre-training step).
    log_every: fetch and log training metrics every this many steps (also
      where NaN/inf losses are caught).
    eval_every: evaluate every this many steps (and at the end); 0: end only.
    seed: parameter-init and dropout seed.
  """

  num_steps: int = 1000
  log_every: int = 50
  eval_every: int = 0
  seed: int = 0

  def __post_init__(self):
    if self.num_steps < 1 or self.log_every < 1 or self.eval_every < 0:
      raise ValueError(f"LoopConfig: num_steps and log_every must be >= 1, got {self}")


# ------------------------------------------------------------------------------
# The trainer.
# ------------------------------------------------------------------------------
_HELD_LOCKS: list[checkpointing.ModelDirLock] = []


def _model_dir_guard(fn):
  """Around `train`: MODEL_DIR's lock is held until it returns or raises (a
  rejected start too), and a start whose newest checkpoint does not restore
  moves it aside and starts again from the newest one that does
  (`CheckpointConfig.fallback_on_damage`).
  """
  @functools.wraps(fn)  # gin reads the signature through __wrapped__
  def wrapper(*args, **kwargs):
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    cfg = bound.arguments["checkpoint"]
    while True:
      held = len(_HELD_LOCKS)
      try:
        return fn(*args, **kwargs)
      except checkpointing.DamagedCheckpointError as e:
        if not cfg.fallback_on_damage:
          raise
        where = e.move_aside()
        log.warning("%s; moved it to %s and resuming from the newest checkpoint that "
                    "restores (CheckpointConfig.fallback_on_damage=False stops instead)", e,
                    where)
      finally:
        while len(_HELD_LOCKS) > held:
          _HELD_LOCKS.pop().release()
  return wrapper


@_model_dir_guard
def train(
    model_dir: str,
    model: ModelConfig = ModelConfig(),
    data: DataConfig = DataConfig(),
    optimizer: OptimizerConfig = OptimizerConfig(),
    loss: LossConfig = LossConfig(),
    loop: LoopConfig = LoopConfig(),
    checkpoint: CheckpointConfig = CheckpointConfig(),
    mesh: MeshConfig = MeshConfig(),
    initial_checkpoint_path: str | None = None,
    task_data: TaskData | None = None,
    on_start: Callable[[], None] | None = None,
) -> dict[str, Any]:
  """Trains (or resumes) one method on one task; returns the results dict.

  Args:
    model_dir: where checkpoints, metrics.jsonl, TensorBoard events and
      results.json go.
    model, data, optimizer, loss, loop, checkpoint, mesh: configs.
    initial_checkpoint_path: pretrained weights for the backbone
      (`pretrained.load_backbone`): a T5X checkpoint (a `checkpoint_N` folder
      or a model dir of them), a Hugging Face T5 folder, or a tree written by
      `checkpointing.save_tree` (the backbone itself, or a method's params of
      which only `backbone` is read). It replaces every backbone subtree of
      the fresh init (each ensemble member's too), and the vocabulary it
      carries tokenizes `inputs` (`train_setup.backbone_vocabulary`). It is
      read at every start, a resume too: the frozen params are rebuilt from it
      and checked against the hash the checkpoint recorded, while trainable
      params (a fine-tuned backbone) then come from the checkpoint. Ignored
      when `model.pretrained` is set. A relative path not found from here is
      looked up among the files shipped with levi_jax, then in the source
      checkout (`paths.shipped_path`).
    task_data: in-memory splits; default: loaded from `data.task`.
    on_start: called once the start is accepted (MODEL_DIR locked, a checkpoint
      to resume matches this run), before anything else is written: e.g.
      writing the run's config.gin, which a rejected start must not overwrite.
  """
  t_start = time.time()
  from levi_jax.data import paths
  initial_checkpoint_path = paths.shipped_path(initial_checkpoint_path)  # e.g. the demo's
  train_setup.check_filesystem_paths(model_dir, model, data, initial_checkpoint_path)

  # --- Mesh and MODEL_DIR (one training job per MODEL_DIR) ---------------------------
  device_mesh, rules = partitioning.make_mesh(mesh), partitioning.rules_for(mesh)
  train_setup.check_batch_sizes(data, device_mesh)  # before anything is written
  os.makedirs(model_dir, exist_ok=True)
  if jax.process_index() == 0:
    lock = checkpointing.ModelDirLock(model_dir)
    lock.acquire()
    _HELD_LOCKS.append(lock)

  # --- Data and model ------------------------------------------------------------------
  pretrained = train_setup.load_pretrained(model)
  run_data = train_setup.load_data(data, device_mesh, pretrained, initial_checkpoint_path,
                                   task_data)
  run = train_setup.build_model(model, run_data, loss.task, loop.seed, pretrained,
                                initial_checkpoint_path)
  method = run.method
  trajectory = train_setup.trajectory(data, optimizer, loss, loop)

  # --- Resume point: the latest checkpoint in MODEL_DIR, if it is this run's ------------
  ckpt = checkpointing.Checkpointer(os.path.join(model_dir, "checkpoints"), checkpoint)
  resume = None
  if (latest := ckpt.latest_step()) is not None:
    meta = ckpt.read_meta(latest)
    train_setup.check_same_model(meta, run.fingerprint, model_dir, latest)
    train_setup.check_same_trajectory(meta, trajectory, model_dir, latest)
    resume = train_loop.Resume(int(meta["step"]), meta)
    log.info("resuming from step %d in %s", resume.step, model_dir)
  if on_start is not None:
    on_start()

  # Leaving this block, also by an error, commits the save in flight (ckpt.close).
  with jax.set_mesh(device_mesh), ckpt:
    # --- Initial params, tap cache, evaluation ---------------------------------------
    params, param_shardings = run.initial_params(device_mesh, rules)
    run_data, tap_stats = train_setup.attach_tap_cache(run_data, data, method, params,
                                                       device_mesh, rules)
    evaluate_params = evaluator.Evaluator(method, loss, run_data, param_shardings, device_mesh,
                                          rules)
    ctx = train_loop.StageContext(
        run=run, run_data=run_data, evaluator=evaluate_params, ckpt=ckpt,
        metric_log=metric_logging.MetricLog(model_dir), optimizer=optimizer, loss=loss,
        num_steps=loop.num_steps, log_every=loop.log_every, eval_every=loop.eval_every,
        save_every=checkpoint.every_steps, mesh=device_mesh, rules=rules, model_dir=model_dir,
        trajectory=trajectory, model_config=dataclasses.asdict(model))

    # --- Stages --------------------------------------------------------------------
    start_step = resume.step if resume else 0
    stage0_params, outcome, last_evals, train_time, steps_run = None, None, {}, 0.0, 0
    for stage_idx, (begin, end) in enumerate(train_loop.stage_bounds(method, loop.num_steps)):
      here = resume if resume and resume.meta["stage"] == stage_idx else None
      if end <= start_step and here is None:
        continue  # finished before this start
      if method.wise_alphas and stage_idx == 1:
        stage0_params = checkpointing.restore_tree(os.path.join(model_dir, "stage_0_params"),
                                                   train_setup.as_abstract(params))
      outcome = train_loop.run_stage(ctx, stage_idx, begin, end, params, here)
      params, last_evals = outcome.params, outcome.evals or last_evals
      train_time += outcome.train_time
      steps_run += outcome.steps_run
      if method.wise_alphas and stage_idx == 0:
        ckpt.wait()
        checkpointing.save_tree(os.path.join(model_dir, "stage_0_params"), params)
      start_step, resume = max(start_step, end), None
    ckpt.close()

    # --- Final evaluation ------------------------------------------------------------
    metrics = last_evals or evaluate_params(params)  # nothing trained: what was restored
    extra: dict[str, Any] = {}
    best = metric_logging.best_eval(model_dir)
    if best is not None:
      extra["best_validation"] = best  # early stopping: the evaluation chosen on validation
    if method.wise_alphas and stage0_params is not None:
      extra["wise_ft"] = evaluator.wise_ft(evaluate_params, stage0_params, params,
                                           method.wise_alphas)
  if tap_stats:
    extra["tap_cache"] = tap_stats

  results = train_setup.results_record(
      run, run_data, data.task, loop.num_steps, params, outcome.frozen_hash, metrics,
      wall_time_s=time.time() - t_start, train_time_s=train_time,
      examples_per_s=steps_run * data.batch_size / max(train_time, 1e-9),
      final_train_loss=outcome.last_loss, extra=extra)
  train_setup.write_results(model_dir, "results.json", results)
  return results
