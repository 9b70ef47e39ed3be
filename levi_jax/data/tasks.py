"""seqio Tasks for every dataset x shift, with a feature converter for rating models.

Importing this module registers one Task per dataset and shift, named
`<dataset>.<shift>` (`python -m levi_jax.data.inspect --list`), each with the
splits `train`, `validation`, `id_test` and `ood_test` (`pretrain_corpus.all`
has no `ood_test`). The data dir is read when a dataset is created, not at
registration: from `register_tasks(data_dir=...)` if given, else from
`LEVI_DATA_DIR`, else the embedded synthetic world (`levi_jax.data.paths`).
`register_tasks` may be called again, e.g. with another data dir: it replaces
the Tasks it registered before, so registration is idempotent.

    import seqio
    from levi_jax.data import tasks
    tasks.register_tasks(data_dir="/data/movielens")   # optional
    ds = seqio.get_dataset("movielens_1m.gender_m_to_f", {"inputs": 64},
                           tasks.RatingFeatureConverter(), dataset_split="train",
                           shard_info=seqio.ShardInfo(jax.process_index(), jax.process_count()))

The pipeline: the source yields text, categorical ids and the rating for each
rating of the split, in the split's order (a seeded permutation when shuffled);
`tokenize_inputs` gives `inputs` the ids of `levi_jax.data.tokens.encode`
(truncated to the length - 1, then EOS); `RatingFeatureConverter` pads
`inputs` and passes the rest through. The examples equal
`levi_jax.input_pipeline.load_split_arrays`'s.

Each Task also carries what a seqio `Evaluator` (T5X's `eval.py`) needs to
score a model's predicted ratings: `targets` as a length-1 float sequence
(the Evaluator measures every feature's length; the feature converter gives
models the scalar), the `RatingVocabulary` of `targets` and the metric
functions `rmse` and `mae`.
"""

from __future__ import annotations

import functools
from typing import Mapping

import numpy as np

from levi_jax import quiet

quiet.import_tensorflow()
import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402

from levi_jax.data import datasets, prepare, tokens

_REGISTERED: set[str] = set()


class DataSentencePieceVocabulary(seqio.SentencePieceVocabulary):
  """A SentencePieceVocabulary whose model file is resolved on first use.

  A task's vocabulary may be trained from its data (`levi_jax.data.spm`), which
  is only known once the data dir is read; this defers that to first use.
  """

  def __init__(self, task: str, data_dir: str | None, vocab_path: str | None,
               max_bad_fraction: float):
    self._resolve = functools.partial(prepare.vocabulary_path, task, data_dir, vocab_path,
                                      max_bad_fraction)
    super().__init__(sentencepiece_model_file="")

  def _model_context(self):
    if not self._sentencepiece_model_file:
      self._sentencepiece_model_file = self._resolve()
    return super()._model_context()

  @property
  def sentencepiece_model_file(self) -> str:
    self._model_context()
    return self._sentencepiece_model_file

  def __eq__(self, other):
    return (isinstance(other, seqio.SentencePieceVocabulary)
            and self.sentencepiece_model_file == other.sentencepiece_model_file
            and self.extra_ids == other.extra_ids)


class RatingVocabulary(seqio.PassThroughVocabulary):
  """The `targets` vocabulary: a rating passes through; a decoded prediction is a float.

  A model's prediction for one example may come as a scalar or a length-1
  array (T5X gives each example's slice of the predicted batch); `decode`
  returns the rating as a float either way.
  """

  def __init__(self):
    super().__init__(size=1)

  def decode(self, ids):
    return _rating(ids)

  def __eq__(self, other):
    return isinstance(other, RatingVocabulary)

  def __hash__(self):
    return hash(RatingVocabulary)


def _rating(value, example=None, is_target=False) -> float:  # pylint: disable=unused-argument
  """seqio postprocessor: a target or a decoded prediction (scalar or [1]) as a float."""
  return float(np.ravel(np.asarray(value, np.float64))[0])


def _errors(name: str, targets, predictions) -> np.ndarray:
  """predictions - targets, float64, checked to pair up one to one."""
  t, p = np.asarray(targets, np.float64), np.asarray(predictions, np.float64)
  if t.shape != p.shape or t.size == 0:
    raise ValueError(f"{name}: {t.size} targets and {p.size} predictions; expected the same, "
                     "non-zero count")
  return p - t


def rmse(targets, predictions) -> dict[str, float]:
  """seqio metric: root mean squared error of predicted ratings."""
  return {"rmse": float(np.sqrt(np.mean(_errors("rmse", targets, predictions) ** 2)))}


def mae(targets, predictions) -> dict[str, float]:
  """seqio metric: mean absolute error of predicted ratings."""
  return {"mae": float(np.mean(np.abs(_errors("mae", targets, predictions))))}


def tokenize_inputs(dataset: tf.data.Dataset, output_features: Mapping[str, seqio.Feature],
                    sequence_length: Mapping[str, int] | None = None) -> tf.data.Dataset:
  """seqio preprocessor: `inputs` text to its `tokens.encode` ids in the Task's vocabulary.

  Truncated to `sequence_length["inputs"] - 1` ids, then EOS (without a
  length: every id, then EOS); the feature converter pads. The ids come from
  the one numpy tokenizer, through `tf.numpy_function`, rather than from
  seqio's `tokenize` preprocessor, whose tensorflow-text SentencePiece splits
  some words into equal-score pieces in another order than the arrays do.
  """
  vocab_path = output_features["inputs"].vocabulary.sentencepiece_model_file
  max_length = (sequence_length or {}).get("inputs")

  def encode(text: bytes) -> np.ndarray:
    return np.asarray(tokens.encode([text.decode("utf-8")], vocab_path, max_length)[0], np.int32)

  def tokenize(ex):
    ids = tf.numpy_function(encode, [ex["inputs"]], tf.int32, stateful=False)
    ids.set_shape([None])
    return {**ex, "inputs": ids}

  return dataset.map(tokenize, num_parallel_calls=tf.data.AUTOTUNE)


def _rating_as_sequence(ds: tf.data.Dataset) -> tf.data.Dataset:
  """`targets` as a [1] sequence, the rank seqio's Evaluator measures lengths of."""
  return ds.map(lambda ex: {**ex, "targets": tf.reshape(ex["targets"], [1])},
                num_parallel_calls=tf.data.AUTOTUNE)


def _dataset_fn(split: str, shuffle_files: bool, seed: int | None = None, *, task: str,
                data_dir: str | None, max_bad_fraction: float,
                duplicates: str = datasets.DEFAULT_DUPLICATES) -> tf.data.Dataset:
  """The source of Task `task`: one element per rating of `split`."""
  prepared = prepare.prepare(task, data_dir, max_bad_fraction, duplicates)
  arrays = prepared.source_arrays(split)
  if shuffle_files:
    order = np.random.default_rng(0 if seed is None else seed).permutation(len(arrays["targets"]))
    arrays = {k: [v[i] for i in order] if isinstance(v, list) else v[order]
              for k, v in arrays.items()}
  texts = arrays.pop("inputs")
  tensors = {"inputs": tf.constant(texts, dtype=tf.string, shape=[len(texts)])}
  for k, v in arrays.items():
    tensors[k] = tf.constant(v)
  return tf.data.Dataset.from_tensor_slices(tensors)


def register_tasks(data_dir: str | None = None, vocab_path: str | None = None,
                   max_bad_fraction: float = datasets.DEFAULT_MAX_BAD_FRACTION,
                   duplicates: str = datasets.DEFAULT_DUPLICATES) -> list[str]:
  """Registers (or re-registers) every dataset x shift Task; returns their names.

  Args:
    data_dir: where the data is (see `levi_jax.data.paths`); None: resolved when
      a dataset is created, from `LEVI_DATA_DIR` or the embedded synthetic world.
    vocab_path: SentencePiece model for `inputs` (None: see `levi_jax.data.spm`).
    max_bad_fraction: malformed-row tolerance per file.
    duplicates: repeated (user, item, timestamp) ratings: 'keep', 'drop' or
      'error' (`datasets.load_table`).
  """
  names = prepare.task_names()
  for name in names:
    _, shift = prepare.lookup_task(name)
    if name in _REGISTERED or name in seqio.TaskRegistry.names():
      seqio.TaskRegistry.remove(name)
    vocab = DataSentencePieceVocabulary(name, data_dir, vocab_path, max_bad_fraction)
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(
            functools.partial(_dataset_fn, task=name, data_dir=data_dir,
                              max_bad_fraction=max_bad_fraction, duplicates=duplicates),
            splits=shift.splits, caching_permitted=False),
        output_features={
            "inputs": seqio.Feature(vocab, add_eos=True),
            "targets": seqio.Feature(RatingVocabulary(), add_eos=False,
                                     dtype=tf.float32, rank=1)},
        preprocessors=[tokenize_inputs, _rating_as_sequence],
        postprocess_fn=_rating,
        metric_fns=[rmse, mae])
    _REGISTERED.add(name)
  return names


class RatingFeatureConverter(seqio.FeatureConverter):
  """Pads/truncates `inputs` to its length; passes `targets` and categorical ids through.

  Only `inputs` needs a length (`task_feature_lengths={"inputs": L}`); the
  Task's [1] `targets` becomes the scalar rating; every other feature of the
  task is passed through with its own rank and dtype. No packing.
  """

  TASK_FEATURES = {"inputs": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
                   "targets": seqio.FeatureConverter.FeatureSpec(dtype=tf.float32, rank=1)}
  MODEL_FEATURES = {"inputs": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
                    "targets": seqio.FeatureConverter.FeatureSpec(dtype=tf.float32, rank=0)}
  PACKING_FEATURE_DTYPES = {}

  def __init__(self, **kwargs):
    kwargs["pack"] = False
    super().__init__(**kwargs)

  def __call__(self, ds: tf.data.Dataset,
               task_feature_lengths: Mapping[str, int] | None) -> tf.data.Dataset:
    if not task_feature_lengths or "inputs" not in task_feature_lengths:
      raise ValueError(f"RatingFeatureConverter needs the length of `inputs` "
                       f"(task_feature_lengths={{'inputs': L}}; TASK_FEATURE_LENGTHS in gin), "
                       f"got {task_feature_lengths!r}")
    passthrough = {k: seqio.FeatureConverter.FeatureSpec(dtype=s.dtype, rank=s.shape.rank)
                   for k, s in ds.element_spec.items() if k not in self.TASK_FEATURES}
    self._passthrough_features = passthrough
    lengths = {"targets": 1, **task_feature_lengths}
    for k, s in ds.element_spec.items():
      if k in passthrough:
        lengths[k] = int(s.shape[0]) if s.shape.rank else 1
    return super().__call__(ds, lengths)

  def _convert_features(self, ds: tf.data.Dataset,
                        task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    ds = seqio.utils.trim_and_pad_dataset(ds, {"inputs": task_feature_lengths["inputs"]})
    return ds.map(lambda ex: {**ex, "targets": ex["targets"][0]},
                  num_parallel_calls=tf.data.AUTOTUNE)

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
    return dict(task_feature_lengths)


def get_dataset(task: str, split: str, inputs_length: int = tokens.DEFAULT_INPUTS_LENGTH,
                batch_size: int | None = None, shuffle: bool = False, seed: int | None = None,
                shard_info: seqio.ShardInfo | None = None, num_epochs: int | None = 1
                ) -> tf.data.Dataset:
  """`seqio.get_dataset` for a registered task with `RatingFeatureConverter`.

  With `batch_size`, the last partial batch is dropped (seqio's behaviour); for
  evaluation over every example, batch the unbatched dataset yourself.

  Raises:
    UnknownTaskError: if `task` is not one of ours (listing close matches).
  """
  prepare.lookup_task(task)
  return seqio.get_dataset(task, {"inputs": inputs_length}, RatingFeatureConverter(),
                           dataset_split=split, shuffle=shuffle, seed=seed, shard_info=shard_info,
                           num_epochs=num_epochs, batch_size=batch_size)


register_tasks()
