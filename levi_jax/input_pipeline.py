"""In-memory task data for the trainer: splits, deterministic batches, eval padding.

Batches are a pure function of (seed, step): an epoch's order is a seeded
permutation, so a restarted run sees exactly the batches an uninterrupted one
would have. Evaluation covers every row once in fixed-size batches padded with
weight-0 rows, so every host runs the same number of steps.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from levi_jax.models.task_net import CategoricalFeature

Arrays = dict[str, np.ndarray]


@dataclasses.dataclass
class TaskData:
  """A task's splits as in-memory numpy arrays (feature name -> array).

  Attributes:
    train: the training population (validation is carved out of it).
    evals: evaluation splits, e.g. {"id_test": ..., "ood_test": ...}.
    features: the categorical features the small model embeds.
    vocab_size: size of the `inputs` token vocabulary.
  """

  train: Arrays
  evals: dict[str, Arrays]
  features: tuple[CategoricalFeature, ...]
  vocab_size: int


def split_validation(arrays: Arrays, fraction: float, seed: int) -> tuple[Arrays, Arrays]:
  """Deterministically holds out `fraction` of the rows as validation."""
  n = len(next(iter(arrays.values())))
  order = np.random.default_rng([seed, 7]).permutation(n)
  k = int(round(n * fraction))
  pick = lambda idx: {key: v[np.sort(idx)] for key, v in arrays.items()}
  return pick(order[k:]), pick(order[:k])


def batch_indices(n: int, step: int, batch_size: int, seed: int) -> np.ndarray:
  """Row indices of the global batch at `step`: epochs of seeded permutations."""
  start = step * batch_size
  idx = []
  while len(idx) < batch_size:
    epoch, offset = divmod(start + len(idx), n)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    idx.extend(perm[offset: offset + batch_size - len(idx)])
  return np.asarray(idx)


def eval_batches(arrays: Arrays, batch_size: int):
  """Fixed-size batches covering every row once, padded with weight-0 rows."""
  n = len(arrays["targets"])
  for start in range(0, max(n, 1), batch_size):
    idx = np.arange(start, start + batch_size)
    real = idx < n
    idx = np.where(real, idx, 0)
    batch = {k: v[idx] for k, v in arrays.items()}
    batch["weights"] = real.astype(np.float32)
    yield batch


def load_task_data(cfg, vocabulary_file: str | None = None) -> TaskData:
  """Loads a registered task's splits into memory (see `levi_jax.data.pipeline`).

  An empty `data_dir` means `LEVI_DATA_DIR`, else the embedded synthetic world.

  Args:
    cfg: the `trainer.DataConfig` (task, data_dir, seq_length).
    vocabulary_file: tokenize `inputs` with this vocabulary instead of the
      task's own: a SentencePiece model, or a WordPiece `vocab.txt` (BERT).
  """
  from levi_jax.data import pipeline
  task = pipeline.prepare(cfg.task, cfg.data_dir or None)
  wordpiece = vocabulary_file is not None and vocabulary_file.endswith(".txt")
  spm_path = None if wordpiece else vocabulary_file
  arrays = {}
  if wordpiece:
    from levi_jax.checkpoints.wordpiece import WordPieceVocabulary
    wordpieces = WordPieceVocabulary(vocabulary_file)
  for split in task.splits:
    if wordpiece:
      src = task.source_arrays(split)
      src["inputs"] = wordpieces.encode_padded(src["inputs"], cfg.seq_length)
      arrays[split] = src
    else:
      arrays[split] = dict(pipeline.load_split_arrays(
          cfg.task, split, task.data_dir, inputs_length=cfg.seq_length, vocab_path=spm_path))
  if wordpiece:
    with open(vocabulary_file, encoding="utf-8") as f:
      vocab_size = sum(1 for _ in f)
  else:
    vocab_size = pipeline.vocabulary_size(
        pipeline.vocabulary_path(cfg.task, task.data_dir, spm_path))
  return TaskData(train=arrays.pop("train"), evals=arrays,
                  features=tuple(task.feature_specs), vocab_size=vocab_size)
