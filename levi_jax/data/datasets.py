"""The datasets: how each is read, serialized to text, and cut into categorical features.

| name             | raw files (canonical folder)             | TFDS                     |
|------------------|------------------------------------------|--------------------------|
| movielens_100k   | u.data, u.user, u.item (`ml-100k/`)       | movielens/100k-ratings   |
| movielens_1m     | ratings.dat, users.dat, movies.dat (`ml-1m/`) | movielens/1m-ratings |
| amazon_2018      | <Cat>.json[.gz], meta_<Cat>.json[.gz] (`amazon_2018/`) | -          |
| amazon_us        | amazon_reviews_us_<Cat>_v1_00.tsv[.gz] (`amazon_us/`) | -           |
| pretrain_corpus  | MovieLens 100K files (`pretrain/ml-100k/`) | -                       |

`pretrain_corpus` is the synthetic world's pre-training corpus (see
`levi_jax.data.synthetic`), read with the MovieLens 100K parser.

Text (`inputs`) is a readable serialization of the side information, e.g.
"user: 25-34, female, programmer, zip 94043. movie: Toy Story (1995). genres:
animation, children, comedy." Amazon has no user attributes, so its text
describes the product only ("product: ... category: ... brand: ... price: ...").
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
  """

  name: str
  family: str
  subdir: str
  parse: Callable[..., RatingsTable]
  features: tuple[FeatureDef, ...]
  first_year: int
  tfds_name: str | None = None
  description: str = ""


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
              description: str) -> DatasetSpec:
  """A spec whose `parse` is `parser` bound to its name, folder and first year."""
  parse = functools.partial(parser, dataset=name, subdir=subdir, first_year=first_year)
  return DatasetSpec(name, family, subdir, parse, features, first_year, tfds_name, description)


DATASETS: dict[str, DatasetSpec] = {
    s.name: s for s in (
        _raw_spec("movielens_100k", "movielens", "ml-100k", formats.parse_movielens_100k,
                  _ML_FEATURES, formats.ML100K_FIRST_YEAR, "movielens/100k-ratings",
                  "MovieLens 100K"),
        _raw_spec("movielens_1m", "movielens", "ml-1m", formats.parse_movielens_1m,
                  _ML_FEATURES, formats.ML1M_FIRST_YEAR, "movielens/1m-ratings", "MovieLens 1M"),
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


def join_texts(user_text: np.ndarray, item_text: np.ndarray) -> list[str]:
  """The `inputs` text of ratings, from their gathered user and item texts."""
  return [f"{u} {i}" if u else i for u, i in zip(user_text, item_text)]


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
