"""`LeviT5XModel`: LEVI and its baselines as a `t5x.models.BaseModel`.

T5X's trainer (`t5x.train`), evaluator (`t5x.eval`) and partitioner then run
the same modules as `levi_jax.train` (`levi_jax.methods.make_method`), on the
seqio Tasks of `levi_jax.data.tasks`:

* `get_initial_variables` initialises the method's params and emits their
  logical axis names as T5X's `params_axes` collection, so `PjitPartitioner`
  with `standard_logical_axis_rules()` shards them with no extra rules.
* The optimizer is T5X's `OptaxWrapper` over an optax `multi_transform`: the
  method's frozen parameters (LEVI's backbone, LP's, LoRA's base kernels) get
  `set_to_zero`, hence no update and no optimizer state; the others get the
  optax transformation of our `OptimizerConfig`. `loss_fn` stops gradients at
  the frozen parameters, so no weight gradient of a frozen kernel is computed.
* `loss_fn` is the weighted mean of `levi_jax.step.compute_loss` (squared
  error for ratings, cross-entropy for classes) with clu metrics: loss, RMSE
  and MAE (accuracy for classification); `predict_batch_with_aux` gives the
  predicted rating, which `levi_jax.data.tasks`' metric functions score.

Constructing the model reads the task (its categorical features, the training
mean that starts the regression head) and re-registers our seqio Tasks with
the vocabulary the backbone was trained with (the one the initial checkpoint
carries, `levi_jax.pretrained.checkpoint_vocabulary`), so T5X's vocabulary
check compares the Task's vocabulary with the backbone's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics as clu_metrics
from flax.linen import partitioning as flax_partitioning

from t5x import metrics as t5x_metrics
from t5x import models as t5x_models
from t5x import optimizers as t5x_optimizers

from levi_jax import methods, optim, step as step_lib
from levi_jax import train_setup, trainer as trainer_lib
from levi_jax import input_pipeline
from levi_jax.data import tasks
from levi_jax.input_pipeline import TaskData
from levi_jax.models import t5_encoder

# Methods whose training is one stage; lpft/wiseft are two T5X runs (LP, then
# FT from the LP run's checkpoint).
SUPPORTED = tuple(m for m in methods.METHODS if m not in ("lpft", "wiseft"))
FROZEN, TRAIN = "frozen", "train"


@flax.struct.dataclass
class RootMeanSquare(clu_metrics.Metric):
  """sqrt(sum of weighted squared errors / sum of weights), merged exactly over batches."""

  total: jnp.ndarray
  count: jnp.ndarray

  @classmethod
  def from_sums(cls, sq_err_sum: jnp.ndarray, weight_sum: jnp.ndarray) -> "RootMeanSquare":
    return cls(total=jnp.asarray(sq_err_sum, jnp.float32),
               count=jnp.asarray(weight_sum, jnp.float32))

  def merge(self, other: "RootMeanSquare") -> "RootMeanSquare":
    return type(self)(total=self.total + other.total, count=self.count + other.count)

  def compute(self) -> jnp.ndarray:
    return jnp.sqrt(self.total / jnp.maximum(self.count, 1e-12))


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def param_labels(params: Any, frozen: tuple[str, ...]) -> Any:
  """FROZEN or TRAIN for each leaf of `params` (same tree structure), by path prefix."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: FROZEN if methods.is_frozen(_path_str(path), frozen) else TRAIN, params)


def frozen_aware_optimizer(tx: optax.GradientTransformation, frozen: tuple[str, ...]
                           ) -> t5x_optimizers.OptaxWrapper:
  """T5X's optax wrapper: `tx` for trainable params, `set_to_zero` (no state) for frozen ones."""
  return t5x_optimizers.OptaxWrapper(optax.multi_transform(
      {TRAIN: tx, FROZEN: optax.set_to_zero()},
      lambda params: param_labels(params, frozen)))


def axes_collection(boxed: Any) -> dict:
  """T5X's `params_axes` for params boxed with logical names (`<leaf>_axes` leaves).

  An unboxed leaf gets `None` per dimension (replicated).
  """
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(boxed), is_leaf=lambda _, x: is_box(x))
  out = {}
  for path, leaf in flat.items():
    names = tuple(leaf.names) if is_box(leaf) else (None,) * np.ndim(leaf)
    out[path[:-1] + (f"{path[-1]}_axes",)] = flax_partitioning.AxisMetadata(names=names)
  return flax.traverse_util.unflatten_dict(out)


class LeviT5XModel(t5x_models.BaseModel):
  """A levi_jax method (`levi_jax.methods`) as a T5X model over one of our seqio Tasks.

  Args:
    task: the seqio Task it trains on (`MIXTURE_OR_TASK_NAME`); its training
      split sizes the categorical features and starts the regression head.
    model: which method, backbone and small model (`trainer.ModelConfig`, as
      `levi_jax.train` reads it); `model.pretrained` is not supported here:
      T5 backbones come from `INITIAL_CHECKPOINT_PATH`. The backbone's
      `vocab_size` is the preset's unless `backbone_overrides` sets it (a T5X
      checkpoint restores only into its own shapes).
    optimizer: the optax optimizer config for the trainable params.
    total_steps: the optimizer schedule's length in updates.
    loss: the task loss.
    data_dir: where the raw data is ('' : `LEVI_DATA_DIR`, else the embedded
      synthetic world).
    initial_checkpoint_path: the backbone's T5X checkpoint; the vocabulary it
      carries tokenizes `inputs`.
    vocabulary_path: an explicit SentencePiece model ('' : the checkpoint's,
      else the data's own); a different hash from the checkpoint's is an error.
    duplicates: repeated (user, item, timestamp) ratings in the raw files:
      'keep', 'drop' or 'error' (as `trainer.DataConfig.duplicates`).
  """

  FEATURE_CONVERTER_CLS = tasks.RatingFeatureConverter

  def __init__(self, task: str, model: trainer_lib.ModelConfig = trainer_lib.ModelConfig(),
               optimizer: optim.OptimizerConfig = optim.OptimizerConfig(),
               total_steps: int = 1000, loss: step_lib.LossConfig = step_lib.LossConfig(),
               data_dir: str = "", initial_checkpoint_path: Optional[str] = None,
               vocabulary_path: str = "", duplicates: str = "keep"):
    if model.method not in SUPPORTED:
      raise ValueError(f"LeviT5XModel: method {model.method!r} trains in two stages; under "
                       "T5X run them as two runs (method 'lp', then 'ft' with the LP run's "
                       f"checkpoint as INITIAL_CHECKPOINT_PATH). One-run methods: "
                       f"{', '.join(SUPPORTED)}")
    if model.pretrained is not None:
      raise ValueError("LeviT5XModel: ModelConfig.pretrained is not supported under T5X; give "
                       "a T5 backbone preset and its T5X checkpoint as INITIAL_CHECKPOINT_PATH")
    if model.task_net != "features":
      raise ValueError("LeviT5XModel: ModelConfig.task_net must be 'features' under T5X")
    if loss.task == "classification":
      raise ValueError("LeviT5XModel: our seqio Tasks carry ratings; LossConfig.task must be "
                       "'regression'")
    input_pipeline.lookup_task(task)
    self.task = task
    self.loss_cfg = loss
    vocab = train_setup.backbone_vocabulary(
        trainer_lib.DataConfig(task=task, data_dir=data_dir, vocabulary_path=vocabulary_path),
        None, initial_checkpoint_path)
    prepared = input_pipeline.prepare(task, data_dir or None, duplicates=duplicates)
    vocab = vocab or input_pipeline.vocabulary_path(task, prepared.data_dir)
    tasks.register_tasks(data_dir=data_dir or None, vocab_path=vocab, duplicates=duplicates)
    self.vocabulary_path = vocab
    summary = TaskData(
        train={"targets": prepared.table.rows["rating"][prepared.rows("train")]},
        evals={}, features=tuple(prepared.feature_specs),
        vocab_size=input_pipeline.vocabulary_size(vocab))
    self.features = summary.features
    # The backbone's vocab_size is the preset's (T5X's: 32128 for T5 1.1) unless
    # backbone_overrides sets it: a T5X checkpoint restores only into its own shapes.
    preset_vocab = t5_encoder.PRESETS[model.backbone].vocab_size
    model = dataclasses.replace(model, backbone_overrides={"vocab_size": preset_vocab,
                                                           **model.backbone_overrides})
    self.method = train_setup.build_method(model, summary)
    self.module = self.method.module
    self.frozen = self.method.stages[0].frozen
    self._input_vocabulary = tasks.seqio.SentencePieceVocabulary(vocab)
    self._output_vocabulary = tasks.RatingVocabulary()
    super().__init__(optimizer_def=frozen_aware_optimizer(
        optim.make_optimizer(optimizer, total_steps), self.frozen))

  @property
  def input_vocabulary(self):
    return self._input_vocabulary

  @property
  def output_vocabulary(self):
    return self._output_vocabulary

  # --- variables ----------------------------------------------------------------
  def get_initial_variables(self, rng: jax.Array, input_shapes: Mapping[str, Any],
                            input_types: Optional[Mapping[str, Any]] = None
                            ) -> flax.core.FrozenDict:
    input_types = input_types or {}
    batch = {k: jnp.ones(shape, input_types.get(k, jnp.int32 if k != "targets" else jnp.float32))
             for k, shape in input_shapes.items()}
    # seqio's Evaluator (t5x.eval) reports only features of rank > 0 per example:
    # the scalar categorical ids and the rating are filled in from the task.
    size = next(iter(input_shapes.values()))[0]
    for f in self.features:
      if f.name not in batch:
        batch[f.name] = jnp.ones((size,) if f.bag_size is None else (size, f.bag_size),
                                 jnp.int32)
    batch.setdefault("targets", jnp.ones((size,), jnp.float32))
    boxed = self.method.init(rng, batch)
    return flax.core.freeze({"params": nn.meta.unbox(boxed),
                             "params_axes": axes_collection(boxed)})

  # --- forward -----------------------------------------------------------------
  def _stop_frozen(self, params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (jax.lax.stop_gradient(x)
                         if methods.is_frozen(_path_str(path), self.frozen) else x),
        flax.core.unfreeze(params))

  def _outputs(self, params, batch, dropout_rng=None) -> dict:
    return self.method.apply(self._stop_frozen(params), batch, train=dropout_rng is not None,
                             rng=dropout_rng)

  def loss_fn(self, params, batch, dropout_rng):
    outputs = self._outputs(params, batch, dropout_rng)
    loss, _ = step_lib.compute_loss(outputs, batch, self.loss_cfg)
    w = step_lib.example_weights(batch)
    err = outputs["prediction"][:, 0].astype(jnp.float32) - batch["targets"].astype(jnp.float32)
    num_examples = jnp.asarray(batch["targets"].shape[0], jnp.float32)
    metrics = {
        "loss": t5x_metrics.AveragePerStep(total=loss),
        "rmse": RootMeanSquare.from_sums((w * err**2).sum(), w.sum()),
        "mae": clu_metrics.Average(total=(w * jnp.abs(err)).sum(), count=w.sum()),
        "timing/seqs_per_second": t5x_metrics.TimeRate.from_model_output(
            numerator=num_examples),
        "timing/steps_per_second": t5x_metrics.StepsPerTime.from_model_output(),
        "timing/seconds": t5x_metrics.Time(),
        "timing/seqs": t5x_metrics.Sum(num_examples),
    }
    return loss, metrics

  def predict_batch_with_aux(self, params, batch, rng=None):
    del rng
    rating = self._outputs(params, batch)["prediction"][:, :1].astype(jnp.float32)
    return rating, {"rating": rating[:, 0]}

  def score_batch(self, params, batch, return_intermediates: bool = False):
    """Per example: minus the squared error of the predicted rating."""
    if return_intermediates:
      raise ValueError("LeviT5XModel.score_batch has no intermediates to return")
    rating = self._outputs(params, batch)["prediction"][:, 0].astype(jnp.float32)
    return -jnp.square(rating - batch["targets"].astype(jnp.float32))
