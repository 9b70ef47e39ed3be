"""Evaluation entry point: evaluate a checkpoint as it was trained.

    python -m levi_jax.eval --checkpoint_path=/tmp/levi          # the run's config.gin
    python -m levi_jax.eval --gin_file=runs/eval.gin --gin_file=methods/levi.gin \
        --gin.CHECKPOINT_PATH="'/tmp/levi'"                      # explicit gin files

The checkpoint is a MODEL_DIR (its latest checkpoint) or one step's directory
`MODEL_DIR/checkpoints/STEP`. Without `--gin_file`, the configuration is the
run's own `MODEL_DIR/config.gin` (written by the trainer at the start it
accepted), so the model, task and data are exactly those trained, whatever gin
files made them; `--gin.NAME=VALUE` still overrides. With `--gin_file`, give
the same model and task gin files as the training run. The configs are those
gin binds for `trainer.train`; `evaluator.evaluate` restores the checkpoint's
params only (no optimizer state, no training loop). Writes `eval_results.json`
into `--output_dir` (default the MODEL_DIR) and nothing else: a read-only run
folder can be evaluated.
"""

import inspect
import json
import logging
import os
import sys

import gin
from absl import app, flags
from absl import logging as absl_logging

from levi_jax import evaluator, gin_utils, trainer

FLAGS = flags.FLAGS
gin_utils.define_flags()
flags.DEFINE_string("output_dir", None, "Where eval_results.json goes (default: the MODEL_DIR).")
flags.DEFINE_string("checkpoint_path", None, "MODEL_DIR or MODEL_DIR/checkpoints/STEP; without "
                    "--gin_file, the run's config.gin configures the evaluation.")


# The `trainer.train` arguments that configure an evaluation.
EVAL_ARGS = ("model", "data", "loss", "loop", "mesh", "initial_checkpoint_path")


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


def train_arguments(names) -> dict:
  """The parsed gin config's `trainer.train` arguments `names` (its defaults where unbound)."""
  bound = gin.get_bindings(trainer.train)
  params = inspect.signature(trainer.train).parameters
  return {k: bound[k] if k in bound else params[k].default for k in names}


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax/jax chatter
  logging.getLogger("levi_jax").setLevel(logging.INFO)
  files, bindings = list(FLAGS.gin_file), list(FLAGS.gin_bindings)
  if FLAGS.checkpoint_path:
    bindings.append(f"CHECKPOINT_PATH = {FLAGS.checkpoint_path!r}")
    if not files:
      run_config = os.path.join(split_checkpoint_path(FLAGS.checkpoint_path)[0], "config.gin")
      if not os.path.isfile(run_config):
        raise FileNotFoundError(f"{run_config} does not exist (the run's configuration); "
                                "give the training run's gin files with --gin_file")
      files = [run_config]
  gin_utils.parse(files, bindings, FLAGS.gin_search_paths)
  path = gin.query_parameter("%CHECKPOINT_PATH")
  if not isinstance(path, str):
    raise ValueError("bind the checkpoint to evaluate: --gin.CHECKPOINT_PATH=\"'/path'\"")
  model_dir, step = split_checkpoint_path(path)
  results = evaluator.evaluate(model_dir, restore_step=step, output_dir=FLAGS.output_dir,
                               **train_arguments(EVAL_ARGS))
  print(json.dumps(results["metrics"], indent=2))


if __name__ == "__main__":
  app.run(main, argv=gin_utils.rewrite_gin_args(sys.argv))
