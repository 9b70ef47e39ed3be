"""Optimizers and learning-rate schedules (optax), configured by a dataclass."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "adafactor", "sgd")
SCHEDULES = ("constant", "cosine", "linear", "rsqrt")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """What `make_optimizer` builds.

  Attributes:
    name: "adamw", "adafactor" (as T5X uses) or "sgd".
    learning_rate: peak learning rate.
    warmup_steps: linear warmup from 0 to the peak.
    schedule: decay after warmup: "constant", "cosine", "linear" (to 0 at
      `total_steps`) or "rsqrt" (T5's 1/sqrt(step)).
    weight_decay: decoupled weight decay (adamw, adafactor).
    clip_norm: global-norm gradient clipping; None disables.
    grad_accum_steps: average gradients over this many train steps before an
      update. `warmup_steps` and the schedule's `total_steps` count train steps
      either way: update u (after u * grad_accum_steps train steps) uses the
      learning rate of train step u * grad_accum_steps.
  """

  name: str = "adamw"
  learning_rate: float = 1e-3
  warmup_steps: int = 0
  schedule: str = "cosine"
  weight_decay: float = 0.0
  clip_norm: float | None = 1.0
  grad_accum_steps: int = 1

  def __post_init__(self):
    if self.name not in OPTIMIZERS:
      raise ValueError(f"OptimizerConfig.name: unknown optimizer {self.name!r}; "
                       f"expected one of {OPTIMIZERS}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"OptimizerConfig.schedule: unknown schedule {self.schedule!r}; "
                       f"expected one of {SCHEDULES}")
    if self.learning_rate <= 0 or self.warmup_steps < 0 or self.grad_accum_steps < 1:
      raise ValueError("OptimizerConfig: learning_rate must be > 0, warmup_steps >= 0 "
                       f"and grad_accum_steps >= 1; got {self}")


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """Warmup then the configured decay, over `total_steps` optimizer updates."""
  peak, warm = cfg.learning_rate, cfg.warmup_steps
  decay_steps = max(total_steps - warm, 1)
  if cfg.schedule == "constant":
    decay = optax.constant_schedule(peak)
  elif cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps)
  elif cfg.schedule == "linear":
    decay = optax.linear_schedule(peak, 0.0, decay_steps)
  else:
    # optax.join_schedules also evaluates this before the warmup ends (step < 0).
    decay = lambda step: peak * jax.lax.rsqrt(jnp.maximum(1.0 + step, 1.0))
  if warm == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), decay], [warm])


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
  """The optax transformation for the trainable parameters only.

  Frozen parameters never reach the optimizer (see `levi_jax.methods.partition`),
  so they get neither updates nor optimizer state.
  """
  lr = make_schedule(cfg, total_steps)
  k = cfg.grad_accum_steps
  if k > 1:
    # optax.MultiSteps advances the inner optimizer's count once per k train
    # steps; the schedule is in train steps, so read it at count * k.
    train_lr = lr
    lr = lambda count: train_lr(count * k)
  if cfg.name == "adamw":
    opt = optax.adamw(lr, weight_decay=cfg.weight_decay)
  elif cfg.name == "adafactor":
    opt = optax.adafactor(lr, weight_decay_rate=cfg.weight_decay or None)
  else:
    opt = optax.sgd(lr)
  if cfg.clip_norm is not None:
    opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
  if k > 1:
    opt = optax.MultiSteps(opt, every_k_schedule=k)
  return opt
