"""The evaluator on its own: a checkpoint's metrics, from its params alone."""

import json
import os

import orbax.checkpoint as ocp
import pytest

from levi_jax import evaluator, optim, step, train_loop, trainer
from levi_jax.checkpointing import CheckpointConfig
from levi_jax.optim import OptimizerConfig

from trainer_fixtures import task_data

SMALL = dict(adapter_dim=16, fusion_hidden=(16,), task_hidden=(16,))
CONFIGS = dict(data=trainer.DataConfig(batch_size=16, eval_batch_size=32),
               loop=trainer.LoopConfig(num_steps=2, log_every=1, eval_every=1))


def _train(model_dir, method):
  return trainer.train(str(model_dir), model=trainer.ModelConfig(method=method, **SMALL),
                       optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=0),
                       checkpoint=CheckpointConfig(every_steps=1, keep=2, async_save=False),
                       task_data=task_data(), **CONFIGS)


def _evaluate(model_dir, method, **kw):
  return evaluator.evaluate(str(model_dir), model=trainer.ModelConfig(method=method, **SMALL),
                            task_data=task_data(), **CONFIGS, **kw)


def _logged_evals(model_dir) -> dict[int, dict[str, dict[str, float]]]:
  """step -> {split: {metric: value}} of the evaluations in metrics.jsonl."""
  out = {}
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    for row in map(json.loads, f):
      for name, v in row.items():
        if "/" in name and not name.startswith("train/"):
          split, metric = name.split("/", 1)
          out.setdefault(row["step"], {}).setdefault(split, {})[metric] = v
  return out


def test_evaluate_restores_params_only_and_matches_training(tmp_path, monkeypatch):
  results = _train(tmp_path, "levi")
  logged = _logged_evals(tmp_path)
  assert sorted(logged) == [1, 2]
  requested = []
  restore = ocp.CheckpointManager.restore

  def spy(self, step_, args=None, **kwargs):
    if args is not None and "state" in args.keys():
      requested.append(args["state"])
    return restore(self, step_, args=args, **kwargs)

  def refuse(*args, **kwargs):
    raise AssertionError("the evaluator built an optimizer or a train state")

  monkeypatch.setattr(ocp.CheckpointManager, "restore", spy)
  for module, name in ((optim, "make_optimizer"), (train_loop, "make_optimizer"),
                       (step, "create_train_state"), (train_loop, "init_stage_state")):
    monkeypatch.setattr(module, name, refuse)

  for ckpt_step in (1, 2):
    got = _evaluate(tmp_path, "levi", restore_step=ckpt_step,
                    output_dir=str(tmp_path / f"eval_{ckpt_step}"))
    assert got["metrics"].keys() == logged[ckpt_step].keys()
    for split, metrics in logged[ckpt_step].items():
      assert got["metrics"][split] == pytest.approx(metrics, rel=1e-6, abs=1e-7), split
  assert got["metrics"] == results["metrics"]  # step 2 is the end of training
  assert got["frozen_hash"] == results["frozen_hash"]
  # Only the trainable params were asked of orbax: no step, no optimizer state.
  assert len(requested) == 2
  for args in requested:
    assert set(args.item) == {"params"} and args.partial_restore
  assert not (tmp_path / "eval_results.json").exists()
  saved = json.load(open(tmp_path / "eval_2" / "eval_results.json"))
  assert saved["metrics"] == got["metrics"] and saved["final_train_loss"] is None


def test_evaluate_wiseft_interpolates_as_the_trainer_did(tmp_path):
  results = _train(tmp_path, "wiseft")
  got = _evaluate(tmp_path, "wiseft")
  assert got["metrics"] == results["metrics"]
  assert got["wise_ft"] == results["wise_ft"]
  saved = json.load(open(tmp_path / "eval_results.json"))  # default: into MODEL_DIR
  assert saved["metrics"] == got["metrics"]
  with pytest.raises(FileNotFoundError, match="no checkpoint at step 5"):
    _evaluate(tmp_path, "wiseft", restore_step=5)


def test_evaluator_needs_a_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint to evaluate"):
    _evaluate(tmp_path, "levi")


def test_long_evaluations_log_their_progress(tmp_path, monkeypatch, caplog):
  _train(tmp_path, "lp")
  quiet = _evaluate(tmp_path, "lp", output_dir=str(tmp_path / "quiet"))
  monkeypatch.setattr(evaluator, "PROGRESS_EVERY_S", 0.0)  # every split counts as long
  with caplog.at_level("INFO", logger="levi_jax"):
    logged = _evaluate(tmp_path, "lp", output_dir=str(tmp_path / "logged"))
  assert logged["metrics"] == quiet["metrics"]  # the same sums, in the same order
  lines = [r.getMessage() for r in caplog.records]
  for split in task_data().evals:
    assert any(line.startswith(f"evaluated {split}: ") for line in lines), split
  # The eval batch (32) splits these test splits in several batches: lines in between.
  assert any(line.startswith("evaluating ") and " ETA " in line for line in lines)
