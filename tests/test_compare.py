"""experiments.compare: variants from several studies, matched by shift, chosen on validation."""

import csv

import pytest

from experiments import compare
from levi_jax import cli

FIELDS = ["task", "column", "learning_rate", "id_mean", "id_std", "seeds", "ood_mean", "ood_std",
          "val_mean", "val_std"]


def write_summary(folder, rows):
  folder.mkdir(parents=True, exist_ok=True)
  with open(folder / "summary.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=FIELDS)
    w.writeheader()
    for task, column, val, id_, ood in rows:
      w.writerow({"task": task, "column": column, "learning_rate": 0.003, "id_mean": id_,
                  "id_std": 0.0, "seeds": 3, "ood_mean": ood, "ood_std": 0.0, "val_mean": val,
                  "val_std": 0.0})


@pytest.fixture
def studies(tmp_path):
  write_summary(tmp_path / "a", [
      ("movielens_100k.gender_m_to_f", "LEVI", 1.00, 1.01, 1.10),
      ("movielens_100k.time_later", "LEVI", 0.90, 0.93, 1.04),
      ("movielens_100k.gender_m_to_f", "LEVI-layerwise", 1.02, 1.00, 1.05),  # best OOD, worse val
  ])
  write_summary(tmp_path / "b", [
      ("movielens_100k.gender_m_to_f", "LEVI", 0.99, 1.02, 1.09),
      ("movielens_100k.time_later", "LEVI", 0.88, 0.92, 1.03),
  ])
  write_summary(tmp_path / "h", [("movielens_100k_history.time_later", "LEVI", 0.86, 0.90, 1.06)])
  return tmp_path


def test_variants_are_compared_on_shared_shifts_and_chosen_on_validation(studies):
  base = compare.Variant("late", str(studies / "a"), "LEVI")
  variants = [compare.Variant("layerwise", str(studies / "a"), "LEVI-layerwise"),
              compare.Variant("late+oov", str(studies / "b"), "LEVI"),
              compare.Variant("history", str(studies / "h"), "LEVI")]
  recs = {r["variant"]: r for r in compare.compare(base, variants)}
  assert recs["late"]["shifts"] == "gender_m_to_f;time_later"
  assert recs["late"]["delta_val"] == 0.0
  lw = recs["layerwise"]
  assert lw["shifts"] == "gender_m_to_f" and lw["base_ood"] == pytest.approx(1.10)
  assert lw["delta_ood"] == pytest.approx(-0.05) and lw["delta_val"] == pytest.approx(0.02)
  oov = recs["late+oov"]
  assert oov["val"] == pytest.approx((0.99 + 0.88) / 2)
  assert oov["delta_val"] == pytest.approx(-0.015)
  hist = recs["history"]  # another dataset's task, the same shift
  assert hist["shifts"] == "time_later" and hist["delta_val"] == pytest.approx(-0.04)
  assert hist["delta_ood"] == pytest.approx(0.02)
  # Validation chooses (history: -0.04), not the OOD test split (layer-wise: -0.05).
  assert [r["variant"] for r in recs.values() if r["chosen"]] == ["history"]


def test_the_base_is_chosen_when_no_variant_validates_better(studies):
  base = compare.Variant("late", str(studies / "a"), "LEVI")
  recs = compare.compare(base, [compare.Variant("layerwise", str(studies / "a"), "LEVI-layerwise")])
  assert [r["variant"] for r in recs if r["chosen"]] == ["late"]


def test_bad_variants_are_named(studies):
  with pytest.raises(ValueError, match="expected LABEL=FOLDER:COLUMN"):
    compare.parse_spec("late")
  with pytest.raises(ValueError, match=r"no column 'LEVII'; it has \['LEVI', 'LEVI-layerwise'\]"):
    compare.read_summary(compare.Variant("x", str(studies / "a"), "LEVII"))
  with pytest.raises(FileNotFoundError, match="summary.csv"):
    compare.read_summary(compare.Variant("x", str(studies / "nowhere"), "LEVI"))
  write_summary(studies / "c", [("movielens_100k.age_young_to_old", "LEVI", 1.0, 1.0, 1.0)])
  with pytest.raises(ValueError, match="shares no shift with the base"):
    compare.compare(compare.Variant("late", str(studies / "a"), "LEVI"),
                    [compare.Variant("age", str(studies / "c"), "LEVI")])
  with pytest.raises(ValueError, match="labels must differ"):
    compare.compare(compare.Variant("late", str(studies / "a"), "LEVI"),
                    [compare.Variant("late", str(studies / "b"), "LEVI")])


def test_command_line_writes_the_table(studies):
  out = studies / "out"
  settings = cli.parse(compare.Settings, [
      "--out", str(out), "--base", f"late fusion={studies / 'a'}:LEVI",
      "--variant", f"late + OOV={studies / 'b'}:LEVI",
      "--variant", f"history={studies / 'h'}:LEVI"])
  result = compare.run(settings, "cmd")
  md = (out / "results.md").read_text()
  assert md == result["markdown"] and "| **history** | 1 | 3 |" in md
  assert "| late + OOV | 2 | 3 | 0.9350 | 0.9700 | 1.0600 | -0.0150 | +0.0000 | -0.0100 |" in md
  with open(out / "variants.csv") as f:
    assert [r["variant"] for r in csv.DictReader(f)] == ["late fusion", "late + OOV", "history"]
  with pytest.raises(ValueError, match="expected LABEL=FOLDER:COLUMN"):
    cli.parse(compare.Settings, ["--out", str(out), "--base", "late"])
