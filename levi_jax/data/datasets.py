"""The datasets: how each is read, serialized to text, and cut into categorical features.

| name             | raw files (canonical folder)             | TFDS                     |
|------------------|------------------------------------------|--------------------------|
| movielens_100k   | u.data, u.user, u.item (`ml-100k/`)       | movielens/100k-ratings   |
| movielens_1m     | ratings.dat, users.dat, movies.dat (`ml-1m/`) | movielens/1m-ratings |
| amazon_2018      | <Cat>.json[.gz], meta_<Cat>.json[.gz] (`amazon_2018/`) | -          |
| amazon_us        | amazon_reviews_us_<Cat>_v1_00.tsv[.gz] (`amazon_us/`) | -           |
| pretrain_corpus  | MovieLens 100K files (`pretrain/ml-100k/`) | -                       |
| movielens_100k_history, movielens_1m_history | as movielens_100k, movielens_1m | as they |

`pretrain_corpus` is the synthetic world's pre-training corpus (see
`levi_jax.data.synthetic`), read with the MovieLens 100K parser.

Text (`inputs`) is a readable serialization of the side information, e.g.
"user: 25-34, female, programmer, zip 94043. movie: Toy Story (1995). genres:
animation, children, comedy." Amazon has no user attributes, so its text
describes the product only ("product: ... category: ... brand: ... price: ...").

A dataset with `history` > 0 (`movielens_100k_history`, `movielens_1m_history`:
the same files) ends each rating's text with the user's latest earlier ratings
of the task's training split, most recent first, as in Kang et al. 2023 ("Do
LLMs Understand User Preferences?"): "... earlier ratings: Fargo (1996): 5;
Heat (1995): 3." (`history_texts`). Only ratings strictly earlier than the
rated one are listed, and only training ratings: no rating's text holds its own
label or an evaluation split's, and a user the training split does not have
gets no history. It gives the pre-trained view something the id embeddings of
the small model do not read.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from typing import Callable

import numpy as np

from levi_jax.data import formats, paths
from levi_jax.data.table import RatingsTable

DEFAULT_MAX_BAD_FRACTION = 0.01
DEFAULT_DUPLICATES = "keep"


@dataclasses.dataclass(frozen=True)
class FeatureDef:
  """A categorical feature of the small task model, read from one table column.

  Attributes:
    name: the feature's key in examples.
    column: the table column it encodes.
    max_values: vocabulary bound: the most frequent values in the training split
      get ids 2..max_values+1; the rest share the OOV id 1.
    bag_size: None for a scalar; K for a bag column (first K members kept).
  """

  name: str
  column: str
  max_values: int
  bag_size: int | None = None


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How to read one dataset.

  Attributes:
    name: dataset name, the first part of its task names.
    family: 'movielens', 'amazon' or 'pretrain' (which shifts apply).
    subdir: canonical folder under a data root.
    parse: reads the raw files under a data dir into a table; takes the keyword
      `duplicates` ('keep', 'drop' or 'error', see `levi_jax.data.formats`).
    features: the categorical features its examples carry.
    first_year: the year of its first rating; earlier timestamps are malformed rows.
    tfds_name: the TFDS dataset, if TFDS has it.
    description: one line.
    history: how many of the user's latest earlier training ratings end each
      rating's text (0: none; `history_texts`).
  """

  name: str
  family: str
  subdir: str
  parse: Callable[..., RatingsTable]
  features: tuple[FeatureDef, ...]
  first_year: int
  tfds_name: str | None = None
  description: str = ""
  history: int = 0


_ID_FEATURES = (FeatureDef("user_id", "user_id", 200_000),
                FeatureDef("item_id", "item_id", 200_000))
_ML_FEATURES = _ID_FEATURES + (
    FeatureDef("user_gender", "user_gender", 4),
    FeatureDef("bucketized_user_age", "bucketized_user_age", 16),
    FeatureDef("user_occupation_label", "user_occupation_label", 32),
    FeatureDef("user_zip_region", "user_zip_region", 64),
    FeatureDef("movie_genres", "movie_genres", 32, bag_size=6),
    FeatureDef("movie_year", "movie_year", 128),
)
_AMAZON_US_FEATURES = _ID_FEATURES + (FeatureDef("item_category", "item_category", 64),)
_AMAZON_FEATURES = _AMAZON_US_FEATURES + (
    FeatureDef("item_subcategories", "item_subcategories", 2000, bag_size=4),
    FeatureDef("item_brand", "item_brand", 5000),
    FeatureDef("item_price_bucket", "item_price_bucket", 8),
)


def _raw_spec(name: str, family: str, subdir: str, parser: Callable[..., RatingsTable],
              features: tuple[FeatureDef, ...], first_year: int, tfds_name: str | None,
              description: str, history: int = 0) -> DatasetSpec:
  """A spec whose `parse` is `parser` bound to its name, folder and first year."""
  parse = functools.partial(parser, dataset=name, subdir=subdir, first_year=first_year)
  return DatasetSpec(name, family, subdir, parse, features, first_year, tfds_name, description,
                     history)


# Ratings of the user's history a `*_history` dataset's texts end with.
HISTORY_RATINGS = 3


DATASETS: dict[str, DatasetSpec] = {
    s.name: s for s in (
        _raw_spec("movielens_100k", "movielens", "ml-100k", formats.parse_movielens_100k,
                  _ML_FEATURES, formats.ML100K_FIRST_YEAR, "movielens/100k-ratings",
                  "MovieLens 100K"),
        _raw_spec("movielens_1m", "movielens", "ml-1m", formats.parse_movielens_1m,
                  _ML_FEATURES, formats.ML1M_FIRST_YEAR, "movielens/1m-ratings", "MovieLens 1M"),
        _raw_spec("movielens_100k_history", "movielens", "ml-100k", formats.parse_movielens_100k,
                  _ML_FEATURES, formats.ML100K_FIRST_YEAR, "movielens/100k-ratings",
                  "MovieLens 100K, texts ending with the user's earlier ratings",
                  HISTORY_RATINGS),
        _raw_spec("movielens_1m_history", "movielens", "ml-1m", formats.parse_movielens_1m,
                  _ML_FEATURES, formats.ML1M_FIRST_YEAR, "movielens/1m-ratings",
                  "MovieLens 1M, texts ending with the user's earlier ratings", HISTORY_RATINGS),
        _raw_spec("amazon_2018", "amazon", "amazon_2018", formats.parse_amazon_2018,
                  _AMAZON_FEATURES, formats.AMAZON_2018_FIRST_YEAR, None,
                  "Amazon Reviews 2018 (Ni et al. 2019), JSON lines"),
        _raw_spec("amazon_us", "amazon", "amazon_us", formats.parse_amazon_us,
                  _AMAZON_US_FEATURES, formats.AMAZON_US_FIRST_YEAR, None,
                  "Amazon US reviews (the TSVs behind TFDS amazon_us_reviews)"),
        _raw_spec("pretrain_corpus", "pretrain", os.path.join("pretrain", "ml-100k"),
                  formats.parse_movielens_100k, _ML_FEATURES, formats.ML100K_FIRST_YEAR, None,
                  "the synthetic world's pre-training corpus (MovieLens 100K format)"),
    )
}

AGE_TEXT = {1: "under 18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49", 50: "50-55",
            56: "56+"}


def _ml_user_text(users: dict[str, np.ndarray]) -> list[str]:
  out = []
  for g, age, occ, z in zip(users["user_gender"], users["bucketized_user_age"],
                            users["user_occupation_text"], users["user_zip_code"]):
    parts = [AGE_TEXT.get(int(age), f"age {int(age)}") if not math.isnan(age) else "",
             "male" if g else "female", occ, f"zip {z}" if z else ""]
    out.append("user: " + ", ".join(p for p in parts if p) + ".")
  return out


def _ml_item_text(items: dict[str, np.ndarray]) -> list[str]:
  out = []
  for title, genres in zip(items["movie_title"], items["movie_genres"]):
    text = f"movie: {title}."
    if genres:
      text += " genres: " + ", ".join(g.lower() for g in genres) + "."
    out.append(text)
  return out


def _amazon_item_text(items: dict[str, np.ndarray]) -> list[str]:
  out = []
  n = len(items["item_id"])
  subcats = items.get("item_subcategories", [()] * n)
  brands = items.get("item_brand", [""] * n)
  prices = items.get("item_price", [math.nan] * n)
  for title, cat, sub, brand, price in zip(items["item_title"], items["item_category"], subcats,
                                           brands, prices):
    text = f"product: {title or 'unknown'}."
    if cat:
      text += " category: " + " > ".join([cat.replace("_", " "), *sub]) + "."
    if brand:
      text += f" brand: {brand}."
    if not math.isnan(price):
      text += f" price: ${price:.2f}."
    out.append(text)
  return out


def side_texts(table: RatingsTable) -> tuple[np.ndarray, np.ndarray]:
  """Per-user and per-item text ('' where the dataset has no user side text)."""
  family = DATASETS[table.dataset].family
  if family in ("movielens", "pretrain"):
    u, i = _ml_user_text(table.users), _ml_item_text(table.items)
  else:
    u, i = [""] * table.num_users, _amazon_item_text(table.items)
  user_text = np.empty(len(u), dtype=object)
  user_text[:] = u
  item_text = np.empty(len(i), dtype=object)
  item_text[:] = i
  return user_text, item_text


def join_texts(user_text: np.ndarray, item_text: np.ndarray,
               history: list[str] | None = None) -> list[str]:
  """The `inputs` text of ratings, from their gathered user and item texts (and history)."""
  out = [f"{u} {i}" if u else i for u, i in zip(user_text, item_text)]
  if history is not None:
    out = [f"{t} {h}" if h else t for t, h in zip(out, history)]
  return out


@dataclasses.dataclass(frozen=True)
class UserHistory:
  """A training split's ratings, by user and time: what `history_texts` lists.

  Attributes:
    size: how many earlier ratings a text lists (at most).
    keys: `user_index * 2**34 + timestamp` of the training ratings, sorted.
    rows: the training rating indices in that order (ties in row order).
  """

  size: int
  keys: np.ndarray
  rows: np.ndarray

  @classmethod
  def build(cls, table: RatingsTable, train_rows: np.ndarray, size: int) -> "UserHistory":
    rows = np.asarray(train_rows, np.int64)
    keys = cls._keys(table, rows)
    order = np.argsort(keys, kind="stable")
    return cls(size, keys[order], rows[order])

  @staticmethod
  def _keys(table: RatingsTable, rows: np.ndarray) -> np.ndarray:
    ts = table.rows["timestamp"][rows].astype(np.int64)
    if ts.size and (ts.min() < 0 or ts.max() >= 2**34):
      raise ValueError(f"{table.dataset}: rating timestamps must lie in [0, 2**34) seconds for "
                       f"the user history, got [{ts.min()}, {ts.max()}]")
    return (table.rows["user_index"][rows].astype(np.int64) << 34) + ts

  def earlier(self, table: RatingsTable, rows: np.ndarray) -> np.ndarray:
    """int64 [len(rows), size]: each rating's user's latest training ratings strictly
    before it, most recent first; -1 where there are fewer."""
    rows = np.asarray(rows, np.int64)
    keys = self._keys(table, rows)
    end = np.searchsorted(self.keys, keys, "left")  # first rating at or after this time
    start = np.searchsorted(self.keys, (keys >> 34) << 34, "left")  # the user's first
    out = np.full((len(rows), self.size), -1, np.int64)
    for j in range(self.size):
      pos = end - 1 - j
      ok = pos >= start
      out[ok, j] = self.rows[pos[ok]]
    return out


@functools.lru_cache(maxsize=8)
def _history_pieces(table: RatingsTable) -> tuple[np.ndarray, np.ndarray]:
  """'<item>: <rating>' for each (item, distinct rating value), and each row's index into it.

  Computed once per table (the examples cache asks for texts chunk by chunk)."""
  column = "movie_title" if DATASETS[table.dataset].family in ("movielens", "pretrain") \
      else "item_title"
  names = [n or "unknown" for n in table.items[column]]
  values, codes = np.unique(table.rows["rating"], return_inverse=True)
  formatted = [f"{float(v):g}" for v in values]
  pieces = np.empty(len(names) * len(values), dtype=object)
  pieces[:] = [f"{n}: {r}" for n in names for r in formatted]
  return pieces, table.rows["item_index"].astype(np.int64) * len(values) + codes.reshape(-1)


def clear_history_cache() -> None:
  """Drops the per-table history pieces `history_texts` keeps."""
  _history_pieces.cache_clear()


def history_texts(table: RatingsTable, earlier: np.ndarray) -> list[str]:
  """'earlier ratings: <item>: <rating>; ...' per row of `UserHistory.earlier` ('' for none)."""
  earlier = np.asarray(earlier, np.int64)
  if not earlier.size:
    return [""] * len(earlier)
  pieces, row_piece = _history_pieces(table)
  valid = earlier >= 0
  # Each row's pieces, -1 (no rating) read as row 0 and masked; object-array `+` joins the
  # strings elementwise without a Python loop over rows.
  past = pieces[row_piece[np.where(valid, earlier, 0)]]
  out = "earlier ratings: " + past[:, 0]
  for j in range(1, earlier.shape[1]):
    out = np.where(valid[:, j], out + "; " + past[:, j], out)
  out = np.where(valid[:, 0], out + ".", "")
  return out.tolist()


def get_spec(dataset: str) -> DatasetSpec:
  """The spec of `dataset`; a KeyError lists the known ones."""
  if dataset not in DATASETS:
    raise KeyError(f"unknown dataset {dataset!r}; known: {sorted(DATASETS)}")
  return DATASETS[dataset]


def dataset_dir_candidates(dataset: str, data_dir: str) -> list[str]:
  """Directories a dataset's raw files may be in, preferred first."""
  return [os.path.join(data_dir, get_spec(dataset).subdir), data_dir]


def fingerprint(dataset: str, data_dir: str) -> tuple:
  """What identifies the dataset's files in `data_dir`: each file's folder, name, size and
  modification time (a TFDS source: its name only)."""
  if paths.is_tfds(data_dir):
    return (data_dir,)
  out = []
  for d in dataset_dir_candidates(dataset, data_dir):
    if os.path.isdir(d):
      for name in sorted(os.listdir(d)):
        st = os.stat(os.path.join(d, name))
        out.append((d, name, st.st_size, st.st_mtime_ns))
  return tuple(out)


def load_table(dataset: str, data_dir: str | None = None,
               max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
               duplicates: str = DEFAULT_DUPLICATES) -> RatingsTable:
  """Reads `dataset` from `data_dir` (see `levi_jax.data.paths`), cached per process.

  Args:
    dataset: a key of `DATASETS`.
    data_dir: raw files, `tfds[:DIR]`, or None for `LEVI_DATA_DIR` (the
      synthetic world, the default of tasks, is
      `levi_jax.data.prepare.resolve_data_dir(None)`).
    max_bad_fraction: malformed-row tolerance per file.
    duplicates: rating rows repeating an earlier (user, item, timestamp): 'keep'
      (counted, a warning), 'drop' (the first of each kept) or 'error'. Raw files
      only; a TFDS source is read as TFDS holds it ('keep').

  Raises:
    MissingFilesError: no such files (the message lists the files expected).
    ValueError: no `data_dir` and no `LEVI_DATA_DIR`.
    MalformedDataError: a file has more malformed rows than `max_bad_fraction`,
      is in another encoding than the dataset declares, or has duplicates with
      `duplicates='error'`.
  """
  spec = get_spec(dataset)
  if duplicates not in formats.DUPLICATE_POLICIES:
    raise ValueError(f"duplicates must be one of {formats.DUPLICATE_POLICIES}, got "
                     f"{duplicates!r}")
  resolved = paths.explicit_data_dir(data_dir)
  if resolved is None:
    raise ValueError(f"load_table({dataset!r}): no data_dir and no ${paths.DATA_DIR_ENV}; "
                     "levi_jax.data.prepare.resolve_data_dir(None) names the default world")
  return _load_table(spec.name, resolved, fingerprint(spec.name, resolved), max_bad_fraction,
                     duplicates)


def clear_cache() -> None:
  """Drops the tables `load_table` holds (they are re-read on the next call)."""
  _load_table.cache_clear()


@functools.lru_cache(maxsize=8)
def _load_table(dataset: str, data_dir: str, fingerprint: tuple,
                max_bad_fraction: float, duplicates: str) -> RatingsTable:
  del fingerprint  # Part of the cache key only: files changed on disk are re-read.
  spec = DATASETS[dataset]
  if paths.is_tfds(data_dir):
    if spec.tfds_name is None:
      raise ValueError(f"{dataset} is not in TFDS; pass a directory of its raw files as data_dir")
    if duplicates != "keep":
      raise ValueError(f"duplicates={duplicates!r} applies to raw files; a TFDS source "
                       f"({data_dir}) is read as TFDS holds it: pass duplicates='keep', or a "
                       "directory of raw files")
    from levi_jax.data import tfds_source  # pylint: disable=g-import-not-at-top

    table = tfds_source.load_movielens(dataset, spec.tfds_name, paths.tfds_data_dir(data_dir))
  else:
    table = spec.parse(data_dir, duplicates=duplicates)
  table.report.check(max_bad_fraction)
  logging.info("%s: %d ratings, %d users, %d items from %s", dataset, table.num_rows,
               table.num_users, table.num_items, table.source)
  return table
