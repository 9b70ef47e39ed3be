"""The design-space table: variants of one method from several studies, chosen on validation.

    python -m experiments.compare --out experiments/results/ml100k_variants \\
        --base 'late fusion=experiments/results/ml100k_minilm:LEVI' \\
        --variant 'layer-wise fusion=experiments/results/ml100k_minilm:LEVI-layerwise' \\
        --variant 'late + OOV dropout=experiments/results/ml100k_minilm_oov:LEVI'

Each `LABEL=FOLDER:COLUMN` names one column of a finished study's
`summary.csv` (`experiments.sweep`): the
per-shift mean validation, ID-test and OOD-test RMSE over seeds, at the
learning rate validation chose there. Studies may cover different shifts, and
a dataset variant (`movielens_100k_history`) the same shift under another task
name, so rows are matched by shift (the task name after its dataset). Each
variant is compared with the base on the shifts both ran: mean RMSE there and
the variant minus the base (negative: lower error). The chosen variant is the
one with the lowest mean *validation* RMSE relative to the base (the test
splits never choose). Writes `results.md` and `variants.csv` into --out.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Any, Mapping, Sequence

import numpy as np

from levi_jax import cli

METRICS = ("val", "id", "ood")


@dataclasses.dataclass(frozen=True)
class Settings:
  """The flags of `python -m experiments.compare`."""

  out: str = cli.field(help="results folder")
  base: str = cli.field(help="LABEL=FOLDER:COLUMN: the variant the others are compared with")
  variant: tuple[str, ...] = cli.field((), "LABEL=FOLDER:COLUMN (repeatable)", multi=True)

  def __post_init__(self):
    for spec in (self.base, *self.variant):
      parse_spec(spec)  # a bad one is a usage error before anything is read


@dataclasses.dataclass(frozen=True)
class Variant:
  label: str
  folder: str
  column: str


def parse_spec(spec: str) -> Variant:
  """'LABEL=FOLDER:COLUMN' -> Variant; a ValueError says what was expected."""
  label, sep, rest = spec.partition("=")
  folder, colon, column = rest.rpartition(":")
  if not (sep and colon and label.strip() and folder and column):
    raise ValueError(f"variant {spec!r}: expected LABEL=FOLDER:COLUMN, e.g. "
                     "'late fusion=experiments/results/ml100k_minilm:LEVI'")
  return Variant(label.strip(), folder, column)


def read_summary(v: Variant) -> dict[str, dict[str, float]]:
  """shift -> {"val", "id", "ood", "learning_rate", "seeds"} of the variant's column."""
  path = os.path.join(v.folder, "summary.csv")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"variant {v.label!r}: no {path} (a finished study's folder, "
                            "written by experiments.sweep)")
  with open(path) as f:
    rows = list(csv.DictReader(f))
  columns = sorted({r["column"] for r in rows})
  mine = [r for r in rows if r["column"] == v.column]
  if not mine:
    raise ValueError(f"variant {v.label!r}: {path} has no column {v.column!r}; it has {columns}")
  out = {}
  for r in mine:
    shift = r["task"].split(".", 1)[-1]
    if shift in out:
      raise ValueError(f"variant {v.label!r}: {path} has shift {shift!r} twice "
                       f"(tasks of two datasets); compare one dataset per folder")
    out[shift] = {"val": float(r["val_mean"]), "id": float(r["id_mean"]),
                  "ood": float(r["ood_mean"]), "seeds": int(r["seeds"]),
                  "learning_rate": r.get("learning_rate", "")}
  return out


def compare(base: Variant, variants: Sequence[Variant],
            summaries: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None
            ) -> list[dict[str, Any]]:
  """One record per variant (the base first): the shifts it shares with the base, its
  and the base's mean RMSE there, their differences, and whether validation chose it.

  `summaries`: label -> `read_summary` output (default: read from the folders).
  """
  every = [base, *variants]
  labels = [v.label for v in every]
  if len(set(labels)) != len(labels):
    raise ValueError(f"variant labels must differ, got {labels}")
  summaries = summaries or {v.label: read_summary(v) for v in every}
  ref = summaries[base.label]
  records = []
  for v in every:
    mine = summaries[v.label]
    shared = [s for s in ref if s in mine]
    if not shared:
      raise ValueError(f"variant {v.label!r} shares no shift with the base {base.label!r} "
                       f"(it ran {sorted(mine)}, the base {sorted(ref)})")
    rec: dict[str, Any] = {"variant": v.label, "source": f"{v.folder}:{v.column}",
                           "shifts": ";".join(shared),
                           "seeds": min(mine[s]["seeds"] for s in shared)}
    for m in METRICS:
      rec[m] = float(np.mean([mine[s][m] for s in shared]))
      rec[f"base_{m}"] = float(np.mean([ref[s][m] for s in shared]))
      rec[f"delta_{m}"] = rec[m] - rec[f"base_{m}"]
    records.append(rec)
  best = min(records, key=lambda r: (r["delta_val"], r["variant"] != base.label))
  for r in records:
    r["chosen"] = r is best
  return records


def markdown(records: Sequence[Mapping[str, Any]], command: str) -> str:
  base = records[0]
  lines = [
      "# Variants, compared with the base on the shifts both ran",
      "",
      f"Command: `{command}`",
      "",
      f"Base: **{base['variant']}** (`{base['source']}`). Per variant: the mean over the "
      "shifts it shares with the base of the per-shift mean RMSE over seeds (validation, "
      "ID test, OOD test), and the variant minus the base on those shifts (negative: lower "
      "error). Chosen (**bold**): the lowest validation RMSE relative to the base; the test "
      "splits do not choose.",
      "",
      "| variant | shifts | seeds | val | ID | OOD | Δ val | Δ ID | Δ OOD |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in records:
    name = f"**{r['variant']}**" if r["chosen"] else r["variant"]
    n = len(r["shifts"].split(";"))
    lines.append(f"| {name} | {n} | {r['seeds']} | {r['val']:.4f} | {r['id']:.4f} | "
                 f"{r['ood']:.4f} | {r['delta_val']:+.4f} | {r['delta_id']:+.4f} | "
                 f"{r['delta_ood']:+.4f} |")
  lines += ["", "Shifts per variant: " + "; ".join(
      f"{r['variant']}: {r['shifts'].replace(';', ', ')}" for r in records) + ".", ""]
  return "\n".join(lines)


def run(settings: Settings, command: str) -> dict[str, Any]:
  base = parse_spec(settings.base)
  records = compare(base, [parse_spec(s) for s in settings.variant])
  os.makedirs(settings.out, exist_ok=True)
  md = markdown(records, command)
  with open(os.path.join(settings.out, "results.md"), "w") as f:
    f.write(md)
  with open(os.path.join(settings.out, "variants.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(records[0]))
    writer.writeheader()
    writer.writerows(records)
  return {"records": records, "markdown": md}


def main(settings: Settings, command: str):
  print(run(settings, command)["markdown"])
  print(f"wrote {settings.out}/results.md, variants.csv")


if __name__ == "__main__":
  cli.main(Settings, main, "experiments.compare")
