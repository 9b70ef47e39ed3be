"""Gin files, command lines, bad-input messages, the report and the demo."""

import glob
import json
import re
import os
import subprocess
import sys

import gin
import pytest

from levi_jax import cli, gin_utils, quiet, report, trainer
from levi_jax.data import inspect, synthetic_scale

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN_DIR = os.path.join(ROOT, "gin")
# gin/t5x/ holds files for T5X's own train.py/eval.py; tests/test_t5x_integration.py runs them.
GIN_FILES = sorted(name for name in (os.path.relpath(p, GIN_DIR) for p in glob.glob(
    os.path.join(GIN_DIR, "**", "*.gin"), recursive=True)) if not name.startswith("t5x/"))


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.mark.parametrize("name", GIN_FILES)
def test_every_gin_file_parses(name):
  """Each file parses on top of the run defaults and builds valid configs."""
  files = [name] if name.startswith("runs/") else ["runs/train.gin", name]
  bindings = ["MODEL_DIR = '/tmp/unused'", "CHECKPOINT_PATH = '/tmp/unused'"]
  gin_utils.parse(files, bindings, gin_utils.GIN_SEARCH_PATHS)
  for cls in (trainer.ModelConfig, trainer.DataConfig, trainer.LoopConfig):
    assert isinstance(gin.get_configurable(cls)(), cls)


def test_gin_flags_are_rewritten():
  assert gin_utils.rewrite_gin_args(["prog", "--gin.TRAIN_STEPS=5", "--gin_file=a.gin"]) == [
      "prog", "--gin_bindings=TRAIN_STEPS=5", "--gin_file=a.gin"]
  with pytest.raises(ValueError, match="has no value"):
    gin_utils.rewrite_gin_args(["--gin.TRAIN_STEPS"])


def test_unknown_binding_is_named():
  with pytest.raises(ValueError, match=r"bad gin binding 'trainer.ModelConfig.tapz = \(1,\)'"):
    gin_utils.parse(["runs/train.gin"], ["MODEL_DIR='/x'", "trainer.ModelConfig.tapz = (1,)"],
                    gin_utils.GIN_SEARCH_PATHS)


def test_missing_required_binding_is_named():
  with pytest.raises(ValueError, match="MODEL_DIR"):
    gin_utils.parse(["runs/train.gin"], [], gin_utils.GIN_SEARCH_PATHS)


def test_misspelled_macro_is_named_with_close_matches():
  with pytest.raises(ValueError, match=r"read by nothing \(misspelled\?\): TRAIN_STEP "
                                       r"\(did you mean TRAIN_STEPS"):
    gin_utils.parse(["runs/train.gin"], ["MODEL_DIR = '/x'", "TRAIN_STEP = 5"],
                    gin_utils.GIN_SEARCH_PATHS)
  gin.clear_config()
  # A macro read only through another macro, or by the code, is in use.
  gin_utils.parse(["runs/train.gin"], ["MODEL_DIR = '/x'", "STEPS2 = 7", "TRAIN_STEPS = %STEPS2"],
                  gin_utils.GIN_SEARCH_PATHS)
  assert gin.query_parameter("trainer.LoopConfig.num_steps") is not None


def test_missing_gin_file_is_named():
  with pytest.raises(FileNotFoundError, match="gin file 'runs/nope.gin' not found"):
    gin_utils.parse(["runs/nope.gin"], [], gin_utils.GIN_SEARCH_PATHS)


def test_bad_config_values_are_named():
  with pytest.raises(ValueError, match="unknown method 'levy'.*did you mean levi"):
    trainer.ModelConfig(method="levy")
  with pytest.raises(ValueError, match="unknown preset 't5_1_1_huge'"):
    trainer.ModelConfig(backbone="t5_1_1_huge")


def test_unknown_task_lists_close_matches(tmp_path):
  with pytest.raises(ValueError, match=r"movielens_100k\.gender_m_to_f"):
    trainer.train(str(tmp_path), data=trainer.DataConfig(task="movielens_100k.gender_m_to_x"))
  assert not (tmp_path / "checkpoints").exists()


def _results(tmp_path, name, method, ood):
  d = tmp_path / name
  d.mkdir()
  r = {"method": method, "task": "t", "params_trained": 10, "params_total": 100,
       "wall_time_s": 2.0, "train_time_s": 1.0, "examples_per_s": 50.0,
       "metrics": {"id_test": {"rmse": 0.9}, "ood_test": {"rmse": ood}}}
  (d / "results.json").write_text(json.dumps(r))


def test_every_command_takes_absl_flags_from_its_settings():
  """One command-line style: flags (and report's positional folders) parse into settings."""
  assert cli.parse(report.Settings, ["a", "--out", "o", "b"]) == report.Settings(("a", "b"), "o")
  with pytest.raises(ValueError, match="give dirs"):
    cli.parse(report.Settings, ["--out", "o"])
  assert cli.parse(synthetic_scale.Settings, ["--out=d", "--ratings=5", "--categories=A,B"]
                   ).categories == ("A", "B")
  with pytest.raises(ValueError, match="give one of --list and --task"):
    cli.parse(inspect.Settings, ["--list", "--task=x"])
  with pytest.raises(ValueError, match="unexpected arguments"):
    cli.parse(inspect.Settings, ["--list", "extra"])


def test_report_table_and_chart(tmp_path):
  _results(tmp_path, "a", "levi", 1.1)
  _results(tmp_path, "b", "ft", 1.3)
  report.main([str(tmp_path), "--out", str(tmp_path / "rep")])
  md = (tmp_path / "rep" / "results.md").read_text()
  assert "| levi | t | - | 0.9000 | 1.1000 | 10 / 100 |" in md
  assert "| ft | t | - | 0.9000 | 1.3000 |" in md
  assert (tmp_path / "rep" / "results.png").stat().st_size > 1000
  with pytest.raises(FileNotFoundError, match="no results.json"):
    report.find_results([str(tmp_path / "rep")])


def _cli(*args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, timeout=timeout,
                        capture_output=True, text=True)


@pytest.mark.slow
def test_train_then_eval_command_lines(tmp_path):
  """The README's commands: train, then evaluate the checkpoint it wrote."""
  common = ["--gin_file=runs/train.gin", "--gin_file=methods/levi.gin",
            "--gin.TRAIN_STEPS=6", "--gin.BATCH_SIZE=16", "--gin.SEQ_LENGTH=24"]
  out = _cli("levi_jax.train", *common, f"--gin.MODEL_DIR='{tmp_path}'")
  assert out.returncode == 0, out.stderr[-3000:]
  noise = [line for line in out.stderr.splitlines() if any(n in line for n in quiet.NOISE)]
  assert not noise, noise  # TensorFlow's start-up notes are dropped
  trained = json.load(open(tmp_path / "results.json"))
  assert (tmp_path / "config.gin").exists() and (tmp_path / "operative_config.gin").exists()
  assert "trainer.LoopConfig.num_steps = 6" in (tmp_path / "config.gin").read_text() or \
      "TRAIN_STEPS = 6" in (tmp_path / "config.gin").read_text()
  ev = _cli("levi_jax.eval", "--gin_file=runs/eval.gin", *common[1:],
            f"--gin.CHECKPOINT_PATH='{tmp_path}/checkpoints/6'")
  assert ev.returncode == 0, ev.stderr[-3000:]
  evaluated = json.load(open(tmp_path / "eval_results.json"))
  assert evaluated["metrics"] == trained["metrics"]
  # Without gin files: the run's own config.gin, whatever files made it.
  own = _cli("levi_jax.eval", f"--checkpoint_path={tmp_path}", f"--output_dir={tmp_path}/own")
  assert own.returncode == 0, own.stderr[-3000:]
  assert json.load(open(tmp_path / "own/eval_results.json"))["metrics"] == trained["metrics"]
  bad = _cli("levi_jax.train", *common, f"--gin.MODEL_DIR='{tmp_path}/x'",
             "--gin.trainer.ModelConfig.adapter_dimm=3")
  assert bad.returncode != 0 and "adapter_dimm" in bad.stderr
  # Another method in this MODEL_DIR is refused, and the run's record is left as it was.
  record = (tmp_path / "config.gin").read_text()
  other = _cli("levi_jax.train", "--gin_file=runs/train.gin", "--gin_file=methods/ft.gin",
               *common[2:], f"--gin.MODEL_DIR='{tmp_path}'")
  assert other.returncode != 0 and "of a different model" in other.stderr
  assert (tmp_path / "config.gin").read_text() == record


@pytest.mark.slow
def test_installed_package_runs_from_any_directory(tmp_path):
  """A non-editable `pip install .`: gin files and the demo's checkpoint ship
  inside the package, so training with them works from `/`."""
  import shutil
  import site
  src = tmp_path / "src"
  shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
      ".git", ".venv", "build", "*.egg-info", "__pycache__", "results", "demo_out", "out"))
  target = tmp_path / "site"
  pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--no-build-isolation", "--target", str(target), str(src)],
                       capture_output=True, text=True, timeout=300)
  assert pip.returncode == 0, pip.stderr[-3000:]
  installed = target / "levi_jax"
  assert (installed / "gin" / "runs" / "train.gin").is_file()
  assert (installed / "demo_checkpoint" / "vocabulary.json").is_file()
  # -S: no site processing, so the editable install of this checkout is not on
  # the path; the dependencies come from this environment's site-packages.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(target), *site.getsitepackages()]))
  model_dir = tmp_path / "run"
  run = subprocess.run(
      [sys.executable, "-S", "-m", "levi_jax.train", "--gin_file=runs/train.gin",
       "--gin_file=experiments/demo.gin", "--gin.METHOD='lp'", "--gin.TRAIN_STEPS=2",
       "--gin.BATCH_SIZE=8", f"--gin.MODEL_DIR='{model_dir}'"],
      cwd="/", env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  results = json.load(open(model_dir / "results.json"))
  assert results["num_steps"] == 2 and results["frozen_hash"].startswith("fp1:")
  assert results["params_trained"] < results["params_total"]  # LP: the backbone is frozen
  # It read the shipped copy of the checkpoint, not this checkout's.
  probe = subprocess.run(
      [sys.executable, "-S", "-c", "import levi_jax; from levi_jax.data import paths; "
       "print(paths.shipped_path('experiments/checkpoints/synthetic_t5_small'))"],
      cwd="/", env=env, capture_output=True, text=True, timeout=120)
  assert probe.stdout.strip() == str(installed / "demo_checkpoint"), probe.stderr[-2000:]


def test_filtered_stderr_drops_noise_and_keeps_the_rest(capfd):
  with quiet.filtered_stderr(("oneDNN custom operations",)):
    os.write(2, b"I0000 port.cc:153] oneDNN custom operations are on.\n")
    os.write(2, b"a real warning\n")
  with pytest.raises(RuntimeError, match="boom"):
    with quiet.filtered_stderr():
      os.write(2, b"said before the error\n")
      raise RuntimeError("boom")
  err = capfd.readouterr().err
  assert "oneDNN" not in err and "a real warning\n" in err and "said before the error" in err


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
  out = _cli("levi_jax.demo", "--out", str(tmp_path), "--methods", "lp,scratch,levi",
             "--gin.TRAIN_STEPS=4", "--gin.BATCH_SIZE=16")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Backbone: pre-trained, from experiments/checkpoints/synthetic_t5_small." in out.stdout
  md = (tmp_path / "results.md").read_text()
  for m in ("lp", "scratch", "levi"):
    assert f"| {m} | movielens_100k.gender_m_to_f |" in md
  assert (tmp_path / "results.png").exists()


def test_readme_python_example_runs(capsys):
  """The README's Python example runs as written and takes a finite step."""
  text = open(os.path.join(ROOT, "README.md")).read()
  code = text.split("```python\n", 1)[1].split("```", 1)[0]
  exec(compile(code, "README.md", "exec"), {})
  assert float(capsys.readouterr().out.strip().splitlines()[-1]) > 0


def test_readme_gin_files_exist():
  text = open(os.path.join(ROOT, "README.md")).read()
  for name in set(re.findall(r"--gin_file=([\w/]+\.gin)", text)):
    assert os.path.isfile(os.path.join(GIN_DIR, name)), name
