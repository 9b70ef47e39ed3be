"""The experiment scripts end to end in tiny configurations, their tables, and the
committed pre-trained synthetic backbone (reproducible start, carried bias)."""

import csv
import json
import os

import gin
import numpy as np
import pytest
from absl import flags

from experiments import driver, efficiency, layer_ablation, pretrain_synthetic, runs, sweep
from levi_jax import checkpointing, cli, demo, gin_utils, pretrained
from levi_jax.data import paths, synthetic
from trainer_fixtures import TINY_BACKBONE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECKPOINT = os.path.join(ROOT, "experiments", "checkpoints", "synthetic_t5_small")
TINY = [f"trainer.ModelConfig.backbone_overrides = {TINY_BACKBONE!r}", "BATCH_SIZE = 16", "SEQ_LENGTH = 24",
        "trainer.DataConfig.eval_batch_size = 1024", "optim.OptimizerConfig.warmup_steps = 0"]
TINY_ARGS = ["--gin." + b.replace(" = ", "=", 1) for b in TINY]


def run_sweep(argv):
  """The sweep as its command line runs it (flags parsed by `cli.parse`)."""
  return driver.run(sweep.STUDY, cli.parse(sweep.Settings, argv), "cmd")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A small synthetic world (MovieLens format only): quick to load and evaluate."""
  path = str(tmp_path_factory.mktemp("world"))
  synthetic.write_world(path, num_users=80, num_items=40, pretrain_num_users=20,
                        pretrain_num_items=20, formats=("ml-100k",))
  return path


def rows(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_sweep_end_to_end(tmp_path, world):
  argv = ["--out", str(tmp_path), "--shifts", "gender_m_to_f", "--seeds", "0", "--steps", "3",
          "--columns", "LP-FT,WiSE-FT,LEVI", "--backbone", "random", "--data_dir", world,
          *TINY_ARGS]
  result = run_sweep(argv)
  recs = {r["column"]: r for r in rows(tmp_path / "runs.csv")}
  assert sorted(recs) == ["LEVI", "LP-FT", "WiSE-FT"]
  assert all(r["task"] == "movielens_100k.gender_m_to_f" for r in recs.values())
  run_dir = tmp_path / "runs/movielens_100k.gender_m_to_f"
  (wise_dir,) = (run_dir / "wiseft").glob("seed0-*")  # keyed by the run's config
  wise = json.load(open(wise_dir / "results.json"))
  assert float(recs["LP-FT"]["ood_rmse"]) == pytest.approx(wise["metrics"]["ood_test"]["rmse"])
  best = min(wise["wise_ft"], key=lambda a: wise["wise_ft"][a]["validation"]["rmse"])
  assert float(recs["WiSE-FT"]["wise_alpha"]) == float(best)
  assert float(recs["WiSE-FT"]["ood_rmse"]) == pytest.approx(
      wise["wise_ft"][best]["ood_test"]["rmse"])
  md = (tmp_path / "results.md").read_text()
  assert "| shift | LP-FT | WiSE-FT | LEVI |" in md and "| movielens_100k.gender_m_to_f |" in md
  assert "average OOD rank" in md and "Command: `cmd`" in md
  # The classical references, fitted on the world's training split.
  base = result["baselines"]["movielens_100k.gender_m_to_f"]
  assert list(base) == ["train mean", "item bias", "user+item bias", "linear"]
  for ref in base.values():
    assert {"validation", "id_test", "ood_test"} <= set(ref) and 0.3 < ref["ood_test"] < 3
    assert f"{ref['id_test']:.3f} / {ref['ood_test']:.3f}" in md
  assert base["item bias"]["validation"] < base["train mean"]["validation"]
  assert "| shift | LP-FT | WiSE-FT | LEVI | train mean | item bias | user+item bias | linear |" \
      in md
  assert all(r["collapsed"] in ("True", "False") for r in recs.values())
  assert (tmp_path / "results.png").stat().st_size > 10_000
  assert len(rows(tmp_path / "summary.csv")) == 3
  (levi_dir,) = (run_dir / "levi").glob("seed0-*")
  levi = json.load(open(levi_dir / "results.json"))
  assert levi["tap_cache"]["used"] and levi["metrics"]["id_test"]["pred_std"] > 0
  assert len([p for p in (tmp_path / "runs" / "tap_cache").rglob("*.npz")
              if "rows" not in p.parts]) == 4
  assert not (wise_dir / "checkpoints").exists()
  mtime = os.path.getmtime(levi_dir / "results.json")
  again = run_sweep(argv)  # resumes: every run is read back
  assert again["summary"] == result["summary"]
  assert os.path.getmtime(levi_dir / "results.json") == mtime
  # Other settings in the same runs folder are other runs, not the old numbers.
  other = run_sweep([a if a != "3" else "4" for a in argv])
  assert len(list((run_dir / "levi").glob("seed0-*"))) == 2
  assert other["summary"] != result["summary"]


def test_sweep_protocol_chooses_learning_rates_on_validation(tmp_path, world):
  """Per (shift, method): the learning rate of the best mean validation RMSE over seeds;
  epochs set the steps; each run reports its best-validation evaluation."""
  argv = ["--out", str(tmp_path), "--shifts", "gender_m_to_f", "--seeds", "0,1",
          "--columns", "LP,LEVI,LEVI-layerwise", "--backbone", "random", "--data_dir", world,
          "--lr_grid", "lp=1e-3,3e-2;default=1e-4,3e-3", "--epochs", "0.05",
          "--evals_per_epoch", "40", "--early_stopping", *TINY_ARGS]
  result = run_sweep(argv)
  every = result["all_records"]
  assert len(every) == 3 * 2 * 2  # runs x learning rates x seeds
  assert {r["learning_rate"] for r in every if r["column"] == "LP"} == {1e-3, 3e-2}
  assert {r["learning_rate"] for r in every if r["column"] == "LEVI"} == {1e-4, 3e-3}
  for col in ("LP", "LEVI", "LEVI-layerwise"):
    mean_val = {}
    for r in every:
      if r["column"] == col:
        mean_val.setdefault(r["learning_rate"], []).append(r["val_rmse"])
    best = min(mean_val, key=lambda lr: np.mean(mean_val[lr]))
    picked = [r for r in result["records"] if r["column"] == col]
    assert {r["learning_rate"] for r in picked} == {best} and len(picked) == 2
    assert all(r["selected"] == (r["learning_rate"] == best) for r in every
               if r["column"] == col)
  res = [json.load(open(p / "results.json"))
         for p in (tmp_path / "runs/movielens_100k.gender_m_to_f/levi").glob("seed0-*")]
  for r in res:
    best = r["best_validation"]
    assert best["metrics"]["validation"]["rmse"] <= r["metrics"]["validation"]["rmse"]
    steps = {rec["steps"] for rec in every}
    assert len(steps) == 1 and r["num_steps"] == steps.pop() >= 1
  assert "Learning rates chosen on validation" in result["markdown"]
  minutes = sum(r["wall_time_s"] for r in every) / 60
  assert f"the 12 runs took {minutes:.0f} min of wall time in all" in result["markdown"]
  assert len(rows(tmp_path / "runs.csv")) == 12
  # The layer-wise variant is a run of its own, with its own fusion.
  (lw,) = list((tmp_path / "runs/movielens_100k.gender_m_to_f/levi_layerwise").glob("seed0-*"))[:1]
  assert "fusion = 'layerwise'" in (lw / "config.gin").read_text()
  late = [r for r in every if r["column"] == "LEVI" and r["seed"] == 0]
  layerwise = [r for r in every if r["column"] == "LEVI-layerwise" and r["seed"] == 0]
  assert {r["val_rmse"] for r in late} != {r["val_rmse"] for r in layerwise}


def test_sweep_restrict_runs_a_method_on_part_of_the_grid(tmp_path, world):
  methods = ["lp", "scratch"]
  assert driver.parse_restrict("scratch=gender_m_to_f,time_later@0", methods) == {
      "scratch": ({"gender_m_to_f", "time_later"}, {0})}
  assert driver.parse_restrict("levi_aux=time_later", ["levi", "levi_aux"]) == {
      "levi_aux": ({"time_later"}, None)}  # a variant column's run, by its name
  with pytest.raises(ValueError, match="not a run of this sweep"):
    driver.parse_restrict("ft=gender_m_to_f", methods)
  with pytest.raises(ValueError, match="RUN=SHIFT"):
    driver.parse_restrict("scratch", methods)
  argv = ["--out", str(tmp_path), "--shifts", "gender_m_to_f", "--seeds", "0,1",
          "--columns", "LP,Scratch", "--backbone", "random", "--data_dir", world,
          "--restrict", "scratch=movielens_100k.gender_m_to_f@1", "--steps", "2", *TINY_ARGS]
  result = run_sweep(argv)
  ran = sorted((r["column"], r["seed"]) for r in result["all_records"])
  assert ran == [("LP", 0), ("LP", 1), ("Scratch", 1)]
  assert "restricted: 'scratch=movielens_100k.gender_m_to_f@1'" in result["markdown"]
  # --report_only trains nothing: an interim report of the finished runs (none yet in a
  # fresh runs folder: a table of references, no chart).
  empty = run_sweep([*argv, "--report_only", "--out", str(tmp_path / "empty")])
  assert empty["all_records"] == [] and not (tmp_path / "empty" / "results.png").exists()
  assert "3 of 3 runs not finished yet" in empty["markdown"]
  interim = run_sweep([*argv, "--report_only", "--seeds", "0,1,2"])
  assert sorted((r["column"], r["seed"]) for r in interim["all_records"]) == ran
  assert "Interim report (--report_only): 1 of 4 runs not finished yet" in interim["markdown"]
  assert not list((tmp_path / "runs").rglob("seed2-*"))
  # A report of a grid whose runs have all finished is the study's own: it names the command
  # without --report_only; an interim one keeps it.
  for spelling in ("--report_only", "--report_only=True", "-report_only=1"):
    cmd = f"python -m experiments.sweep --steps 2 {spelling}"
    full = driver.run(sweep.STUDY, cli.parse(sweep.Settings, [*argv, spelling]), cmd)
    assert "Command: `python -m experiments.sweep --steps 2`" in full["markdown"], spelling
  assert "Interim" not in full["markdown"]
  cmd = "python -m experiments.sweep --steps 2 --report_only"
  part = driver.run(sweep.STUDY, cli.parse(sweep.Settings, [*argv, "--report_only", "--seeds",
                                                            "0,1,2"]), cmd)
  assert f"Command: `{cmd}`" in part["markdown"]
  bad = [*argv[:-len(TINY_ARGS) - 4], "--restrict", "scratch=time_latr"]
  with pytest.raises(ValueError, match="names unknown shifts: \\['time_latr'\\]"):
    run_sweep(bad)


def test_sweep_checks_the_whole_grid_before_the_first_run(tmp_path, world):
  # time_later names a MovieLens and an Amazon task; this world has MovieLens files only.
  kept = driver.validate_grid(
      driver.tasks_for(["time_later"], ["movielens_100k", "amazon_2018"]), world, implicit=True)
  assert kept == ["movielens_100k.time_later"]
  argv = ["--out", str(tmp_path), "--shifts", "movielens_100k.gender_m_to_f,amazon_2018.time_later",
          "--seeds", "0", "--steps", "1", "--columns", "LEVI", "--data_dir", world, *TINY_ARGS]
  with pytest.raises(ValueError, match=r"amazon_2018.time_later"):
    run_sweep(argv)
  assert not (tmp_path / "runs").exists()  # nothing trained


def test_the_driver_resolves_the_whole_grid_before_the_first_run(tmp_path, world):
  """Every cell over the learning-rate grid, less the restricted ones, gets its bindings and
  its own keyed MODEL_DIR up front; a bad binding fails there, with nothing trained."""
  argv = ["--out", str(tmp_path), "--shifts", "gender_m_to_f", "--seeds", "0,1",
          "--columns", "LP,LP-FT,WiSE-FT,LEVI-layerwise", "--data_dir", world,
          "--lr_grid", "lp=1e-3,3e-3", "--restrict", "levi_layerwise=gender_m_to_f@1",
          *TINY_ARGS]
  settings = cli.parse(sweep.Settings, argv)
  task = "movielens_100k.gender_m_to_f"
  planned = driver.plan(sweep.STUDY, settings, [task], world)
  assert [(r.cell.run, r.cell.seed, r.learning_rate) for r in planned] == [
      ("lp", 0, 1e-3), ("lp", 0, 3e-3), ("wiseft", 0, None),
      ("lp", 1, 1e-3), ("lp", 1, 3e-3), ("wiseft", 1, None), ("levi_layerwise", 1, None)]
  assert planned[2].cell.labels["columns"] == ("LP-FT", "WiSE-FT")  # one run feeds both
  assert len({r.model_dir for r in planned}) == len(planned)
  assert all(os.path.basename(r.model_dir).startswith(f"seed{r.cell.seed}-") for r in planned)
  assert "LEARNING_RATE = 0.003" in planned[1].bindings
  assert "trainer.ModelConfig.fusion = 'layerwise'" in planned[-1].bindings
  bad = cli.parse(sweep.Settings, [*argv, "--gin.trainer.ModelConfig.no_such_field=1"])
  with pytest.raises(ValueError, match="no_such_field"):
    driver.run(sweep.STUDY, bad, "cmd")
  assert not (tmp_path / "runs").exists()


def test_command_lines_are_absl_flags_with_gin_bindings():
  """`--gin_file` and `--gin.NAME=VALUE` as `levi_jax.train` takes them; lists comma-separated;
  each script's settings validate its flags."""
  s = cli.parse(sweep.Settings, ["--out=/tmp/x", "--seeds=0,2", "--shifts", "a,b", "--lora",
                                 "--gin_file=experiments/demo.gin", "--gin_file=methods/lp.gin",
                                 "--gin.TRAIN_STEPS=5", "--no_tap_cache"])
  assert s.seeds == (0, 2) and s.shifts == ("a", "b") and s.no_tap_cache
  assert s.gin_file == ("experiments/demo.gin", "methods/lp.gin")
  assert s.gin_bindings == ("TRAIN_STEPS=5",)
  assert s.columns == (*sweep.DEFAULT_COLUMNS, *sweep.LORA_COLUMNS)
  default = cli.parse(sweep.Settings, ["--out", "/tmp/x"])
  assert default.gin_file == runs.BASE_GIN and default.steps is None and default.seeds == (0, 1, 2)
  with pytest.raises(ValueError, match="unknown columns \\['LEVII'\\]"):
    cli.parse(sweep.Settings, ["--out=/tmp/x", "--columns=LEVI,LEVII"])
  with pytest.raises(flags.IllegalFlagValueError):
    cli.parse(sweep.Settings, ["--out=/tmp/x", "--backbone=bert"])
  with pytest.raises(flags.Error):
    cli.parse(layer_ablation.Settings, ["--seeds=0"])  # --out is required
  assert cli.parse(layer_ablation.Settings, ["--out=o", "--tap_sets=none,all"]).tap_sets == (
      "none", "all")
  assert cli.command_line("experiments.sweep", ["--out", "a b"]) == "python -m experiments.sweep --out 'a b'"


def test_sweep_references_only(tmp_path, world):
  argv = ["--out", str(tmp_path), "--shifts", "gender_m_to_f,time_later", "--datasets",
          "movielens_100k", "--data_dir", world, "--references_only"]
  result = run_sweep(argv)
  assert sorted(result["baselines"]) == ["movielens_100k.gender_m_to_f",
                                         "movielens_100k.time_later"]
  md = (tmp_path / "results.md").read_text()
  item = result["baselines"]["movielens_100k.time_later"]["item bias"]
  assert (f"{item['validation']:.3f} / {item['id_test']:.3f} / {item['ood_test']:.3f}" in md)
  assert not (tmp_path / "runs").exists()


def test_collapsed_runs_are_flagged():
  mean = {"id_test": 1.0956, "ood_test": 1.171}
  assert sweep.is_collapsed({"id_rmse": 1.09561, "ood_rmse": 1.17099}, mean)
  assert sweep.is_collapsed({"id_rmse": 1.0, "ood_rmse": 1.1, "id_pred_std": 2e-4}, mean)
  assert not sweep.is_collapsed({"id_rmse": 1.0, "ood_rmse": 1.1, "id_pred_std": 0.4}, mean)
  recs = _records({("a", "FT"): [(1.0, 1.6)], ("a", "LP"): [(1.2, 1.3)],
                   ("a", "Scratch"): [(1.1, 1.4)], ("a", "LEVI"): [(1.0, 1.2)]})
  recs[0]["collapsed"] = True
  md = sweep.markdown(sweep.summarize(recs), ["FT", "LP", "Scratch", "LEVI"], "# t",
                      records=recs)
  assert "| a | 1.000 / 1.600 † |" in md and "Collapsed runs (constant predictions)" in md


def _records(values):
  """{(task, column): [ (id, ood), per seed ]} -> sweep records."""
  return [{"task": t, "column": c, "seed": k, "id_rmse": i, "ood_rmse": o, "val_rmse": i}
          for (t, c), seeds in values.items() for k, (i, o) in enumerate(seeds)]


def test_sweep_tables():
  recs = _records({
      ("a", "FT"): [(1.0, 1.6), (1.0, 1.4)], ("a", "LP"): [(1.2, 1.3), (1.2, 1.3)],
      ("a", "Scratch"): [(1.1, 1.4), (1.1, 1.4)], ("a", "LEVI"): [(1.02, 1.35), (1.0, 1.05)],
      ("b", "FT"): [(1.0, 1.0)], ("b", "LP"): [(1.0, 1.1)], ("b", "Scratch"): [(1.0, 1.2)],
      ("b", "LEVI"): [(1.1, 1.1)]})
  s = sweep.summarize(recs)
  ft_a = next(r for r in s if r["task"] == "a" and r["column"] == "FT")
  assert ft_a["ood_mean"] == pytest.approx(1.5) and ft_a["seeds"] == 2
  assert ft_a["ood_std"] == pytest.approx(np.std([1.6, 1.4], ddof=1))
  cols = ["FT", "LP", "Scratch", "LEVI"]
  # a: OOD ranks 4, 2, 3, 1; b: 1, 2.5 (tie), 4, 2.5.
  assert sweep.average_ranks(s, cols) == pytest.approx(
      {"FT": 2.5, "LP": 2.25, "Scratch": 3.5, "LEVI": 1.75})
  imp = sweep.improvement(s)
  assert imp["per_shift"] == pytest.approx({"a": 20.0, "b": -10.0}) and imp["wins"] == 1
  ans = sweep.figure1_answer(s, id_tolerance=0.05, records=recs)
  assert ans["a"]["ft_worst"] and ans["a"]["levi_best_ood"] and ans["a"]["levi_id_ok"]
  assert ans["a"]["levi_ood_margin"] == pytest.approx(0.1) and ans["a"]["best_other_ood"] == "LP"
  # LEVI's mean is the best, but it beats LP on one seed of two (1.35 > 1.3).
  assert ans["a"]["seeds_levi_beats_best_other"] == (1, 2)
  assert ans["a"]["seeds_levi_beats_ft"] == (2, 2)
  assert not ans["b"]["ft_worst"] and not ans["b"]["levi_best_ood"]
  assert ans["b"]["levi_id_gap"] == pytest.approx(0.1) and not ans["b"]["levi_id_ok"]
  md = sweep.markdown(s, cols, "# t", id_tolerance=0.05, records=recs)
  assert "| a | 1.000 ± 0.000 / 1.500 ± 0.141 |" in md and "**1.200 ± 0.212**" in md
  base = {"a": {"train mean": {"id_test": 1.3, "ood_test": 1.45},
                "item bias": {"id_test": 1.1, "ood_test": 1.3}},
          "b": {"train mean": {"id_test": 1.0, "ood_test": 1.15},
                "item bias": {"id_test": 1.0, "ood_test": 1.05}}}
  with_mean = sweep.markdown(s, cols, "# t", id_tolerance=0.05, records=recs, baselines=base)
  assert "| shift | FT | LP | Scratch | LEVI | train mean | item bias |" in with_mean
  assert "| 1.300 / 1.450 | 1.100 / 1.300 |" in with_mean
  # OOD below the mean predictor: FT on b; LP on a and b; Scratch on a; LEVI on a and b.
  assert ("`train mean` reference's (shifts below / shifts run): FT 1/2, LP 2/2, Scratch 1/2, "
          "LEVI 2/2.") in with_mean
  # Below item bias: FT on b (1.0 < 1.05), LP on a (1.3 < 1.3 is not), LEVI on a.
  assert ("`item bias` reference's (shifts below / shifts run): FT 1/2, LP 0/2, Scratch 0/2, "
          "LEVI 1/2.") in with_mean
  assert "| a | yes | yes (+0.1000 vs LP) | 1/2 | 2/2 | +1.0% |" in md
  assert "1 of 2 shifts" in md and "LEVI lower on 1 of 2 shifts" in md
  # Without FT, LEVI is still compared with the baselines; LEVI variants are not baselines.
  no_ft = _records({("c", "LP"): [(1.2, 1.3)], ("c", "Scratch"): [(1.1, 1.25)],
                    ("c", "LEVI"): [(1.1, 1.2)], ("c", "LEVI-layerwise"): [(1.0, 1.1)]})
  refs = {"c": {"item bias": {"id_test": 1.1, "ood_test": 1.15},
                "train mean": {"id_test": 1.3, "ood_test": 1.4}}}
  c = sweep.figure1_answer(sweep.summarize(no_ft), records=no_ft, baselines=refs)["c"]
  assert c["ft_worst"] is None and c["levi_best_ood"] and c["best_other_ood"] == "Scratch"
  assert c["best_reference"] == "item bias" and not c["levi_beats_references"]
  assert "seeds_levi_beats_ft" not in c
  md_c = sweep.markdown(sweep.summarize(no_ft), ["FT", "LP", "Scratch", "LEVI", "LEVI-layerwise"],
                        "# t", records=no_ft, baselines=refs)
  assert "| c | - | yes (+0.0500 vs Scratch) | 1/1 | - |" in md_c
  assert "0 of 0 shifts with FT" in md_c and "below every classical reference's too: 0 of 1" in md_c
  # The LEVI default is chosen on validation: LEVI-layerwise's 1.0 < LEVI's 1.1.
  assert "chosen: **LEVI-layerwise**" in md_c
  assert driver.tasks_for(["all"], ["movielens_100k", "amazon_2018"]).__len__() == 27
  assert driver.tasks_for(["time_later"], ["movielens_100k", "amazon_2018"]) == [
      "movielens_100k.time_later", "amazon_2018.time_later"]
  with pytest.raises(ValueError, match="gender_m_to_f"):
    driver.tasks_for(["gender_m_to_x"], ["movielens_100k"])


def test_layer_ablation_end_to_end(tmp_path, world):
  assert layer_ablation.tap_sets(4) == {"none": (), "last": (3,), "middle": (1,),
                                        "middle+last": (1, 3), "every_other": (0, 2),
                                        "all": (0, 1, 2, 3)}
  argv = ["--out", str(tmp_path), "--seeds", "0", "--steps", "2", "--tap_sets", "none,all",
          "--backbone", "random", "--data_dir", world, *TINY_ARGS]
  settings = cli.parse(layer_ablation.Settings, argv)
  result = driver.run(layer_ablation.STUDY, settings, "cmd")
  assert [r["tap_set"] for r in result["summary"]] == ["none", "all"]
  assert [r["layers"] for r in result["summary"]] == ["", "0 1"]
  run_dir = tmp_path / "runs/movielens_100k.gender_m_to_f"
  (none_dir,) = (run_dir / "none").glob("seed0-*")  # keyed by the run's config
  (all_dir,) = (run_dir / "all").glob("seed0-*")
  none = json.load(open(none_dir / "results.json"))
  every = json.load(open(all_dir / "results.json"))
  assert none["params_total"] < every["params_total"]  # no backbone at all
  assert none["method"] == "scratch" and every["method"] == "levi"
  assert every["tap_cache"]["used"]
  assert len(rows(tmp_path / "runs.csv")) == 2 and len(rows(tmp_path / "summary.csv")) == 2
  assert "| all | 0 1 |" in (tmp_path / "results.md").read_text()
  assert (tmp_path / "results.png").stat().st_size > 5_000
  mtime = os.path.getmtime(all_dir / "results.json")
  again = driver.run(layer_ablation.STUDY, settings, "cmd")  # resumes: nothing retrains
  assert again["summary"] == result["summary"]
  assert os.path.getmtime(all_dir / "results.json") == mtime
  # Other settings in the same runs folder train new runs instead of reading the old ones.
  longer = cli.parse(layer_ablation.Settings, [*argv, "--steps", "3", "--tap_sets", "all"])
  driver.run(layer_ablation.STUDY, longer, "cmd")
  dirs = sorted((run_dir / "all").glob("seed0-*"))
  assert len(dirs) == 2 and all_dir in dirs
  steps = sorted(json.load(open(d / "results.json"))["num_steps"] for d in dirs)
  assert steps == [2, 3]


def test_layer_ablation_tables_per_shift_and_refuses_a_learning_rate_grid():
  recs = [{"task": f"movielens_100k.{t}", "seed": k, "tap_set": n, "layers": "",
           "id_rmse": 1.0 + 0.01 * k, "ood_rmse": ood + 0.01 * k, "val_rmse": 1.0}
          for t, n, ood in (("a", "none", 1.2), ("a", "all", 1.1), ("b", "none", 1.0),
                            ("b", "all", 1.3)) for k in (0, 1)]
  table = layer_ablation.per_shift_table(recs, ["none", "all"],
                                         ["movielens_100k.a", "movielens_100k.b"])
  assert "| tap set | a | b |" in table
  assert "| none | 1.005 / 1.205 | 1.005 / **1.005** |" in table
  assert "| all | 1.005 / **1.105** | 1.005 / 1.305 |" in table
  with pytest.raises(ValueError, match="one learning rate per method"):
    cli.parse(layer_ablation.Settings, ["--out", "/tmp/x", "--lr_grid", "levi=1e-3,3e-3"])
  cli.parse(layer_ablation.Settings, ["--out", "/tmp/x", "--lr_grid", "levi=1e-3;scratch=3e-3"])


def test_efficiency_end_to_end(tmp_path, world):
  argv = ["--out", str(tmp_path), "--steps", "1", "--warmup", "0", "--e2e_steps", "0",
          "--variants", "LEVI,LEVI-cached", "--backbone", "random",
          f"--gin.DATA_DIR='{world}'", *TINY_ARGS]
  report = efficiency.run(cli.parse(efficiency.Settings, argv), "cmd")
  v = {r["variant"]: r for r in report["variants"]}
  assert list(v) == ["LEVI", "LEVI-cached"]
  assert v["LEVI"]["params_trained"] < v["LEVI"]["params_total"]
  assert v["LEVI-cached"]["params_trained"] == v["LEVI"]["params_trained"]
  assert v["LEVI-cached"]["cache_rows"] > 0
  for r in v.values():
    assert r["step_s"] > 0 and r["inference_us_per_example"] > 0 and r["rss_peak_mb"] > 0
  md = (tmp_path / "results.md").read_text()
  assert "| LEVI-cached |" in md and "Cached taps: a LEVI train step" in md
  assert len(rows(tmp_path / "results.csv")) == 2 and (tmp_path / "results.png").exists()
  e2e = {k: {"wall_s": w, "train_time_s": w / 2, "examples_per_s": 1.0, "tap_cache_s": 0.0,
             "tap_cache_hits": 0, "ood_rmse": 1.0, "final_train_loss": 0.5}
         for k, w in (("uncached", 30.0), ("cold cache", 20.0), ("warm cache", 10.0))}
  md = efficiency.markdown({**report, "end_to_end": e2e})
  assert "of the whole run (warm cache): 3.0x; cold cache: 1.5x" in md


def test_demo_gin_uses_the_committed_checkpoint(tmp_path, monkeypatch):
  manifest = json.load(open(CHECKPOINT + ".json"))
  monkeypatch.chdir(tmp_path)  # the relative path is resolved from the repository root
  gin.clear_config()
  gin_utils.parse(["experiments/demo.gin"], ["MODEL_DIR = '/unused'"],
                  gin_utils.GIN_SEARCH_PATHS)
  path = gin.query_parameter("%INITIAL_CHECKPOINT_PATH")
  assert paths.shipped_path(path) == CHECKPOINT
  assert "pre-trained, from experiments/checkpoints/synthetic_t5_small" == demo.backbone_note()
  assert gin.query_parameter("%BACKBONE") == manifest["backbone"]
  assert gin.query_parameter("trainer.ModelConfig.backbone_overrides") == {
      **manifest["backbone_overrides"], "vocab_size": manifest["vocab_size"]}
  assert gin.query_parameter("%SEQ_LENGTH") == manifest["seq_length"]
  gin.clear_config()


@pytest.mark.slow
def test_pretraining_rerun_starts_like_the_committed_run(tmp_path):
  """Re-running the script for a few steps reads the same batches and logs the same losses."""
  committed = json.load(open(CHECKPOINT + ".json"))
  assert committed["command"] == ("python -m experiments.pretrain_synthetic "
                                  "--out experiments/checkpoints/synthetic_t5_small")
  cfg = pretrain_synthetic.PretrainConfig(steps=10, log_every=5)
  rerun = pretrain_synthetic.pretrain(str(tmp_path / "ck"), cfg, measure=False)
  # The world's vocabulary is regenerated here from the world's text: it must be
  # the one the committed backbone carries (and was trained with).
  assert rerun["vocabulary_sha256"] == committed["vocabulary_sha256"]
  # Token ids, feature ids and targets are exact, so their hashes are asserted.
  changed = sorted(k for k, v in rerun["first_batches_sha256_per_array"].items()
                   if committed["first_batches_sha256_per_array"].get(k) != v)
  assert not changed, f"arrays of the first batches that changed: {changed}"
  assert rerun["first_batches_sha256"] == committed["first_batches_sha256"]
  # Both runs are inside the warmup, which does not depend on the number of steps.
  assert [s for s, _ in rerun["losses"]] == [5, 10]
  np.testing.assert_allclose([l for _, l in rerun["losses"]],
                             [l for _, l in committed["losses"][:2]], rtol=1e-4)
  tree = checkpointing.restore_tree(str(tmp_path / "ck"))
  assert sorted(tree) == ["backbone", "head"]


@pytest.mark.slow
def test_committed_backbone_carries_the_prestige_bias():
  manifest = json.load(open(CHECKPOINT + ".json"))
  tree = checkpointing.restore_tree(CHECKPOINT)
  assert checkpointing.tree_hash(tree["backbone"]) == manifest["backbone_sha256"]
  assert pretrained.checkpoint_vocabulary(CHECKPOINT).sha256 == manifest["vocabulary_sha256"]
  effect = pretrain_synthetic.prestige_effect(CHECKPOINT, max_rows=2000)
  # In the fine-tuning world prestige says nothing about the rating, yet the
  # pre-trained probe rates prestige titles up. On 2000 rows (a few hundred
  # prestige titles) the actual-rating difference is zero up to sampling noise
  # of about 0.08 stars; over all 18,016 rows it is +0.026 (checkpoints/README.md).
  assert abs(effect["true"]) < 0.25
  assert effect["counterfactual"] > 0.3 and effect["observed"] - effect["true"] > 0.3


@pytest.mark.parametrize("files,backbone,batch,fsdp", [
    (["experiments/paper_t5_1_1_base.gin", "experiments/paper_movielens_1m.gin"],
     "t5_1_1_base", 512, False),
    (["experiments/paper_t5_1_1_base.gin", "experiments/paper_t5_1_1_large.gin",
      "experiments/paper_amazon.gin"], "t5_1_1_large", 256, True)])
def test_paper_scale_gin_files_bind_t5x_backbones(files, backbone, batch, fsdp):
  """The paper-scale configs (not run here) parse and bind what experiments/README.md says."""
  from levi_jax import partitioning, trainer
  from levi_jax.checkpoints import backbones
  gin.clear_config()
  gin_utils.parse(files + ["methods/levi.gin"], ["MODEL_DIR = '/unused'"],
                  gin_utils.GIN_SEARCH_PATHS)
  model = gin.get_configurable(trainer.ModelConfig)()
  data = gin.get_configurable(trainer.DataConfig)()
  mesh = gin.get_configurable(partitioning.MeshConfig)()
  pre = model.pretrained
  assert isinstance(pre, backbones.PretrainedConfig) and pre.format == "t5x"
  assert pre.preset == backbone and pre.dtype == model.dtype == "bfloat16"
  assert pre.path == f"/data/t5x/{backbone}/checkpoint_1000000"
  assert pre.vocabulary.endswith("cc_all.32000.100extra/sentencepiece.model")
  assert data.batch_size == batch and data.seq_length == 128
  assert (mesh.data, mesh.model, mesh.fsdp) == (-1, 1, fsdp)
  assert model.method == "levi"
  task = data.task.split(".")[0]
  assert task == ("movielens_1m" if "paper_movielens_1m" in files[-1] else "amazon_2018")
  gin.clear_config()


def test_backbone_choices_bind_what_they_say():
  """`--backbone config|random|minilm`: the demo's checkpoint, none, the packaged MiniLM."""
  from levi_jax import trainer
  seen = {}
  for name in ("config", "random", "minilm"):
    gin.clear_config()
    gin_utils.parse(["experiments/demo.gin"],
                    runs.run_bindings("/unused", "levi", "movielens_100k.gender_m_to_f", 0,
                                      backbone=name), gin_utils.GIN_SEARCH_PATHS)
    pre = gin.get_configurable(trainer.ModelConfig)().pretrained
    seen[name] = (gin.query_parameter("%INITIAL_CHECKPOINT_PATH"),
                  pre.format if pre is not None else None)
  gin.clear_config()
  assert seen == {"config": ("experiments/checkpoints/synthetic_t5_small", None),
                  "random": (None, None), "minilm": (None, "minilm_l6")}
  with pytest.raises(ValueError, match="unknown backbone 'bert'"):
    runs.run_bindings("/unused", "levi", "t", 0, backbone="bert")


@pytest.mark.slow
def test_demo_data_is_what_readme_table_was_made_with():
  """README's demo table names the data digest; the demo's data path still yields it."""
  committed = json.load(open(os.path.join(ROOT, "experiments", "results", "demo",
                                          "data_sha256.json")))
  got = demo.data_digests()
  changed = sorted(k for k in committed if k != "all" and got.get(k) != committed[k])
  assert not changed, f"arrays of the demo's data that changed since README's table: {changed}"
  assert got == committed
  readme = open(os.path.join(ROOT, "README.md")).read()
  assert f"data digest `{committed['all'][:16]}`" in readme


def test_progress_lines_print_when_stdout_is_not_a_terminal(capsys):
  import logging
  from levi_jax import metric_logging
  logger = logging.getLogger("levi_jax")
  level, propagate = logger.level, logger.propagate
  try:
    runs.progress_logging()
    runs.progress_logging()  # idempotent: one handler
    progress = metric_logging.Progress(10, 0, 4, 1)
    progress.update(5, 0.5)
    out = capsys.readouterr().out
    assert out.count("step 5/10 loss 0.5000") == 1
  finally:
    logger.handlers = [h for h in logger.handlers if type(h).__name__ != "Stdout"]
    logger.setLevel(level)
    logger.propagate = propagate
