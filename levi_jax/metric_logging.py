"""Training metrics out: metrics.jsonl, TensorBoard, and a progress display."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Mapping

import jax

log = logging.getLogger("levi_jax")


class MetricLog:
  """metrics.jsonl (every process writes nothing but process 0) + TensorBoard."""

  def __init__(self, model_dir: str, enabled: bool = True):
    self.enabled = enabled and jax.process_index() == 0
    self.path = os.path.join(model_dir, "metrics.jsonl")
    self.writer = None
    if self.enabled:
      try:
        from levi_jax import quiet
        quiet.import_tensorflow()
        from clu import metric_writers  # TensorFlow-backed; optional on accelerators
        self.writer = metric_writers.create_default_writer(
            os.path.join(model_dir, "tb"), asynchronous=False)
      except ImportError:
        log.warning("clu is not installed: TensorBoard summaries are off")

  def write(self, step: int, values: Mapping[str, float]):
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, **values}) + "\n")
    if self.writer is not None:
      self.writer.write_scalars(step, dict(values))
      self.writer.flush()


class Progress:
  """A tqdm bar on terminals, plain log lines otherwise."""

  def __init__(self, total: int, initial: int, batch_size: int, log_every: int):
    self.bar = None
    self.batch_size, self.log_every, self.total = batch_size, log_every, total
    self.t0, self.s0 = time.time(), initial
    if sys.stderr.isatty() and jax.process_index() == 0:
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

  def update(self, step: int, loss: float | None):
    rate = (step - self.s0) / max(time.time() - self.t0, 1e-9)
    if self.bar is not None:
      self.bar.n = step
      self.bar.set_postfix(loss=f"{loss:.4f}" if loss is not None else "?",
                           ex_s=f"{rate * self.batch_size:.0f}", refresh=False)
      self.bar.refresh()
    elif loss is not None and jax.process_index() == 0:
      eta = (self.total - step) / max(rate, 1e-9)
      log.info("step %d/%d loss %.4f %.0f examples/s ETA %.0fs", step, self.total, loss,
               rate * self.batch_size, eta)

  def close(self):
    if self.bar is not None:
      self.bar.close()


def best_eval(model_dir: str, split: str = "validation", key: str = "rmse"
              ) -> dict[str, Any] | None:
  """The periodic evaluation with the lowest `split/key` in MODEL_DIR's metrics.jsonl.

  Early stopping by model selection: {"step", "metrics": {split: {metric: v}}}
  of that evaluation (the first on ties), read back from the log so that it
  holds across resumed runs; None when no evaluation logged `split/key`.
  """
  path = os.path.join(model_dir, "metrics.jsonl")
  if not os.path.isfile(path):
    return None
  best = None
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      value = row.get(f"{split}/{key}")
      if value is None or (best is not None and value >= best[0]):
        continue
      evals: dict[str, dict[str, float]] = {}
      for name, v in row.items():
        if "/" in name and not name.startswith("train/"):
          s, m = name.split("/", 1)
          evals.setdefault(s, {})[m] = v
      best = (value, {"step": int(row["step"]), "metrics": evals})
  return best[1] if best else None
