"""Classical (non-neural) reference predictors for rating prediction.

These are the *unranked reference columns* of the experiment tables: they say
what "good" is on a split (in particular for cold-start users, whose ids are
out of vocabulary) without any training run, so a learned method that does
not beat them, or that collapsed to the training mean, is visible at once.
All are fitted on a task's training split only, with numpy in float64,
deterministically:

* `training_mean`: the mean training rating.
* `item_bias`: mu + b_i, the item's mean residual shrunk to the global mean.
* `user_item_bias`: mu + b_u + b_i, the classic baseline predictor (Koren
  2008) fitted by alternating regularized least squares.
* `linear`: ridge regression on one-hot (bags: averaged multi-hot) encodings
  of categorical features plus the item id, solved in closed form.

`fit_references` fits all four, choosing each regularization strength on a
validation split (never a test split). Two small pure helpers serve the study
protocol: `select_by_validation` (pick a hyperparameter setting per group by
mean validation metric over seeds) and `is_collapsed` (flag a run whose
predictions are constant or no better than the training mean).

Feature ids follow `levi_jax.data`: 0 is padding/missing, 1 is
out-of-vocabulary (unseen in training), 2.. are known values. Ids 0 and 1
never get a bias or a coefficient of their own: they get the fallback.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Hashable, Mapping, Protocol, Sequence

import numpy as np

from levi_jax.models.task_net import OOV_ID, CategoricalFeature

Arrays = Mapping[str, np.ndarray]

BIAS_GRID = (1.0, 3.0, 10.0, 30.0, 100.0)
RIDGE_GRID = (0.1, 1.0, 10.0, 100.0)


class Predictor(Protocol):
  """A fitted reference: `.predict(split_arrays)` -> float32 ratings, `.name`."""

  name: str
  chosen: dict[str, float]

  def predict(self, arrays: Arrays) -> np.ndarray:
    ...


def rmse(pred: np.ndarray, targets: np.ndarray) -> float:
  """Root mean squared error (float64); NaN for no rows."""
  pred = np.asarray(pred, np.float64).reshape(-1)
  targets = np.asarray(targets, np.float64).reshape(-1)
  if pred.shape != targets.shape:
    raise ValueError(f"rmse: {pred.shape[0]} predictions for {targets.shape[0]} targets")
  if not pred.size:
    return math.nan
  return float(np.sqrt(np.mean((pred - targets) ** 2)))


def _targets(arrays: Arrays) -> np.ndarray:
  t = np.asarray(arrays["targets"], np.float64).reshape(-1)
  if not t.size:
    raise ValueError("cannot fit a reference on a split with no rows")
  return t


def _lookup(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
  """table[ids], 0 for ids outside the table (unseen in training)."""
  ids = np.asarray(ids, np.int64).reshape(-1)
  inside = (ids >= 0) & (ids < len(table))
  return np.where(inside, table[np.where(inside, ids, 0)], 0.0)


# ----------------------------------------------------------------- predictors


@dataclasses.dataclass
class ConstantPredictor:
  """Predicts `value` for every row."""

  value: float
  name: str = "training_mean"
  chosen: dict[str, float] = dataclasses.field(default_factory=dict)
  val_rmse: float | None = None

  def predict(self, arrays: Arrays) -> np.ndarray:
    return np.full(len(arrays["targets"]), self.value, np.float32)


@dataclasses.dataclass
class BiasPredictor:
  """mu + b_user[user] + b_item[item]; ids unseen in training get 0 bias.

  `user_bias` is None for the item-only model.
  """

  mu: float
  item_bias: np.ndarray
  user_bias: np.ndarray | None = None
  name: str = "item_bias"
  chosen: dict[str, float] = dataclasses.field(default_factory=dict)
  item_key: str = "item_id"
  user_key: str = "user_id"
  val_rmse: float | None = None

  def predict(self, arrays: Arrays) -> np.ndarray:
    pred = self.mu + _lookup(self.item_bias, arrays[self.item_key])
    if self.user_bias is not None:
      pred = pred + _lookup(self.user_bias, arrays[self.user_key])
    return pred.astype(np.float32)


@dataclasses.dataclass
class LinearPredictor:
  """intercept + sum over features of coef[feature][ids] (bags: averaged)."""

  intercept: float
  features: tuple[CategoricalFeature, ...]
  coef: dict[str, np.ndarray]
  name: str = "linear"
  chosen: dict[str, float] = dataclasses.field(default_factory=dict)
  val_rmse: float | None = None

  def predict(self, arrays: Arrays) -> np.ndarray:
    pred = np.full(len(arrays["targets"]), self.intercept, np.float64)
    for f in self.features:
      ids, w = _encode(arrays[f.name], f)
      table = self.coef[f.name]
      pred += (table[ids] * w).sum(axis=1)
    return pred.astype(np.float32)


# -------------------------------------------------------------------- fitting


def training_mean(train: Arrays) -> ConstantPredictor:
  """The mean training target."""
  return ConstantPredictor(float(_targets(train).mean()))


def _known_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
  """(ids as int64, mask of ids >= 2, table size covering the known ids)."""
  ids = np.asarray(ids, np.int64).reshape(-1)
  known = ids > OOV_ID
  size = int(ids[known].max()) + 1 if known.any() else OOV_ID + 1
  return ids, known, size


def _shrunk_mean(residual: np.ndarray, ids: np.ndarray, known: np.ndarray, size: int,
                 reg: float) -> np.ndarray:
  """Per id: sum(residual) / (count + reg) over rows with a known id."""
  total = np.bincount(ids[known], residual[known], minlength=size)
  count = np.bincount(ids[known], minlength=size).astype(np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    out = np.where(count > 0, total / (count + reg), 0.0)
  return out


def item_bias(train: Arrays, reg: float = 10.0, item_key: str = "item_id") -> BiasPredictor:
  """mu + b_i, b_i = sum(r - mu) / (n_i + reg) over the item's training ratings.

  Unseen items (id 0/1, or not in the training split) get mu.
  """
  if reg < 0:
    raise ValueError(f"item_bias: reg must be >= 0, got {reg}")
  t = _targets(train)
  mu = float(t.mean())
  ids, known, size = _known_ids(train[item_key])
  b = _shrunk_mean(t - mu, ids, known, size, reg)
  return BiasPredictor(mu, b, name="item_bias", chosen={"reg": float(reg)},
                       item_key=item_key)


def user_item_bias(train: Arrays, reg_user: float = 10.0, reg_item: float = 10.0,
                   iters: int = 20, user_key: str = "user_id",
                   item_key: str = "item_id") -> BiasPredictor:
  """mu + b_u + b_i by alternating regularized least squares (Koren 2008).

  mu is the training mean; each round sets b_i = sum(r - mu - b_u) /
  (n_i + reg_item), then b_u = sum(r - mu - b_i) / (n_u + reg_user). Unseen
  users/items (id 0/1, or not in training) get 0 bias; their rows still
  inform the other side's biases.
  """
  if reg_user < 0 or reg_item < 0:
    raise ValueError(f"user_item_bias: regs must be >= 0, got {reg_user}, {reg_item}")
  t = _targets(train)
  mu = float(t.mean())
  users, u_known, u_size = _known_ids(train[user_key])
  items, i_known, i_size = _known_ids(train[item_key])
  bu = np.zeros(u_size)
  bi = np.zeros(i_size)
  r = t - mu
  for _ in range(max(int(iters), 1)):
    bi = _shrunk_mean(r - np.where(u_known, bu[users * u_known], 0.0), items, i_known,
                      i_size, reg_item)
    bu = _shrunk_mean(r - np.where(i_known, bi[items * i_known], 0.0), users, u_known,
                      u_size, reg_user)
  return BiasPredictor(mu, bi, bu, name="user_item_bias",
                       chosen={"reg_user": float(reg_user), "reg_item": float(reg_item)},
                       item_key=item_key, user_key=user_key)


def _encode(x: np.ndarray, f: CategoricalFeature) -> tuple[np.ndarray, np.ndarray]:
  """A feature's rows as (ids [n, slots], weights [n, slots]).

  Scalar: weight 1 for a known id. Bag: 1 / (number of non-zero entries) for
  each known entry (multi-hot averaged; duplicates add up). Padding (0), OOV
  (1) and ids outside the vocabulary get weight 0 (and id 0).
  """
  x = np.asarray(x, np.int64)
  x = x.reshape(-1, 1) if f.bag_size is None else x.reshape(len(x), -1)
  known = (x > OOV_ID) & (x < f.vocab_size)
  w = known.astype(np.float64)
  if f.bag_size is not None:
    w /= np.maximum((x != 0).sum(axis=1, keepdims=True), 1)
  return np.where(known, x, 0), w


def _with_item(features: Sequence[CategoricalFeature], train: Arrays,
               item_key: str) -> tuple[CategoricalFeature, ...]:
  features = tuple(features)
  if item_key in train and item_key not in {f.name for f in features}:
    vocab = max(int(np.asarray(train[item_key]).max(initial=0)) + 1, OOV_ID + 1)
    features += (CategoricalFeature(item_key, vocab),)
  return features


@dataclasses.dataclass
class _NormalEquations:
  """X'X and X'y of the ridge design, restricted to columns seen in training.

  Column 0 is the intercept; the others are the (feature, id) pairs with a
  non-zero weight somewhere in the training split. Built once, solved per reg.
  """

  features: tuple[CategoricalFeature, ...]
  columns: np.ndarray   # global column (offset + id) of each active column
  gram: np.ndarray
  xty: np.ndarray
  n: int

  @classmethod
  def build(cls, train: Arrays, features: tuple[CategoricalFeature, ...],
            chunk: int = 4_000_000) -> "_NormalEquations":
    t = _targets(train)
    n = len(t)
    offsets = np.cumsum([0] + [f.vocab_size for f in features])
    ids, ws = [np.zeros((n, 1), np.int64)], [np.ones((n, 1))]   # intercept: global col 0
    for f, off in zip(features, offsets[:-1]):
      i, w = _encode(train[f.name], f)
      if len(i) != n:
        raise ValueError(f"feature {f.name!r} has {len(i)} rows, targets have {n}")
      ids.append(np.where(w > 0, 1 + off + i, 0))
      ws.append(w)
    cols, w = np.concatenate(ids, axis=1), np.concatenate(ws, axis=1)
    active = np.unique(cols[w > 0])           # sorted; includes 0 (the intercept)
    local = np.searchsorted(active, cols)     # zero-weight slots land on col 0, weight 0
    d, s = len(active), cols.shape[1]
    gram = np.zeros(d * d)
    step = max(chunk // (s * s), 1)
    for start in range(0, n, step):           # rows in order: deterministic sums
      c, v = local[start:start + step], w[start:start + step]
      pair = (c[:, :, None] * d + c[:, None, :]).reshape(-1)
      gram += np.bincount(pair, (v[:, :, None] * v[:, None, :]).reshape(-1), minlength=d * d)
    xty = np.bincount(local.reshape(-1), (w * t[:, None]).reshape(-1), minlength=d)
    return cls(features, active, gram.reshape(d, d), xty, n)

  def solve(self, reg: float) -> LinearPredictor:
    if reg <= 0:
      raise ValueError(f"linear: reg must be > 0, got {reg}")
    penalty = np.full(len(self.columns), float(reg))
    penalty[0] = 0.0                          # the intercept is not shrunk
    beta = np.linalg.solve(self.gram + np.diag(penalty), self.xty)
    offsets = np.cumsum([0] + [f.vocab_size for f in self.features])
    full = np.zeros(1 + offsets[-1])
    full[self.columns] = beta
    coef = {f.name: full[1 + off: 1 + off + f.vocab_size]
            for f, off in zip(self.features, offsets[:-1])}
    return LinearPredictor(float(beta[0]), self.features, coef, chosen={"reg": float(reg)})


def linear(train: Arrays, features: Sequence[CategoricalFeature], reg: float = 10.0,
           item_key: str = "item_id") -> LinearPredictor:
  """Ridge regression on one-hot categorical features plus the item id.

  Scalar features are one-hot, bags multi-hot averaged over their non-zero
  entries; padding (0) and OOV (1) ids contribute nothing. An unpenalized
  intercept; `reg` is the L2 penalty on the (unnormalized) normal equations
  (X'X + reg I) beta = X'y. The item id is added (its vocabulary the largest
  training id + 1) when `features` does not name it.
  """
  return _NormalEquations.build(train, _with_item(features, train, item_key)).solve(reg)


def _pick(fits: list[tuple[Any, Predictor]], val: Arrays) -> Predictor:
  """The first fit with the lowest validation RMSE (its .val_rmse set)."""
  best, best_score = None, math.inf
  for _, p in fits:
    score = rmse(p.predict(val), val["targets"])
    if best is None or score < best_score:
      best, best_score = p, score
  best.val_rmse = best_score
  return best


def fit_references(train: Arrays, features: Sequence[CategoricalFeature],
                   val: Arrays | None = None, bias_grid: Sequence[float] = BIAS_GRID,
                   ridge_grid: Sequence[float] = RIDGE_GRID, user_key: str = "user_id",
                   item_key: str = "item_id",
                   linear_features: Sequence[str] | None = None) -> dict[str, Predictor]:
  """Fits the four references on `train`; regs chosen on `val` when given.

  Each regularization strength is picked from its grid (`bias_grid` for the
  bias models, reg_user x reg_item jointly for `user_item_bias`;
  `ridge_grid` for `linear`) by RMSE on `val`, the first on ties, and
  recorded in the predictor's `.chosen` (and its `.val_rmse`). Pass a
  validation split, never a test split. Without `val`, the defaults are used.

  The ridge uses `linear_features` (names) of `features`; by default every
  feature but the user id (constant per user, it would absorb the user side
  features' effects that cold-start users need), plus the item id.

  Returns:
    {"training_mean", "item_bias", "user_item_bias", "linear"} -> predictor.
  """
  if linear_features is None:
    lin = tuple(f for f in features if f.name != user_key)
  else:
    by_name = {f.name: f for f in features}
    missing = [n for n in linear_features if n not in by_name]
    if missing:
      raise KeyError(f"linear_features {missing} are not among the features {sorted(by_name)}")
    lin = tuple(by_name[n] for n in linear_features)
  out: dict[str, Predictor] = {"training_mean": training_mean(train)}
  kw = dict(user_key=user_key, item_key=item_key)
  normal = _NormalEquations.build(train, _with_item(lin, train, item_key))
  if val is None:
    out["item_bias"] = item_bias(train, item_key=item_key)
    out["user_item_bias"] = user_item_bias(train, **kw)
    out["linear"] = normal.solve(10.0)
    return out
  out["training_mean"].val_rmse = rmse(out["training_mean"].predict(val), val["targets"])
  out["item_bias"] = _pick([(r, item_bias(train, r, item_key)) for r in bias_grid], val)
  out["user_item_bias"] = _pick(
      [((ru, ri), user_item_bias(train, ru, ri, **kw)) for ru in bias_grid for ri in bias_grid],
      val)
  out["linear"] = _pick([(r, normal.solve(r)) for r in ridge_grid], val)
  return out


# ------------------------------------------------------------ study protocol

RESULT_SUFFIXES = ("_rmse", "_mse", "_mae", "_loss", "_accuracy", "_acc")
RESULT_PREFIXES = ("val_", "validation_", "test_", "id_", "ood_")


def is_result_key(key: str) -> bool:
  """A metric/result key: ends in _rmse/_mse/_mae/_loss/_accuracy/_acc, or
  starts with val_/validation_/test_/id_/ood_."""
  return key.endswith(RESULT_SUFFIXES) or key.startswith(RESULT_PREFIXES)


def _freeze(v: Any) -> Hashable:
  if isinstance(v, (list, tuple)):
    return tuple(_freeze(x) for x in v)
  if isinstance(v, dict):
    return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
  return v


def _score(v: Any) -> float:
  """A metric value as a float; missing or NaN (a diverged run) counts as +inf."""
  if v is None:
    return math.inf
  v = float(v)
  return math.inf if math.isnan(v) else v


def select_by_validation(records: Sequence[Mapping[str, Any]], group_keys: Sequence[str],
                         hparam_keys: Sequence[str] | None = None,
                         metric: str = "val_rmse",
                         seed_key: str = "seed") -> list[Mapping[str, Any]]:
  """Per group, the records of the setting with the lowest mean `metric` over seeds.

  A *setting* is the tuple of the record's `hparam_keys` values. When
  `hparam_keys` is None it is every key of the record except the
  `group_keys`, `seed_key`, `metric` and result keys (`is_result_key`: e.g.
  val_rmse, id_rmse, ood_rmse). Runs of one setting differ only by seed; the
  setting's score is the mean of `metric` over its runs (a missing or NaN
  metric counts as +inf, so a diverged seed disqualifies its setting).
  Ties go to the setting first seen in record order. Only `metric` is read
  for selection; a metric naming a test split is refused.

  Returns:
    The chosen settings' records (all their seeds), groups in order of first
    appearance, records in input order within a group.
  """
  if "test" in metric:
    raise ValueError(f"select_by_validation: refusing to select on a test metric {metric!r}")
  group_keys = tuple(group_keys)
  skip = set(group_keys) | {seed_key, metric}
  groups: dict[Hashable, dict[Hashable, list[Mapping[str, Any]]]] = {}
  for r in records:
    if hparam_keys is None:
      keys = sorted(k for k in r if k not in skip and not is_result_key(k))
      setting = tuple((k, _freeze(r[k])) for k in keys)
    else:
      setting = tuple((k, _freeze(r.get(k))) for k in hparam_keys)
    group = tuple(_freeze(r.get(k)) for k in group_keys)
    groups.setdefault(group, {}).setdefault(setting, []).append(r)
  out = []
  for settings in groups.values():
    best, best_score = None, math.inf
    for runs in settings.values():
      score = sum(_score(r.get(metric)) for r in runs) / len(runs)
      if best is None or score < best_score:
        best, best_score = runs, score
    out.extend(best)
  return out


def is_collapsed(pred_std: float | None, rmses: Mapping[str, float],
                 mean_rmses: Mapping[str, float], std_tol: float = 1e-3,
                 rmse_tol: float = 1e-4) -> bool:
  """True for a run that learned a constant, from its evaluation summary.

  Collapsed: the std of its predictions (`pred_std`, None or NaN: unknown) is
  below `std_tol` stars, or its RMSE on every split of `rmses` equals, within
  `rmse_tol`, the training-mean predictor's on that split (`mean_rmses`).
  """
  if pred_std is not None and math.isfinite(float(pred_std)) and float(pred_std) < std_tol:
    return True
  return bool(rmses) and all(abs(float(v) - mean_rmses[k]) <= rmse_tol
                             for k, v in rmses.items())
