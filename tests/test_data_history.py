"""`*_history` datasets: each rating's text ends with the user's earlier training ratings."""

import numpy as np
import pytest

from levi_jax import input_pipeline
from levi_jax.data import datasets, prepare


@pytest.fixture(scope="module")
def world(small_world):
  return small_world


def _expected(task, row: int) -> str:
  """The history text of `row`, by brute force over the training split."""
  t = task.table
  user, ts = t.rows["user_index"], t.rows["timestamp"]
  train = task.rows("train")
  earlier = [r for r in train if user[r] == user[row] and ts[r] < ts[row]]
  earlier = sorted(earlier, key=lambda r: (ts[r], r), reverse=True)[:datasets.HISTORY_RATINGS]
  if not earlier:
    return ""
  titles = t.items["movie_title"]
  return "earlier ratings: " + "; ".join(
      f"{titles[t.rows['item_index'][r]]}: {float(t.rows['rating'][r]):g}" for r in earlier) + "."


@pytest.mark.parametrize("shift", ["time_later", "gender_m_to_f"])
def test_history_lists_the_latest_earlier_training_ratings(world, shift):
  task = prepare.prepare(f"movielens_100k_history.{shift}", world)
  plain = prepare.prepare(f"movielens_100k.{shift}", world)
  assert task.dataset.history == datasets.HISTORY_RATINGS > 0
  rng = np.random.default_rng(0)
  listed = 0
  for split in task.splits:
    np.testing.assert_array_equal(task.rows(split), plain.rows(split))
    rows = task.rows(split)
    sample = rng.choice(rows, size=min(40, len(rows)), replace=False)
    for row, text, base in zip(sample, task.texts(sample), plain.texts(sample)):
      want = _expected(task, row)
      assert text == (f"{base} {want}" if want else base), (split, row)
      listed += bool(want)
  assert listed > 20  # the sample did hold histories


def test_no_rating_lists_itself_an_evaluation_rating_or_a_later_one(world):
  task = prepare.prepare("movielens_100k_history.time_later", world)
  t = task.table
  train = set(task.rows("train").tolist())
  for split in task.splits:
    rows = task.rows(split)
    past = task.history.earlier(t, rows)
    assert past.shape == (len(rows), datasets.HISTORY_RATINGS)
    for row, earlier in zip(rows, past):
      earlier = earlier[earlier >= 0]
      assert set(earlier.tolist()) <= train and row not in earlier
      assert (t.rows["user_index"][earlier] == t.rows["user_index"][row]).all()
      assert (t.rows["timestamp"][earlier] < t.rows["timestamp"][row]).all()
      assert (np.diff(t.rows["timestamp"][earlier]) <= 0).all()  # most recent first


def test_users_the_training_split_lacks_get_no_history(world):
  """A cold-start shift's OOD users have no training ratings, so their texts are unchanged."""
  task = prepare.prepare("movielens_100k_history.gender_m_to_f", world)
  plain = prepare.prepare("movielens_100k.gender_m_to_f", world)
  ood = task.rows("ood_test")
  assert task.texts(ood) == plain.texts(ood)
  assert task.texts(task.rows("train")) != plain.texts(task.rows("train"))


def test_history_tasks_are_registered_tasks_whose_examples_carry_it(world):
  names = input_pipeline.task_names()
  assert "movielens_100k_history.time_later" in names
  assert {n.split(".", 1)[1] for n in names if n.startswith("movielens_100k_history.")} == {
      n.split(".", 1)[1] for n in names if n.startswith("movielens_100k.")}
  vocab = input_pipeline.vocabulary_path("movielens_100k.time_later", world)
  arrays = input_pipeline.load_split_arrays("movielens_100k_history.time_later", "ood_test",
                                            data_dir=world, vocab_path=vocab, inputs_length=96)
  plain = input_pipeline.load_split_arrays("movielens_100k.time_later", "ood_test",
                                           data_dir=world, vocab_path=vocab, inputs_length=96)
  np.testing.assert_array_equal(arrays["targets"], plain["targets"])
  np.testing.assert_array_equal(arrays["item_id"], plain["item_id"])
  task = prepare.prepare("movielens_100k_history.time_later", world)
  has_history = (task.history.earlier(task.table, task.rows("ood_test")) >= 0).any(1)
  longer = (arrays["inputs"] > 0).sum(1) > (plain["inputs"] > 0).sum(1)
  np.testing.assert_array_equal(longer, has_history)
  assert has_history.sum() > 10


def test_timestamps_out_of_range_are_named(world):
  task = prepare.prepare("movielens_100k_history.time_later", world)
  table = task.table
  bad = dict(table.rows, timestamp=np.full_like(table.rows["timestamp"], -5))
  broken = type(table)(table.dataset, table.source, table.users, table.items, bad, table.report)
  with pytest.raises(ValueError, match="timestamps must lie in"):
    datasets.UserHistory.build(broken, task.rows("train"), 3)


def test_texts_of_no_rows_and_of_rows_without_history(world):
  task = prepare.prepare("movielens_100k_history.time_later", world)
  assert task.texts(np.array([], np.int64)) == []
  none = np.full((4, datasets.HISTORY_RATINGS), -1)
  assert datasets.history_texts(task.table, none) == [""] * 4
  assert datasets.history_texts(task.table, np.empty((0, datasets.HISTORY_RATINGS))) == []
