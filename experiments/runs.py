"""What the experiment scripts share: one gin-configured training run, and result tables.

A run is `trainer.train` configured the T5X way: the experiment's base gin
files (default `experiments/demo.gin`, the settings of `make demo`), then the
run's own bindings (MODEL_DIR, METHOD, TASK, DATA_DIR, seeds, backbone, tap
cache, anything from `--gin.NAME=VALUE`). A run whose MODEL_DIR already holds
`results.json` is not trained again, so an interrupted experiment resumes.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import sys
from typing import Any, Iterable, Mapping, Sequence

import gin
import numpy as np

from levi_jax import cli, demo, gin_utils, input_pipeline, train_setup, trainer
from levi_jax.data import paths
from levi_jax.models.task_net import OOV_ID

BASE_GIN = ("experiments/demo.gin",)
# Backbones: as the gin files configure it (demo.gin: the committed checkpoint
# pre-trained on the synthetic corpus), that architecture randomly initialised,
# or the packaged all-MiniLM-L6-v2 (with its own WordPiece vocabulary).
BACKBONES = {
    "config": (),
    "random": ("INITIAL_CHECKPOINT_PATH = None",),
    "minilm": ("include 'models/minilm_l6.gin'", "INITIAL_CHECKPOINT_PATH = None"),
}


def backbone_flag():
  """The `--backbone` field of a script's settings (one of BACKBONES)."""
  return cli.field("config", "config: as the gin files set it; random; minilm",
                   choices=sorted(BACKBONES))


def gin_file_flag():
  """The `--gin_file` field: base gin files, repeatable."""
  return cli.field(BASE_GIN, "base gin files (repeatable)", multi=True)


def gin_bindings_flag():
  """The `--gin.NAME=VALUE` field (`--gin_bindings`), repeatable."""
  return cli.field((), "extra gin bindings, also as --gin.NAME=VALUE", multi=True)


# Cached backbone taps need a frozen backbone; the trainer skips the cache otherwise.
TAP_CACHE_METHODS = ("levi", "lp", "ensemble")
# Methods whose small model embeds the categorical features (the others read text only).
FEATURE_METHODS = ("scratch", "ensemble", "levi", "levi_ft", "levi_lora")


def oov_dropout(data: trainer.TaskData, rate: float, seed: int) -> trainer.TaskData:
  """Training rows with each scalar feature's known id set to OOV with probability `rate`.

  Test rows often carry values no training row has (unseen users, a gender or
  occupation outside the training population); they map to the OOV id, whose
  embedding no training row would otherwise reach, so it stays at its random
  init and shifts the small model's predictions by a seed-dependent amount.
  Dropping known ids to OOV in training makes that embedding "an unknown
  value". Bags (genres) are left alone.
  """
  rng = np.random.default_rng([seed, 11])
  train = dict(data.train)
  for f in data.features:
    if f.bag_size is None:
      ids = np.asarray(train[f.name])
      drop = (rng.random(ids.shape) < rate) & (ids >= 2)
      train[f.name] = np.where(drop, OOV_ID, ids).astype(ids.dtype)
  return dataclasses.replace(data, train=train)


def run_bindings(model_dir: str, method: str, task: str, seed: int, *, backbone: str = "config",
                 data_dir: str = "", steps: int | None = None, tap_cache_dir: str = "",
                 extra: Sequence[str] = ()) -> list[str]:
  """The gin bindings of one run (after the base gin files); '' data_dir: the gin's."""
  if backbone not in BACKBONES:
    raise ValueError(f"unknown backbone {backbone!r}; expected one of {sorted(BACKBONES)}")
  out = [f"MODEL_DIR = '{model_dir}'", f"METHOD = '{method}'", f"TASK = '{task}'",
         *([f"DATA_DIR = '{data_dir}'"] if data_dir else []), f"trainer.LoopConfig.seed = {seed}",
         f"trainer.DataConfig.seed = {seed}", *BACKBONES[backbone],
         *(demo.NO_BACKBONE if method == "scratch" else ())]
  if steps is not None:
    out.append(f"TRAIN_STEPS = {steps}")
  if tap_cache_dir:
    out.append(f"trainer.DataConfig.tap_cache_dir = '{tap_cache_dir}'")
  return out + list(extra)


def parse_base(gin_files: Sequence[str], bindings: Sequence[str] = ()):
  """Parses the base gin files and `bindings` alone (no run) to read what they bind."""
  gin.clear_config()
  gin_utils.parse(gin_files, ["MODEL_DIR = '/unused'", *bindings], gin_utils.GIN_SEARCH_PATHS)


def train_run(model_dir: str, bindings: Sequence[str], gin_files: Sequence[str] = BASE_GIN,
              keep_checkpoints: bool = False, oov_rate: float = 0.0, seed: int = 0
              ) -> dict[str, Any]:
  """Trains one run (or reads its results.json); returns the results dict.

  Relative paths in INITIAL_CHECKPOINT_PATH are found as the trainer finds
  them (`levi_jax.data.paths.shipped_path`).
  `oov_rate` > 0 trains on `oov_dropout(data, oov_rate, seed)`.
  """
  done = os.path.join(model_dir, "results.json")
  if os.path.isfile(done):
    with open(done) as f:
      return json.load(f)
  gin.clear_config()
  gin_utils.parse(gin_files, list(bindings), gin_utils.GIN_SEARCH_PATHS)
  task_data = None
  if oov_rate:
    model = gin.get_configurable(trainer.ModelConfig)()
    data = gin.get_configurable(trainer.DataConfig)()
    pretrained = None
    if model.pretrained is not None:
      from levi_jax.checkpoints import backbones
      pretrained = backbones.load_pretrained(model.pretrained)
    vocabulary = train_setup.backbone_vocabulary(
        data, pretrained, paths.shipped_path(gin.query_parameter("%INITIAL_CHECKPOINT_PATH")))
    task_data = oov_dropout(input_pipeline.load_task_data(data, vocabulary), oov_rate, seed)
  results = gin_utils.call(  # config.gin once the trainer accepts the start, as levi_jax.train
      trainer.train, task_data=task_data,
      on_start=lambda: gin_utils.write_operative_config(model_dir, "config.gin"))
  if not keep_checkpoints:
    for sub in ("checkpoints", "stage_0_params", "tb"):
      shutil.rmtree(os.path.join(model_dir, sub), ignore_errors=True)
  return results


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
  """Mean, sample standard deviation (0 for one value) and count."""
  v = np.asarray(list(values), np.float64)
  if not len(v):
    return float("nan"), float("nan"), 0
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def fmt(mean: float, std: float, n: int) -> str:
  """'mean ± std' (std left out for one seed)."""
  if n == 0 or not np.isfinite(mean):
    return "-"
  return f"{mean:.3f}" if n == 1 else f"{mean:.3f} ± {std:.3f}"


def write_csv(path: str, rows: Sequence[Mapping[str, Any]]):
  """Rows of dicts as CSV (columns: the union of keys, in first-seen order)."""
  fields: list[str] = []
  for r in rows:
    fields += [k for k in r if k not in fields]
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)


def progress_logging():
  """Training progress lines (`levi_jax` logger, INFO) on stdout, also when it is not a
  terminal (a long run under nohup or a job scheduler would otherwise print nothing)."""
  import logging

  class Stdout(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time of the record."""

    def emit(self, record):
      self.stream = sys.stdout
      super().emit(record)

  logger = logging.getLogger("levi_jax")
  if not any(type(h).__name__ == "Stdout" for h in logger.handlers):
    handler = Stdout()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  logger.propagate = False


def initialize_multiprocess(enabled: bool):
  """`jax.distributed.initialize()` when a script runs on several hosts."""
  if enabled:
    import jax
    jax.distributed.initialize()


def parse_list(text: str, cast=str) -> list:
  """'a,b,c' -> [a, b, c] (empty items dropped)."""
  return [cast(x.strip()) for x in text.split(",") if x.strip()]
