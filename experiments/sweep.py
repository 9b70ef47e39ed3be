"""The Figure-1 study: methods x shifts x seeds -> ID and OOD RMSE, ranks, LEVI vs FT.

    python -m experiments.sweep --out experiments/results/sweep \\
        --shifts gender_m_to_f,age_young_to_old --seeds 0,1,2
    python -m experiments.sweep --out /tmp/sweep_all --shifts all --lora
    python -m experiments.sweep --out /tmp/ml1m --data_dir /data/ml-1m-raw \\
        --datasets movielens_1m --shifts all

Its grid (`grid`): one run per shift, seed and trained run of the table's
columns (`run_of`), run by `experiments.driver` (resume, --restrict,
--lr_grid, --epochs, --oov_dropout, the whole grid checked before the first
run). The real-data study is this grid on raw data (`--data_dir`,
`--datasets`). Each run is `trainer.train` with the base gin files (default
`experiments/demo.gin`: the demo's backbone, pre-trained on the synthetic
world's corpus, its steps and learning rate) plus the run's bindings
(`runs.run_bindings`). Writes into --out:

* `results.md`: rows = shifts, columns = methods, cells = ID and OOD RMSE
  (mean ± sample std over seeds); the average rank of each method (ID, OOD);
  LEVI's OOD improvement over FT; and the answer to the paper's Figure-1
  question on each shift (`figure1_answer`).
* `runs.csv` (one row per run and method column) and `summary.csv` (one row
  per shift and method).
* `results.png`: OOD RMSE relative to FT per shift and method, and the mean
  ranks.
* `figure1.json`: the Figure-1 answers, ranks, references and collapsed runs.
* `runs/<task>/<run>/seed<k>-<key>/` (or under --runs_dir): each run's
  MODEL_DIR (results.json, metrics.jsonl, config.gin), and `tap_cache/`
  (`driver.run_key`).

The classical references (`reference_baselines`) are unranked columns, and a
run that collapsed to a constant prediction is flagged (`is_collapsed`).

LP-FT and WiSE-FT come from one `wiseft` run: it trains exactly as `lpft`
(LP stage, then FT from there) and also keeps the LP-stage weights, so its
final weights are LP-FT's and its interpolations WiSE-FT's; WiSE-FT reports
the mixing weight with the best validation RMSE. Ensemble is the vanilla
output average of LP and Scratch members. Frozen-backbone methods (LP, LEVI,
Ensemble) read cached backbone taps (`levi_jax.tap_cache`) unless
--no_tap_cache.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from experiments import driver, runs
from levi_jax import cli

# Table columns: (label, method that is trained, how its number is read).
MEAN_COLUMN = "train mean"
COLUMNS = {"FT": "ft", "LP": "lp", "LP-FT": "wiseft", "WiSE-FT": "wiseft",
           "Scratch": "scratch", "Ensemble": "ensemble", "LEVI": "levi",
           "LoRA": "lora", "LEVI+LoRA": "levi_lora", "LEVI-layerwise": "levi",
           "LEVI+aux": "levi"}
# Columns that are a method with extra bindings, trained as runs of their own.
VARIANTS = {"LEVI-layerwise": ("levi_layerwise", ("trainer.ModelConfig.fusion = 'layerwise'",)),
            "LEVI+aux": ("levi_aux", ("trainer.ModelConfig.aux_heads = True",
                                      "step.LossConfig.aux_weight = 0.3"))}


def run_of(column: str) -> tuple[str, str, tuple[str, ...]]:
  """(run name, method, extra bindings) of the run that feeds `column`."""
  name, extra = VARIANTS.get(column, (COLUMNS[column], ()))
  return name, COLUMNS[column], extra


DEFAULT_COLUMNS = ("FT", "LP", "LP-FT", "WiSE-FT", "Scratch", "Ensemble", "LEVI")
LORA_COLUMNS = ("LoRA", "LEVI+LoRA")


def records_of(results: Mapping[str, Any], task: str, seed: int,
               columns: Sequence[str], early_stopping: bool = False,
               hparams: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
  """Table records (one per column the run feeds) from one run's results.

  `early_stopping`: a column's numbers are those of the run's evaluation with
  the lowest validation RMSE (`results["best_validation"]`), not the last.
  `hparams` (e.g. the learning rate) are copied into every record.
  """
  metric = lambda m, split: m.get(split, {}).get("rmse", float("nan"))
  base = {"task": task, "dataset": task.split(".")[0], "shift": task.split(".", 1)[1],
          "seed": seed, "method": results["method"],
          "train_time_s": results.get("train_time_s"), "wall_time_s": results.get("wall_time_s"),
          "params_trained": results.get("params_trained"),
          "params_total": results.get("params_total")}
  base.update(hparams or {})
  out = []
  for col in columns:
    if COLUMNS[col] != results["method"]:
      continue
    m, extra = driver.metrics_of(results, early_stopping and col != "WiSE-FT")
    if col == "WiSE-FT":
      alpha, m = min(results["wise_ft"].items(), key=lambda kv: kv[1]["validation"]["rmse"])
      extra = {"wise_alpha": float(alpha)}
    out.append({**base, "column": col, "val_rmse": metric(m, "validation"),
                "id_rmse": metric(m, "id_test"), "ood_rmse": metric(m, "ood_test"),
                "id_pred_std": m.get("id_test", {}).get("pred_std", float("nan")), **extra})
  return out


def summarize(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """One row per (task, column): mean, std and count of ID, OOD and validation RMSE."""
  keys = sorted({(r["task"], r["column"]) for r in records})
  out = []
  for task, col in keys:
    rs = [r for r in records if r["task"] == task and r["column"] == col]
    row = {"task": task, "column": col}
    if "learning_rate" in rs[0]:
      row["learning_rate"] = rs[0]["learning_rate"]
    for k in ("id", "ood", "val"):
      row[f"{k}_mean"], row[f"{k}_std"], row["seeds"] = runs.mean_std(
          float(r[f"{k}_rmse"]) for r in rs)
    out.append(row)
  return out


def _table(summary: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Mapping[str, Any]]]:
  t: dict[str, dict[str, Mapping[str, Any]]] = {}
  for row in summary:
    t.setdefault(row["task"], {})[row["column"]] = row
  return t


def _ranks(values: Sequence[float]) -> np.ndarray:
  """1 = lowest; ties share the mean of their ranks."""
  v = np.asarray(values, np.float64)
  order = np.argsort(v, kind="stable")
  ranks = np.empty(len(v))
  ranks[order] = np.arange(1, len(v) + 1)
  for x in np.unique(v):
    ranks[v == x] = ranks[v == x].mean()
  return ranks


def average_ranks(summary: Sequence[Mapping[str, Any]], columns: Sequence[str],
                  split: str = "ood") -> dict[str, float]:
  """Each column's rank by mean RMSE on `split`, averaged over the shifts that have all columns."""
  table = _table(summary)
  per_task = [[table[t][c][f"{split}_mean"] for c in columns] for t in sorted(table)
              if all(c in table[t] for c in columns)]
  if not per_task:
    return {}
  ranks = np.mean([_ranks(v) for v in per_task], axis=0)
  return dict(zip(columns, map(float, ranks)))


def ranked_columns(summary: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> list[str]:
  """The columns every shift ran: ranks are over these (a --restrict'ed column is left out)."""
  table = _table(summary)
  return [c for c in columns if table and all(c in row for row in table.values())]


def improvement(summary: Sequence[Mapping[str, Any]], better: str = "LEVI", than: str = "FT",
                split: str = "ood") -> dict[str, Any]:
  """Relative RMSE reduction (%) of `better` over `than`, per shift and its mean ± std."""
  table = _table(summary)
  per = {t: 100.0 * (row[than][f"{split}_mean"] - row[better][f"{split}_mean"])
         / row[than][f"{split}_mean"] for t, row in table.items() if better in row and than in row}
  mean, std, n = runs.mean_std(per.values())
  return {"per_shift": per, "mean": mean, "std": std, "shifts": n,
          "wins": sum(v > 0 for v in per.values())}


def seed_wins(records: Sequence[Mapping[str, Any]], task: str, better: str, than: str,
              split: str = "ood") -> tuple[int, int]:
  """(seeds where `better`'s RMSE on `split` is below `than`'s, seeds both ran)."""
  by = {(r["column"], int(r["seed"])): float(r[f"{split}_rmse"]) for r in records
        if r["task"] == task}
  seeds = sorted(s for c, s in by if c == better and (than, s) in by)
  return sum(by[(better, s)] < by[(than, s)] for s in seeds), len(seeds)


def is_levi(column: str) -> bool:
  """LEVI and its variants (LEVI-layerwise, LEVI+aux, LEVI+LoRA): not baselines."""
  return column.startswith("LEVI")


def figure1_answer(summary: Sequence[Mapping[str, Any]], id_tolerance: float = 0.03,
                   records: Sequence[Mapping[str, Any]] = (),
                   baselines: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
                   levi: str = "LEVI") -> dict[str, dict[str, Any]]:
  """Per shift: the paper's Figure-1 question, from the seed means.

  `ft_worst`: FT's OOD RMSE is above both LP's and Scratch's (None on a shift
  without FT). `levi_best_ood`: `levi`'s OOD RMSE is below every baseline's
  (the columns that are not LEVI variants). `levi_id_ok`: its ID RMSE is
  within `id_tolerance` (relative) of the best ID RMSE. `levi_ood_margin`: the
  best baseline's OOD RMSE minus LEVI's (positive: LEVI is better). With
  `baselines` (task -> `reference_baselines`), `levi_beats_references`: LEVI's
  OOD RMSE is also below every classical reference's. With the per-seed
  `records`, `seeds_levi_beats_best_other` and `seeds_levi_beats_ft` count the
  seeds where LEVI's OOD RMSE is the lower one, as (wins, seeds).
  """
  out = {}
  for task, row in _table(summary).items():
    others = {c: r["ood_mean"] for c, r in row.items() if not is_levi(c)}
    if levi not in row or not others:
      continue
    ood = {c: r["ood_mean"] for c, r in row.items()}
    best_other = min(others, key=others.get)
    best_id = min(r["id_mean"] for c, r in row.items() if not is_levi(c) or c == levi)
    has_ft = {"FT", "LP", "Scratch"} <= set(row)
    out[task] = {
        "ft_worst": bool(ood["FT"] > ood["LP"] and ood["FT"] > ood["Scratch"]) if has_ft
                    else None,
        "levi_best_ood": bool(ood[levi] < others[best_other]),
        "levi_ood_margin": float(others[best_other] - ood[levi]),
        "best_other_ood": best_other,
        "levi_id_gap": float(row[levi]["id_mean"] / best_id - 1.0),
        "levi_id_ok": bool(row[levi]["id_mean"] <= (1.0 + id_tolerance) * best_id),
    }
    refs = (baselines or {}).get(task)
    if refs:
      best_ref = min(refs, key=lambda c: refs[c]["ood_test"])
      out[task]["best_reference"] = best_ref
      out[task]["levi_beats_references"] = bool(ood[levi] < refs[best_ref]["ood_test"])
    if records:
      out[task]["seeds_levi_beats_best_other"] = seed_wins(records, task, levi, best_other)
      if "FT" in row:
        out[task]["seeds_levi_beats_ft"] = seed_wins(records, task, levi, "FT")
  return out


def levi_by_validation(summary: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """The LEVI variant with the lowest validation RMSE on average over the shifts
  that ran every variant (how the default is chosen; never on a test split)."""
  table = _table(summary)
  variants = sorted({c for row in table.values() for c in row if is_levi(c)})
  tasks = [t for t, row in table.items() if all(v in row for v in variants)]
  if len(variants) < 2 or not tasks:
    return {}
  mean_val = {v: float(np.mean([table[t][v]["val_mean"] for t in tasks])) for v in variants}
  return {"chosen": min(mean_val, key=mean_val.get), "mean_validation_rmse": mean_val,
          "shifts": len(tasks)}


REFERENCES = {"training_mean": MEAN_COLUMN, "item_bias": "item bias",
              "user_item_bias": "user+item bias", "linear": "linear"}


def reference_baselines(task: str, data_dir: str = "") -> dict[str, dict[str, Any]]:
  """The classical references on one task: {column: {split: RMSE, "chosen": {...}}}.

  `train mean` predicts the training split's mean rating; `item bias` the
  item's mean shrunk to it; `user+item bias` the classic baseline predictor;
  `linear` a ridge regression on the side features and item id
  (`levi_jax.references`). Each is fitted on the training split, its
  regularisation chosen on the validation split (never on a test split). They
  are shown unranked: a method whose OOD RMSE is above `item bias` has learned
  nothing a user needs beyond how good each item is.
  """
  from levi_jax import references
  from levi_jax import input_pipeline
  prepared = input_pipeline.prepare(task, data_dir or None)
  arrays = {split: prepared.source_arrays(split) for split in prepared.splits}
  fitted = references.fit_references(arrays["train"], prepared.feature_specs,
                                     arrays.get("validation"))
  out = {}
  for key, column in REFERENCES.items():
    pred = fitted[key]
    out[column] = {split: references.rmse(pred.predict(a), a["targets"])
                   for split, a in arrays.items() if split != "train"}
    out[column]["chosen"] = dict(pred.chosen)
  out[MEAN_COLUMN]["train_mean"] = float(np.mean(arrays["train"]["targets"], dtype=np.float64))
  return out


def is_collapsed(record: Mapping[str, Any], mean_rmse: Mapping[str, float]) -> bool:
  """A run that learned a constant (`references.is_collapsed` on a table record):
  its predictions' std on the ID test split is below 1e-3 stars, or its ID and OOD
  RMSE equal the training-mean predictor's."""
  from levi_jax import references
  return references.is_collapsed(
      record.get("id_pred_std"), {"id_test": record["id_rmse"], "ood_test": record["ood_rmse"]},
      mean_rmse)


def beats_reference(table: Mapping[str, Mapping[str, Mapping[str, Any]]],
                    baselines: Mapping[str, Mapping[str, Mapping[str, float]]],
                    cols: Sequence[str], reference: str = MEAN_COLUMN
                    ) -> dict[str, tuple[int, int]]:
  """Per column: (shifts where its mean OOD RMSE is below `reference`'s, shifts it ran)."""
  out = {}
  for c in cols:
    ran = [t for t, row in table.items() if c in row and t in baselines]
    out[c] = (sum(table[t][c]["ood_mean"] < baselines[t][reference]["ood_test"] for t in ran),
              len(ran))
  return out


def markdown(summary: Sequence[Mapping[str, Any]], columns: Sequence[str], header: str,
             id_tolerance: float = 0.03, records: Sequence[Mapping[str, Any]] = (),
             baselines: Mapping[str, Mapping[str, float]] | None = None) -> str:
  """The results page: the table, ranks, LEVI vs FT and the Figure-1 answer.

  `baselines`: task -> `reference_baselines`, shown as last, unranked columns.
  A cell marked † holds a collapsed run (`is_collapsed`: it predicts a constant).
  """
  table = _table(summary)
  cols = [c for c in columns if any(c in row for row in table.values())]
  baselines = baselines or {}
  ref_cols = [c for c in REFERENCES.values() if any(c in b for b in baselines.values())]
  collapsed = {(r["task"], r["column"]) for r in records if r.get("collapsed")}
  lines = [header, "", *_results_table(summary, cols, ref_cols, baselines, collapsed), "",
           *_findings(summary),
           *_figure1_section(figure1_answer(summary, id_tolerance, records, baselines), table,
                             cols, ref_cols, baselines, collapsed, id_tolerance)]
  return "\n".join(lines) + "\n"


def _results_table(summary, cols, ref_cols, baselines, collapsed) -> list[str]:
  """The table's lines: one row per shift (ID / OOD cells), then the average ranks."""
  table = _table(summary)
  lines = ["Cells: ID-test RMSE / OOD-test RMSE, mean ± sample std over seeds "
           "(lower is better; **bold**: the best OOD of the row; †: at least one seed collapsed "
           "to a constant prediction)"
           + (f"; {', '.join(f'`{c}`' for c in ref_cols)}: classical references fitted on the "
              "training split, regularisation chosen on validation (not ranked)"
              if ref_cols else "") + ".", "",
           "| shift | " + " | ".join(cols + ref_cols) + " |",
           "|---|" + "---|" * len(cols + ref_cols)]
  for task in sorted(table):
    row = table[task]
    best = min((row[c]["ood_mean"] for c in cols if c in row), default=None)
    cells = []
    for c in cols:
      if c not in row:
        cells.append("-")
        continue
      r = row[c]
      ood = runs.fmt(r["ood_mean"], r["ood_std"], r["seeds"])
      if r["ood_mean"] == best:
        ood = f"**{ood}**"
      mark = " †" if (task, c) in collapsed else ""
      cells.append(f"{runs.fmt(r['id_mean'], r['id_std'], r['seeds'])} / {ood}{mark}")
    for c in ref_cols:
      b = baselines.get(task, {}).get(c, {})
      cells.append(f"{b.get('id_test', float('nan')):.3f} / {b.get('ood_test', float('nan')):.3f}")
    lines.append(f"| {task} | " + " | ".join(cells) + " |")
  ranked = ranked_columns(summary, cols)
  for split, name in (("id", "ID"), ("ood", "OOD")):
    ranks = average_ranks(summary, ranked, split)
    if ranks:
      lines.append(f"| average {name} rank | " + " | ".join(
          f"{ranks[c]:.2f}" if c in ranks else "-" for c in cols) + " |")
  return lines


def _findings(summary) -> list[str]:
  """LEVI vs FT, the learning rates chosen and the LEVI variant chosen, each a paragraph."""
  lines = []
  imp = improvement(summary)
  if imp["shifts"]:
    spread = f" (std over shifts {imp['std']:.2f}%)" if imp["shifts"] > 1 else ""
    lines += [f"**LEVI vs FT, OOD:** mean relative RMSE reduction {imp['mean']:+.2f}%"
              f"{spread}, LEVI lower on {imp['wins']} of {imp['shifts']} shifts.", ""]
  chosen = [(r["task"], r["column"], r["learning_rate"]) for r in summary
             if r.get("learning_rate") not in (None, "gin")]
  if chosen:
    lines += ["Learning rates chosen on validation (mean over seeds): " + "; ".join(
        f"{t} {c} {lr:g}" for t, c, lr in chosen) + ".", ""]
  variant = levi_by_validation(summary)
  if variant:
    lines += ["LEVI variants by mean validation RMSE over the "
              f"{variant['shifts']} shifts that ran them all (the default is chosen so): " +
              ", ".join(f"{v} {x:.4f}" for v, x in sorted(
                  variant["mean_validation_rmse"].items(), key=lambda kv: kv[1])) +
              f"; chosen: **{variant['chosen']}**.", ""]
  return lines


def _figure1_section(answer, table, cols, ref_cols, baselines, collapsed, id_tolerance
                     ) -> list[str]:
  """The Figure-1 question, as measured: the counts, then one row per shift."""
  if not answer:
    return []
  n = len(answer)
  count = lambda k: sum(bool(a.get(k)) for a in answer.values())
  with_ft = sum(a["ft_worst"] is not None for a in answer.values())
  lines = [
      "## The Figure-1 question, as measured", "",
      f"* FT's OOD error above both LP's and Scratch's: {count('ft_worst')} of {with_ft} "
      "shifts with FT.",
      f"* LEVI's OOD error below every baseline's (the columns that are not LEVI "
      f"variants): {count('levi_best_ood')} of {n}.",
      *([f"* ... and below every classical reference's too: "
         f"{sum(bool(a['levi_best_ood'] and a['levi_beats_references']) for a in answer.values())}"
         f" of {n}; LEVI below the best reference alone: {count('levi_beats_references')} "
         f"of {n}."] if any("levi_beats_references" in a for a in answer.values()) else []),
      f"* LEVI's ID error within {100 * id_tolerance:.0f}% of the best ID: "
      f"{count('levi_id_ok')} of {n}.",
      *([f"* OOD error below the `{ref}` reference's (shifts below / shifts run): " +
         ", ".join(f"{c} {k}/{m}" for c, (k, m) in
                   beats_reference(table, baselines, cols, ref).items()) + "."
         for ref in ref_cols]),
      *([f"* Collapsed runs (constant predictions), flagged †: {len(collapsed)} "
         f"(shift, method) cells."] if collapsed else []), "",
      "| shift | FT OOD worse than LP and Scratch | LEVI best OOD (margin to the best other) "
      "| seeds LEVI OOD < best other | seeds LEVI OOD < FT | LEVI ID vs best ID |",
      "|---|---|---|---|---|---|"]
  wins = lambda a, k: "{}/{}".format(*a[k]) if k in a else "-"
  yes_no = lambda v: "-" if v is None else ("yes" if v else "no")
  for task, a in sorted(answer.items()):
    lines.append(f"| {task} | {yes_no(a['ft_worst'])} | "
                 f"{'yes' if a['levi_best_ood'] else 'no'} ({a['levi_ood_margin']:+.4f} vs "
                 f"{a['best_other_ood']}) | {wins(a, 'seeds_levi_beats_best_other')} | "
                 f"{wins(a, 'seeds_levi_beats_ft')} | {100 * a['levi_id_gap']:+.1f}% |")
  lines.append("")
  return lines


def references_markdown(baselines: Mapping[str, Mapping[str, Mapping[str, Any]]],
                        header: str) -> str:
  """The classical references alone: per shift, validation / ID / OOD RMSE of each."""
  cols = list(REFERENCES.values())
  lines = [header, "",
           "Cells: validation / ID-test / OOD-test RMSE of each classical reference, fitted on "
           "the shift's training split with its regularisation chosen on validation (chosen "
           "values in `figure1.json`).", "",
           "| shift | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
  for task in sorted(baselines):
    b = baselines[task]
    lines.append(f"| {task} | " + " | ".join(
        f"{b[c]['validation']:.3f} / {b[c]['id_test']:.3f} / {b[c]['ood_test']:.3f}"
        for c in cols) + " |")
  best = {c: sum(min(cols, key=lambda k, b=b: b[k]["ood_test"]) == c for b in baselines.values())
          for c in cols}
  lines += ["", "Lowest OOD RMSE among the references, shifts of "
            f"{len(baselines)}: " + ", ".join(f"{c} {n}" for c, n in best.items()) + "."]
  return "\n".join(lines) + "\n"


def chart(summary: Sequence[Mapping[str, Any]], columns: Sequence[str], path: str, title: str):
  """OOD RMSE relative to FT (or, in a study without FT, to its first column)
  per shift and method, and the average ranks."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  table = _table(summary)
  tasks = sorted(table)
  cols = [c for c in columns if any(c in table[t] for t in tasks)]
  if not cols:  # an interim report before any run finished: no chart, not a stale one
    if os.path.exists(path):
      os.remove(path)
    return
  base = "FT" if "FT" in cols else cols[0]
  rel = np.full((len(tasks), len(cols)), np.nan)
  for i, t in enumerate(tasks):
    ref = table[t].get(base, {}).get("ood_mean")
    for j, c in enumerate(cols):
      if c in table[t] and ref:
        rel[i, j] = table[t][c]["ood_mean"] / ref
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(4 + 1.1 * len(cols) * 2, 1.5 + 0.35 * len(tasks)),
                               gridspec_kw={"width_ratios": [3, 2]})
  span = np.nanmax(np.abs(rel - 1.0)) if np.isfinite(rel).any() else 0.1
  im = ax.imshow(rel, cmap="RdYlGn_r", vmin=1 - span, vmax=1 + span, aspect="auto")
  ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
  ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
  for i in range(len(tasks)):
    for j in range(len(cols)):
      if np.isfinite(rel[i, j]):
        ax.text(j, i, f"{rel[i, j]:.3f}", ha="center", va="center", fontsize=6)
  ax.set_title(f"OOD RMSE / {base}'s OOD RMSE (lower is better)", fontsize=9)
  fig.colorbar(im, ax=ax, fraction=0.04)
  x = np.arange(len(cols))
  for k, (split, name) in enumerate((("id", "ID"), ("ood", "OOD"))):
    ranks = average_ranks(summary, ranked_columns(summary, cols), split)
    bx.bar(x + (k - 0.5) * 0.4, [ranks.get(c, np.nan) for c in cols], 0.4, label=name)
  bx.set_xticks(x, cols, rotation=30, ha="right")
  bx.set_ylabel("average rank over shifts (1 = best)")
  bx.legend()
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)




@dataclasses.dataclass(frozen=True)
class Settings(driver.Settings):
  """The sweep's flags: the shared ones (`driver.Settings`) and its table's."""

  columns: tuple[str, ...] = cli.field(DEFAULT_COLUMNS, f"table columns, of {','.join(COLUMNS)}")
  lora: bool = cli.field(False, "add the LoRA and LEVI+LoRA columns")
  id_tolerance: float = cli.field(0.03, "LEVI's ID RMSE counts as fine within this share of "
                                        "the best ID RMSE")
  references_only: bool = cli.field(False, "fit and report the classical references only "
                                           "(no training)")

  def __post_init__(self):
    super().__post_init__()
    if self.lora:
      object.__setattr__(self, "columns", (*self.columns, *(
          c for c in LORA_COLUMNS if c not in self.columns)))
    unknown = set(self.columns) - set(COLUMNS)
    if unknown:
      raise ValueError(f"unknown columns {sorted(unknown)}; expected some of {list(COLUMNS)}")


def grid(settings: Settings, tasks: Sequence[str]) -> list[driver.Cell]:
  """Per shift and seed, one run per trained run of the columns (LP-FT and WiSE-FT share
  the `wiseft` run; a variant column is a run of its own); none with --references_only."""
  if settings.references_only:
    return []
  trained: dict[str, tuple[str, tuple[str, ...], list[str]]] = {}  # run -> method, bindings, cols
  for c in settings.columns:
    name, method, extra = run_of(c)
    trained.setdefault(name, (method, extra, []))[2].append(c)
  return [driver.Cell(task, seed, name, method, extra, {"columns": tuple(cols)},
                      tap_cache=method in runs.TAP_CACHE_METHODS)
          for task in tasks for seed in settings.seeds
          for name, (method, extra, cols) in trained.items()]


def records(settings: Settings, run: driver.Run, results: Mapping[str, Any]
            ) -> list[dict[str, Any]]:
  """The records of the columns the run feeds, with its learning rate and steps."""
  lr = run.learning_rate
  hparams = {"learning_rate": lr if lr is not None else "gin", "steps": run.steps or "gin"}
  return records_of(results, run.cell.task, run.cell.seed, run.cell.labels["columns"],
                    settings.early_stopping, hparams)


def _header(s: Settings, outcome: driver.Outcome, all_records: Sequence[Mapping[str, Any]]
            ) -> str:
  """The results page's title, settings line and command; the run time is that of every
  run trained (all learning rates), not only of those validation chose."""
  trained = [r for r in all_records if r["column"] != "WiSE-FT"]  # LP-FT's run feeds it too
  run_time = sum(r["wall_time_s"] or 0.0 for r in trained)
  missing = outcome.missing
  return (f"# Methods x shifts: ID and OOD RMSE\n\n"
          f"{len(outcome.tasks)} shifts x {len({run_of(c)[0] for c in s.columns})} trained runs "
          f"x seeds {','.join(map(str, s.seeds))}; backbone `{s.backbone}`; data_dir "
          f"`{s.data_dir or 'of the gin (demo: the synthetic world)'}`; base gin "
          f"{', '.join(s.gin_file)}"
          + driver.protocol_text(
              s, f"learning rate per method and shift chosen on validation (mean over seeds) "
                 f"from {s.lr_grid!r}" if s.lr_grid else "",
              f"restricted: {s.restrict!r} (those methods ran only there)" if s.restrict else "")
          + f"; the {len(trained)} runs took {run_time / 60:.0f} min of wall time in all."
          + (f" **Interim report (--report_only): {len(missing)} of {len(outcome.plan)} runs "
             "not finished yet are left out.**" if missing else "")
          + f"\n\nCommand: `{outcome.command}`")


def report(outcome: driver.Outcome) -> dict[str, Any]:
  """Writes results.md, figure1.json and (unless --references_only) runs.csv,
  summary.csv and results.png; returns {records, all_records, summary, markdown, ...}."""
  s, baselines = outcome.settings, outcome.prepared
  out = os.path.abspath(s.out)
  if s.references_only:
    md = references_markdown(baselines, f"# Classical references on {len(outcome.tasks)} "
                             f"shifts\n\ndata_dir `{s.data_dir or 'the synthetic world'}`.\n\n"
                             f"Command: `{outcome.command}`")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.md"), "w") as f:
      f.write(md)
    with open(os.path.join(out, "figure1.json"), "w") as f:
      json.dump({"references": baselines}, f, indent=1)
    return {"records": [], "summary": [], "markdown": md, "baselines": baselines,
            "files": ["results.md", "figure1.json"]}
  all_records = outcome.records
  for rec in all_records:
    rec["collapsed"] = is_collapsed(rec, baselines[rec["task"]][MEAN_COLUMN])
  # Per (shift, column): the learning rate with the best mean validation RMSE over seeds.
  from levi_jax import references
  records = references.select_by_validation(all_records, ("task", "column"),
                                            hparam_keys=("learning_rate",))
  chosen = {id(r) for r in records}
  for r in all_records:
    r["selected"] = id(r) in chosen
  summary = summarize(records)
  md = markdown(summary, s.columns, _header(s, outcome, all_records), s.id_tolerance, records,
                baselines)
  driver.write_tables(out, md, all_records, summary)
  chart(summary, s.columns, os.path.join(out, "results.png"),
        f"{len(outcome.tasks)} shifts, seeds {','.join(map(str, s.seeds))}, backbone {s.backbone}")
  ranked = ranked_columns(summary, s.columns)
  with open(os.path.join(out, "figure1.json"), "w") as f:
    json.dump({"figure1": figure1_answer(summary, s.id_tolerance, records, baselines),
               "levi_by_validation": levi_by_validation(summary),
               "levi_vs_ft_ood": improvement(summary),
               "average_rank_ood": average_ranks(summary, ranked, "ood"),
               "average_rank_id": average_ranks(summary, ranked, "id"),
               "references": baselines,
               "collapsed": sorted({(r["task"], r["column"]) for r in records
                                    if r["collapsed"]})}, f, indent=1)
  return {"records": records, "all_records": all_records, "summary": summary, "markdown": md,
          "baselines": baselines,
          "files": ["results.md", "figure1.json", "runs.csv", "summary.csv", "results.png"]}


def references(settings: Settings, tasks: Sequence[str], data_dir: str
               ) -> dict[str, dict[str, dict[str, Any]]]:
  """The classical references of every task ({task: `reference_baselines`})."""
  del settings
  return {task: reference_baselines(task, data_dir) for task in tasks}


STUDY = driver.Study(module="sweep", settings=Settings, grid=grid, records=records,
                     report=report, methods=tuple(COLUMNS.values()), prepare=references)


if __name__ == "__main__":
  driver.main(STUDY)
