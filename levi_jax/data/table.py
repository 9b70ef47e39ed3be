"""The in-memory form every source is parsed into: ratings plus user and item side tables.

A `RatingsTable` is relational: one row per rating (user index, item index,
rating, timestamp) and one row per user / per item holding their attributes.
Every source (raw files in the publishers' formats, TFDS, the synthetic world)
builds it through `build_table`, which fixes a canonical order (users and items
sorted by id; ratings sorted by timestamp, then user id, item id and rating), so
the same ratings give the same table whichever source they came from.

Column conventions: strings are `object` arrays of `str` ('' = missing),
numbers are float32/float64 (NaN = missing), bags are `object` arrays of tuples
of `str` (() = missing). `add_derived_columns` adds the shift-defining columns
(activity, popularity, time, release year and price shares).

Pure numpy; no TensorFlow.
"""

from __future__ import annotations

import array
import dataclasses
import re
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from levi_jax.data.load_report import LoadReport

USER, ITEM, ROW = "user", "item", "row"


@dataclasses.dataclass(eq=False)
class RatingsTable:
  """Ratings in relational form.

  Attributes:
    dataset: name of the dataset (a key of `levi_jax.data.datasets.DATASETS`).
    source: where it was read from (a directory, or `tfds:<name>`).
    users: per-user columns; `user_id` (str) first.
    items: per-item columns; `item_id` (str) first.
    rows: per-rating columns: `user_index`, `item_index` (int32 into the side
      tables), `rating` (float32), `timestamp` (int64, seconds since epoch).
    report: malformed-row accounting of the load.
  """

  dataset: str
  source: str
  users: dict[str, np.ndarray]
  items: dict[str, np.ndarray]
  rows: dict[str, np.ndarray]
  report: LoadReport

  @property
  def num_rows(self) -> int:
    return len(self.rows["rating"])

  @property
  def num_users(self) -> int:
    return len(self.users["user_id"])

  @property
  def num_items(self) -> int:
    return len(self.items["item_id"])

  def level(self, name: str) -> str:
    """Whether column `name` is a user, item or row (rating) column."""
    for level, cols in ((ROW, self.rows), (USER, self.users), (ITEM, self.items)):
      if name in cols:
        return level
    raise KeyError(f"{self.dataset}: no column {name!r}; user columns {sorted(self.users)}, "
                   f"item columns {sorted(self.items)}, rating columns {sorted(self.rows)}")

  def column(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
    """Column `name` gathered per rating (for all ratings, or those in `rows`)."""
    level = self.level(name)
    if level == ROW:
      values = self.rows[name]
      return values if rows is None else values[rows]
    index = self.rows["user_index" if level == USER else "item_index"]
    if rows is not None:
      index = index[rows]
    return (self.users if level == USER else self.items)[name][index]

  def records(self, names: Mapping[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """Yields one denormalized dict per rating, keys renamed by `names`."""
    names = names or {}
    ucols = [c for c in self.users if not _is_derived(c)]
    icols = [c for c in self.items if not _is_derived(c)]
    for r in range(self.num_rows):
      u, i = self.rows["user_index"][r], self.rows["item_index"][r]
      ex = {c: self.users[c][u] for c in ucols}
      ex.update({c: self.items[c][i] for c in icols})
      ex["rating"] = self.rows["rating"][r]
      ex["timestamp"] = self.rows["timestamp"][r]
      yield {names.get(k, k): v for k, v in ex.items()}


_DERIVED = ("user_activity", "user_activity_share", "user_first_time_share", "user_zip_region",
            "item_popularity", "item_popularity_share", "movie_year", "movie_year_share",
            "item_price_share", "item_price_bucket", "time_share")


def _is_derived(name: str) -> bool:
  return name in _DERIVED


def _column_array(values: Sequence[Any], kind: str) -> np.ndarray:
  if kind == "str":
    out = np.empty(len(values), dtype=object)
    out[:] = [str(v) if isinstance(v, str) else "" for v in values]
    return out
  if kind == "bag":
    out = np.empty(len(values), dtype=object)
    out[:] = [tuple(v) if v else () for v in values]
    return out
  if kind == "bool":
    return np.asarray([bool(v) for v in values], dtype=bool)
  if kind == "float32":
    return np.asarray([np.nan if v is None else v for v in values], dtype=np.float32)
  if kind == "float64":
    return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
  raise ValueError(f"unknown column kind {kind!r}")


def build_table(dataset: str, source: str, *, user_ids: Sequence[str] | Interned,
                item_ids: Sequence[str] | Interned, ratings: Sequence[float],
                timestamps: Sequence[int], user_attrs: Mapping[str, Mapping[str, Any]],
                item_attrs: Mapping[str, Mapping[str, Any]], user_columns: Mapping[str, str],
                item_columns: Mapping[str, str], report: LoadReport) -> RatingsTable:
  """Builds a canonical `RatingsTable` from parallel per-rating lists.

  Args:
    dataset: dataset name.
    source: where the data came from (for messages).
    user_ids, item_ids, ratings, timestamps: one entry per rating (ids as
      strings, or `Interned`).
    user_attrs: user id -> {column: value}; users without an entry get missing values.
    item_attrs: item id -> {column: value}.
    user_columns, item_columns: column name -> kind ('str', 'bag', 'bool',
      'float32', 'float64'), in output order.
    report: the load's malformed-row report.

  Returns:
    The table, with `add_derived_columns` applied.
  """
  users, uinv = _sorted_ids(user_ids)
  items, iinv = _sorted_ids(item_ids)
  rating = np.asarray(ratings, dtype=np.float32)
  ts = np.asarray(timestamps, dtype=np.int64)
  # Canonical order: time, then user, item (ids are sorted, so indices order them), rating.
  order = np.lexsort((rating, iinv, uinv, ts))
  user_table = {"user_id": _column_array(list(users), "str")}
  for col, kind in user_columns.items():
    user_table[col] = _column_array([user_attrs.get(u, {}).get(col) for u in users], kind)
  item_table = {"item_id": _column_array(list(items), "str")}
  for col, kind in item_columns.items():
    item_table[col] = _column_array([item_attrs.get(i, {}).get(col) for i in items], kind)
  rows = {"user_index": uinv[order].astype(np.int32), "item_index": iinv[order].astype(np.int32),
          "rating": rating[order], "timestamp": ts[order]}
  table = RatingsTable(dataset, source, user_table, item_table, rows, report)
  add_derived_columns(table)
  return table


class Interned:
  """A column of strings as per-row int32 codes into its distinct values (first seen first).

  What a parser holds per rating row is then 4 bytes, not a string object: each
  user's and item's id is held once, however many rows name it.
  """

  def __init__(self):
    self.codes = array.array("i")
    self.values: list[str] = []
    self._index: dict[str, int] = {}

  def append(self, value: str) -> None:
    code = self._index.get(value)
    if code is None:
      code = self._index[value] = len(self.values)
      self.values.append(value)
    self.codes.append(code)

  def __len__(self) -> int:
    return len(self.codes)

  def __getitem__(self, row: int) -> str:
    return self.values[self.codes[row]]

  def code_array(self) -> np.ndarray:
    """The codes as int32 `[rows]` (equal strings, equal codes)."""
    return np.frombuffer(self.codes, np.int32).copy() if len(self.codes) else np.zeros(0, np.int32)

  def select(self, rows: np.ndarray) -> "Interned":
    """Rows `rows` only (values no kept row names stay, unused)."""
    out = Interned()
    out.values, out._index = self.values, self._index
    out.codes = array.array("i", self.code_array()[rows].tobytes())
    return out


def _sorted_ids(ids: Sequence[str] | Interned) -> tuple[np.ndarray, np.ndarray]:
  """The distinct ids, sorted, and each row's index among them (`np.unique`'s inverse)."""
  if not len(ids):
    return np.array([], dtype=str), np.array([], dtype=np.int64)
  if not isinstance(ids, Interned):
    return np.unique(np.asarray(ids, dtype=object).astype(str), return_inverse=True)
  used, inverse = np.unique(ids.code_array(), return_inverse=True)
  values = np.asarray([ids.values[c] for c in used.tolist()], dtype=str)
  order = np.argsort(values, kind="stable")
  rank = np.empty(len(order), np.int64)
  rank[order] = np.arange(len(order))
  return values[order], rank[inverse]


def weighted_share(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """Per unit, the share of total weight held by units whose value is <= its own.

  Units with a NaN value get NaN and are left out of the total. Ties share a value,
  so a threshold on the share never splits units with equal values.
  """
  values = np.asarray(values, dtype=np.float64)
  weights = np.asarray(weights, dtype=np.float64)
  out = np.full(values.shape, np.nan)
  ok = ~np.isnan(values)
  if not ok.any():
    return out
  v, w = values[ok], weights[ok]
  order = np.argsort(v, kind="stable")
  sorted_v, cum = v[order], np.cumsum(w[order])
  idx = np.searchsorted(sorted_v, v, side="right") - 1
  out[ok] = cum[idx] / cum[-1]
  return out


_YEAR_RE = re.compile(r"\((\d{4})\)\s*$")
_PRICE_EDGES = (5.0, 10.0, 20.0, 50.0, 100.0)
_PRICE_BUCKETS = ("<$5", "$5-10", "$10-20", "$20-50", "$50-100", ">$100")


def movie_year(title: str) -> float:
  """Release year from a MovieLens title such as 'Toy Story (1995)' (NaN if absent)."""
  m = _YEAR_RE.search(title)
  return float(m.group(1)) if m else np.nan


def price_bucket(price: float) -> str:
  """A coarse price band ('' if unknown)."""
  if np.isnan(price):
    return ""
  return _PRICE_BUCKETS[int(np.searchsorted(_PRICE_EDGES, price, side="right"))]


def add_derived_columns(table: RatingsTable) -> None:
  """Adds the columns shifts and features are defined on (in place).

  Shares are rating-weighted: `user_activity_share` > 0.5 selects the heaviest
  users, who together wrote about half of all ratings; likewise
  `item_popularity_share`, `movie_year_share` (older films first) and
  `item_price_share` (cheaper first). `time_share` is the fraction of ratings at
  or before a rating's timestamp; `user_first_time_share` is that of a user's
  first rating.
  """
  rows = table.rows
  n_u, n_i = table.num_users, table.num_items
  ts = rows["timestamp"]
  rows["time_share"] = weighted_share(ts.astype(np.float64), np.ones(len(ts)))
  activity = np.bincount(rows["user_index"], minlength=n_u)
  popularity = np.bincount(rows["item_index"], minlength=n_i)
  table.users["user_activity"] = activity.astype(np.int64)
  table.users["user_activity_share"] = weighted_share(activity, activity)
  first = np.full(n_u, np.inf)
  np.minimum.at(first, rows["user_index"], rows["time_share"])
  table.users["user_first_time_share"] = np.where(np.isinf(first), np.nan, first)
  table.items["item_popularity"] = popularity.astype(np.int64)
  table.items["item_popularity_share"] = weighted_share(popularity, popularity)
  if "user_zip_code" in table.users:
    region = np.empty(n_u, dtype=object)
    region[:] = [z[:1].upper() if z[:1].isalnum() else "" for z in table.users["user_zip_code"]]
    table.users["user_zip_region"] = region
  if "movie_title" in table.items:
    years = np.asarray([movie_year(t) for t in table.items["movie_title"]], dtype=np.float64)
    table.items["movie_year"] = years
    table.items["movie_year_share"] = weighted_share(years, popularity)
  if "item_price" in table.items:
    price = table.items["item_price"].astype(np.float64)
    table.items["item_price_share"] = weighted_share(price, popularity)
    bucket = np.empty(n_i, dtype=object)
    bucket[:] = [price_bucket(p) for p in price]
    table.items["item_price_bucket"] = bucket
