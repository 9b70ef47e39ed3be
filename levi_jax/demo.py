"""`make demo`: the main job on the embedded default, end to end, on a CPU.

Trains FT, LP, Scratch, the vanilla Ensemble and LEVI on one shift of the
synthetic world (`gin/experiments/demo.gin`), then prints the ID/OOD table and
writes `results.md` and `results.png` into the output folder it names.
"""

import argparse
import logging
import os
import time

import gin
from absl import logging as absl_logging

from levi_jax import gin_utils, report, trainer

DEMO_METHODS = ("ft", "lp", "scratch", "ensemble", "levi")


def run(out_dir: str, methods=DEMO_METHODS, bindings=(), gin_file="experiments/demo.gin"):
  """Trains each method into out_dir/METHOD and writes the report; returns results."""
  results = []
  for m in methods:
    gin.clear_config()
    gin_utils.parse([gin_file], [f"MODEL_DIR = '{os.path.join(out_dir, m)}'",
                                 f"METHOD = '{m}'", *bindings], gin_utils.GIN_SEARCH_PATHS)
    backbone_source = gin.query_parameter("%INITIAL_CHECKPOINT_PATH")
    t0 = time.time()
    r = gin_utils.call(trainer.train)
    print(f"  {m:9s} ID {r['metrics']['id_test']['rmse']:.4f}  OOD "
          f"{r['metrics']['ood_test']['rmse']:.4f}  ({time.time() - t0:.0f}s)", flush=True)
    results.append(r)
  title = (f"{results[0]['task']}: backbone "
           + ("randomly initialised" if not backbone_source else f"from {backbone_source}"))
  return results, report.write_report(results, out_dir, title)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="demo_out", help="output folder")
  parser.add_argument("--methods", default=",".join(DEMO_METHODS))
  parser.add_argument("--gin", action="append", default=[],
                      help="extra gin binding, e.g. --gin TRAIN_STEPS=50")
  args = parser.parse_args()
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("levi_jax").setLevel(logging.WARNING)
  out = os.path.abspath(args.out)
  t0 = time.time()
  print(f"levi_jax demo: methods {args.methods} on the synthetic world -> {out}")
  results, table = run(out, args.methods.split(","), args.gin)
  if not any("INITIAL_CHECKPOINT_PATH" in b for b in args.gin):
    print("Note: the backbone is randomly initialised (no pre-trained checkpoint is "
          "configured), so FT/LP/LEVI see random text features.")
  print(table)
  print(f"wrote {out}/results.md and {out}/results.png; total {time.time() - t0:.0f}s")


if __name__ == "__main__":
  main()
