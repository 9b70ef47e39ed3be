"""Examples for every reader: raw files to numpy arrays or seqio Tasks, then shards and batches.

The trainer, the tap cache, the T5X integration and `levi_jax.data.inspect`
read examples through this module. The path, by module:

    raw files (MovieLens, Amazon; or TFDS)       levi_jax.data.paths: the data dir
      -> parser                                   levi_jax.data.formats (levi_jax.data.schema,
                                                  levi_jax.data.load_report); tfds_source
      -> RatingsTable                             levi_jax.data.table, via datasets.load_table
      -> shift split                              levi_jax.data.shifts
      -> encoded features + texts                 levi_jax.data.prepare (PreparedTask)
      -> tokens                                   levi_jax.data.tokens (spm, wordpiece)
      -> arrays (`load_split_arrays`)  |  seqio Task (levi_jax.data.tasks)
         in memory, or on disk once
         (levi_jax.data.example_cache)
      -> input shards (`InputShards`)  |  seqio.ShardInfo
      -> batches (`shard_batch_indices`, `eval_batches`)

An example is `inputs`, int32 [length]: the text's token ids truncated to
length - 1, then EOS, padded with 0 (`levi_jax.data.tokens`); one int32 id per
categorical feature (scalar, or a [K] bag padded with 0; `prepare`); and
`targets`, the float32 rating. The arrays and the seqio Tasks hold the same
examples; neither the arrays of a SentencePiece vocabulary nor this module
import TensorFlow.

Every split's rows are dealt round-robin to `num_shards` input shards (row i
to shard i % num_shards, as `seqio.ShardInfo` and `tf.data.Dataset.shard` do),
and each process loads only the shards it feeds (`InputShards`). A shard's
batches are a pure function of (seed, shard, step): an epoch's order is a
seeded permutation, so a restarted run sees exactly the batches an
uninterrupted one would have. The global batch at a step is the
concatenation, in shard order, of every shard's `batch_size / num_shards`
rows, so for a given number of input shards it is the same however many
processes read them. Evaluation covers every row once in fixed-size batches
padded with weight-0 rows, the same number of batches on every process.

With `DataConfig.example_cache_dir` set, `load_task_data` reads the examples
from disk (`levi_jax.data.example_cache`, written on the first run): each
split's columns are then `disk_array.RowView`s of one record file, a
process's shards a view of its rows, and `take` reads a batch's rows of all
columns at once; the batches are those of the in-memory arrays.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from levi_jax import disk_array
from levi_jax.data import datasets
from levi_jax.data.load_report import MalformedDataError, MissingFilesError
from levi_jax.data.prepare import (PreparedTask, UnknownTaskError, feature_specs, lookup_task,
                                   prepare, task_names, vocabulary_path)
from levi_jax.data.tokens import DEFAULT_INPUTS_LENGTH, tokenize, vocabulary_size
from levi_jax.models.task_net import CategoricalFeature

__all__ = [
    "Arrays", "DEFAULT_INPUTS_LENGTH", "InputShards", "MalformedDataError", "MissingFilesError",
    "PreparedTask", "TaskData", "UnknownTaskError", "batch_indices", "eval_batches",
    "feature_specs", "load_split_arrays", "load_task_data", "lookup_task", "num_rows",
    "prepare", "select_shards", "shard_batch_indices", "split_validation", "take",
    "task_names", "tokenize", "vocabulary_path", "vocabulary_size",
]

Arrays = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class InputShards:
  """The input shards one process reads.

  The rows of each split are dealt to `num_shards` shards (`positions`);
  process `index` of `count` (its data shard, `partitioning.process_shard`)
  reads shards `index * k ... (index + 1) * k - 1`, k = num_shards / count.
  """

  num_shards: int = 1
  index: int = 0
  count: int = 1

  def __post_init__(self):
    if self.count < 1 or not 0 <= self.index < self.count:
      raise ValueError(f"InputShards: process {self.index} of {self.count} is out of range")
    if self.num_shards < 1 or self.num_shards % self.count:
      raise ValueError(f"the number of input shards ({self.num_shards}) must be a positive "
                       f"multiple of the number of processes feeding data ({self.count})")

  @property
  def owned(self) -> range:
    """The shards this process reads."""
    k = self.num_shards // self.count
    return range(self.index * k, (self.index + 1) * k)

  def shard_sizes(self, num_rows: int) -> list[int]:
    """Rows of each owned shard in a split of `num_rows` rows."""
    return [len(range(s, num_rows, self.num_shards)) for s in self.owned]

  def positions(self, num_rows: int) -> np.ndarray:
    """Positions (within a split of `num_rows`) this process holds, shard after shard."""
    if not num_rows:
      return np.zeros((0,), np.int64)
    return np.concatenate([np.arange(s, num_rows, self.num_shards) for s in self.owned])

  def num_held(self, num_rows: int) -> int:
    """How many rows of a split of `num_rows` this process holds."""
    return sum(self.shard_sizes(num_rows))

  def max_rows(self, num_rows: int) -> int:
    """The most rows any process holds of a split of `num_rows` (process 0's)."""
    return InputShards(self.num_shards, 0, self.count).num_held(num_rows)


@dataclasses.dataclass
class TaskData:
  """A task's splits as in-memory numpy arrays (feature name -> array).

  Attributes:
    train: the training population (validation is carved out of it when the
      task has none).
    evals: evaluation splits, e.g. {"validation": ..., "id_test": ..., "ood_test": ...}.
    features: the categorical features the small model embeds.
    vocab_size: size of the `inputs` token vocabulary.
    shards: None when the arrays hold every row; else the input shards they
      hold (`InputShards.positions` of each split).
    split_sizes: with `shards`, every split's total number of rows (all shards).
  """

  train: Arrays
  evals: dict[str, Arrays]
  features: tuple[CategoricalFeature, ...]
  vocab_size: int
  shards: InputShards | None = None
  split_sizes: dict[str, int] = dataclasses.field(default_factory=dict)


def num_rows(arrays: Arrays) -> int:
  """The number of examples in `arrays`."""
  return len(arrays["targets"])


def take(arrays: Arrays, index: np.ndarray) -> Arrays:
  """Rows `index` of every column (columns on disk: one read of their records)."""
  return disk_array.gather(arrays, index)


def select_shards(data: TaskData, shards: InputShards) -> TaskData:
  """The rows of `shards` of data that holds every row."""
  if data.shards is not None:
    raise ValueError(f"task data already holds input shards {data.shards}")
  pick = lambda a: {k: v[shards.positions(num_rows(a))] for k, v in a.items()}
  return dataclasses.replace(
      data, train=pick(data.train), evals={k: pick(v) for k, v in data.evals.items()},
      shards=shards, split_sizes={"train": num_rows(data.train),
                                  **{k: num_rows(v) for k, v in data.evals.items()}})


def shard_batch_indices(shards: InputShards, num_rows_total: int, step: int,
                        batch_size: int, seed: int) -> np.ndarray:
  """Positions (in this process's arrays) of its rows of the global batch at `step`.

  Each owned shard contributes `batch_size / num_shards` rows from its own
  seeded epochs (`batch_indices`; with one shard, exactly the unsharded order).
  """
  if batch_size % shards.num_shards:
    raise ValueError(f"the global batch size {batch_size} is not divisible by the number "
                     f"of input shards {shards.num_shards}")
  per_shard = batch_size // shards.num_shards
  out, offset = [], 0
  for s, n in zip(shards.owned, shards.shard_sizes(num_rows_total)):
    if n == 0:
      raise ValueError(f"input shard {s} of {shards.num_shards} has no training rows "
                       f"(the split has {num_rows_total}); use fewer input shards")
    shard_seed = seed if shards.num_shards == 1 else (seed, s)
    out.append(offset + batch_indices(n, step, per_shard, shard_seed))
    offset += n
  return np.concatenate(out)


def split_validation(arrays: Arrays, fraction: float, seed: int) -> tuple[Arrays, Arrays]:
  """Deterministically holds out `fraction` of the rows as validation."""
  n = len(next(iter(arrays.values())))
  order = np.random.default_rng([seed, 7]).permutation(n)
  k = int(round(n * fraction))
  pick = lambda idx: {key: v[np.sort(idx)] for key, v in arrays.items()}
  return pick(order[k:]), pick(order[:k])


# (n, seed) -> {epoch: its permutation}, the two epochs last used (a batch straddles at most two).
_PERMUTATIONS: dict[tuple[int, tuple[int, ...]], dict[int, np.ndarray]] = {}
_MAX_STREAMS = 256  # input shards' streams kept (a process reads a few)


def _epoch_permutation(n: int, seed: tuple[int, ...], epoch: int) -> np.ndarray:
  """The seeded order of epoch `epoch` (read-only; drawn once per epoch, not per step).

  Per stream (rows, seed), only the two epochs last used are held, so host
  memory is two permutations of each input shard however long the run is
  (an LRU over all streams kept old epochs: 8 x 4 bytes a row after 8 epochs).
  """
  held = _PERMUTATIONS.pop((n, seed), {})
  _PERMUTATIONS[(n, seed)] = held  # most recently used stream last
  while len(_PERMUTATIONS) > _MAX_STREAMS:
    _PERMUTATIONS.pop(next(iter(_PERMUTATIONS)))
  perm = held.pop(epoch, None)
  if perm is None:
    perm = np.random.default_rng([*seed, epoch]).permutation(n)
    perm = perm.astype(np.int32) if n < 2**31 else perm
    perm.flags.writeable = False
  held[epoch] = perm  # most recently used epoch last
  while len(held) > 2:
    held.pop(next(iter(held)))
  return perm


def batch_indices(n: int, step: int, batch_size: int, seed: int | tuple[int, ...]
                  ) -> np.ndarray:
  """Row indices of the batch at `step` of `n` rows: epochs of seeded permutations."""
  start = step * batch_size
  seed = tuple(seed) if isinstance(seed, tuple) else (seed,)
  parts, have = [], 0
  while have < batch_size:
    epoch, offset = divmod(start + have, n)
    part = _epoch_permutation(n, seed, epoch)[offset: offset + batch_size - have]
    parts.append(part)
    have += len(part)
  return np.concatenate(parts).astype(np.int64)


def eval_batches(arrays: Arrays, batch_size: int, num_batches: int | None = None):
  """Fixed-size batches covering every row once, padded with weight-0 rows.

  `num_batches` (at least enough for every row): pad with all-weight-0
  batches up to it, so processes holding fewer rows run as many steps.
  """
  n = len(arrays["targets"])
  needed = max(-(-n // batch_size), 1)
  if num_batches is not None and num_batches < needed:
    raise ValueError(f"{num_batches} batches of {batch_size} cannot hold {n} rows")
  for start in range(0, (num_batches or needed) * batch_size, batch_size):
    idx = np.arange(start, start + batch_size)
    real = idx < n
    idx = np.where(real, idx, 0)
    batch = take(arrays, idx)
    batch["weights"] = real.astype(np.float32)
    yield batch


def load_split_arrays(name: str, split: str, data_dir: str | None = None,
                      inputs_length: int = DEFAULT_INPUTS_LENGTH, vocab_path: str | None = None,
                      max_bad_fraction: float = datasets.DEFAULT_MAX_BAD_FRACTION,
                      shard: tuple[int, int] | None = None,
                      select: np.ndarray | None = None,
                      duplicates: str = datasets.DEFAULT_DUPLICATES) -> Arrays:
  """A split of task `name` as numpy arrays, in the split's (deterministic) order.

  Args:
    vocab_path: the `inputs` vocabulary (a SentencePiece model or a WordPiece
      `vocab.txt`); None: the task's own (`vocabulary_path`).
    duplicates: see `levi_jax.data.prepare.prepare`.
    shard: `(index, num_shards)`: only that input shard's rows, the rows
      `seqio.get_dataset(..., shard_info=seqio.ShardInfo(index, num_shards))`
      yields for the split.
    select: only these positions within the split (in this order).
    Only the kept rows are tokenized.

  Returns:
    `inputs` int32 [n, inputs_length], each categorical feature int32 [n] or
    [n, K], `targets` float32 [n]; the same examples `levi_jax.data.tasks`
    yields through seqio. Arrays are read-only (the whole split's are cached).
  """
  if inputs_length < 2:
    raise ValueError(f"inputs_length must be >= 2 (text plus EOS), got {inputs_length}")
  if shard is not None and select is not None:
    raise ValueError("pass either shard or select, not both")
  task = prepare(name, data_dir, max_bad_fraction, duplicates)
  vocab = vocabulary_path(name, task.data_dir, vocab_path, max_bad_fraction)
  if shard is not None:
    index, count = shard
    if not 0 <= index < count:
      raise ValueError(f"shard index {index} is out of range for {count} shards")
    select = InputShards(count, index, count).positions(len(task.rows(split)))
  if select is None:
    return _split_arrays(task, split, inputs_length, vocab)
  src = task.source_arrays(split, select)
  return {"inputs": tokenize(src.pop("inputs"), vocab, inputs_length), **src}


@functools.lru_cache(maxsize=4)  # One task's splits; real datasets' arrays are large.
def _split_arrays(task: PreparedTask, split: str, inputs_length: int, vocab: str) -> Arrays:
  src = task.source_arrays(split)
  out = {"inputs": tokenize(src.pop("inputs"), vocab, inputs_length), **src}
  for v in out.values():
    v.flags.writeable = False
  return out


def load_task_data(cfg, vocabulary_file: str | None = None,
                   shards: InputShards | None = None) -> TaskData:
  """Loads a registered task's splits into memory (`load_split_arrays` of each).

  An empty `data_dir` means `LEVI_DATA_DIR`, else the embedded synthetic world.

  Args:
    cfg: the `trainer.DataConfig` (task, data_dir, seq_length, duplicates).
    vocabulary_file: tokenize `inputs` with this vocabulary instead of the
      task's own: a SentencePiece model, or a WordPiece `vocab.txt` (BERT).
    shards: load only these input shards' rows of every split (only they are
      tokenized and kept); None: every row.

  With `cfg.example_cache_dir`, the splits are read from the examples on disk
  (`disk_examples`), written first if missing.
  """
  if getattr(cfg, "example_cache_dir", ""):
    return disk_examples(cfg, vocabulary_file, shards)
  task = prepare(cfg.task, cfg.data_dir or None, duplicates=cfg.duplicates)
  arrays, sizes = {}, {}
  for split in task.splits:
    sizes[split] = len(task.rows(split))
    select = None if shards is None else shards.positions(sizes[split])
    arrays[split] = dict(load_split_arrays(
        cfg.task, split, task.data_dir, inputs_length=cfg.seq_length,
        vocab_path=vocabulary_file, select=select, duplicates=cfg.duplicates))
  vocab_size = vocabulary_size(vocabulary_path(cfg.task, task.data_dir, vocabulary_file))
  return TaskData(train=arrays.pop("train"), evals=arrays,
                  features=tuple(task.feature_specs), vocab_size=vocab_size, shards=shards,
                  split_sizes=sizes if shards is not None else {})


def disk_examples(cfg, vocabulary_file: str | None = None,
                  shards: InputShards | None = None) -> TaskData:
  """The task's splits as views of its examples on disk (`levi_jax.data.example_cache`).

  Every column is a `disk_array.RowView` of the split's record file, holding
  only `shards`' rows (none of them read until a batch asks); the same rows,
  in the same order, as `load_task_data` holds in memory.
  """
  from levi_jax.data import example_cache  # pylint: disable=g-import-not-at-top
  entry, _ = example_cache.load(cfg.example_cache_dir, cfg.task, cfg.data_dir or None,
                                vocabulary_file, cfg.seq_length, cfg.duplicates)
  arrays, sizes = {}, {}
  for split, records in entry.splits.items():
    sizes[split] = len(records)
    rows = None if shards is None else disk_array.RowMap(len(records), shards.num_shards,
                                                         shards.owned)
    digests = entry.manifest["splits"][split]["sha256"]
    arrays[split] = {k: disk_array.RowView(records, k, rows, digests[k]) for k in entry.fields}
  return TaskData(train=arrays.pop("train"), evals=arrays, features=entry.features,
                  vocab_size=entry.vocab_size, shards=shards,
                  split_sizes=sizes if shards is not None else {})
