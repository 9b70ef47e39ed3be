"""Training entry point: `python -m levi_jax.train --gin_file=... --gin.NAME=VALUE`.

Example:
  python -m levi_jax.train --gin_file=runs/train.gin --gin_file=methods/levi.gin \
      --gin.MODEL_DIR="'/tmp/levi'" --gin.DATA_DIR="'/tmp/world'"
"""

import json
import logging
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging

from levi_jax import gin_utils, trainer

FLAGS = flags.FLAGS
gin_utils.define_flags()
flags.DEFINE_bool("multiprocess", False, "Call jax.distributed.initialize() first "
                  "(TPU pods, multi-host GPU).")


def main(argv):
  del argv
  if FLAGS.multiprocess:
    jax.distributed.initialize()
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax/jax chatter
  logging.getLogger("levi_jax").setLevel(logging.INFO)
  gin_utils.parse(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
  model_dir = gin_utils.model_dir()
  # config.gin is written once the trainer accepts the start (a rejected one, e.g.
  # another model's MODEL_DIR, leaves the run's record as it was).
  results = gin_utils.call(
      trainer.train, on_start=lambda: gin_utils.write_operative_config(model_dir, "config.gin"))
  gin_utils.write_operative_config(model_dir, "operative_config.gin", operative=True)
  print(json.dumps(results["metrics"], indent=2))


if __name__ == "__main__":
  app.run(main, argv=gin_utils.rewrite_gin_args(sys.argv))
