"""Evaluation entry point: `python -m levi_jax.eval --gin_file=runs/eval.gin ...`.

`--gin.CHECKPOINT_PATH` is a MODEL_DIR (its latest checkpoint) or one step's
directory `MODEL_DIR/checkpoints/STEP`. Give the same model and task gin files
as the training run. Writes `eval_results.json` into `--output_dir` (default the
MODEL_DIR) and nothing else: a read-only run folder can be evaluated.
"""

import json
import logging
import os
import sys

import gin
from absl import app, flags
from absl import logging as absl_logging

from levi_jax import gin_utils, trainer

FLAGS = flags.FLAGS
gin_utils.define_flags()
flags.DEFINE_string("output_dir", None, "Where eval_results.json goes (default: the MODEL_DIR).")


def split_checkpoint_path(path: str) -> tuple[str, int | None]:
  """(model_dir, step or None) from a MODEL_DIR or a checkpoints/STEP path."""
  path = os.path.abspath(path.rstrip("/"))
  parent, leaf = os.path.split(path)
  if leaf.isdigit() and os.path.basename(parent) == "checkpoints":
    return os.path.dirname(parent), int(leaf)
  if not os.path.isdir(os.path.join(path, "checkpoints")):
    raise FileNotFoundError(f"CHECKPOINT_PATH {path} is neither a MODEL_DIR (with a "
                            "checkpoints/ folder) nor a MODEL_DIR/checkpoints/STEP folder")
  return path, None


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax/jax chatter
  logging.getLogger("levi_jax").setLevel(logging.INFO)
  gin_utils.parse(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
  path = gin.query_parameter("%CHECKPOINT_PATH")
  if not isinstance(path, str):
    raise ValueError("bind the checkpoint to evaluate: --gin.CHECKPOINT_PATH=\"'/path'\"")
  model_dir, step = split_checkpoint_path(path)
  results = gin_utils.call(trainer.train, model_dir=model_dir, eval_only=True,
                           restore_step=step, output_dir=FLAGS.output_dir)
  print(json.dumps(results["metrics"], indent=2))


if __name__ == "__main__":
  app.run(main, argv=gin_utils.rewrite_gin_args(sys.argv))
