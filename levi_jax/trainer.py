"""The trainer: one function, top to bottom (gin binds it at the edge).

`train(...)` builds the mesh, loads the task's splits, builds the method,
creates (or resumes) sharded state, runs each training stage with periodic
evaluation on the validation, ID-test and OOD splits, checkpoints, and writes
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
import json
import logging
import math
import os
import re
import time
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from levi_jax import (checkpointing, metric_logging, methods, partitioning, step as step_lib,
                      tap_cache)
from levi_jax.input_pipeline import (InputShards, TaskData, eval_batches, load_task_data,
                                     num_rows, select_shards, shard_batch_indices,
                                     split_validation)
from levi_jax.input_pipeline import batch_indices  # noqa: F401  (re-exported)
from levi_jax.checkpointing import CheckpointConfig
from levi_jax.models import lora as lora_lib
from levi_jax.models import t5_encoder
from levi_jax.models.task_net import FeatureTower, TokenTower, validate_features
from levi_jax.optim import OptimizerConfig, make_optimizer
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
# Pieces (pure, tested on their own).
# ------------------------------------------------------------------------------
def build_method(cfg: ModelConfig, data: TaskData, num_outputs: int = 1,
                 backbone: nn.Module | None = None) -> methods.Method:
  """The method for `cfg`, sized to the data's features and vocabulary.

  Args:
    backbone: the encoder module (a pretrained one); default: the T5 preset
      `cfg.backbone` with `cfg.backbone_overrides`, its vocabulary sized to
      the data's unless overridden.

  Regression heads start at the mean training target.
  """
  if backbone is None:
    overrides = dict(cfg.backbone_overrides)
    overrides.setdefault("vocab_size", data.vocab_size)
    backbone = t5_encoder.T5Encoder(t5_encoder.preset(cfg.backbone, dtype=cfg.dtype,
                                                      **overrides))
  if backbone.config.vocab_size < data.vocab_size:
    raise ValueError(f"backbone vocab_size {backbone.config.vocab_size} is smaller than the "
                     f"data's token vocabulary ({data.vocab_size})")
  if cfg.task_net == "features":
    task_net = FeatureTower(data.features, embed_dim=cfg.feature_embed_dim,
                            hidden=cfg.task_hidden, dtype=cfg.dtype)
  else:
    task_net = TokenTower(data.vocab_size, embed_dim=cfg.token_embed_dim,
                          num_layers=cfg.token_layers, out_dim=cfg.task_hidden[-1],
                          dtype=cfg.dtype)
  return methods.make_method(
      cfg.method, backbone=backbone, task_net=task_net,
      taps=cfg.taps, pooling=cfg.pooling, adapter_dim=cfg.adapter_dim,
      fusion_hidden=cfg.fusion_hidden, num_outputs=num_outputs, aux_heads=cfg.aux_heads,
      fusion=cfg.fusion,
      lora=lora_lib.LoraConfig(cfg.lora_rank, cfg.lora_alpha),
      ensemble_member=cfg.ensemble_member, lp_fraction=cfg.lp_fraction,
      wise_alphas=cfg.wise_alphas, dtype=cfg.dtype,
      output_bias=float(np.mean(data.train["targets"])) if num_outputs == 1 else 0.0)


def backbone_vocabulary(data: DataConfig, pretrained: Any = None,
                        initial_checkpoint_path: str | None = None) -> str | None:
  """The vocabulary file that tokenizes `inputs` (see `DataConfig.vocabulary_path`).

  Raises:
    pretrained_lib.VocabularyMismatchError: the configured vocabulary is not
      the one the backbone was trained with.
  """
  from levi_jax import pretrained as pretrained_lib
  from levi_jax.data import spm
  explicit = data.vocabulary_path or os.environ.get(spm.VOCAB_ENV) or None
  if pretrained is not None:
    carried = None
    if pretrained.vocabulary_file:
      carried = pretrained_lib.BackboneVocabulary(
          pretrained.vocabulary_file, pretrained_lib.file_sha256(pretrained.vocabulary_file),
          pretrained.source)
    return pretrained_lib.resolve_vocabulary(carried, explicit, pretrained.source)
  if initial_checkpoint_path:
    return pretrained_lib.resolve_vocabulary(
        pretrained_lib.checkpoint_vocabulary(initial_checkpoint_path), explicit,
        initial_checkpoint_path)
  return explicit


def stage_bounds(method: methods.Method, num_steps: int) -> list[tuple[int, int]]:
  """[start, end) global steps of each stage."""
  bounds, start = [], 0
  for i, s in enumerate(method.stages):
    end = num_steps if i == len(method.stages) - 1 else start + max(
        1, int(round(s.fraction * num_steps)))
    bounds.append((start, end))
    start = end
  return bounds


def count_params(tree: Any) -> int:
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def _require_filesystem_path(what: str, path: str | None):
  """Raises for a URL (gs://...): run directories, data and checkpoints are read and
  written through the file system (a bucket mounted with gcsfuse, an NFS share)."""
  if path and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", str(path)):
    raise ValueError(
        f"{what} is {path!r}, a URL; levi_jax reads and writes run directories, data and "
        f"checkpoints through the file system. Mount the bucket on every host (e.g. "
        f"`gcsfuse --implicit-dirs BUCKET /gcs/BUCKET`) and pass the mounted path.")


def _config_diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> str:
  """'optimizer.learning_rate: 0.001 -> 0.01; batch_size: 16 -> 32' for the fields that differ."""
  parts = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k), new.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      sub = _config_diff(a, b, f"{prefix}{k}.")
      parts += [sub] if sub else []
    elif a != b:
      parts.append(f"{prefix}{k}: {a!r} (checkpoint) -> {b!r} (this run)")
  return "; ".join(parts)


def _finite_or_raise(metrics: Mapping[str, Any], step: int, last_ok: int, model_dir: str,
                     ckpt: checkpointing.Checkpointer):
  loss = float(metrics["loss"])
  if not math.isfinite(loss) or not math.isfinite(float(metrics["grad_norm"])):
    ckpt.wait()  # the save in flight is committed before we stop
    kept = ckpt.latest_step()
    raise FloatingPointError(
        f"non-finite training loss ({loss}) at step {step} (the previous check passed at "
        f"step {last_ok}); stopping without saving. "
        + (f"The last good checkpoint, step {kept}, is kept in {model_dir}/checkpoints: "
           "lower the learning rate or check the data, then resume from it."
           if kept is not None else f"No checkpoint had been saved in {model_dir} yet."))


# ------------------------------------------------------------------------------
# The trainer.
# ------------------------------------------------------------------------------
_HELD_LOCKS: list[checkpointing.ModelDirLock] = []


def _model_dir_guard(fn):
  """Around `train`: MODEL_DIR's lock is held until it returns or raises (a
  rejected start too), and a training start whose newest checkpoint does not restore moves it aside and
  starts again from the newest one that does (`CheckpointConfig.fallback_on_damage`).
  """
  @functools.wraps(fn)  # gin reads the signature through __wrapped__
  def wrapper(*args, **kwargs):
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    cfg, eval_only = bound.arguments["checkpoint"], bound.arguments["eval_only"]
    while True:
      held = len(_HELD_LOCKS)
      try:
        return fn(*args, **kwargs)
      except checkpointing.DamagedCheckpointError as e:
        if eval_only or not cfg.fallback_on_damage:
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
    eval_only: bool = False,
    restore_step: int | None = None,
    on_start: Callable[[], None] | None = None,
    output_dir: str | None = None,
) -> dict[str, Any]:
  """Trains (or resumes) one method on one task; returns the results dict.

  Args:
    model_dir: where checkpoints, metrics.jsonl, TensorBoard events and
      results.json go.
    model, data, optimizer, loss, loop, checkpoint, mesh: configs.
    initial_checkpoint_path: pretrained backbone weights: a tree written by
      `checkpointing.save_tree` (the committed demo backbone), a Hugging Face
      T5 folder or a T5X checkpoint (`pretrained.read_backbone`); only the
      backbone subtree is restored, and its vocabulary tokenizes `inputs`
      (`backbone_vocabulary`). A relative path not found from here is looked
      up among the files shipped with levi_jax (`paths.shipped_path`).
    task_data: in-memory splits; default: loaded from `data.task`.
    eval_only: restore a checkpoint of MODEL_DIR (the latest, or
      `restore_step`), evaluate it and write `eval_results.json`; no training.
    restore_step: with eval_only, which checkpoint step to evaluate.
    output_dir: with eval_only, where `eval_results.json` goes (default MODEL_DIR);
      evaluation writes nothing else, so a read-only MODEL_DIR can be evaluated.
    on_start: called once the start is accepted (MODEL_DIR locked, a checkpoint
      to resume matches this run), before anything else is written: e.g.
      writing the run's config.gin, which a rejected start must not overwrite.
  """
  t_start = time.time()
  from levi_jax.data import paths
  initial_checkpoint_path = paths.shipped_path(initial_checkpoint_path)  # e.g. the demo's
  for what, path in (("MODEL_DIR", model_dir), ("DataConfig.data_dir", data.data_dir),
                     ("DataConfig.tap_cache_dir", data.tap_cache_dir),
                     ("DataConfig.vocabulary_path", data.vocabulary_path),
                     ("INITIAL_CHECKPOINT_PATH", initial_checkpoint_path),
                     ("PretrainedConfig.path", model.pretrained and model.pretrained.path)):
    _require_filesystem_path(what, path)
  # --- Mesh -------------------------------------------------------------------
  device_mesh = partitioning.make_mesh(mesh)
  rules = partitioning.rules_for(mesh)
  for what, size in (("DataConfig.batch_size", data.batch_size),
                     ("DataConfig.eval_batch_size", data.eval_batch_size)):
    partitioning.local_batch_size(size, device_mesh, what)  # before anything is written
  if eval_only:
    target = output_dir or model_dir
    probe = target if os.path.isdir(target) else os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
      raise PermissionError(f"evaluation writes eval_results.json into {target}, which is not "
                            "a writable folder; give another (levi_jax.eval --output_dir=DIR)")
  else:
    os.makedirs(model_dir, exist_ok=True)
  lock = None
  if not eval_only and jax.process_index() == 0:  # one training job per MODEL_DIR
    lock = checkpointing.ModelDirLock(model_dir)
    lock.acquire()
    _HELD_LOCKS.append(lock)

  # --- Pretrained backbone (module, weights, vocabulary) ------------------------
  pretrained = None
  if model.pretrained is not None:
    from levi_jax.checkpoints import backbones
    pretrained = backbones.load_pretrained(model.pretrained)

  # --- Data: each process holds only the input shards it feeds -------------------
  shard_index, shard_count = partitioning.process_shard(device_mesh)
  shards = InputShards(data.input_shards or shard_count, shard_index, shard_count)
  if task_data is None:
    task_data = load_task_data(
        data, backbone_vocabulary(data, pretrained, initial_checkpoint_path), shards)
  elif task_data.shards is None:  # every row in memory: validation first, then the shards
    if "validation" not in task_data.evals:
      train_all, val_all = split_validation(task_data.train, data.validation_fraction,
                                            data.seed)
      task_data = dataclasses.replace(task_data, train=train_all, evals=(
          {"validation": val_all, **task_data.evals} if num_rows(val_all) else task_data.evals))
    task_data = select_shards(task_data, shards)
  elif task_data.shards != shards:
    raise ValueError(f"task data holds input shards {task_data.shards}; this process reads "
                     f"{shards}")
  train_rows, evals = task_data.train, dict(task_data.evals)
  sizes = dict(task_data.split_sizes)
  for name, arrays in {"train": train_rows, **evals}.items():
    held = shards.num_held(sizes[name]) if name in sizes else None
    if held != num_rows(arrays):
      raise ValueError(f"split {name!r} of the task data holds {num_rows(arrays)} rows; input "
                       f"shards {shards} of its {sizes.get(name)} rows are {held}")
  if sizes["train"] == 0:
    raise ValueError(f"task {data.task!r} has no training examples")
  # Evaluation: each process its rows, in as many batches as the largest share needs.
  local_eval = partitioning.local_batch_size(data.eval_batch_size, device_mesh)
  eval_steps = {k: max(-(-shards.max_rows(sizes[k]) // local_eval), 1) for k in evals}

  def train_batch(step: int) -> dict[str, np.ndarray]:
    idx = shard_batch_indices(shards, sizes["train"], step, data.batch_size, data.seed)
    return {k: v[idx] for k, v in train_rows.items()}

  example = train_batch(0)
  validate_features(example, task_data.features)

  # --- Model ------------------------------------------------------------------
  num_outputs = 1 if loss.task == "regression" else partitioning.global_max(
      int(np.max(train_rows["targets"], initial=0))) + 1
  method = build_method(model, task_data, num_outputs,
                        pretrained.module if pretrained else None)
  fingerprint = checkpointing.config_fingerprint(
      {"model": dataclasses.asdict(model), "features": [dataclasses.asdict(f) for f in
                                                        task_data.features],
       "vocab": task_data.vocab_size, "num_outputs": num_outputs})
  # What the training trajectory depends on besides the model; a resume must match it.
  trajectory = json.loads(json.dumps(
      {"optimizer": dataclasses.asdict(optimizer), "loss": dataclasses.asdict(loss),
       "batch_size": data.batch_size, "seq_length": data.seq_length, "data_seed": data.seed,
       "task": data.task, "seed": loop.seed, "num_steps": loop.num_steps,
       # (only when not the default, so checkpoints written before it existed resume)
       **({"duplicates": data.duplicates} if data.duplicates != "keep" else {}),
       **({"tap_cache_dtype": data.tap_cache_dtype}
          if data.tap_cache_dir and data.tap_cache_dtype != "float32" else {})},
      default=str))
  rng = jax.random.PRNGKey(loop.seed)
  init_rng, dropout_rng = jax.random.split(rng)
  bounds = stage_bounds(method, loop.num_steps)
  if pretrained is not None:
    frozen_source = f"pretrained backbone {pretrained.source}"
  elif initial_checkpoint_path:
    frozen_source = f"initial checkpoint {initial_checkpoint_path}"
  else:
    frozen_source = f"a fresh init with seed {loop.seed}"

  def init_params():
    return method.init(init_rng, example)

  def load_initial(params):
    from levi_jax import pretrained as pretrained_lib
    if pretrained is not None:
      return pretrained_lib.put_backbone(params, pretrained.params)
    if initial_checkpoint_path:
      return pretrained_lib.load_backbone(initial_checkpoint_path, params)
    return params

  # --- Checkpoints and resume ---------------------------------------------------
  ckpt = checkpointing.Checkpointer(os.path.join(model_dir, "checkpoints"), checkpoint,
                                    read_only=eval_only)
  latest = ckpt.latest_step()
  if eval_only:
    if latest is None:
      raise FileNotFoundError(f"no checkpoint to evaluate in {model_dir}/checkpoints")
    if restore_step is not None:
      if restore_step not in ckpt.all_steps():
        raise FileNotFoundError(f"no checkpoint at step {restore_step} in {model_dir}; "
                                f"it has steps {ckpt.all_steps()}")
      latest = restore_step
  start_step, meta = 0, None
  if latest is not None:
    meta = ckpt.read_meta(latest)
    if meta["fingerprint"] != fingerprint:
      raise ValueError(
          f"MODEL_DIR {model_dir} holds a checkpoint (step {latest}) of a different model "
          f"or data (fingerprint {meta['fingerprint']}, this run {fingerprint}; saved "
          f"config: {meta['model']}). Use a new MODEL_DIR or the original config.")
    saved = meta.get("trajectory")  # absent in checkpoints written before it was recorded
    if not eval_only and saved is not None and saved != trajectory:
      diff = _config_diff(saved, trajectory)
      raise ValueError(
          f"MODEL_DIR {model_dir} holds a checkpoint (step {latest}) trained with other "
          f"settings; resuming would not continue that run: {diff}. Use the original "
          "settings, or a new MODEL_DIR.")
    start_step = int(meta["step"])
    log.info("resuming from step %d in %s", start_step, model_dir)
  if on_start is not None:
    on_start()

  # Leaving this block, also by an error, commits the save in flight (ckpt.close).
  with jax.set_mesh(device_mesh), ckpt:
    params, param_shardings = partitioning.sharded_init(init_params, device_mesh, rules)
    params = load_initial(params)  # loaded leaves go straight into their shardings
    tap_stats = None
    if data.tap_cache_dir:
      splits, tap_stats = tap_cache.attach(
          data.tap_cache_dir, data.task, method, params, {"train": train_rows, **evals},
          device_mesh, rules, data.eval_batch_size, shards, dtype=data.tap_cache_dtype)
      train_rows = splits.pop("train")
      evals = splits
    eval_step = partitioning.jit_eval_step(step_lib.make_eval_step(method, loss),
                                           param_shardings, device_mesh, rules)
    metric_log = metric_logging.MetricLog(model_dir, enabled=not eval_only)

    def evaluate(params_, prefix: str = "") -> dict[str, dict[str, float]]:
      out = {}
      for name, split in evals.items():
        sums = None
        for b in eval_batches(split, local_eval, eval_steps[name]):
          part = eval_step(params_, partitioning.global_batch(b, device_mesh))
          sums = part if sums is None else jax.tree.map(jnp.add, sums, part)
        out[prefix + name] = step_lib.finalize_metrics(jax.device_get(sums), loss.task)
      return out

    stage_params0 = None
    results_evals: dict[str, Any] = {}
    train_time, steps_run = 0.0, 0
    for stage_idx, (s_begin, s_end) in enumerate(bounds):
      stage = method.stages[stage_idx]
      resuming_here = meta is not None and meta["stage"] == stage_idx
      if (s_end <= start_step or eval_only) and not resuming_here:
        continue
      opt = make_optimizer(optimizer, s_end - s_begin)

      def init_state(stage=stage, opt=opt):
        trainable, frozen = methods.partition(init_params(), stage.frozen)
        return step_lib.create_train_state(trainable, frozen, opt)

      abstract = jax.eval_shape(init_state)
      state_shardings = nn.meta.unbox(partitioning.logical_to_sharding(
          abstract, device_mesh, rules))
      trainable, frozen = methods.partition(params, stage.frozen)
      state = jax.jit(lambda t, f: step_lib.create_train_state(t, f, opt),
                      out_shardings=state_shardings)(trainable, frozen)
      # The step counter is global across stages; the schedule restarts per stage.
      state = state.replace(step=jnp.asarray(s_begin, jnp.int32))
      frozen_hash = checkpointing.tree_fingerprint(state.frozen)
      if resuming_here:
        if not s_begin <= start_step <= s_end:
          raise ValueError(f"checkpoint at step {start_step} is from stage {stage_idx}, "
                           f"which now spans steps {s_begin}-{s_end}; the stage split "
                           "changed (num_steps or lp_fraction)")
        checkpointing.check_frozen(state.frozen, meta["frozen_hash"], frozen_source)
        saved = ckpt.restore(latest, {"step": state.step, "params": state.params,
                                      "opt_state": state.opt_state})
        state = state.replace(**saved)
      if method.wise_alphas and stage_idx == 1:
        stage_params0 = checkpointing.restore_tree(
            os.path.join(model_dir, "stage_0_params"),
            jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                         params))

      train_step = partitioning.jit_train_step(step_lib.make_train_step(method, loss),
                                               state_shardings, device_mesh, rules)
      first = max(s_begin, start_step)
      if eval_only:
        s_end = first
      progress = metric_logging.Progress(loop.num_steps, first, data.batch_size, loop.log_every)
      last_ok, last_loss = first, None
      log.info("stage %s: steps %d-%d, %d trainable / %d params", stage.name, s_begin,
               s_end, count_params(state.params), count_params(params))
      t_loop = time.time()
      for s in range(first, s_end):
        state, metrics = train_step(
            state, partitioning.global_batch(train_batch(s), device_mesh), dropout_rng)
        done = s + 1
        is_last = done == s_end
        save_now = done % checkpoint.every_steps == 0 or is_last
        eval_now = is_last or (loop.eval_every and done % loop.eval_every == 0)
        if done % loop.log_every == 0 or save_now or eval_now:
          metrics = jax.device_get(metrics)
          _finite_or_raise(metrics, done, last_ok, model_dir, ckpt)
          last_ok, last_loss = done, float(metrics["loss"])
          metric_log.write(done, {f"train/{k}": float(v) for k, v in metrics.items()})
          progress.update(done, last_loss)
        ckpt_metrics = None
        if eval_now:
          jax.block_until_ready(state.params)
          t_eval = time.time()
          all_params = state.all_params()
          results_evals = evaluate(all_params)
          metric_log.write(done, {f"{split}/{k}": v for split, m in results_evals.items()
                                  for k, v in m.items()})
          if "validation" in results_evals and loss.task == "regression":
            ckpt_metrics = {checkpointing.BEST_METRIC: results_evals["validation"]["rmse"]}
          t_loop += time.time() - t_eval  # evaluation is not training time
        if save_now:
          ckpt.save(done, {"step": state.step, "params": state.params,
                           "opt_state": state.opt_state},
                    {"step": done, "stage": stage_idx, "fingerprint": fingerprint,
                     "frozen_hash": frozen_hash, "frozen_source": frozen_source,
                     "trajectory": trajectory,
                     "model": dataclasses.asdict(model), "method": method.name},
                    ckpt_metrics)
      progress.close()
      params = state.all_params()
      jax.block_until_ready(params)
      train_time += time.time() - t_loop
      steps_run += s_end - first
      if method.wise_alphas and stage_idx == 0 and not eval_only:
        ckpt.wait()
        checkpointing.save_tree(os.path.join(model_dir, "stage_0_params"), params)
      start_step = max(start_step, s_end)
      meta = None
      final_frozen_hash = frozen_hash  # frozen params never change within a stage
      if eval_only:
        break
    ckpt.close()

    if not results_evals:  # nothing trained in this call: evaluate what was restored
      results_evals = evaluate(params)
    wise = {}
    if method.wise_alphas and stage_params0 is not None:
      for alpha in method.wise_alphas:
        mixed = methods.wise_interpolate(stage_params0, params, alpha)
        wise[f"{alpha:g}"] = evaluate(mixed)

  wall = time.time() - t_start
  trainable_now, _ = methods.partition(params, method.stages[-1].frozen)
  results = {
      "method": method.name,
      "task": data.task,
      "config_hash": fingerprint,
      "params_trained": count_params(trainable_now),
      "params_total": count_params(params),
      "num_steps": loop.num_steps,
      "wall_time_s": wall,
      "train_time_s": train_time,
      "examples_per_s": steps_run * data.batch_size / max(train_time, 1e-9),
      "final_train_loss": last_loss,
      "frozen_hash": final_frozen_hash,
      "metrics": results_evals,
  }
  best = metric_logging.best_eval(model_dir)
  if best is not None and not eval_only:
    results["best_validation"] = best  # early stopping: the evaluation chosen on validation
  if wise:
    results["wise_ft"] = wise
  if tap_stats:
    results["tap_cache"] = tap_stats
  results["input"] = {"input_shards": shards.num_shards, "processes": shards.count,
                      "split_rows": sizes,
                      "process_rows": {"train": num_rows(train_rows),
                                       **{k: num_rows(v) for k, v in evals.items()}}}
  if jax.process_index() == 0:
    name = "eval_results.json" if eval_only else "results.json"
    out_dir = (output_dir or model_dir) if eval_only else model_dir
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, name), "w") as f:
      json.dump(results, f, indent=2)
  return results
