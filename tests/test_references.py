"""Tests for the classical reference predictors and the study-protocol helpers."""

import math

import numpy as np
import pytest

from levi_jax import references
from levi_jax.models.task_net import CategoricalFeature


def _split(**cols):
  out = {k: np.asarray(v, np.int32) for k, v in cols.items() if k != "targets"}
  out["targets"] = np.asarray(cols["targets"], np.float32)
  return out


def _planted_biases(n_users=60, n_items=40, density=0.6, seed=0):
  """Noise-free mu + b_u + b_i on a random subset of the user x item grid."""
  rs = np.random.RandomState(seed)
  bu = rs.randn(n_users) * 0.5
  bi = rs.randn(n_items) * 0.7
  bu -= bu.mean()
  bi -= bi.mean()
  uu, ii = np.meshgrid(np.arange(n_users), np.arange(n_items), indexing="ij")
  keep = rs.rand(n_users, n_items) < density
  users, items = uu[keep], ii[keep]
  targets = 3.5 + bu[users] + bi[items]
  return _split(user_id=users + 2, item_id=items + 2, targets=targets), bu, bi


def _rating_task(n, seed, n_users=80, n_items=30, noise=0.5):
  """Users x items with a gender and a genre bag, plus rating noise."""
  rs = np.random.RandomState(seed)
  bu = np.random.RandomState(100).randn(n_users) * 0.4
  bi = np.random.RandomState(101).randn(n_items) * 0.6
  users = rs.randint(0, n_users, n)
  items = rs.randint(0, n_items, n)
  targets = 3.5 + bu[users] + bi[items] + noise * rs.randn(n)
  genres = (np.random.RandomState(102).randint(0, 6, (n_items, 2)))[items]
  return _split(user_id=users + 2, item_id=items + 2, user_gender=2 + users % 2,
                genres=genres, targets=targets)


# ------------------------------------------------------------------ predictors


def test_training_mean_and_rmse():
  train = _split(item_id=[2, 3, 4], targets=[1.0, 2.0, 4.5])
  p = references.training_mean(train)
  assert p.name == "training_mean"
  pred = p.predict(train)
  assert pred.dtype == np.float32
  np.testing.assert_allclose(pred, [2.5, 2.5, 2.5])
  assert references.rmse(pred, train["targets"]) == pytest.approx(math.sqrt((2.25 + 0.25 + 4) / 3))
  assert math.isnan(references.rmse(np.zeros(0), np.zeros(0)))


def test_item_bias_hand_table():
  # mu = (4 + 5 + 1 + 2) / 4 = 3; residuals: item 2 -> +1, +2; item 3 -> -2;
  # the id-0 row (missing item) only enters mu. With reg = 1:
  # b_2 = (1 + 2) / (2 + 1) = 1, b_3 = -2 / (1 + 1) = -1.
  train = _split(item_id=[2, 2, 3, 0], targets=[4.0, 5.0, 1.0, 2.0])
  p = references.item_bias(train, reg=1.0)
  assert p.chosen == {"reg": 1.0}
  test = _split(item_id=[2, 3, 0, 1, 9], targets=[0.0] * 5)
  np.testing.assert_allclose(p.predict(test), [4.0, 2.0, 3.0, 3.0, 3.0])
  # reg = 0 is the item's plain mean residual: b_2 = 1.5, b_3 = -2.
  np.testing.assert_allclose(references.item_bias(train, reg=0.0).predict(test),
                             [4.5, 1.0, 3.0, 3.0, 3.0])


def test_user_item_bias_recovers_planted_biases():
  train, bu, bi = _planted_biases()
  p = references.user_item_bias(train, reg_user=0.01, reg_item=0.01, iters=50)
  assert p.name == "user_item_bias"
  assert p.chosen == {"reg_user": 0.01, "reg_item": 0.01}
  np.testing.assert_allclose(p.user_bias[2:], bu, atol=0.05)
  np.testing.assert_allclose(p.item_bias[2:], bi, atol=0.05)
  assert p.mu == pytest.approx(3.5, abs=0.05)
  assert references.rmse(p.predict(train), train["targets"]) < 0.01
  # A large reg shrinks the biases: clearly worse on the same data.
  shrunk = references.user_item_bias(train, reg_user=1000.0, reg_item=1000.0)
  assert references.rmse(shrunk.predict(train), train["targets"]) > 0.3


def test_ridge_recovers_planted_effects_with_bag():
  rs = np.random.RandomState(0)
  n = 3000
  gender_eff = np.array([0.0, 0.0, 0.4, -0.4])          # ids 0 (missing) and 1 (OOV): 0
  genre_eff = np.array([0.0, 0.0, 0.9, -0.3, -0.2, -0.4])
  item_eff = np.zeros(12)
  item_eff[2:] = np.linspace(-1.0, 1.0, 10)
  gender = rs.choice([0, 2, 3], n, p=[0.1, 0.45, 0.45])
  genres = rs.randint(0, 6, (n, 3))                      # pads (0) and OOV (1) mixed in
  genres[:, 0] = rs.randint(2, 6, n)                     # at least one known genre
  item = rs.randint(2, 12, n)
  nonzero = (genres != 0).sum(axis=1)
  targets = 3.0 + gender_eff[gender] + genre_eff[genres].sum(axis=1) / nonzero + item_eff[item]
  train = _split(user_gender=gender, genres=genres, item_id=item, targets=targets)
  features = (CategoricalFeature("user_gender", 4), CategoricalFeature("genres", 6, bag_size=3))
  p = references.linear(train, features, reg=1e-4)    # the item id is added
  assert {f.name for f in p.features} == {"user_gender", "genres", "item_id"}
  assert p.intercept == pytest.approx(3.0, abs=0.02)
  np.testing.assert_allclose(p.coef["user_gender"][2:], gender_eff[2:], atol=0.02)
  np.testing.assert_allclose(p.coef["genres"][2:], genre_eff[2:], atol=0.02)
  np.testing.assert_allclose(p.coef["item_id"][2:], item_eff[2:], atol=0.02)
  np.testing.assert_allclose(p.coef["genres"][:2], 0.0)   # pad / OOV get no coefficient
  assert references.rmse(p.predict(train), train["targets"]) < 1e-3
  # A bag of one known genre plus OOV: the OOV entry counts in the mean, adds nothing.
  row = _split(user_gender=[2], genres=[[2, 1, 0]], item_id=[2], targets=[0.0])
  want = p.intercept + p.coef["user_gender"][2] + p.coef["genres"][2] / 2 + p.coef["item_id"][2]
  assert p.predict(row)[0] == pytest.approx(want, abs=1e-5)


def test_unseen_ids_get_the_fallback():
  train, _, _ = _planted_biases(n_users=10, n_items=8, density=1.0)
  unseen = _split(user_id=[0, 1, 500, 3], item_id=[3, 0, 1, 700], targets=[0.0] * 4)
  ib = references.item_bias(train, reg=1.0)
  pred = ib.predict(unseen)
  assert pred[0] != pytest.approx(ib.mu)                # a seen item has a bias
  np.testing.assert_allclose(pred[1:], ib.mu, rtol=1e-6)
  uib = references.user_item_bias(train, reg_user=1.0, reg_item=1.0)
  pred = uib.predict(unseen)
  np.testing.assert_allclose(pred[0], uib.mu + uib.item_bias[3], rtol=1e-6)   # new user
  np.testing.assert_allclose(pred[1:3], uib.mu, rtol=1e-6)                    # no user, no item
  np.testing.assert_allclose(pred[3], uib.mu + uib.user_bias[3], rtol=1e-6)   # new item
  features = (CategoricalFeature("user_gender", 4),)
  train["user_gender"] = (2 + train["user_id"] % 2).astype(np.int32)
  lin = references.linear(train, features, reg=1.0)
  rows = _split(user_gender=[1, 0, 2], item_id=[1, 999, 0], targets=[0.0] * 3)
  np.testing.assert_allclose(lin.predict(rows)[:2], lin.intercept, rtol=1e-6)
  assert lin.predict(rows)[2] == pytest.approx(lin.intercept + lin.coef["user_gender"][2])


def test_validation_chosen_reg_is_the_best_on_validation():
  train, val = _rating_task(2000, 0), _rating_task(600, 1)
  features = (CategoricalFeature("user_id", 82), CategoricalFeature("item_id", 32),
              CategoricalFeature("user_gender", 4), CategoricalFeature("genres", 6, bag_size=2))
  refs = references.fit_references(train, features, val=val)
  assert set(refs) == {"training_mean", "item_bias", "user_item_bias", "linear"}
  for name, p in refs.items():
    assert p.name == name
  score = lambda p: references.rmse(p.predict(val), val["targets"])

  ib = {r: score(references.item_bias(train, r)) for r in references.BIAS_GRID}
  assert refs["item_bias"].chosen == {"reg": min(ib, key=ib.get)}
  assert refs["item_bias"].val_rmse == pytest.approx(min(ib.values()))

  uib = {(ru, ri): score(references.user_item_bias(train, ru, ri))
         for ru in references.BIAS_GRID for ri in references.BIAS_GRID}
  ru, ri = min(uib, key=uib.get)
  assert refs["user_item_bias"].chosen == {"reg_user": ru, "reg_item": ri}

  lin_features = [f for f in features if f.name != "user_id"]   # the default
  lin = {r: score(references.linear(train, lin_features, r)) for r in references.RIDGE_GRID}
  assert refs["linear"].chosen == {"reg": min(lin, key=lin.get)}
  assert "user_id" not in refs["linear"].coef

  # The references beat the training mean on held-out ratings.
  base = score(refs["training_mean"])
  for name in ("item_bias", "user_item_bias", "linear"):
    assert score(refs[name]) < base - 0.05, name
  # Without validation: the defaults, deterministically.
  a = references.fit_references(train, features)
  b = references.fit_references(train, features)
  assert a["item_bias"].chosen == {"reg": 10.0}
  for name in a:
    np.testing.assert_array_equal(a[name].predict(val), b[name].predict(val))


# -------------------------------------------------------------- study protocol


def _runs():
  recs = []
  def add(shift, method, lr, vals, tests):
    for seed, (v, t) in enumerate(zip(vals, tests)):
      recs.append(dict(shift=shift, method=method, seed=seed, learning_rate=lr,
                       val_rmse=v, id_rmse=t, ood_rmse=t + 0.1))
  # Group (user, levi): lr 1e-3 has the single best val run and the best test
  # RMSE, but lr 1e-4 has the lowest *mean* validation RMSE.
  add("user", "levi", 1e-3, [0.80, 1.20], [0.50, 0.55])
  add("user", "levi", 1e-4, [0.95, 0.96], [0.90, 0.91])
  # Group (user, small): an exact tie on mean val (1.0) -> the first setting in record order.
  add("user", "small", 3e-4, [0.75, 1.25], [0.99, 0.99])
  add("user", "small", 1e-3, [1.00, 1.00], [0.40, 0.40])
  return recs


def test_select_by_validation_uses_mean_validation_not_test():
  recs = _runs()
  chosen = references.select_by_validation(recs, ("shift", "method"), ("learning_rate",))
  assert [(r["method"], r["learning_rate"], r["seed"]) for r in chosen] == [
      ("levi", 1e-4, 0), ("levi", 1e-4, 1), ("small", 3e-4, 0), ("small", 3e-4, 1)]
  # Inferred settings (every non-group, non-seed, non-result key) agree.
  assert references.select_by_validation(recs, ("shift", "method")) == chosen
  # Ties go to the first setting in record order.
  small = [r for r in recs if r["method"] == "small"]
  flipped = references.select_by_validation(small[2:] + small[:2], ("shift", "method"))
  assert {r["learning_rate"] for r in flipped} == {1e-3}
  # A diverged (NaN) seed disqualifies its setting.
  recs[2]["val_rmse"] = float("nan")
  chosen = references.select_by_validation(recs, ("shift", "method"), ("learning_rate",))
  assert {r["learning_rate"] for r in chosen if r["method"] == "levi"} == {1e-3}
  with pytest.raises(ValueError, match="test"):
    references.select_by_validation(recs, ("shift",), metric="id_test_rmse")


def test_select_by_validation_groups_and_settings():
  recs = [dict(shift=s, method="m", seed=seed, learning_rate=lr, batch=b,
               val_rmse=1.0 + 0.1 * lr + 0.01 * b + (0.5 if s == "item" and lr == 1 else 0),
               id_rmse=0.0)
          for s in ("user", "item") for lr in (1, 2) for b in (8, 16) for seed in (0, 1, 2)]
  chosen = references.select_by_validation(recs, ("shift",))
  assert len(chosen) == 6                                  # 2 groups x 3 seeds
  picks = {(r["shift"], r["learning_rate"], r["batch"]) for r in chosen}
  assert picks == {("user", 1, 8), ("item", 2, 8)}
  assert sorted(r["seed"] for r in chosen if r["shift"] == "user") == [0, 1, 2]
  # Only learning_rate as the setting: batches pool into one setting per lr.
  chosen = references.select_by_validation(recs, ("shift",), ("learning_rate",))
  assert len(chosen) == 12
  assert references.is_result_key("ood_rmse") and not references.is_result_key("learning_rate")


def test_is_collapsed():
  mean = {"id_test": 1.0, "ood_test": 1.2}
  assert references.is_collapsed(0.0, {"id_test": 0.9, "ood_test": 1.0}, mean)  # constant
  assert references.is_collapsed(5e-4, {"id_test": 0.9}, mean)
  assert not references.is_collapsed(0.4, {"id_test": 0.9, "ood_test": 1.0}, mean)
  # Not constant, but exactly as good as the mean on every split.
  assert references.is_collapsed(0.4, {"id_test": 1.00005, "ood_test": 1.19996}, mean)
  assert not references.is_collapsed(0.4, {"id_test": 1.00005, "ood_test": 1.1}, mean)
  assert not references.is_collapsed(float("nan"), {"id_test": 0.9}, mean)  # std unknown
  assert not references.is_collapsed(None, {}, mean)
