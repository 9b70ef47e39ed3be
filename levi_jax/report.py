"""`python -m levi_jax.report DIR... [--out OUT]`: results.json files -> table + chart.

Each DIR is a MODEL_DIR (or a folder holding several); every `results.json`
found under them becomes a row. Writes `OUT/results.md` (markdown table) and
`OUT/results.png` (ID vs OOD error per method) and prints the table.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Sequence

from levi_jax import cli


def find_results(dirs: Sequence[str]) -> list[dict[str, Any]]:
  """Loads every results.json under `dirs` (sorted by path)."""
  paths = []
  for d in dirs:
    if os.path.isfile(d):
      paths.append(d)
      continue
    if not os.path.isdir(d):
      raise FileNotFoundError(f"{d} is neither a results.json nor a directory")
    paths += glob.glob(os.path.join(d, "**", "results.json"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"no results.json under {', '.join(dirs)}")
  out = []
  for p in sorted(set(paths)):
    with open(p) as f:
      r = json.load(f)
    r["_path"] = p
    out.append(r)
  return out


def _metric(r: dict, split: str) -> float | None:
  m = r.get("metrics", {}).get(split, {})
  return m.get("rmse", m.get("accuracy"))


def markdown_table(results: Sequence[dict]) -> str:
  """One row per run: method, task, validation/ID/OOD error, params, time."""
  lines = ["| method | task | val RMSE | ID RMSE | OOD RMSE | trained / total params "
           "| train time (s) | examples/s |",
           "|---|---|---|---|---|---|---|---|"]
  fmt = lambda v: "-" if v is None else f"{v:.4f}"
  for r in results:
    lines.append(
        f"| {r['method']} | {r.get('task', '-')} | {fmt(_metric(r, 'validation'))} | "
        f"{fmt(_metric(r, 'id_test'))} | {fmt(_metric(r, 'ood_test'))} | "
        f"{r['params_trained']:,} / {r['params_total']:,} | {r['train_time_s']:.1f} | "
        f"{r['examples_per_s']:.0f} |")
  return "\n".join(lines) + "\n"


def chart(results: Sequence[dict], path: str, title: str = "ID vs OOD error"):
  """Grouped bars of ID-test and OOD-test RMSE per run."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  labels = [r["method"] for r in results]
  ids = [_metric(r, "id_test") or 0.0 for r in results]
  oods = [_metric(r, "ood_test") or 0.0 for r in results]
  x = np.arange(len(labels))
  fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(labels) + 1), 3.6))
  ax.bar(x - 0.2, ids, 0.4, label="ID test")
  ax.bar(x + 0.2, oods, 0.4, label="OOD test")
  ax.set_xticks(x, labels, rotation=20)
  ax.set_ylabel("RMSE (lower is better)")
  lo = min(v for v in ids + oods if v > 0) if any(ids + oods) else 0.0
  ax.set_ylim(max(0.0, lo * 0.9), max(ids + oods) * 1.03 if any(ids + oods) else 1.0)
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_report(results: Sequence[dict], out_dir: str, title: str = "ID vs OOD error") -> str:
  """Writes results.md and results.png into out_dir; returns the markdown."""
  os.makedirs(out_dir, exist_ok=True)
  table = markdown_table(results)
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(f"# {title}\n\n{table}")
  chart(results, os.path.join(out_dir, "results.png"), title)
  return table


@dataclasses.dataclass(frozen=True)
class Settings:
  """The flags of `python -m levi_jax.report`."""
  dirs: tuple[str, ...] = cli.field(help="MODEL_DIRs or folders of them", positional=True)
  out: str = cli.field(".", "where results.md/results.png go")


def report(settings: Settings) -> str:
  """Writes the report of `settings.dirs`; prints and returns its table."""
  table = write_report(find_results(settings.dirs), settings.out)
  print(table)
  print(f"wrote {os.path.join(settings.out, 'results.md')} and "
        f"{os.path.join(settings.out, 'results.png')}")
  return table


def main(argv: Sequence[str] | None = None):
  """The command line; `argv` (arguments without the program name) for a call from Python."""
  if argv is not None:
    return report(cli.parse(Settings, argv))
  cli.main(Settings, lambda settings, _: report(settings), "levi_jax.report")


if __name__ == "__main__":
  main()
