"""The Figure-4 study: which backbone layers LEVI taps -> ID and OOD RMSE.

    python experiments/layer_ablation.py --out experiments/results/layer_ablation \\
        --shifts gender_m_to_f --seeds 0,1,2

Trains LEVI with each tap set of `tap_sets` (none, last only, middle only,
middle + last, every other layer, all layers) on each shift and seed, with
the base gin files (default `experiments/demo.gin`) and cached backbone taps
(the backbone is frozen, so every tap set's pooled taps are computed once per
split and backbone). "none" is the small model alone: the `scratch` method
(LEVI itself refuses an empty tap set). Writes `results.md`, `runs.csv`,
`summary.csv` and `results.png` (ID and OOD RMSE per tap set, mean ± std
over seeds, averaged over shifts) into --out.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Mapping, Sequence

import gin

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import runs  # noqa: E402
import sweep  # noqa: E402

from levi_jax import trainer  # noqa: E402
from levi_jax.models import t5_encoder  # noqa: E402

TAP_SET_NAMES = ("none", "last", "middle", "middle+last", "every_other", "all")


def tap_sets(num_layers: int, names: Sequence[str] = TAP_SET_NAMES) -> dict[str, tuple]:
  """Tap sets for a backbone with `num_layers` layers (layer indices from 0)."""
  middle = (num_layers - 1) // 2
  table = {"none": (), "last": (num_layers - 1,), "middle": (middle,),
           "middle+last": (middle, num_layers - 1),
           "every_other": tuple(range(0, num_layers, 2)),
           "all": tuple(range(num_layers))}
  unknown = set(names) - set(table)
  if unknown:
    raise ValueError(f"unknown tap sets {sorted(unknown)}; expected some of {list(table)}")
  return {n: table[n] for n in names}


def backbone_layers(gin_files: Sequence[str], bindings: Sequence[str]) -> int:
  """The number of layers of the backbone the gin config builds."""
  runs.parse_base(gin_files, bindings)
  model = gin.get_configurable(trainer.ModelConfig)()
  if model.pretrained is not None:
    from levi_jax.checkpoints import backbones
    return backbones.load_pretrained(model.pretrained).module.config.num_layers
  return t5_encoder.preset(model.backbone, **model.backbone_overrides).num_layers


def tap_bindings(taps: tuple) -> list[str]:
  """Bindings for a tap set (none: the scratch method, which has no backbone)."""
  return [f"trainer.ModelConfig.taps = {tuple(taps)!r}"] if taps else []


def summarize(records: Sequence[Mapping[str, Any]], names: Sequence[str]) -> list[dict]:
  """Per tap set: mean ± std over seeds of the per-seed mean over shifts."""
  out = []
  for name in names:
    rs = [r for r in records if r["tap_set"] == name]
    if not rs:
      continue
    row = {"tap_set": name, "layers": rs[0]["layers"],
           "shifts": len({r["task"] for r in rs})}
    for k in ("id", "ood", "val"):
      per_seed = {}
      for r in rs:
        per_seed.setdefault(r["seed"], []).append(float(r[f"{k}_rmse"]))
      row[f"{k}_mean"], row[f"{k}_std"], row["seeds"] = runs.mean_std(
          sum(v) / len(v) for v in per_seed.values())
    out.append(row)
  return out


def markdown(summary: Sequence[Mapping[str, Any]], header: str) -> str:
  lines = [header, "", "| tap set | layers | ID RMSE | OOD RMSE | validation RMSE |",
           "|---|---|---|---|---|"]
  best = min(r["ood_mean"] for r in summary)
  for r in summary:
    ood = runs.fmt(r["ood_mean"], r["ood_std"], r["seeds"])
    lines.append(f"| {r['tap_set']} | {r['layers'] or '-'} | "
                 f"{runs.fmt(r['id_mean'], r['id_std'], r['seeds'])} | "
                 + (f"**{ood}**" if r["ood_mean"] == best else ood)
                 + f" | {runs.fmt(r['val_mean'], r['val_std'], r['seeds'])} |")
  return "\n".join(lines) + "\n"


def chart(summary: Sequence[Mapping[str, Any]], path: str, title: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  x = np.arange(len(summary))
  fig, ax = plt.subplots(figsize=(1.2 * len(summary) + 2.5, 3.6))
  for k, (split, name) in enumerate((("id", "ID test"), ("ood", "OOD test"))):
    ax.errorbar(x, [r[f"{split}_mean"] for r in summary], [r[f"{split}_std"] for r in summary],
                marker="o", capsize=3, label=name)
  ax.set_xticks(x, [f"{r['tap_set']}\n{r['layers'] or '-'}" for r in summary], fontsize=8)
  ax.set_ylabel("RMSE (lower is better)")
  ax.set_title(title, fontsize=9)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--shifts", default="gender_m_to_f")
  p.add_argument("--datasets", default=",".join(sweep.DEFAULT_DATASETS))
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--tap_sets", default=",".join(TAP_SET_NAMES))
  p.add_argument("--steps", type=int, default=None)
  p.add_argument("--data_dir", default="")
  p.add_argument("--backbone", default="config", choices=sorted(runs.BACKBONES),
                 help="config: as the gin files set it; random; minilm")
  p.add_argument("--gin_file", action="append", default=None)
  p.add_argument("--gin", action="append", default=[])
  p.add_argument("--no_tap_cache", action="store_true")
  p.add_argument("--runs_dir", default="", help="runs and tap cache (default OUT/runs)")
  p.add_argument("--multiprocess", action="store_true",
                 help="call jax.distributed.initialize() first (TPU pods, multi-host GPU)")
  args = p.parse_args(argv)
  args.seeds = runs.parse_list(args.seeds, int)
  args.tap_sets = runs.parse_list(args.tap_sets)
  args.gin_file = args.gin_file or list(runs.BASE_GIN)
  return args


def run(args: argparse.Namespace, command: str = "") -> dict[str, Any]:
  out = os.path.abspath(args.out)
  tasks = sweep.tasks_for(runs.parse_list(args.shifts), runs.parse_list(args.datasets))
  layers = backbone_layers(args.gin_file, [*runs.BACKBONES[args.backbone], *args.gin])
  sets = tap_sets(layers, args.tap_sets)
  runs_dir = os.path.abspath(args.runs_dir or os.path.join(out, "runs"))
  cache = "" if args.no_tap_cache else os.path.join(runs_dir, "tap_cache")
  records = []
  for task in tasks:
    for seed in args.seeds:
      for name, taps in sets.items():
        model_dir = os.path.join(runs_dir, task, name, f"seed{seed}")
        bindings = runs.run_bindings(model_dir, "levi" if taps else "scratch", task, seed,
                                     backbone=args.backbone,
                                     data_dir=args.data_dir, steps=args.steps,
                                     tap_cache_dir=cache,
                                     extra=[*args.gin, *tap_bindings(taps)])
        r = runs.train_run(model_dir, bindings, args.gin_file)
        m = r["metrics"]
        print(f"{task} taps {name} {taps} seed {seed}: ID {m['id_test']['rmse']:.4f} "
              f"OOD {m['ood_test']['rmse']:.4f}", flush=True)
        records.append({"task": task, "seed": seed, "tap_set": name,
                        "layers": " ".join(map(str, taps)),
                        "val_rmse": m["validation"]["rmse"], "id_rmse": m["id_test"]["rmse"],
                        "ood_rmse": m["ood_test"]["rmse"],
                        "train_time_s": r["train_time_s"], "wall_time_s": r["wall_time_s"]})
  summary = summarize(records, list(sets))
  header = (f"# LEVI tap-set ablation\n\nLEVI with each set of tapped backbone layers "
            f"(0-based, of {layers}); {len(tasks)} shift(s) ({', '.join(tasks)}), seeds "
            f"{','.join(map(str, args.seeds))}, backbone `{args.backbone}`; base gin "
            f"{', '.join(args.gin_file)}" + (f"; steps {args.steps}" if args.steps else "")
            + f". Cells: mean ± sample std over seeds of the mean over shifts; the runs "
            f"took {sum(r['wall_time_s'] for r in records) / 60:.1f} min of wall time in all."
            f"\n\nCommand: `{command}`")
  md = markdown(summary, header)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(md)
  runs.write_csv(os.path.join(out, "runs.csv"), records)
  runs.write_csv(os.path.join(out, "summary.csv"), summary)
  chart(summary, os.path.join(out, "results.png"),
        f"LEVI tap sets ({len(tasks)} shift(s), seeds {','.join(map(str, args.seeds))})")
  return {"records": records, "summary": summary, "markdown": md}


def main(argv=None):
  args = parse_args(argv)
  runs.initialize_multiprocess(args.multiprocess)
  runs.progress_logging()
  command = runs.command_line("layer_ablation.py", argv)
  result = run(args, command)
  print(result["markdown"])
  print(f"wrote {args.out}/results.md, runs.csv, summary.csv, results.png")


if __name__ == "__main__":
  main()
