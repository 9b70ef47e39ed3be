"""What a run needs before its first step: data, model, initial params, resume checks.

Shared by the trainer (`trainer.train`) and the evaluator
(`evaluator.evaluate`), so both read the same rows, build the same method and
rebuild the same frozen params.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
from clu import parameter_overview

from levi_jax import checkpointing, methods, partitioning, tap_cache
from levi_jax.input_pipeline import (InputShards, TaskData, load_task_data, num_rows,
                                     select_shards, shard_batch_indices, split_validation,
                                     take)
from levi_jax.models import lora as lora_lib
from levi_jax.models import t5_encoder
from levi_jax.models.task_net import FeatureTower, TokenTower, validate_features

Rows = dict[str, np.ndarray]


# ------------------------------------------------------------------------------
# Checks before anything is written.
# ------------------------------------------------------------------------------
def check_filesystem_paths(model_dir: str | None, model: Any, data: Any,
                           initial_checkpoint_path: str | None):
  """Raises for a URL (gs://...) among the run's paths: run directories, data
  and checkpoints are read and written through the file system (a bucket
  mounted with gcsfuse, an NFS share)."""
  for what, path in (("MODEL_DIR", model_dir), ("DataConfig.data_dir", data.data_dir),
                     ("DataConfig.tap_cache_dir", data.tap_cache_dir),
                     ("DataConfig.example_cache_dir", data.example_cache_dir),
                     ("DataConfig.vocabulary_path", data.vocabulary_path),
                     ("INITIAL_CHECKPOINT_PATH", initial_checkpoint_path),
                     ("PretrainedConfig.path", model.pretrained and model.pretrained.path)):
    if path and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", str(path)):
      raise ValueError(
          f"{what} is {path!r}, a URL; levi_jax reads and writes run directories, data and "
          f"checkpoints through the file system. Mount the bucket on every host (e.g. "
          f"`gcsfuse --implicit-dirs BUCKET /gcs/BUCKET`) and pass the mounted path.")


def check_batch_sizes(data: Any, mesh: jax.sharding.Mesh):
  """Raises unless both batch sizes split evenly over the processes and the data axis."""
  for what, size in (("DataConfig.batch_size", data.batch_size),
                     ("DataConfig.eval_batch_size", data.eval_batch_size)):
    partitioning.local_batch_size(size, mesh, what)


# ------------------------------------------------------------------------------
# Data: each process holds only the input shards it feeds.
# ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunData:
  """This process's rows of every split, and how they are batched.

  Attributes:
    task_data: the task (features, vocabulary), holding this process's shards.
    shards: the input shards this process reads.
    train: this process's training rows.
    evals: split name -> this process's rows (validation, ID test, OOD...).
    sizes: split name -> rows in the whole split (all shards).
    batch_size, seed: global training batch size and batch-order seed.
    eval_batch: this process's evaluation batch size.
    eval_steps: split name -> evaluation batches; the same on every process
      (as many as the largest share needs; padding is masked).
  """

  task_data: TaskData
  shards: InputShards
  train: Rows
  evals: dict[str, Rows]
  sizes: dict[str, int]
  batch_size: int
  seed: int
  eval_batch: int
  eval_steps: dict[str, int]

  def train_batch(self, step: int) -> Rows:
    """This process's rows of training batch `step` (a pure function of seed and step)."""
    idx = shard_batch_indices(self.shards, self.sizes["train"], step, self.batch_size,
                              self.seed)
    return take(self.train, idx)

  def input_record(self) -> dict[str, Any]:
    """The `input` entry of results.json: shard counts and rows per split."""
    return {"input_shards": self.shards.num_shards, "processes": self.shards.count,
            "split_rows": self.sizes,
            "process_rows": {"train": num_rows(self.train),
                             **{k: num_rows(v) for k, v in self.evals.items()}}}


def backbone_vocabulary(data: Any, pretrained: Any = None,
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


def load_pretrained(model: Any) -> Any:
  """The pretrained backbone (module, weights, vocabulary) `model.pretrained` names, or None."""
  if model.pretrained is None:
    return None
  from levi_jax.checkpoints import backbones
  return backbones.load_pretrained(model.pretrained)


def load_data(data: Any, mesh: jax.sharding.Mesh, pretrained: Any = None,
              initial_checkpoint_path: str | None = None,
              task_data: TaskData | None = None) -> RunData:
  """This process's shards of the task's splits (`task_data`, or loaded from `data.task`).

  In-memory task data holding every row gets a validation split first (when it
  has none), then is cut to this process's shards.
  """
  shard_index, shard_count = partitioning.process_shard(mesh)
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
  eval_batch = partitioning.local_batch_size(data.eval_batch_size, mesh)
  eval_steps = {k: max(-(-shards.max_rows(sizes[k]) // eval_batch), 1) for k in evals}
  run_data = RunData(task_data, shards, train_rows, evals, sizes, data.batch_size, data.seed,
                     eval_batch, eval_steps)
  validate_features(run_data.train_batch(0), task_data.features)
  return run_data


def attach_tap_cache(run_data: RunData, data: Any, method: methods.Method, params: Any,
                     mesh: jax.sharding.Mesh, rules) -> tuple[RunData, dict | None]:
  """Adds the frozen backbone's cached taps to every split when `data.tap_cache_dir` is set.

  Returns:
    (the run data, its splits carrying the taps; the cache's stats, or None when off).
  """
  if not data.tap_cache_dir:
    return run_data, None
  splits, stats = tap_cache.attach(
      data.tap_cache_dir, data.task, method, params, {"train": run_data.train, **run_data.evals},
      mesh, rules, data.eval_batch_size, run_data.shards, dtype=data.tap_cache_dtype)
  train_rows = splits.pop("train")
  return dataclasses.replace(run_data, train=train_rows, evals=splits), stats


# ------------------------------------------------------------------------------
# Model: the method, its identity, and where its frozen params come from.
# ------------------------------------------------------------------------------
def build_method(cfg: Any, data: TaskData, num_outputs: int = 1,
                 backbone: nn.Module | None = None) -> methods.Method:
  """The method for `cfg` (a `trainer.ModelConfig`), sized to the data's features and vocabulary.

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
                            hidden=cfg.task_hidden, feature_dropout=cfg.feature_dropout,
                            dtype=cfg.dtype)
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


@dataclasses.dataclass(frozen=True)
class RunModel:
  """The method of a run, how its params start, and its checkpoint identity.

  Attributes:
    method: the method being trained or evaluated.
    fingerprint: hash of the model config, features, vocabulary and outputs;
      a checkpoint in MODEL_DIR must carry the same.
    frozen_source: where the frozen params come from (for error messages and
      checkpoint metadata).
    init_rng, dropout_rng: the parameter-init key and the dropout key (folded
      with the step in the train step).
    example: training batch 0 (shapes for the init).
    pretrained: the loaded pretrained backbone, or None.
    initial_checkpoint_path: backbone weights to load into the init, or None.
  """

  method: methods.Method
  fingerprint: str
  frozen_source: str
  init_rng: jax.Array
  dropout_rng: jax.Array
  example: Rows
  pretrained: Any
  initial_checkpoint_path: str | None

  def init_params(self) -> Any:
    """A fresh init of every param (boxed with logical axis names; for `jax.eval_shape`)."""
    return self.method.init(self.init_rng, self.example)

  def initial_params(self, mesh: jax.sharding.Mesh, rules) -> tuple[Any, Any]:
    """(params, their shardings): a sharded fresh init with the backbone weights
    loaded in (the pretrained backbone or the initial checkpoint's)."""
    from levi_jax import pretrained as pretrained_lib
    params, shardings = partitioning.sharded_init(self.init_params, mesh, rules)
    if self.pretrained is not None:
      params = pretrained_lib.put_backbone(params, self.pretrained.params)
    elif self.initial_checkpoint_path:
      params = pretrained_lib.load_backbone(self.initial_checkpoint_path, params)
    return params, shardings


def build_model(model: Any, run_data: RunData, task: str, seed: int, pretrained: Any = None,
                initial_checkpoint_path: str | None = None) -> RunModel:
  """The run's method sized to its data, with its fingerprint and init keys.

  Args:
    model: the `trainer.ModelConfig`.
    task: "regression" (one output) or "classification" (one output per class
      seen in training, over all processes).
    seed: the parameter-init and dropout seed (`LoopConfig.seed`).
  """
  task_data = run_data.task_data
  num_outputs = 1 if task == "regression" else partitioning.global_max(
      int(np.max(run_data.train["targets"], initial=0))) + 1
  method = build_method(model, task_data, num_outputs,
                        pretrained.module if pretrained else None)
  fingerprint = checkpointing.config_fingerprint(
      {"model": dataclasses.asdict(model), "features": [dataclasses.asdict(f) for f in
                                                        task_data.features],
       "vocab": task_data.vocab_size, "num_outputs": num_outputs})
  if pretrained is not None:
    frozen_source = f"pretrained backbone {pretrained.source}"
  elif initial_checkpoint_path:
    frozen_source = f"initial checkpoint {initial_checkpoint_path}"
  else:
    frozen_source = f"a fresh init with seed {seed}"
  init_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(seed))
  return RunModel(method, fingerprint, frozen_source, init_rng, dropout_rng,
                  run_data.train_batch(0), pretrained, initial_checkpoint_path)


# ------------------------------------------------------------------------------
# Checkpoints of MODEL_DIR: do they belong to this run?
# ------------------------------------------------------------------------------
def trajectory(data: Any, optimizer: Any, loss: Any, loop: Any) -> dict[str, Any]:
  """What the training trajectory depends on besides the model; a resume must match it."""
  return json.loads(json.dumps(
      {"optimizer": dataclasses.asdict(optimizer), "loss": dataclasses.asdict(loss),
       "batch_size": data.batch_size, "seq_length": data.seq_length, "data_seed": data.seed,
       "task": data.task, "seed": loop.seed, "num_steps": loop.num_steps,
       # (only when not the default, so checkpoints written before it existed resume)
       **({"duplicates": data.duplicates} if data.duplicates != "keep" else {}),
       **({"tap_cache_dtype": data.tap_cache_dtype}
          if data.tap_cache_dir and data.tap_cache_dtype != "float32" else {})},
      default=str))


def check_same_model(meta: Mapping[str, Any], fingerprint: str, model_dir: str, step: int):
  """Raises unless the checkpoint's metadata carries this run's model fingerprint."""
  if meta["fingerprint"] != fingerprint:
    raise ValueError(
        f"MODEL_DIR {model_dir} holds a checkpoint (step {step}) of a different model "
        f"or data (fingerprint {meta['fingerprint']}, this run {fingerprint}; saved "
        f"config: {meta['model']}). Use a new MODEL_DIR or the original config.")


def check_same_trajectory(meta: Mapping[str, Any], expected: Mapping[str, Any],
                          model_dir: str, step: int):
  """Raises when the checkpoint was trained with other settings (a resume would
  not continue that run); checkpoints that predate the record pass."""
  saved = meta.get("trajectory")
  if saved is not None and saved != expected:
    raise ValueError(
        f"MODEL_DIR {model_dir} holds a checkpoint (step {step}) trained with other "
        f"settings; resuming would not continue that run: {config_diff(saved, expected)}. "
        "Use the original settings, or a new MODEL_DIR.")


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> str:
  """'optimizer.learning_rate: 0.001 -> 0.01; batch_size: 16 -> 32' for the fields that differ."""
  parts = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k), new.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      sub = config_diff(a, b, f"{prefix}{k}.")
      parts += [sub] if sub else []
    elif a != b:
      parts.append(f"{prefix}{k}: {a!r} (checkpoint) -> {b!r} (this run)")
  return "; ".join(parts)


# ------------------------------------------------------------------------------
# The results record.
# ------------------------------------------------------------------------------
def results_record(run: RunModel, run_data: RunData, task: str, num_steps: int, params: Any,
                   frozen_hash: str, metrics: Mapping[str, Any], *, wall_time_s: float,
                   train_time_s: float, examples_per_s: float,
                   final_train_loss: float | None, extra: Mapping[str, Any] | None = None
                   ) -> dict[str, Any]:
  """The results.json / eval_results.json dict of a run whose params are `params`.

  `extra` entries (best_validation, wise_ft, tap_cache) come after `metrics`
  and before `input`.
  """
  trainable_now, _ = methods.partition(params, run.method.stages[-1].frozen)
  return {
      "method": run.method.name,
      "task": task,
      "config_hash": run.fingerprint,
      "params_trained": int(parameter_overview.count_parameters(trainable_now)),
      "params_total": int(parameter_overview.count_parameters(params)),
      "num_steps": num_steps,
      "wall_time_s": wall_time_s,
      "train_time_s": train_time_s,
      "examples_per_s": examples_per_s,
      "final_train_loss": final_train_loss,
      "frozen_hash": frozen_hash,
      "metrics": dict(metrics),
      **(extra or {}),
      "input": run_data.input_record(),
  }


def write_results(out_dir: str, name: str, results: Mapping[str, Any]):
  """Writes `results` as `out_dir/name` (JSON) from process 0."""
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, name), "w") as f:
      json.dump(results, f, indent=2)


def as_abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a tree of arrays: a restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      tree)
