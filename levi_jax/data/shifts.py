"""Distribution shifts, declared as data, and the splits they induce.

A `Shift` names a training population and an OOD population, each a conjunction
of `Clause`s over table columns (user, item or rating level; see
`levi_jax.data.table`). `split_rows` turns a shift into four disjoint sets of
ratings:

* `train`, `validation`, `id_test`: the training population, partitioned by a
  seeded hash of the holdout unit (a rating, a user or an item), so that
  `id_test` holds exactly round(id_test_fraction * units) units and
  `validation` round(validation_fraction * units) of them;
* `ood_test`: the OOD population.

Ratings in neither population are unused. Where a shift declares `unseen`
users or items, no OOD user (item) occurs anywhere in the training population;
the split checks this on the data and fails loudly if the declaration is wrong.
User-attribute shifts hold out users (and item-attribute shifts items), so that
ID and OOD test differ in population only, not in cold start.

Shares are rating-weighted (`add_derived_columns`), so `*_share > 0.5`
selects units holding about half of all ratings.

Pure numpy; no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Mapping

import numpy as np

from levi_jax.data.table import ITEM, ROW, USER, RatingsTable

SPLITS = ("train", "validation", "id_test", "ood_test")
SPLIT_SEED = 0

_SET_OPS = ("in", "not_in", "any_in", "none_in")
_CMP_OPS = {"lt": np.less, "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal}


@dataclasses.dataclass(frozen=True)
class Clause:
  """One condition on a column: `column op value`.

  Ops: `in` / `not_in` (scalar column, value a tuple), `any_in` / `none_in`
  (bag column: some / no member in the tuple), `lt`, `le`, `gt`, `ge` (numeric
  column, value a number). A missing value (NaN, '', empty bag) satisfies no
  clause, so such ratings fall in neither population.
  """

  column: str
  op: str
  value: Any

  def __post_init__(self):
    if self.op not in _SET_OPS and self.op not in _CMP_OPS:
      raise ValueError(f"clause on {self.column!r}: unknown op {self.op!r}; "
                       f"expected one of {_SET_OPS + tuple(_CMP_OPS)}")
    if self.op in _SET_OPS and not isinstance(self.value, tuple):
      raise ValueError(f"clause on {self.column!r}: op {self.op!r} needs a tuple value")

  def mask(self, values: np.ndarray) -> np.ndarray:
    """Boolean mask of the entries of `values` that satisfy the clause."""
    values = np.asarray(values)
    if self.op in _CMP_OPS:
      with np.errstate(invalid="ignore"):
        return _CMP_OPS[self.op](values.astype(np.float64), float(self.value))
    allowed = set(self.value)
    if self.op in ("any_in", "none_in"):
      hit = np.fromiter((any(v in allowed for v in bag) for bag in values), bool, len(values))
      present = np.fromiter((len(bag) > 0 for bag in values), bool, len(values))
      return hit if self.op == "any_in" else present & ~hit
    hit = np.fromiter((v in allowed for v in values.tolist()), bool, len(values))
    if self.op == "in":
      return hit
    return _present(values) & ~hit

  def __str__(self) -> str:
    return f"{self.column} {self.op} {self.value!r}"


def _present(values: np.ndarray) -> np.ndarray:
  if values.dtype.kind == "f":
    return ~np.isnan(values)
  if values.dtype == object:
    return np.fromiter((v != "" and v is not None for v in values), bool, len(values))
  return np.ones(len(values), bool)


@dataclasses.dataclass(frozen=True)
class Shift:
  """A training population and a shifted (OOD) population.

  Attributes:
    name: short name, unique within a family.
    family: 'movielens', 'amazon' or 'pretrain'.
    kind: 'user', 'item' or 'time' (what shifts).
    description: one line.
    train: clauses (ANDed) selecting the training population; () = all ratings.
    ood: clauses selecting the OOD population; None for no OOD split.
    id_test_fraction: fraction of the training population's holdout units in `id_test`.
    validation_fraction: fraction of them in `validation`.
    holdout: the unit held out for id_test/validation: 'row', 'user' or 'item'.
    unseen: 'user' and/or 'item': OOD users (items) must not occur in the
      training population.
    datasets: the datasets it applies to (None: all of the family).
  """

  name: str
  family: str
  kind: str
  description: str
  train: tuple[Clause, ...]
  ood: tuple[Clause, ...] | None
  id_test_fraction: float = 0.2
  validation_fraction: float = 0.1
  holdout: str = ROW
  unseen: tuple[str, ...] = ()
  datasets: tuple[str, ...] | None = None

  def __post_init__(self):
    if self.holdout not in (ROW, USER, ITEM):
      raise ValueError(f"shift {self.name}: holdout must be row, user or item")
    if not set(self.unseen) <= {USER, ITEM}:
      raise ValueError(f"shift {self.name}: unseen must name 'user' and/or 'item'")
    if not (0 <= self.id_test_fraction and 0 <= self.validation_fraction
            and self.id_test_fraction + self.validation_fraction < 1):
      raise ValueError(f"shift {self.name}: fractions must be >= 0 and sum to < 1")

  @property
  def splits(self) -> tuple[str, ...]:
    return SPLITS if self.ood is not None else SPLITS[:3]

  def population_mask(self, columns: Mapping[str, np.ndarray], which: str = "train") -> np.ndarray:
    """Evaluates the train or ood clauses on columns of equal length (e.g. a user table)."""
    clauses = self.train if which == "train" else self.ood
    if clauses is None:
      raise ValueError(f"shift {self.name} has no OOD population")
    n = len(next(iter(columns.values())))
    mask = np.ones(n, bool)
    for c in clauses:
      if c.column not in columns:
        raise KeyError(f"shift {self.name}: clause {c} needs column {c.column!r}; "
                       f"have {sorted(columns)}")
      mask &= c.mask(columns[c.column])
    return mask


def population(table: RatingsTable, clauses: tuple[Clause, ...]) -> np.ndarray:
  """Row mask of the ratings satisfying all `clauses`."""
  mask = np.ones(table.num_rows, bool)
  for c in clauses:
    level = table.level(c.column)
    if level == ROW:
      mask &= c.mask(table.rows[c.column])
    else:
      side = table.users if level == USER else table.items
      index = table.rows["user_index" if level == USER else "item_index"]
      mask &= c.mask(side[c.column])[index]
  return mask


def _splitmix64(x: np.ndarray) -> np.ndarray:
  x = (x + np.uint64(0x9E3779B97F4A7C15)).astype(np.uint64)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def stable_hash(strings: np.ndarray, seed: int) -> np.ndarray:
  """A 64-bit hash of each string that does not depend on the process or order."""
  salt = seed.to_bytes(8, "little", signed=False)
  return np.fromiter(
      (int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8, salt=salt).digest(),
                      "little") for s in strings), np.uint64, len(strings))


def holdout_keys(table: RatingsTable, unit: str, seed: int) -> np.ndarray:
  """Per rating, the hash of its holdout unit (equal for ratings of one user/item)."""
  hu = stable_hash(table.users["user_id"], seed)[table.rows["user_index"]]
  if unit == USER:
    return hu
  hi = stable_hash(table.items["item_id"], seed)[table.rows["item_index"]]
  if unit == ITEM:
    return hi
  with np.errstate(over="ignore"):
    ts = table.rows["timestamp"].astype(np.uint64)
    return _splitmix64(hu ^ _splitmix64(hi ^ _splitmix64(ts)))


def split_rows(table: RatingsTable, shift: Shift, seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
  """The shift's splits of `table`: split name -> sorted rating (row) indices.

  Raises:
    ValueError: if the populations overlap, a declared-unseen user/item occurs
      in both, or a required split comes out empty.
  """
  train_pop = population(table, shift.train)
  ood = population(table, shift.ood) if shift.ood is not None else np.zeros_like(train_pop)
  both = train_pop & ood
  if both.any():
    raise ValueError(f"shift {shift.name}: {both.sum()} ratings are in both the training and "
                     "the OOD population; the clauses must be disjoint")
  for unit in shift.unseen:
    index = table.rows["user_index" if unit == USER else "item_index"]
    shared = np.intersect1d(index[train_pop], index[ood])
    if len(shared):
      ids = (table.users["user_id"] if unit == USER else table.items["item_id"])[shared[:5]]
      raise ValueError(f"shift {shift.name} declares unseen {unit}s, but {len(shared)} {unit}s "
                       f"occur in both populations (e.g. {list(ids)})")
  with np.errstate(over="ignore"):
    keys = holdout_keys(table, shift.holdout, seed)
  rows = np.flatnonzero(train_pop)
  if shift.holdout == ROW:
    unit_of_row = np.arange(len(rows))
    unit_keys = keys[rows]
  else:
    index = table.rows["user_index" if shift.holdout == USER else "item_index"][rows]
    _, first, unit_of_row = np.unique(index, return_index=True, return_inverse=True)
    unit_keys = keys[rows][first]
  n_units = len(unit_keys)
  rank = np.empty(n_units, np.int64)
  rank[np.lexsort((np.arange(n_units), unit_keys))] = np.arange(n_units)
  n_test = int(round(shift.id_test_fraction * n_units))
  n_val = int(round(shift.validation_fraction * n_units))
  row_rank = rank[unit_of_row]
  out = {"id_test": rows[row_rank < n_test],
         "validation": rows[(row_rank >= n_test) & (row_rank < n_test + n_val)],
         "train": rows[row_rank >= n_test + n_val]}
  if shift.ood is not None:
    out["ood_test"] = np.flatnonzero(ood)
  required = ["train"] + (["id_test"] if shift.id_test_fraction else []) + (
      ["ood_test"] if shift.ood is not None else [])
  empty = [s for s in required if not len(out[s])]
  if empty:
    raise ValueError(
        f"shift {shift.name} on {table.dataset} ({table.source}): empty {empty}. Training "
        f"population {int(train_pop.sum())} ratings "
        f"({' AND '.join(map(str, shift.train)) or 'all'})"
        f", OOD population {int(ood.sum())} ratings "
        f"({' AND '.join(map(str, shift.ood or ())) or 'none'}).")
  return {s: out[s].astype(np.int64) for s in shift.splits}


def _in(column: str, *values: Any) -> Clause:
  return Clause(column, "in", tuple(values))


def _not_in(column: str, *values: Any) -> Clause:
  return Clause(column, "not_in", tuple(values))


_DARK = ("Crime", "Film-Noir", "Horror", "Mystery", "Thriller", "War")
_FAMILY = ("Animation", "Children")
_STUDENT = ("student",)
_TECH = ("programmer", "technician/engineer", "scientist")
# Media categories under both spellings: Amazon 2018 files and amazon_us_reviews TSVs.
MEDIA_CATEGORIES = ("Books", "Kindle_Store", "Movies_and_TV", "CDs_and_Vinyl", "Digital_Music",
                    "Amazon_Instant_Video", "Magazine_Subscriptions", "Digital_Ebook_Purchase",
                    "Digital_Music_Purchase", "Digital_Video_Download", "Music", "Video",
                    "Video_DVD")


def _pair(name_ab: str, name_ba: str, family: str, kind: str, desc_ab: str, desc_ba: str,
          a: tuple[Clause, ...], b: tuple[Clause, ...], **kw) -> list[Shift]:
  return [Shift(name_ab, family, kind, desc_ab, a, b, **kw),
          Shift(name_ba, family, kind, desc_ba, b, a, **kw)]


def _shared_shifts(family: str) -> list[Shift]:
  """Activity, popularity and time shifts; defined the same way for both families."""
  heavy, light = (Clause("user_activity_share", "gt", 0.5),), (
      Clause("user_activity_share", "le", 0.5),)
  head, tail = (Clause("item_popularity_share", "gt", 0.5),), (
      Clause("item_popularity_share", "le", 0.5),)
  return [
      *_pair("activity_heavy_to_light", "activity_light_to_heavy", family, "user",
             "train on the heaviest raters (half of all ratings), test on the rest",
             "train on the lighter raters, test on the heaviest", heavy, light,
             holdout=USER, unseen=(USER,)),
      *_pair("popularity_head_to_tail", "popularity_tail_to_head", family, "item",
             "train on the most rated items (half of all ratings), test on the long tail",
             "train on the long tail, test on the most rated items", head, tail,
             holdout=ITEM, unseen=(ITEM,)),
      Shift("time_later", family, "time",
            "train on the earliest 80% of ratings, test on the latest 20%",
            (Clause("time_share", "le", 0.8),), (Clause("time_share", "gt", 0.8),)),
      Shift("time_new_users", family, "time",
            "train on early ratings of early users, test on users who joined in the last 20%",
            (Clause("user_first_time_share", "le", 0.8), Clause("time_share", "le", 0.8)),
            (Clause("user_first_time_share", "gt", 0.8),), holdout=USER, unseen=(USER,)),
  ]


def _movielens_shifts() -> list[Shift]:
  f = "movielens"
  return [
      *_pair("gender_m_to_f", "gender_f_to_m", f, "user", "train on men, test on women",
             "train on women, test on men", (_in("user_gender", True),),
             (_in("user_gender", False),), holdout=USER, unseen=(USER,)),
      *_pair("age_young_to_old", "age_old_to_young", f, "user",
             "train on users under 35, test on users 35 and over",
             "train on users 35 and over, test on users under 35",
             (Clause("bucketized_user_age", "lt", 35),),
             (Clause("bucketized_user_age", "ge", 35),), holdout=USER, unseen=(USER,)),
      Shift("occupation_other_to_student", f, "user", "train on non-students, test on students",
            (_not_in("user_occupation_label", *_STUDENT),),
            (_in("user_occupation_label", *_STUDENT),), holdout=USER, unseen=(USER,)),
      Shift("occupation_other_to_tech", f, "user",
            "train on non-technical occupations, test on programmers, engineers, scientists",
            (_not_in("user_occupation_label", *_TECH),),
            (_in("user_occupation_label", *_TECH),), holdout=USER, unseen=(USER,)),
      *_shared_shifts(f),
      *_pair("genre_light_to_dark", "genre_dark_to_light", f, "item",
             "train on films without crime/noir/horror/mystery/thriller/war, test on those",
             "train on crime/noir/horror/mystery/thriller/war films, test on the others",
             (Clause("movie_genres", "none_in", _DARK),),
             (Clause("movie_genres", "any_in", _DARK),),
             holdout=ITEM, unseen=(ITEM,)),
      Shift("genre_other_to_family", f, "item",
            "train on films that are not animation/children's, test on those",
            (Clause("movie_genres", "none_in", _FAMILY),),
            (Clause("movie_genres", "any_in", _FAMILY),), holdout=ITEM, unseen=(ITEM,)),
      *_pair("year_old_to_new", "year_new_to_old", f, "item",
             "train on older films (half of all ratings), test on newer",
             "train on newer films, test on older", (Clause("movie_year_share", "le", 0.5),),
             (Clause("movie_year_share", "gt", 0.5),), holdout=ITEM, unseen=(ITEM,)),
  ]


def _amazon_shifts() -> list[Shift]:
  f = "amazon"
  media = (_in("item_category", *MEDIA_CATEGORIES),)
  goods = (_not_in("item_category", *MEDIA_CATEGORIES),)
  return [
      *_pair("category_media_to_goods", "category_goods_to_media", f, "item",
             "train on media categories (books, film, music), test on goods",
             "train on goods, test on media categories", media, goods,
             holdout=ITEM, unseen=(ITEM,)),
      *_shared_shifts(f),
      *_pair("price_low_to_high", "price_high_to_low", f, "item",
             "train on cheaper items (half of priced ratings), test on dearer ones",
             "train on dearer items, test on cheaper ones",
             (Clause("item_price_share", "le", 0.5),), (Clause("item_price_share", "gt", 0.5),),
             holdout=ITEM, unseen=(ITEM,), datasets=("amazon_2018",)),
  ]


PRETRAIN_ALL = Shift("all", "pretrain", "none", "all ratings of the pre-training corpus", (), None,
                     id_test_fraction=0.1, validation_fraction=0.1)

SHIFTS: tuple[Shift, ...] = tuple(_movielens_shifts() + _amazon_shifts() + [PRETRAIN_ALL])


def shifts_for(dataset: str, family: str) -> list[Shift]:
  """The shifts that apply to `dataset` (of `family`), in declaration order."""
  return [s for s in SHIFTS if s.family == family and (s.datasets is None or dataset in s.datasets)]
