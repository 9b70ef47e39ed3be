"""Input shards: which rows each process loads, and batches that do not depend on
how many processes read the shards."""

import numpy as np
import pytest

import trainer_fixtures
from levi_jax import input_pipeline, trainer
from levi_jax.input_pipeline import InputShards, shard_batch_indices


def test_input_shards_deal_rows_round_robin():
  s = InputShards(num_shards=4, index=1, count=2)
  assert list(s.owned) == [2, 3]
  assert s.shard_sizes(10) == [2, 2]
  np.testing.assert_array_equal(s.positions(10), [2, 6, 3, 7])
  assert s.num_held(10) == s.positions(10).size == 4
  assert InputShards(4, 0, 2).max_rows(10) == s.max_rows(10) == 6  # shards 0, 1: 3 + 3
  every = np.concatenate([InputShards(4, p, 2).positions(10) for p in range(2)])
  assert sorted(every) == list(range(10))
  assert InputShards().positions(5).tolist() == [0, 1, 2, 3, 4]
  with pytest.raises(ValueError, match=r"input shards \(3\) must be a positive multiple of "
                                       r"the number of processes feeding data \(2\)"):
    InputShards(3, 0, 2)
  with pytest.raises(ValueError, match="process 2 of 2 is out of range"):
    InputShards(2, 2, 2)


def _global_batch(num_shards, count, n, step, batch, seed=5):
  """The global batch (as split positions) assembled from `count` processes' rows."""
  out = []
  for p in range(count):
    shards = InputShards(num_shards, p, count)
    out.append(shards.positions(n)[shard_batch_indices(shards, n, step, batch, seed)])
  return np.concatenate(out)


@pytest.mark.parametrize("step", [0, 3, 17])
def test_global_batch_does_not_depend_on_the_process_count(step):
  one = _global_batch(4, 1, 103, step, 16)
  assert len(one) == 16 and len(set(one.tolist())) == 16
  np.testing.assert_array_equal(_global_batch(4, 2, 103, step, 16), one)
  np.testing.assert_array_equal(_global_batch(4, 4, 103, step, 16), one)
  # Each shard contributes its quarter: rows of shard s are s mod 4.
  np.testing.assert_array_equal(one.reshape(4, 4) % 4, np.repeat(np.arange(4), 4).reshape(4, 4))
  # Another number of input shards is another (equally valid) order.
  assert not np.array_equal(_global_batch(2, 1, 103, step, 16), one)


def test_one_shard_is_the_unsharded_order():
  shards = InputShards()
  for step in (0, 7, 40):
    np.testing.assert_array_equal(shard_batch_indices(shards, 100, step, 16, 3),
                                  input_pipeline.batch_indices(100, step, 16, 3))


def test_shard_batch_errors():
  with pytest.raises(ValueError, match="batch size 10 is not divisible by the number of "
                                       "input shards 4"):
    shard_batch_indices(InputShards(4), 100, 0, 10, 0)
  with pytest.raises(ValueError, match="input shard 3 of 4 has no training rows"):
    shard_batch_indices(InputShards(4), 3, 0, 8, 0)


def test_eval_batches_pad_to_the_common_count():
  rows = {"targets": np.arange(5, dtype=np.float32)}
  batches = list(input_pipeline.eval_batches(rows, 4, num_batches=3))
  assert len(batches) == 3
  assert [b["weights"].sum() for b in batches] == [4, 1, 0]
  with pytest.raises(ValueError, match="1 batches of 4 cannot hold 5 rows"):
    list(input_pipeline.eval_batches(rows, 4, num_batches=1))


def test_select_shards_keeps_the_process_rows():
  data = trainer_fixtures.task_data(n=50)
  mine = input_pipeline.select_shards(data, InputShards(4, 1, 2))
  pos = InputShards(4, 1, 2).positions(50)
  np.testing.assert_array_equal(mine.train["inputs"], data.train["inputs"][pos])
  assert mine.split_sizes == {"train": 50, "id_test": 64, "ood_test": 64}
  assert len(mine.evals["id_test"]["targets"]) == InputShards(4, 1, 2).positions(64).size
  with pytest.raises(ValueError, match="already holds input shards"):
    input_pipeline.select_shards(mine, InputShards())


def test_load_task_data_loads_only_its_shards():
  cfg = trainer.DataConfig(seq_length=16)
  full = input_pipeline.load_task_data(cfg)
  assert full.shards is None
  parts = [input_pipeline.load_task_data(cfg, shards=InputShards(2, p, 2)) for p in range(2)]
  for p, part in enumerate(parts):
    assert part.shards == InputShards(2, p, 2)
    assert part.split_sizes["train"] == len(full.train["targets"])
    for split, arrays in {"train": part.train, **part.evals}.items():
      whole = full.train if split == "train" else full.evals[split]
      for k, v in arrays.items():
        np.testing.assert_array_equal(v, whole[k][p::2], err_msg=f"{split}/{k}")


def _model():
  return trainer.ModelConfig(method="levi", backbone="t5_1_1_tiny", taps=(-1,), adapter_dim=8,
                             fusion_hidden=(8,), task_hidden=(8,), aux_heads=False,
                             backbone_overrides={**trainer_fixtures.TINY_BACKBONE,
                                                 "num_layers": 1})


def test_trainer_names_bad_input_shards(tmp_path):
  data = trainer_fixtures.task_data(n=64)
  with pytest.raises(ValueError, match="batch size 16 is not divisible by the number of input "
                                       "shards 3"):
    trainer.train(str(tmp_path / "a"), model=_model(),
                  data=trainer.DataConfig(batch_size=16, input_shards=3),
                  loop=trainer.LoopConfig(num_steps=1), task_data=data)
  sharded = input_pipeline.select_shards(data, InputShards(2, 0, 2))
  with pytest.raises(ValueError, match="task data holds input shards"):
    trainer.train(str(tmp_path / "b"), model=_model(), data=trainer.DataConfig(batch_size=16),
                  loop=trainer.LoopConfig(num_steps=1), task_data=sharded)
  with pytest.raises(ValueError, match="input_shards must be >= 0"):
    trainer.DataConfig(input_shards=-1)


def test_batches_are_epochs_of_seeded_permutations_drawn_once_and_two_epochs_held():
  """Each epoch is numpy's permutation for (seed, epoch); batches straddle epoch ends."""
  n, batch, seed = 10, 4, (3, 1)
  expected = np.concatenate([np.random.default_rng([*seed, e]).permutation(n) for e in range(4)])
  got = np.concatenate([input_pipeline.batch_indices(n, s, batch, seed) for s in range(10)])
  np.testing.assert_array_equal(got, expected[:40])
  assert got.dtype == np.int64
  first = input_pipeline._epoch_permutation(n, seed, 3)
  assert input_pipeline._epoch_permutation(n, seed, 3) is first  # drawn once, then held
  assert set(input_pipeline._PERMUTATIONS[(n, seed)]) == {2, 3}  # only the two last used
  input_pipeline.batch_indices(n, 1, batch, seed)  # epoch 0 again: drawn again, the same
  assert set(input_pipeline._PERMUTATIONS[(n, seed)]) == {3, 0}
  assert input_pipeline._epoch_permutation(n, seed, 3) is first
