"""The Figure-4 study: which backbone layers LEVI taps -> ID and OOD RMSE.

    python -m experiments.layer_ablation --out experiments/results/layer_ablation \\
        --shifts gender_m_to_f --seeds 0,1,2

Its grid (`grid`): LEVI with each tap set of `tap_sets` (none, last only,
middle only, middle + last, every other layer, all layers) on each shift and
seed, run by `experiments.driver` with the base gin files (default
`experiments/demo.gin`) and cached backbone taps (the backbone is frozen, so
every tap set's pooled taps are computed once per split and backbone).
"none" is the small model alone: the `scratch` method (LEVI itself refuses an
empty tap set). Each run's MODEL_DIR is `runs/<task>/<tap set>/seed<k>-<key>/`, keyed by
its resolved config as the sweep's are, so a rerun with other settings trains anew.
Writes `results.md`, `runs.csv`, `summary.csv` and `results.png` (ID and OOD
RMSE per tap set, mean ± std over seeds, averaged over shifts) into --out.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import gin
import numpy as np

from experiments import driver, runs
from levi_jax import cli

# What the runs train: LEVI with a tap set, or the small model alone (the empty set).
METHODS = ("levi", "scratch")
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
  from levi_jax import trainer
  from levi_jax.models import t5_encoder
  runs.parse_base(gin_files, bindings)
  model = gin.get_configurable(trainer.ModelConfig)()
  gin.clear_config()
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
  """The results page: one row per tap set (the best OOD in bold)."""
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


def per_shift_table(records: Sequence[Mapping[str, Any]], names: Sequence[str],
                    tasks: Sequence[str]) -> str:
  """ID / OOD RMSE per tap set and shift (means over seeds; the best OOD of a shift in bold)."""
  cell = {}
  for name in names:
    for task in tasks:
      rs = [r for r in records if r["tap_set"] == name and r["task"] == task]
      if rs:
        cell[name, task] = tuple(float(np.mean([float(r[f"{k}_rmse"]) for r in rs]))
                                 for k in ("id", "ood"))
  shifts = [t.split(".", 1)[-1] for t in tasks]
  lines = ["| tap set | " + " | ".join(shifts) + " |", "|---|" + "---|" * len(tasks)]
  best = {t: min((v[1] for (n, tt), v in cell.items() if tt == t), default=None) for t in tasks}
  for name in names:
    row = []
    for task in tasks:
      if (name, task) not in cell:
        row.append("-")
        continue
      id_, ood = cell[name, task]
      row.append(f"{id_:.3f} / " + (f"**{ood:.3f}**" if ood == best[task] else f"{ood:.3f}"))
    lines.append(f"| {name} | " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def chart(summary: Sequence[Mapping[str, Any]], path: str, title: str):
  """ID and OOD RMSE (mean ± std over seeds) per tap set."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

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


@dataclasses.dataclass(frozen=True)
class Settings(driver.Settings):
  """The ablation's flags: the shared ones (`driver.Settings`) and its tap sets."""

  tap_sets: tuple[str, ...] = cli.field(TAP_SET_NAMES, f"tap sets, of {','.join(TAP_SET_NAMES)}")

  def __post_init__(self):
    super().__post_init__()
    # The table averages a tap set's runs over seeds and shifts: it has no learning-rate
    # choice, so a grid of several rates for one method would be averaged in silently.
    several = {m: lrs for m, lrs in driver.parse_lr_grid(self.lr_grid, METHODS, METHODS).items()
               if len(lrs) > 1}
    if several:
      raise ValueError(f"--lr_grid {self.lr_grid!r}: the layer ablation runs one learning rate "
                       f"per method, got {several}")


def grid(settings: Settings, tasks: Sequence[str]) -> list[driver.Cell]:
  """Per shift and seed, one run per tap set (`none`: the scratch method)."""
  layers = backbone_layers(settings.gin_file,
                           [*runs.BACKBONES[settings.backbone], *settings.gin_bindings])
  sets = tap_sets(layers, settings.tap_sets)
  return [driver.Cell(task, seed, name, "levi" if taps else "scratch", tuple(tap_bindings(taps)),
                      {"tap_set": name, "layers": " ".join(map(str, taps)),
                       "num_layers": layers})
          for task in tasks for seed in settings.seeds for name, taps in sets.items()]


def records(settings: Settings, run: driver.Run, results: Mapping[str, Any]) -> list[dict]:
  """One record per run: its tap set and its ID, OOD and validation RMSE."""
  m, _ = driver.metrics_of(results, settings.early_stopping)
  labels = run.cell.labels
  return [{"task": run.cell.task, "seed": run.cell.seed, "tap_set": labels["tap_set"],
           "layers": labels["layers"], "val_rmse": m["validation"]["rmse"],
           "id_rmse": m["id_test"]["rmse"], "ood_rmse": m["ood_test"]["rmse"],
           "train_time_s": results["train_time_s"], "wall_time_s": results["wall_time_s"]}]


def report(outcome: driver.Outcome) -> dict[str, Any]:
  """Writes results.md, runs.csv, summary.csv and results.png; returns
  {records, summary, markdown, files}."""
  s, records_ = outcome.settings, outcome.records
  names = list(dict.fromkeys(r.cell.labels["tap_set"] for r in outcome.plan))
  layers = outcome.plan[0].cell.labels["num_layers"] if outcome.plan else 0
  summary = summarize(records_, names)
  tasks = outcome.tasks
  header = (f"# LEVI tap-set ablation\n\nLEVI with each set of tapped backbone layers "
            f"(0-based, of {layers}); {len(tasks)} shift(s) ({', '.join(tasks)}), seeds "
            f"{','.join(map(str, s.seeds))}, backbone `{s.backbone}`; base gin "
            f"{', '.join(s.gin_file)}"
            + driver.protocol_text(s, f"learning rates {s.lr_grid!r}" if s.lr_grid else "")
            + f". Cells: mean ± sample std over seeds of the mean over shifts; the runs "
            f"took {sum(r['wall_time_s'] for r in records_) / 60:.1f} min of wall time in all."
            f"\n\nCommand: `{outcome.command}`")
  md = markdown(summary, header)
  if len(tasks) > 1:
    md += ("\nPer shift: ID-test / OOD-test RMSE, mean over seeds (**bold**: the best OOD of "
           "the shift).\n\n" + per_shift_table(records_, names, tasks))
  out = os.path.abspath(s.out)
  driver.write_tables(out, md, records_, summary)
  chart(summary, os.path.join(out, "results.png"),
        f"LEVI tap sets ({len(tasks)} shift(s), seeds {','.join(map(str, s.seeds))})")
  return {"records": records_, "summary": summary, "markdown": md,
          "files": ["results.md", "runs.csv", "summary.csv", "results.png"]}


STUDY = driver.Study(module="layer_ablation", settings=Settings, grid=grid, records=records,
                     report=report, methods=METHODS)


if __name__ == "__main__":
  driver.main(STUDY)
