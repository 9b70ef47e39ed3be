"""The train and eval steps: pure functions to be `jax.jit`-ed with shardings.

The train state holds the trainable parameters (with their optimizer state)
apart from the frozen ones, and the loss is differentiated with respect to
the trainable tree only: a frozen backbone gets no gradient computation, no
update and no optimizer state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from levi_jax.methods import Method, combine

Batch = Mapping[str, jax.Array]


class TrainState(train_state.TrainState):
  """Flax's train state (step, trainable `params`, optimizer `tx` and its
  state) plus the `frozen` params, which the optimizer never sees."""

  frozen: Any

  def all_params(self) -> dict:
    """The full parameter tree the method applies (trainable and frozen)."""
    return combine(self.params, self.frozen)


def create_train_state(trainable: Any, frozen: Any, optimizer: optax.GradientTransformation
                       ) -> TrainState:
  """A state at step 0 whose optimizer state covers only the trainable tree.

  `apply_fn` stays None: the steps close over the method.
  """
  return TrainState.create(apply_fn=None, params=trainable, tx=optimizer, frozen=frozen)


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Task loss.

  Attributes:
    task: "regression" (squared error on output 0) or "classification"
      (softmax cross-entropy on integer targets).
    aux_weight: weight of the auxiliary per-view heads' losses.
  """

  task: str = "regression"
  aux_weight: float = 0.0

  def __post_init__(self):
    if self.task not in ("regression", "classification"):
      raise ValueError(f"LossConfig.task must be 'regression' or 'classification', "
                       f"got {self.task!r}")
    if self.aux_weight < 0:
      raise ValueError(f"LossConfig.aux_weight must be >= 0, got {self.aux_weight}")


def _per_example(pred: jax.Array, targets: jax.Array, task: str) -> jax.Array:
  if task == "regression":
    return jnp.square(pred[:, 0] - targets.astype(jnp.float32))
  labels = targets.astype(jnp.int32)
  return optax.softmax_cross_entropy_with_integer_labels(pred, labels)


def example_weights(batch: Batch) -> jax.Array:
  """Per-example weights: `batch["weights"]` (0 marks padding) or all ones."""
  if "weights" in batch:
    return batch["weights"].astype(jnp.float32)
  return jnp.ones(batch["targets"].shape[:1], jnp.float32)


def compute_loss(outputs: Mapping[str, Any], batch: Batch, cfg: LossConfig
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted mean task loss (+ auxiliary / ensemble-member losses)."""
  w = example_weights(batch)
  denom = jnp.maximum(w.sum(), 1.0)
  mean = lambda pred: (_per_example(pred, batch["targets"], cfg.task) * w).sum() / denom
  if "members" in outputs:
    # Ensemble: each member trains on its own loss.
    loss = sum(mean(p) for p in outputs["members"])
  else:
    loss = mean(outputs["prediction"])
  if cfg.aux_weight and outputs.get("aux"):
    loss = loss + cfg.aux_weight * sum(mean(a) for a in outputs["aux"])
  return loss, {"loss": loss, "task_loss": mean(outputs["prediction"])}


def make_train_step(method: Method, loss_cfg: LossConfig) -> Callable:
  """Returns `train_step(state, batch, rng) -> (state, metrics)`.

  The update is the state's own optimizer (`state.tx`). The dropout key is
  `fold_in(rng, step)`, so a resumed run replays the same randomness.
  """

  def loss_fn(trainable, frozen, batch, rng):
    outputs = method.apply(combine(trainable, frozen), batch, train=True, rng=rng)
    return compute_loss(outputs, batch, loss_cfg)

  def train_step(state: TrainState, batch: Batch, rng: jax.Array):
    step_rng = jax.random.fold_in(rng, state.step)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.frozen, batch, step_rng)
    state = state.apply_gradients(grads=grads)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads),
                   param_norm=optax.global_norm(state.params))
    return state, metrics

  return train_step


def make_eval_step(method: Method, loss_cfg: LossConfig) -> Callable:
  """Returns `eval_step(params, batch) -> sums` for streaming metrics.

  Sums (not means) so batches, hosts and padded examples combine exactly:
  regression gives weight, squared-error and absolute-error sums;
  classification gives weight and correct-count sums.
  """

  def eval_step(params, batch: Batch):
    pred = method.apply(params, batch, train=False)["prediction"]
    w = example_weights(batch)
    if loss_cfg.task == "regression":
      p = pred[:, 0].astype(jnp.float32)
      err = p - batch["targets"].astype(jnp.float32)
      return {"weight": w.sum(), "sq_err": (w * err**2).sum(),
              "abs_err": (w * jnp.abs(err)).sum(), "pred": (w * p).sum(),
              "pred_sq": (w * p**2).sum()}
    correct = (jnp.argmax(pred, -1) == batch["targets"].astype(jnp.int32))
    return {"weight": w.sum(), "correct": (w * correct).sum()}

  return eval_step


def finalize_metrics(sums: Mapping[str, float], task: str) -> dict[str, float]:
  """RMSE/MAE (regression) or accuracy (classification) from summed metrics.

  Regression also reports the predictions' mean and standard deviation
  (`pred_mean`, `pred_std`): a run whose predictions are constant has
  collapsed, whatever its RMSE.
  """
  n = max(float(sums["weight"]), 1e-12)
  if task == "regression":
    out = {"rmse": (float(sums["sq_err"]) / n) ** 0.5, "mae": float(sums["abs_err"]) / n,
           "count": float(sums["weight"])}
    if "pred" in sums:
      mean = float(sums["pred"]) / n
      out.update(pred_mean=mean, pred_std=max(float(sums["pred_sq"]) / n - mean**2, 0.0) ** 0.5)
    return out
  return {"accuracy": float(sums["correct"]) / n, "count": float(sums["weight"])}
