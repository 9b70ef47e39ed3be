"""From a task name to a prepared task: its table, splits, feature ids and texts.

A task is a dataset under a shift, named `<dataset>.<shift>` (e.g.
`movielens_100k.gender_m_to_f`; `pretrain_corpus.all` for the pre-training
corpus), with splits `train`, `validation`, `id_test` and `ood_test`.

`prepare` loads the dataset's table, splits it by the shift and encodes each
categorical feature as one int32 id per unit (scalar, or a [K] bag padded
with 0): 0 = missing, 1 = not among the training split's kept values (OOV),
2.. = values of the training split, most frequent first (ties by value). A
`PreparedTask` gives a split's `inputs` texts, feature ids and ratings
(`source_arrays`), from which `levi_jax.input_pipeline` builds numpy arrays
and `levi_jax.data.tasks` the seqio Tasks' sources. `vocabulary_path` names
the SentencePiece model of a task's `inputs`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import math
import os
from typing import Any

import numpy as np

from levi_jax.data import datasets, paths, shifts, spm, synthetic
from levi_jax.data.table import ROW, USER, RatingsTable
from levi_jax.models.task_net import OOV_ID, PAD_ID, CategoricalFeature

class UnknownTaskError(ValueError):
  """A task name that is not registered."""


def resolve_data_dir(data_dir: str | None) -> str:
  """An explicit data dir: the argument, `LEVI_DATA_DIR`, or the default synthetic world."""
  return paths.explicit_data_dir(data_dir) or synthetic.ensure_default_world()


def task_name(dataset: str, shift: str) -> str:
  """The task name of `dataset` under `shift`."""
  return f"{dataset}.{shift}"


@functools.lru_cache(maxsize=None)
def _task_table() -> dict[str, tuple[str, shifts.Shift]]:
  out = {}
  for spec in datasets.DATASETS.values():
    for s in shifts.shifts_for(spec.name, spec.family):
      out[task_name(spec.name, s.name)] = (spec.name, s)
  return out


def task_names() -> list[str]:
  """All task names, datasets in declaration order, shifts in declaration order."""
  return list(_task_table())


def lookup_task(name: str) -> tuple[datasets.DatasetSpec, shifts.Shift]:
  """The dataset spec and shift of task `name`.

  Raises:
    UnknownTaskError: listing the closest task names.
  """
  table = _task_table()
  if name not in table:
    close = difflib.get_close_matches(name, table, n=5, cutoff=0.5)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise UnknownTaskError(f"unknown task {name!r}{hint}. `python -m levi_jax.data.inspect "
                           f"--list` lists all {len(table)}.")
  dataset, shift = table[name]
  return datasets.DATASETS[dataset], shift


def _key(v: Any) -> str:
  """A feature value as a vocabulary key ('' = missing)."""
  if isinstance(v, (bool, np.bool_)):
    return "true" if v else "false"
  if isinstance(v, (float, np.floating)):
    if math.isnan(v):
      return ""
    return str(int(v)) if float(v).is_integer() else repr(float(v))
  return str(v)


@dataclasses.dataclass(eq=False)
class EncodedFeature:
  """One categorical feature of a task: its vocabulary and per-unit ids.

  Attributes:
    spec: the model-side description.
    level: 'user', 'item' or 'row': what the ids are indexed by.
    values: the kept values; value k has id k + 2.
    ids: int32 ids per unit ([units] or [units, K]).
  """

  spec: CategoricalFeature
  level: str
  values: tuple[str, ...]
  ids: np.ndarray


def _encode_feature(table: RatingsTable, fdef: datasets.FeatureDef,
                    train_rows: np.ndarray) -> EncodedFeature:
  level = table.level(fdef.column)
  if level == ROW:
    raw = table.rows[fdef.column]
    unit_train_count = np.zeros(len(raw), np.int64)
    unit_train_count[train_rows] = 1
  else:
    raw = (table.users if level == USER else table.items)[fdef.column]
    index = table.rows["user_index" if level == USER else "item_index"][train_rows]
    unit_train_count = np.bincount(index, minlength=len(raw))
  if fdef.bag_size is None:
    members = [[_key(v)] for v in raw]
  else:
    members = [[_key(v) for v in bag] for bag in raw]
  counts: dict[str, int] = {}
  for unit, keys in enumerate(members):
    c = int(unit_train_count[unit])
    if c:
      for k in keys:
        if k:
          counts[k] = counts.get(k, 0) + c
  kept = sorted(counts, key=lambda k: (-counts[k], k))[:fdef.max_values]
  vocab = {k: i + 2 for i, k in enumerate(kept)}
  width = fdef.bag_size or 1
  ids = np.zeros((len(members), width), np.int32)
  truncated = 0
  for unit, keys in enumerate(members):
    keys = [k for k in keys if k]
    truncated += len(keys) > width
    for j, k in enumerate(keys[:width]):
      ids[unit, j] = vocab.get(k, OOV_ID)
  if truncated:
    logging.warning("%s: %d %ss have more than %d %s values; the first %d are kept",
                    table.dataset, truncated, level, width, fdef.name, width)
  spec = CategoricalFeature(fdef.name, vocab_size=len(kept) + 2, bag_size=fdef.bag_size)
  return EncodedFeature(spec, level, tuple(kept), ids if fdef.bag_size else ids[:, 0])


@dataclasses.dataclass(eq=False)
class PreparedTask:
  """A task's table, splits, feature vocabularies and texts.

  Attributes:
    name: task name.
    dataset: dataset spec.
    shift: the shift.
    table: the loaded table.
    splits: split name -> sorted rating indices.
    features: encoded categorical features, in the dataset's order.
    user_text, item_text: per-user and per-item text.
    data_dir: the resolved data dir.
    history: the training split's ratings by user and time, when the dataset's
      texts end with the user's earlier ratings (`datasets.UserHistory`).
  """

  name: str
  dataset: datasets.DatasetSpec
  shift: shifts.Shift
  table: RatingsTable
  splits: dict[str, np.ndarray]
  features: tuple[EncodedFeature, ...]
  user_text: np.ndarray
  item_text: np.ndarray
  data_dir: str
  history: datasets.UserHistory | None = None

  @property
  def feature_specs(self) -> list[CategoricalFeature]:
    return [f.spec for f in self.features]

  def rows(self, split: str) -> np.ndarray:
    """Rating indices of `split`; a ValueError names the task's splits."""
    if split not in self.splits:
      raise ValueError(f"task {self.name} has splits {list(self.splits)}, not {split!r}")
    return self.splits[split]

  def texts(self, rows: np.ndarray) -> list[str]:
    """The `inputs` text of ratings `rows`."""
    t = self.table
    history = None
    if self.history is not None:
      history = datasets.history_texts(t, self.history.earlier(t, rows))
    return datasets.join_texts(self.user_text[t.rows["user_index"][rows]],
                               self.item_text[t.rows["item_index"][rows]], history)

  def feature_ids(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Categorical feature ids of ratings `rows` (int32 [n] or [n, K])."""
    out = {}
    for f in self.features:
      if f.level == ROW:
        out[f.spec.name] = f.ids[rows]
      else:
        index = self.table.rows["user_index" if f.level == USER else "item_index"][rows]
        out[f.spec.name] = f.ids[index]
    return out

  def source_arrays(self, split: str, select: np.ndarray | None = None) -> dict[str, Any]:
    """A split before tokenization: `inputs` text (list), feature ids, `targets`.

    `select`: positions within the split to keep (in that order); only their
    text is built.
    """
    rows = self.rows(split)
    if select is not None:
      rows = rows[np.asarray(select, np.int64)]
    return {"inputs": self.texts(rows), **self.feature_ids(rows),
            "targets": self.table.rows["rating"][rows].astype(np.float32)}

  def decode_feature(self, name: str, ids: np.ndarray) -> list[str]:
    """Feature ids back to values ('<pad>', '<oov>' for the reserved ids)."""
    f = next(f for f in self.features if f.spec.name == name)
    words = {PAD_ID: "<pad>", OOV_ID: "<oov>"}
    return [words.get(int(i)) or f.values[int(i) - 2] for i in np.ravel(ids)]


def prepare(name: str, data_dir: str | None = None,
            max_bad_fraction: float = datasets.DEFAULT_MAX_BAD_FRACTION,
            duplicates: str = datasets.DEFAULT_DUPLICATES) -> PreparedTask:
  """Loads and splits task `name`, and builds its feature vocabularies (cached).

  `duplicates`: what to do with rating rows that repeat an earlier (user, item,
  timestamp): 'keep', 'drop' or 'error' (`datasets.load_table`).
  """
  spec, _ = lookup_task(name)
  resolved = resolve_data_dir(data_dir)
  table = datasets.load_table(spec.name, resolved, max_bad_fraction, duplicates)
  return _prepare(name, resolved, table)


@functools.lru_cache(maxsize=16)
def _prepare(name: str, data_dir: str, table: RatingsTable) -> PreparedTask:
  spec, shift = lookup_task(name)
  splits = shifts.split_rows(table, shift)
  features = tuple(_encode_feature(table, f, splits["train"]) for f in spec.features)
  user_text, item_text = _side_texts(table)
  history = (datasets.UserHistory.build(table, splits["train"], spec.history)
             if spec.history else None)
  return PreparedTask(name, spec, shift, table, splits, features, user_text, item_text, data_dir,
                      history)


def clear_cache() -> None:
  """Drops the prepared tasks this process holds (they are rebuilt on the next call)."""
  _prepare.cache_clear()
  _side_texts.cache_clear()
  datasets.clear_history_cache()


@functools.lru_cache(maxsize=8)
def _side_texts(table: RatingsTable) -> tuple[np.ndarray, np.ndarray]:
  return datasets.side_texts(table)


def feature_specs(name: str, data_dir: str | None = None,
                  max_bad_fraction: float = datasets.DEFAULT_MAX_BAD_FRACTION,
                  duplicates: str = datasets.DEFAULT_DUPLICATES) -> list[CategoricalFeature]:
  """The categorical features the examples of task `name` carry (sizes from its data)."""
  return prepare(name, data_dir, max_bad_fraction, duplicates).feature_specs


def vocabulary_path(name: str, data_dir: str | None = None, vocab_path: str | None = None,
                    max_bad_fraction: float = datasets.DEFAULT_MAX_BAD_FRACTION) -> str:
  """The vocabulary file of the `inputs` of task or dataset `name`.

  `vocab_path`, else `LEVI_VOCAB_PATH`, if set (a SentencePiece model or a
  WordPiece `vocab.txt`, `levi_jax.data.tokens`); else the dataset's
  SentencePiece model (`levi_jax.data.spm`).
  """
  explicit = vocab_path or os.environ.get(spm.VOCAB_ENV)
  if explicit:
    return explicit
  dataset = name.split(".")[0]
  datasets.get_spec(dataset)
  resolved = resolve_data_dir(data_dir)
  if not paths.is_tfds(resolved):
    shipped = spm.find_shipped(datasets.dataset_dir_candidates(dataset, resolved))
    if shipped:
      return shipped
  table = datasets.load_table(dataset, resolved, max_bad_fraction)
  user_text, item_text = _side_texts(table)
  return spm.cached_sentencepiece([t for t in user_text if t] + list(item_text))
