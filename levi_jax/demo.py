"""`make demo`: the main job on the embedded default, end to end, on a CPU.

Trains FT, LP, Scratch, the vanilla Ensemble and LEVI on one shift of the
synthetic world (`gin/experiments/demo.gin`), then prints the ID/OOD table and
writes `results.md`, `results.png` and `data_sha256.json` (the hash of every
array the runs train and evaluate on: `data_digests`) into the output folder.
README's table names the data digest it was made with, and a test recomputes
it, so the table and the data path cannot drift apart unnoticed.
"""

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time

import numpy as np

import gin
from absl import logging as absl_logging

from levi_jax import cli, gin_utils, report, train_setup, trainer
from levi_jax.data import paths
from levi_jax.input_pipeline import load_task_data

DEMO_METHODS = ("ft", "lp", "scratch", "ensemble", "levi")
# Scratch has no backbone, so no backbone weights to load.
NO_BACKBONE = ("INITIAL_CHECKPOINT_PATH = None", "trainer.ModelConfig.pretrained = None")


def backbone_note() -> str:
  """Where the configured backbone's weights come from (after gin parsing)."""
  try:
    pretrained = gin.query_parameter("trainer.ModelConfig.pretrained")
  except ValueError:
    pretrained = None
  if pretrained is not None:
    return "pre-trained all-MiniLM-L6-v2 (frozen where the method freezes it)"
  path = gin.query_parameter("%INITIAL_CHECKPOINT_PATH")
  if path:
    return f"pre-trained, from {path}"
  return "randomly initialised"


def data_digests(gin_file: str = "experiments/demo.gin", bindings=()) -> dict[str, str]:
  """sha256 of every array the demo's runs read: {"<split>/<array>": hex, "all": hex}.

  The data config and the backbone's vocabulary are resolved as the trainer
  resolves them; tokens and ids are integers, so the hashes are exact on
  every machine.
  """
  gin.clear_config()
  gin_utils.parse([gin_file], ["MODEL_DIR = '/unused'", *bindings], gin_utils.GIN_SEARCH_PATHS)
  data = gin_utils.call(trainer.DataConfig)
  checkpoint = paths.shipped_path(gin.query_parameter("%INITIAL_CHECKPOINT_PATH"))
  gin.clear_config()
  task = load_task_data(data, train_setup.backbone_vocabulary(data, None, checkpoint))
  out = {}
  for split, arrays in {"train": task.train, **task.evals}.items():
    for name in sorted(arrays):
      x = np.ascontiguousarray(arrays[name])
      out[f"{split}/{name}"] = hashlib.sha256(
          f"{x.dtype}{x.shape}".encode() + x.tobytes()).hexdigest()
  out["all"] = hashlib.sha256(json.dumps(out, sort_keys=True).encode()).hexdigest()
  return out


def run(out_dir: str, methods=DEMO_METHODS, bindings=(), gin_file="experiments/demo.gin"):
  """Trains each method into out_dir/METHOD and writes the report; returns results.

  Each run starts fresh: an out_dir/METHOD left by an earlier demo is replaced
  (resuming it would report that run's numbers without training).
  """
  results = []
  for m in methods:
    if os.path.isdir(os.path.join(out_dir, m)):
      shutil.rmtree(os.path.join(out_dir, m))
    run_bindings = [f"MODEL_DIR = '{os.path.join(out_dir, m)}'", f"METHOD = '{m}'", *bindings,
                    *(NO_BACKBONE if m == "scratch" else ())]
    gin.clear_config()
    gin_utils.parse([gin_file], run_bindings, gin_utils.GIN_SEARCH_PATHS)
    if m != "scratch" or not results:
      note = backbone_note()
    t0 = time.time()
    r = gin_utils.call(trainer.train)
    print(f"  {m:9s} ID {r['metrics']['id_test']['rmse']:.4f}  OOD "
          f"{r['metrics']['ood_test']['rmse']:.4f}  ({time.time() - t0:.0f}s)", flush=True)
    results.append(r)
  title = f"{results[0]['task']}: backbone {note}"
  return results, report.write_report(results, out_dir, title), note


@dataclasses.dataclass(frozen=True)
class Settings:
  """The flags of `python -m levi_jax.demo`."""
  out: str = cli.field("demo_out", "output folder")
  methods: tuple[str, ...] = cli.field(DEMO_METHODS, "comma-separated methods")
  gin_bindings: tuple[str, ...] = cli.field((), "extra gin bindings: --gin.NAME=VALUE",
                                            multi=True)


def demo(settings: Settings):
  """Runs the demo `settings` describe and prints its table."""
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("levi_jax").setLevel(logging.WARNING)
  out = os.path.abspath(settings.out)
  t0 = time.time()
  bindings = list(settings.gin_bindings)
  print(f"levi_jax demo: methods {','.join(settings.methods)} on the synthetic world -> {out}")
  digests = data_digests(bindings=bindings)
  results, table, note = run(out, list(settings.methods), bindings)
  with open(os.path.join(out, "data_sha256.json"), "w") as f:
    json.dump(digests, f, indent=1, sort_keys=True)
  if note == "randomly initialised":
    print("Note: the backbone is randomly initialised (no pre-trained checkpoint is "
          "configured), so FT/LP/LEVI see random text features.")
  else:
    print(f"Backbone: {note}.")
  print(table)
  print(f"data digest {digests['all'][:16]} (every array's sha256: {out}/data_sha256.json)")
  print(f"wrote {out}/results.md and {out}/results.png; total {time.time() - t0:.0f}s")


def main():
  """`make demo`'s command line (`--out`, `--methods`, `--gin.NAME=VALUE`)."""
  cli.main(Settings, lambda settings, _: demo(settings), "levi_jax.demo")


if __name__ == "__main__":
  main()
