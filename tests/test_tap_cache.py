"""Cached pooled taps: same training trajectory, keyed entries, which methods use them."""

import json
import os

import jax
import numpy as np
import pytest

from levi_jax import checkpointing, tap_cache, train_setup, trainer
from levi_jax.checkpointing import CheckpointConfig
from levi_jax.models.levi import CACHED_TAPS
from levi_jax.optim import OptimizerConfig

from trainer_fixtures import task_data

SMALL = dict(adapter_dim=16, fusion_hidden=(16,), task_hidden=(16,))


def run(model_dir, method="levi", cache_dir="", steps=8, seed=0, tap_cache_dtype="float32",
        **model_kw):
  return trainer.train(
      str(model_dir), model=trainer.ModelConfig(method=method, **{**SMALL, **model_kw}),
      data=trainer.DataConfig(batch_size=16, eval_batch_size=32, tap_cache_dir=str(cache_dir),
                              tap_cache_dtype=tap_cache_dtype),
      optimizer=OptimizerConfig(learning_rate=3e-3, schedule="constant"),
      loop=trainer.LoopConfig(num_steps=steps, log_every=1, seed=seed),
      checkpoint=CheckpointConfig(every_steps=steps, async_save=False), task_data=task_data())


def losses(model_dir):
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    return [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]


@pytest.mark.parametrize("method", ["levi", "ensemble"])
def test_cached_taps_follow_the_uncached_trajectory(tmp_path, method):
  plain = run(tmp_path / "plain", method)
  cached = run(tmp_path / "cached", method, tmp_path / "cache")
  assert "tap_cache" not in plain
  assert cached["tap_cache"]["used"] and cached["tap_cache"]["misses"] == 4  # 4 splits
  a, b = losses(tmp_path / "plain"), losses(tmp_path / "cached")
  assert len(a) == 8
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for split in ("validation", "id_test", "ood_test"):
    np.testing.assert_allclose(plain["metrics"][split]["rmse"],
                               cached["metrics"][split]["rmse"], rtol=1e-5)


def _attach(cache, data, seed=0, **model_kw):
  method = train_setup.build_method(trainer.ModelConfig(method="levi", **{**SMALL, **model_kw}),
                                data)
  boxed = method.init(jax.random.PRNGKey(seed), data.train)
  params = jax.tree.map(lambda x: np.asarray(getattr(x, "value", x)), boxed,
                        is_leaf=lambda x: hasattr(x, "value"))
  mesh = jax.make_mesh((1, 1), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    splits, stats = tap_cache.attach(str(cache), "toy", method, params,
                                     {"train": data.train, **data.evals}, mesh, (),
                                     batch_size=24)
  return method, params, splits, stats


def test_entries_are_invalidated_by_what_the_taps_depend_on(tmp_path):
  data = task_data(64)
  assert _attach(tmp_path, data)[3]["misses"] == 3
  assert _attach(tmp_path, data)[3]["hits"] == 3
  # Another tap set, pooling, backbone (init seed) or sequence length: new entries.
  other_taps = _attach(tmp_path, data, taps=(-1,))[3]
  assert other_taps["hits"] == 0 and other_taps["rows_computed"] == 0  # from the row store
  assert _attach(tmp_path, data, pooling="first")[3]["hits"] == 0
  assert _attach(tmp_path, data, seed=1)[3]["hits"] == 0
  longer = trainer.TaskData(
      {**data.train, "inputs": np.pad(data.train["inputs"], ((0, 0), (0, 2)))},
      data.evals, data.features, data.vocab_size)
  assert _attach(tmp_path, longer)[3]["hits"] == 2  # only train's inputs changed
  assert len([p for p in tmp_path.rglob("*.npz") if "rows" not in p.parts]) == 3 * 4 + 1
  # An entry whose stored key differs (a name collision) is recomputed, not read.
  # (A copy: entries are read from their file, and this one is rewritten in place below.)
  first = np.array(_attach(tmp_path / "x", data)[2]["train"][CACHED_TAPS])
  entry = next((tmp_path / "x").rglob("train-*.npz"))
  with np.load(entry) as f:
    np.savez(entry, taps=f["taps"] + 1, key=json.dumps({"other": 1}))
  _, _, splits, stats = _attach(tmp_path / "x", data)
  assert stats["hits"] == 2 and stats["misses"] == 1
  np.testing.assert_array_equal(splits["train"][CACHED_TAPS], first)


def test_which_methods_read_cached_taps(tmp_path):
  data = task_data()
  for name, reason in [("levi", ""), ("lp", ""), ("ensemble", ""),
                       ("ft", "the backbone trains"), ("levi_ft", "the backbone trains"),
                       ("lpft", "later stage"), ("lora", "LoRA"), ("levi_lora", "LoRA"),
                       ("scratch", "no single module")]:
    method = train_setup.build_method(trainer.ModelConfig(method=name, **SMALL), data)
    source, why = tap_source_of(method)
    assert (source is not None) == (reason == ""), name
    assert reason in why, (name, why)
  dropout = train_setup.build_method(trainer.ModelConfig(
      method="levi", backbone_overrides={"dropout_rate": 0.1}, **SMALL), data)
  assert "dropout" in tap_source_of(dropout)[1]
  # Dropout in the small model leaves the frozen backbone's taps cacheable.
  for name in ("levi", "ensemble"):
    small_dropout = train_setup.build_method(trainer.ModelConfig(
        method=name, feature_dropout=0.1, **SMALL), data)
    assert tap_source_of(small_dropout)[0] is not None, name
  assert small_dropout.module.members[-1].task_net.feature_dropout == 0.1
  ft = run(tmp_path / "ft", "ft", tmp_path / "cache", steps=2)
  assert ft["tap_cache"] == {"used": False, "reason": "the backbone trains"}
  assert not (tmp_path / "cache").exists()


def tap_source_of(method):
  return tap_cache.tap_source(method)


def test_attach_adds_taps_the_model_would_compute(tmp_path):
  data = task_data(64)
  method, params, splits, stats = _attach(tmp_path, data)
  taps = splits["train"][CACHED_TAPS]
  assert taps.shape == (64, 2, 8) and stats["misses"] == 3  # tiny preset: emb 8
  direct = method.module.apply({"params": params}, data.train,
                               method=method.module.pooled_taps)
  np.testing.assert_allclose(taps, direct, rtol=1e-5, atol=1e-6)
  entry = next(tmp_path.rglob("train-*.npz"))
  with np.load(entry) as f:
    key = json.loads(str(f["key"]))
  assert key["split"] == "train" and key["taps"] == ["0", "1"] and key["pooling"] == "mean"
  assert key["backbone_fingerprint"] == checkpointing.tree_fingerprint(params["backbone"])


def test_a_long_backbone_pass_logs_its_progress(tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(tap_cache, "PROGRESS_EVERY_S", 0.0)
  with caplog.at_level("INFO", logger="levi_jax"):
    _, _, splits, stats = _attach(tmp_path, task_data(64))
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("backbone taps")]
  assert stats["rows_computed"] > 0 and lines
  counts = [tuple(map(int, line.split()[2].split("/"))) for line in lines]  # one pass a split
  assert all(0 < done <= total for done, total in counts) and "rows/s, ETA" in lines[-1]
  assert counts[-1][0] == counts[-1][1]


def test_row_store_runs_the_backbone_once_per_row_across_tasks(tmp_path):
  """Another task (another shift) dealing the same rows into other splits reads their
  taps from the row store; only rows never seen run through the backbone."""
  data = task_data(64)
  _, _, first, stats = _attach(tmp_path, data)
  rows = sum(len(np.unique(a["inputs"], axis=0)) for a in [data.train, *data.evals.values()])
  assert stats["rows_computed"] <= rows and stats["rows_computed"] > 0
  # The same rows, re-dealt: train and id_test swapped, under another task name.
  swapped = trainer.TaskData(data.evals["id_test"], {"id_test": data.train,
                                                     "ood_test": data.evals["ood_test"]},
                             data.features, data.vocab_size)
  method, params, splits, stats2 = _attach_task(tmp_path, swapped, "toy2")
  assert stats2["misses"] == 3 and stats2["rows_computed"] == 0
  np.testing.assert_allclose(splits["id_test"][CACHED_TAPS], first["train"][CACHED_TAPS],
                             rtol=1e-6, atol=1e-7)
  # A split with new rows: only those are computed, and all taps match the model's.
  fresh = task_data(80).train  # some rows seen before (same token patterns), some not
  grown = trainer.TaskData(fresh, {}, data.features, data.vocab_size)
  _, _, splits3, stats3 = _attach_task(tmp_path, grown, "toy3")
  new_rows = {r.tobytes() for r in fresh["inputs"]} - {
      r.tobytes() for a in [data.train, *data.evals.values()] for r in a["inputs"]}
  assert stats3["rows_computed"] == len(new_rows)
  direct = method.module.apply({"params": params}, fresh, method=method.module.pooled_taps)
  np.testing.assert_allclose(splits3["train"][CACHED_TAPS], direct, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("taps", [(0,), (-1, 0), ("final",)])
def test_row_store_serves_every_tap_set(tmp_path, taps):
  """The row store holds every layer: another method's tap set runs no backbone,
  and its taps are the ones its model computes."""
  data = task_data(48)
  _attach(tmp_path, data, taps=(0, 1))
  method, params, splits, stats = _attach(tmp_path, data, taps=taps)
  assert stats["misses"] == 3 and stats["rows_computed"] == 0
  direct = method.module.apply({"params": params}, data.train,
                               method=method.module.pooled_taps)
  assert splits["train"][CACHED_TAPS].shape == direct.shape
  np.testing.assert_allclose(splits["train"][CACHED_TAPS], direct, rtol=1e-5, atol=1e-6)


def _attach_task(cache, data, task):
  method = train_setup.build_method(trainer.ModelConfig(method="levi", **SMALL), data)
  boxed = method.init(jax.random.PRNGKey(0), data.train)
  params = jax.tree.map(lambda x: np.asarray(getattr(x, "value", x)), boxed,
                        is_leaf=lambda x: hasattr(x, "value"))
  mesh = jax.make_mesh((1, 1), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  with jax.set_mesh(mesh):
    splits, stats = tap_cache.attach(str(cache), task, method, params,
                                     {"train": data.train, **data.evals}, mesh, (),
                                     batch_size=24)
  return method, params, splits, stats


def test_trainer_on_bfloat16_taps_stays_close_and_refuses_a_float32_resume(tmp_path):
  f32 = run(tmp_path / "f32", cache_dir=tmp_path / "cache")
  bf16 = run(tmp_path / "bf16", cache_dir=tmp_path / "cache", tap_cache_dtype="bfloat16")
  assert bf16["tap_cache"] and losses(tmp_path / "bf16") != losses(tmp_path / "f32")
  np.testing.assert_allclose(losses(tmp_path / "bf16"), losses(tmp_path / "f32"), rtol=2e-2)
  with pytest.raises(ValueError, match="tap_cache_dtype"):
    run(tmp_path / "bf16", cache_dir=tmp_path / "cache", steps=8)
  with pytest.raises(ValueError, match="tap_cache_dtype must be"):
    trainer.DataConfig(tap_cache_dtype="float16")
