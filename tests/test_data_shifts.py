"""Shifts: declarations, split invariants on the synthetic world, and failure modes."""

import os

import numpy as np
import pytest

from levi_jax import input_pipeline
from levi_jax.data import datasets, prepare, shifts, synthetic
from levi_jax.data.shifts import Clause, Shift

from world_fixtures import write_small_world


@pytest.fixture(scope="module")
def world(small_world):
  return small_world


def test_at_least_twenty_shifts_covering_all_kinds():
  ood = [s for s in shifts.SHIFTS if s.ood is not None]
  assert len({(s.family, s.name) for s in ood}) >= 20
  assert {s.family for s in ood} == {"movielens", "amazon"}
  columns = {c.column for s in ood for c in s.train + s.ood}
  for needed in ("user_gender", "bucketized_user_age", "user_occupation_label",
                 "user_activity_share", "movie_genres", "item_category", "item_popularity_share",
                 "movie_year_share", "time_share", "user_first_time_share", "item_price_share"):
    assert needed in columns, needed
  assert {s.kind for s in ood} == {"user", "item", "time"}
  for s in ood:
    assert s.name.count("_to_") == 1 or s.kind == "time", s.name


def test_every_task_splits_disjoint_sized_and_leak_free(world):
  names = input_pipeline.task_names()
  assert len(names) > 40
  for name in names:
    task = input_pipeline.prepare(name, world)
    t, s, sp = task.table, task.shift, task.splits
    assert list(sp) == list(s.splits), name
    for split in sp:
      assert len(sp[split]) > 0, (name, split)
      assert np.all(np.diff(sp[split]) > 0), (name, split)
    allrows = np.concatenate(list(sp.values()))
    assert len(np.unique(allrows)) == len(allrows), f"{name}: a rating in two splits"
    pop = np.concatenate([sp["train"], sp["validation"], sp["id_test"]])
    assert np.array_equal(np.sort(pop), np.flatnonzero(shifts.population(t, s.train))), name
    unit = {"row": np.arange(t.num_rows), "user": t.rows["user_index"],
            "item": t.rows["item_index"]}[s.holdout]
    n_units = len(np.unique(unit[pop]))
    assert len(np.unique(unit[sp["id_test"]])) == round(s.id_test_fraction * n_units), name
    assert len(np.unique(unit[sp["validation"]])) == round(s.validation_fraction * n_units), name
    if s.holdout != "row":
      assert not np.intersect1d(unit[sp["train"]], unit[sp["id_test"]]).size, name
    for e in s.unseen:
      idx = t.rows[f"{e}_index"]
      assert not np.intersect1d(idx[pop], idx[sp["ood_test"]]).size, f"{name}: {e} leaks"


def test_splits_are_deterministic_across_loads(world, tmp_path):
  a = input_pipeline.prepare("movielens_1m.time_later", world).splits
  # The same world written again elsewhere gives the same splits.
  other = write_small_world(str(tmp_path / "again"))
  b = input_pipeline.prepare("movielens_1m.time_later", other).splits
  assert all(np.array_equal(a[k], b[k]) for k in a)
  # A different split seed gives a different partition of the same population.
  t = datasets.load_table("movielens_1m", world)
  c = shifts.split_rows(t, input_pipeline.lookup_task("movielens_1m.time_later")[1], seed=7)
  assert np.array_equal(c["ood_test"], a["ood_test"]) and not np.array_equal(c["train"], a["train"])


def test_same_world_in_both_movielens_formats_gives_same_splits(world):
  a = input_pipeline.prepare("movielens_100k.gender_m_to_f", world)
  b = input_pipeline.prepare("movielens_1m.gender_m_to_f", world)
  assert all(np.array_equal(a.splits[k], b.splits[k]) for k in a.splits)
  assert a.table.num_rows == b.table.num_rows


def test_clause_semantics_and_missing_values():
  strs = np.array(["a", "", "b"], dtype=object)
  assert Clause("c", "in", ("a",)).mask(strs).tolist() == [True, False, False]
  assert Clause("c", "not_in", ("a",)).mask(strs).tolist() == [False, False, True]
  nums = np.array([1.0, np.nan, 3.0])
  assert Clause("c", "le", 1.0).mask(nums).tolist() == [True, False, False]
  assert Clause("c", "gt", 1.0).mask(nums).tolist() == [False, False, True]
  bags = np.empty(3, dtype=object)
  bags[:] = [("Horror", "Drama"), (), ("Comedy",)]
  assert Clause("c", "any_in", ("Horror",)).mask(bags).tolist() == [True, False, False]
  assert Clause("c", "none_in", ("Horror",)).mask(bags).tolist() == [False, False, True]
  with pytest.raises(ValueError, match="unknown op"):
    Clause("c", "like", ("a",))
  with pytest.raises(ValueError, match="tuple"):
    Clause("c", "in", ["a"])


def test_bad_declarations_fail_loudly(world):
  t = datasets.load_table("movielens_100k", world)
  overlap = Shift("overlap", "movielens", "user", "", (Clause("bucketized_user_age", "ge", 18),),
                  (Clause("bucketized_user_age", "ge", 25),))
  with pytest.raises(ValueError, match="in both the training and the OOD population"):
    shifts.split_rows(t, overlap)
  wrong_unseen = Shift("w", "movielens", "time", "", (Clause("time_share", "le", 0.5),),
                       (Clause("time_share", "gt", 0.5),), unseen=("user",))
  with pytest.raises(ValueError, match="declares unseen users"):
    shifts.split_rows(t, wrong_unseen)
  empty = Shift("e", "movielens", "user", "", (Clause("user_occupation_label", "in", ("pilot",)),),
                (Clause("user_gender", "in", (False,)),))
  with pytest.raises(ValueError, match=r"empty \['train', 'id_test'\].*pilot"):
    shifts.split_rows(t, empty)
  with pytest.raises(KeyError, match="no column 'nope'"):
    shifts.population(t, (Clause("nope", "in", ("x",)),))


def test_feature_vocab_from_train_split_with_oov_for_unseen(world):
  task = input_pipeline.prepare("movielens_100k.gender_m_to_f", world)
  specs = {f.name: f for f in task.feature_specs}
  train = task.feature_ids(task.splits["train"])
  ood = task.feature_ids(task.splits["ood_test"])
  assert np.all(ood["user_id"] == 1), "unseen OOD users must be OOV"
  assert np.all(ood["user_gender"] == 1) and np.all(train["user_gender"] == 2)
  n_train_users = len(np.unique(task.table.rows["user_index"][task.splits["train"]]))
  assert specs["user_id"].vocab_size == n_train_users + 2
  assert np.all(train["user_id"] >= 2)
  assert specs["movie_genres"].bag_size == 6 and train["movie_genres"].shape[1] == 6
  assert set(task.decode_feature("user_gender", [0, 1, 2])) == {"<pad>", "<oov>", "true"}
  # Most frequent value first: id 2 is the commonest age bucket in train.
  ages = task.table.column("bucketized_user_age", task.splits["train"])
  values, counts = np.unique(ages, return_counts=True)
  assert task.decode_feature("bucketized_user_age", [2]) == [str(int(values[counts.argmax()]))]


def test_default_world_is_the_embedded_default(tmp_path, monkeypatch):
  monkeypatch.setenv("LEVI_CACHE_DIR", str(tmp_path))
  monkeypatch.delenv("LEVI_DATA_DIR", raising=False)
  t = datasets.load_table("movielens_100k", prepare.resolve_data_dir(None))
  assert t.source == os.path.join(synthetic.default_world_dir(), "ml-100k")
  assert t.source.startswith(str(tmp_path))
  assert t.num_users == synthetic.WorldConfig().num_users
  assert synthetic.ensure_default_world() == os.path.dirname(t.source)
  monkeypatch.setenv("LEVI_DATA_DIR", str(tmp_path / "elsewhere"))
  with pytest.raises(FileNotFoundError, match="elsewhere"):
    datasets.load_table("movielens_100k")
