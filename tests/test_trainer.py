"""Trainer tests on a tiny in-memory task: methods, freezing, resume, NaN guard."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from levi_jax import (checkpointing, evaluator, input_pipeline, methods, partitioning,
                      train_setup, trainer)
from levi_jax.checkpointing import CheckpointConfig
from levi_jax.optim import OptimizerConfig

from trainer_fixtures import task_data

SMALL = dict(adapter_dim=16, fusion_hidden=(16,), task_hidden=(16,))


def run(model_dir, method="levi", steps=12, lr=3e-3, model_kw=None, batch_size=16, **kw):
  kw.setdefault("checkpoint", CheckpointConfig(every_steps=steps, async_save=False))
  kw.setdefault("task_data", task_data())
  return trainer.train(
      str(model_dir), model=trainer.ModelConfig(method=method, **SMALL, **(model_kw or {})),
      data=trainer.DataConfig(batch_size=batch_size, eval_batch_size=32),
      optimizer=kw.pop("optimizer", OptimizerConfig(learning_rate=lr, schedule="constant")),
      loop=kw.pop("loop", trainer.LoopConfig(num_steps=steps, log_every=4)), **kw)


def evaluate(model_dir, method="levi", steps=12, model_kw=None, batch_size=16, **kw):
  """`evaluator.evaluate` of MODEL_DIR's checkpoint with the configs `run` trains with."""
  kw.setdefault("task_data", task_data())
  return evaluator.evaluate(
      str(model_dir), model=trainer.ModelConfig(method=method, **SMALL, **(model_kw or {})),
      data=trainer.DataConfig(batch_size=batch_size, eval_batch_size=32),
      loop=kw.pop("loop", trainer.LoopConfig(num_steps=steps, log_every=4)), **kw)


def logged(model_dir, key="train/loss"):
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [(r["step"], r[key]) for r in rows if key in r]


def test_batches_are_a_pure_function_of_step():
  a = input_pipeline.batch_indices(100, 7, 16, seed=3)
  b = input_pipeline.batch_indices(100, 7, 16, seed=3)
  np.testing.assert_array_equal(a, b)
  epoch = np.concatenate([input_pipeline.batch_indices(100, s, 20, 3) for s in range(5)])
  assert sorted(epoch) == list(range(100))  # one epoch sees every row once
  assert not np.array_equal(input_pipeline.batch_indices(100, 5, 20, 3)[:20], epoch[:20])


def test_validation_split_is_disjoint_and_deterministic():
  rows = task_data().train
  rows = dict(rows, row_id=np.arange(len(rows["targets"])))
  train, val = input_pipeline.split_validation(rows, 0.25, seed=1)
  assert len(val["row_id"]) == 64 and len(train["row_id"]) == 192
  assert not set(train["row_id"]) & set(val["row_id"])
  np.testing.assert_array_equal(input_pipeline.split_validation(rows, 0.25, 1)[1]["row_id"],
                                val["row_id"])


def test_eval_batches_cover_each_row_once():
  rows = {"targets": np.arange(70, dtype=np.float32)}
  batches = list(input_pipeline.eval_batches(rows, 32))
  assert len(batches) == 3
  w = np.concatenate([b["weights"] for b in batches])
  t = np.concatenate([b["targets"] for b in batches])
  assert w.sum() == 70 and sorted(t[w > 0]) == list(range(70))


@pytest.mark.parametrize("method", methods.METHODS)
def test_every_method_trains(tmp_path, method):
  # A backbone wide enough that a linear probe of its random features has signal.
  wide = {"emb_dim": 32, "head_dim": 8, "mlp_dim": 64}
  results = run(tmp_path, method, steps=30, lr=1e-2, model_kw={"backbone_overrides": wide},
                batch_size=64, loop=trainer.LoopConfig(num_steps=30, log_every=1))
  losses = [l for _, l in logged(tmp_path)]
  assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses
  for split in ("validation", "id_test", "ood_test"):
    assert np.isfinite(results["metrics"][split]["rmse"])
  assert results["params_trained"] <= results["params_total"]
  saved = json.load(open(tmp_path / "results.json"))
  assert saved["method"] == method and saved["metrics"] == results["metrics"]
  frozen_backbone = method in ("lp", "levi", "lora", "levi_lora", "ensemble")
  assert (results["params_trained"] < results["params_total"]) == frozen_backbone


@pytest.mark.parametrize("method", ["levi", "lp"])
def test_frozen_backbone_is_bit_identical(tmp_path, method):
  results = run(tmp_path, method)
  m = train_setup.build_method(trainer.ModelConfig(method=method, **SMALL), task_data())
  first = {k: v[:16] for k, v in task_data().train.items()}
  init_rng, _ = jax.random.split(jax.random.PRNGKey(0))
  # The initial values, created the way the trainer creates them (jit, sharded).
  params, _ = partitioning.sharded_init(lambda: m.init(init_rng, first),
                                        partitioning.make_mesh(), partitioning.LOGICAL_RULES)
  _, frozen = methods.partition(params, m.stages[0].frozen)
  assert results["frozen_hash"] == checkpointing.tree_fingerprint(frozen)
  # Not written into the training checkpoint either.
  step_dir = tmp_path / "checkpoints" / "12" / "state"
  restored = ocp.StandardCheckpointer().restore(str(step_dir))
  assert "backbone" not in restored["params"]


def test_eval_writes_only_to_its_output_dir(tmp_path):
  run_dir, out = tmp_path / "run", tmp_path / "eval_out"
  trained = run(run_dir, "scratch", steps=4)
  before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
  evaluated = evaluate(run_dir, "scratch", steps=4, output_dir=str(out))
  assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before  # nothing written
  assert json.load(open(out / "eval_results.json"))["metrics"] == evaluated["metrics"]
  assert evaluated["metrics"] == trained["metrics"]
  (tmp_path / "a_file").write_text("")
  with pytest.raises(PermissionError, match="not a writable folder; give another"):
    evaluate(run_dir, "scratch", steps=4, output_dir=str(tmp_path / "a_file" / "x"))


def test_model_dir_with_another_model_fails_before_training(tmp_path):
  run(tmp_path, "levi", steps=4)
  with pytest.raises(ValueError, match=r"holds a checkpoint \(step 4\) of a different model"):
    run(tmp_path, "ft", steps=4)


def test_resume_with_other_training_settings_is_refused(tmp_path):
  run(tmp_path, "scratch", steps=4, lr=3e-3,
      checkpoint=CheckpointConfig(every_steps=2, async_save=False),
      loop=trainer.LoopConfig(num_steps=2, log_every=1))
  before = sorted(p.name for p in tmp_path.iterdir())
  with pytest.raises(ValueError, match=r"trained with other settings.*"
                     r"optimizer.learning_rate: 0.003 \(checkpoint\) -> 0.01 \(this run\)"):
    run(tmp_path, "scratch", steps=4, lr=1e-2,
        loop=trainer.LoopConfig(num_steps=2, log_every=1))
  with pytest.raises(ValueError, match=r"batch_size: 16 \(checkpoint\) -> 32 \(this run\)"):
    run(tmp_path, "scratch", steps=4, lr=3e-3, batch_size=32,
        loop=trainer.LoopConfig(num_steps=2, log_every=1))
  assert sorted(p.name for p in tmp_path.iterdir()) == before
  # Evaluation needs only the same model: other training settings are fine there.
  ev = evaluate(tmp_path, "scratch", batch_size=32,
                loop=trainer.LoopConfig(num_steps=2, log_every=1))
  assert ev["metrics"]["validation"]["rmse"] > 0


def _damage(step_dir, how):
  state = step_dir / "state"
  if how == "truncated":
    data = max((p for p in state.rglob("*") if p.is_file() and "d" in p.parent.name),
               key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
  elif how == "missing_d":
    import shutil
    shutil.rmtree(state / "d")
  else:
    (state / "_METADATA").write_text("")


@pytest.mark.parametrize("how", ["truncated", "missing_d", "empty_metadata"])
def test_damaged_newest_checkpoint_falls_back_and_is_kept_aside(tmp_path, how, caplog):
  loop = trainer.LoopConfig(num_steps=4, log_every=1)
  ckpt_cfg = CheckpointConfig(every_steps=2, keep=2, async_save=False)
  run(tmp_path, "scratch", steps=4, loop=loop, checkpoint=ckpt_cfg)
  (tmp_path / "results.json").unlink()
  _damage(tmp_path / "checkpoints" / "4", how)
  with pytest.raises(checkpointing.DamagedCheckpointError, match="checkpoints/4 does not restore"):
    run(tmp_path, "scratch", steps=4, loop=loop,
        checkpoint=CheckpointConfig(every_steps=2, keep=2, async_save=False,
                                    fallback_on_damage=False))
  assert (tmp_path / "checkpoints" / "4").exists()  # strict: nothing moved
  with caplog.at_level("WARNING", logger="levi_jax"):
    results = run(tmp_path, "scratch", steps=4, loop=loop, checkpoint=ckpt_cfg)
  assert "checkpoints/4 does not restore" in caplog.text and "resuming from" in caplog.text
  (aside,) = list((tmp_path / "damaged_checkpoints").iterdir())
  assert aside.name.startswith("4-") and (aside / "state").exists()  # kept, not deleted
  assert results["num_steps"] == 4 and sorted(
      checkpointing.Checkpointer(str(tmp_path / "checkpoints")).all_steps()) == [2, 4]
  assert [s for s, _ in logged(tmp_path)][-2:] == [3, 4]  # trained again from step 2


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  with pytest.raises(FloatingPointError, match=r"non-finite training loss .* at step (\d+)"):
    run(tmp_path, "scratch", steps=40,
        optimizer=OptimizerConfig(name="sgd", learning_rate=1e12, clip_norm=None,
                                  schedule="constant"),
        loop=trainer.LoopConfig(num_steps=40, log_every=1),
        checkpoint=CheckpointConfig(every_steps=1, async_save=False))
  steps = checkpointing.Checkpointer(str(tmp_path / "checkpoints")).all_steps()
  assert steps, "no good checkpoint was kept"
  state = ocp.StandardCheckpointer().restore(str(tmp_path / "checkpoints" / str(max(steps))
                                                 / "state"))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))


@pytest.mark.slow
def test_nan_stop_with_async_saves_commits_the_last_checkpoint(tmp_path):
  """The default async saves: the save in flight when the loss turns NaN is
  committed before the process exits, and the error (the last thing printed)
  names the step kept."""
  code = (
      "import sys; sys.path.insert(0, %r)\n"
      "from test_trainer import run\n"
      "from levi_jax import trainer\n"
      "from levi_jax.checkpointing import CheckpointConfig\n"
      "from levi_jax.optim import OptimizerConfig\n"
      "run(%r, 'scratch', steps=40, optimizer=OptimizerConfig(name='sgd', learning_rate=1e12,"
      " clip_norm=None, schedule='constant'), loop=trainer.LoopConfig(num_steps=40, log_every=1),"
      " checkpoint=CheckpointConfig(every_steps=1, async_save=True))\n"
  ) % (os.path.dirname(os.path.abspath(__file__)), str(tmp_path))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode != 0
  last = out.stderr.strip().splitlines()[-1]
  kept = re.search(r"FloatingPointError: non-finite training loss .* The last good "
                   r"checkpoint, step (\d+), is kept", last)
  assert kept, out.stderr[-2000:]
  ckpts = tmp_path / "checkpoints"
  assert not [p.name for p in ckpts.iterdir() if "tmp" in p.name]
  steps = checkpointing.Checkpointer(str(ckpts)).all_steps()
  assert max(steps) == int(kept.group(1))
  state = ocp.StandardCheckpointer().restore(str(ckpts / kept.group(1) / "state"))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))


def test_model_dir_is_locked_by_the_training_process(tmp_path, caplog):
  import socket
  lock_file = tmp_path / checkpointing.ModelDirLock.NAME
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    tmp_path.mkdir(exist_ok=True)
    lock_file.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid,
                                     "since": time.time()}))
    with pytest.raises(checkpointing.ModelDirLockedError,
                       match=f"in use by another training process .*pid {holder.pid}"):
      run(tmp_path, "scratch", steps=2)
    assert not (tmp_path / "checkpoints").exists() and lock_file.exists()
  finally:
    holder.kill()
    holder.wait()
  # The holder is gone: its lock is taken over with a warning, and released at the end.
  with caplog.at_level("WARNING", logger="levi_jax"):
    run(tmp_path, "scratch", steps=2)
  assert f"pid {holder.pid}) is not running" in caplog.text
  assert not lock_file.exists() and (tmp_path / "results.json").exists()
  # A lock on another host can't be checked for liveness: an error naming the file.
  lock_file.write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": 0}))
  with pytest.raises(checkpointing.ModelDirLockedError, match="host elsewhere.*delete"):
    run(tmp_path, "scratch", steps=4)


def test_initial_checkpoint_shape_mismatch_is_listed(tmp_path):
  other = train_setup.build_method(trainer.ModelConfig(
      method="lp", backbone_overrides={"emb_dim": 12}, **SMALL), task_data())
  params = nn.meta.unbox(other.init(jax.random.PRNGKey(0),
                                    {k: v[:4] for k, v in task_data().train.items()}))
  checkpointing.save_tree(str(tmp_path / "pre"), params["backbone"])
  with pytest.raises(ValueError, match=r"pre does not match the model:[\s\S]*wrong shape "
                     r"\(\d+\), checkpoint vs model:[\s\S]*token_embedder/embedding: "
                     r"\(40, 12\) vs \(40, 8\)"):
    run(tmp_path / "run", "levi", initial_checkpoint_path=str(tmp_path / "pre"))
  assert not (tmp_path / "run" / "checkpoints" / "12").exists()


def test_initial_checkpoint_restores_the_backbone(tmp_path):
  src = train_setup.build_method(trainer.ModelConfig(method="lp", **SMALL), task_data())
  params = nn.meta.unbox(src.init(jax.random.PRNGKey(42),
                                  {k: v[:4] for k, v in task_data().train.items()}))
  checkpointing.save_tree(str(tmp_path / "pre"), params["backbone"])
  results = run(tmp_path / "run", "levi", initial_checkpoint_path=str(tmp_path / "pre"))
  assert results["frozen_hash"] == checkpointing.tree_fingerprint({"backbone": params["backbone"]})


@pytest.mark.parametrize("fixture", ["t5x_legacy_f32", "t5x_orbax"])
def test_t5x_checkpoint_as_initial_checkpoint(tmp_path, fixture):
  """INITIAL_CHECKPOINT_PATH takes a checkpoint T5X wrote; the backbone is its encoder."""
  ckpt = os.path.join(os.path.dirname(__file__), "data", "ckpt", "t5x")
  results = run(tmp_path, "levi", steps=4, model_kw={"backbone_overrides": {"vocab_size": 64}},
                initial_checkpoint_path=os.path.join(ckpt, fixture))
  expected = np.load(os.path.join(ckpt, "expected.npz"))
  from flax import traverse_util
  want = traverse_util.unflatten_dict(
      {k[len(fixture) + 1:]: expected[k] for k in expected.files if k.startswith(fixture + "/")},
      sep="/")
  assert results["frozen_hash"] == checkpointing.tree_fingerprint({"backbone": want})


def test_pretrained_minilm_backbone_trains_frozen(tmp_path):
  """ModelConfig.pretrained swaps in the packaged MiniLM (module and weights)."""
  from levi_jax.checkpoints import backbones
  cfg = backbones.PretrainedConfig(format="minilm_l6")
  results = run(tmp_path, "levi", steps=4, model_kw={"pretrained": cfg})
  want = backbones.load_pretrained(cfg).params
  assert results["frozen_hash"] == checkpointing.tree_fingerprint({"backbone": want})
  assert results["params_total"] - results["params_trained"] == sum(
      np.size(x) for x in jax.tree.leaves(want))
  assert np.isfinite(results["metrics"]["ood_test"]["rmse"])


def test_wordpiece_batch_encoding_matches_seqio_encode():
  from levi_jax.checkpoints import backbones
  from levi_jax.data import tokens
  vocab = backbones.load_pretrained(backbones.PretrainedConfig()).vocabulary()
  texts = ["user: 25-34, female, programmer. movie: Toy Story (1995).",
           "Señor Déjà Vu (1998). genres: comedy, crime"]
  got = tokens.tokenize(texts, vocab.vocab_file, 12)
  for row, text in zip(got, texts):
    ids = vocab.encode(text)
    want = (ids[:11] + [vocab.eos_id]) if len(ids) >= 12 else ids + [vocab.eos_id]
    assert list(row[:len(want)]) == want and not row[len(want):].any()


def test_lpft_and_wiseft_two_stages(tmp_path):
  model = trainer.ModelConfig(method="wiseft", wise_alphas=(0.0, 1.0), **SMALL)
  results = trainer.train(str(tmp_path), model=model,
                          data=trainer.DataConfig(batch_size=16, eval_batch_size=32),
                          optimizer=OptimizerConfig(learning_rate=3e-3),
                          loop=trainer.LoopConfig(num_steps=12, log_every=2),
                          checkpoint=CheckpointConfig(every_steps=3, async_save=False),
                          task_data=task_data())
  # alpha=1 is the final (FT) model; alpha=0 the model at the end of the LP stage.
  assert results["wise_ft"]["1"] == results["metrics"]
  lp_end = [r for s, r in logged(tmp_path, "ood_test/rmse") if s == 6]
  assert lp_end and results["wise_ft"]["0"]["ood_test"]["rmse"] == pytest.approx(lp_end[0])
  assert results["wise_ft"]["0"]["ood_test"] != results["metrics"]["ood_test"]


WORKER = os.path.join(os.path.dirname(__file__), "train_worker.py")


def _worker(model_dir, delay, timeout=240):
  env = dict(os.environ, JAX_PLATFORMS="cpu", LEVI_STEP_DELAY=str(delay))
  return subprocess.Popen([sys.executable, WORKER, str(model_dir)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path):
  """A run killed (SIGKILL) mid-training and restarted ends where a clean run ends."""
  clean = _worker(tmp_path / "clean", 0.0)
  killed = _worker(tmp_path / "killed", 0.25)
  try:
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 180
    while time.time() < deadline:
      done = [int(p.name) for p in ckpts.glob("*") if p.name.isdigit()] if ckpts.exists() else []
      if done and max(done) >= 10:
        break
      assert killed.poll() is None, killed.stdout.read().decode()[-3000:]
      time.sleep(0.1)
    killed.send_signal(signal.SIGKILL)
    killed.wait(30)
    assert not (tmp_path / "killed" / "results.json").exists(), "run finished before the kill"
    assert clean.wait(240) == 0, clean.stdout.read().decode()[-3000:]
    resumed = _worker(tmp_path / "killed", 0.0)
    assert resumed.wait(240) == 0, resumed.stdout.read().decode()[-3000:]
  finally:
    for p in (clean, killed):
      if p.poll() is None:
        p.kill()
  a = json.load(open(tmp_path / "clean" / "results.json"))
  b = json.load(open(tmp_path / "killed" / "results.json"))
  for split in a["metrics"]:
    for k, v in a["metrics"][split].items():
      assert b["metrics"][split][k] == pytest.approx(v, abs=1e-6), (split, k)
  pa = ocp.StandardCheckpointer().restore(str(tmp_path / "clean/checkpoints/30/state"))
  pb = ocp.StandardCheckpointer().restore(str(tmp_path / "killed/checkpoints/30/state"))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), pa, pb)


def test_url_paths_are_refused_before_anything_is_written(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match=r"MODEL_DIR is 'gs://bucket/run', a URL.*gcsfuse"):
    trainer.train("gs://bucket/run", task_data=task_data())
  with pytest.raises(ValueError, match=r"INITIAL_CHECKPOINT_PATH is 'gs://b/ckpt', a URL"):
    trainer.train(str(tmp_path / "run"), initial_checkpoint_path="gs://b/ckpt",
                  task_data=task_data())
  assert not os.path.exists(tmp_path / "gs:") and not os.path.exists(tmp_path / "run")
