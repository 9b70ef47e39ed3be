"""Lists the registered Tasks, or summarizes one.

    python -m levi_jax.data.inspect --list
    python -m levi_jax.data.inspect --task movielens_100k.gender_m_to_f [--data_dir DIR]
    python -m levi_jax.data.inspect --task ... --backbone minilm      # MiniLM's WordPieces
    python -m levi_jax.data.inspect --task ... --backbone CHECKPOINT  # its vocabulary

For a task: where its data came from, malformed rows, the populations, per split
the number of ratings, users and items with the rating mean and std, the
categorical features, and three examples as a backbone reads them, decoded: the
seqio Task's SentencePiece tokens, or with a WordPiece vocabulary (`--backbone
minilm`, or a BERT `vocab.txt` as --vocab_path) the WordPieces the trainer feeds.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Sequence

import numpy as np

from levi_jax import cli, input_pipeline, quiet
from levi_jax.data import tokens


def _list() -> None:
  quiet.import_tensorflow()
  import seqio  # pylint: disable=g-import-not-at-top

  from levi_jax.data import tasks  # pylint: disable=g-import-not-at-top,unused-import

  registered = set(seqio.TaskRegistry.names())
  names = [n for n in input_pipeline.task_names() if n in registered]
  width = max(len(n) for n in names)
  for n in names:
    _, shift = input_pipeline.lookup_task(n)
    print(f"{n:<{width}}  {shift.kind:<5} {'/'.join(shift.splits)}  {shift.description}")
  print(f"{len(names)} tasks")


def backbone_vocab_path(backbone: str) -> str | None:
  """The vocabulary a backbone reads: `minilm` (the packaged all-MiniLM-L6-v2),
  or a checkpoint that carries one (`pretrained.checkpoint_vocabulary`)."""
  import os  # pylint: disable=g-import-not-at-top
  if backbone == "minilm":
    from levi_jax.checkpoints import backbones  # pylint: disable=g-import-not-at-top
    return os.path.join(backbones.minilm_l6_folder(), "vocab.txt")
  from levi_jax import pretrained  # pylint: disable=g-import-not-at-top
  if not os.path.exists(backbone):
    raise FileNotFoundError(f"--backbone: {backbone} is neither 'minilm' nor a checkpoint")
  found = pretrained.checkpoint_vocabulary(backbone)
  bert_vocab = os.path.join(backbone, "vocab.txt")
  if found is None and os.path.isfile(bert_vocab):
    return bert_vocab
  if found is None:
    raise FileNotFoundError(f"--backbone: {backbone} carries no vocabulary (no "
                            f"{pretrained.VOCAB_MANIFEST}, spiece.model, vocab.txt or T5X "
                            "config.gin naming a SentencePiece model)")
  return found.path


def _wordpiece_examples(name: str, task, vocab_path: str, inputs_length: int) -> None:
  from levi_jax.data.wordpiece import WordPieceVocabulary  # pylint: disable=g-import-not-at-top
  vocab = WordPieceVocabulary(vocab_path)
  print(f"  vocabulary: {vocab_path} (WordPiece, {vocab.vocab_size} pieces)")
  print("  three examples (train split, as the trainer tokenizes them):")
  arrays = input_pipeline.load_split_arrays(
      name, "train", task.data_dir, inputs_length=inputs_length, vocab_path=vocab_path,
      select=np.arange(min(3, len(task.rows("train")))))
  for k in range(len(arrays["targets"])):
    _print_example(k, task, vocab, {f: v[k] for f, v in arrays.items()})


def _print_example(k: int, task, vocab, ex) -> None:
  """One example: its decoded tokens, feature values and target."""
  n_tok = int((ex["inputs"] > 0).sum())
  print(f"  [{k}] inputs ({n_tok} tokens): {vocab.decode(ex['inputs'].tolist())!r}")
  feats = [f"{f.name}={task.decode_feature(f.name, ex[f.name])}" if f.bag_size
           else f"{f.name}={task.decode_feature(f.name, ex[f.name])[0]}"
           for f in task.feature_specs]
  print("      " + ", ".join(feats))
  print(f"      targets={float(ex['targets']):g}")


def _describe(name: str, data_dir: str | None, inputs_length: int,
              vocab_path: str | None) -> None:
  task = input_pipeline.prepare(name, data_dir)
  from levi_jax.data import tasks  # pylint: disable=g-import-not-at-top

  t, shift = task.table, task.shift
  print(f"task {name}: {shift.description}")
  print(f"  data: {t.source}: {t.num_rows} ratings, {t.num_users} users, {t.num_items} items")
  print("  malformed: " + t.report.summary().replace("\n", "\n    "))
  print(f"  training population: {' AND '.join(map(str, shift.train)) or 'all ratings'}")
  if shift.ood is not None:
    print(f"  OOD population: {' AND '.join(map(str, shift.ood))}")
  print(f"  held out by {shift.holdout}; id_test {shift.id_test_fraction:g}, validation "
        f"{shift.validation_fraction:g} of the training population"
        + (f"; unseen in OOD: {', '.join(shift.unseen)}" if shift.unseen else ""))
  print(f"  {'split':<11}{'ratings':>9}{'users':>8}{'items':>8}{'mean':>8}{'std':>7}")
  used = 0
  for split, rows in task.splits.items():
    r = t.rows["rating"][rows]
    used += len(rows)
    print(f"  {split:<11}{len(rows):>9}{len(np.unique(t.rows['user_index'][rows])):>8}"
          f"{len(np.unique(t.rows['item_index'][rows])):>8}{r.mean():>8.3f}{r.std():>7.3f}")
  print(f"  unused (in neither population): {t.num_rows - used} ratings")
  print("  features: " + ", ".join(
      f"{f.name} ({f.vocab_size}{f', bag {f.bag_size}' if f.bag_size else ''})"
      for f in task.feature_specs))
  if vocab_path and tokens.is_wordpiece(vocab_path):
    _wordpiece_examples(name, task, vocab_path, inputs_length)
    return
  tasks.register_tasks(data_dir=data_dir, vocab_path=vocab_path)
  ds = tasks.get_dataset(name, "train", inputs_length=inputs_length)
  import seqio  # pylint: disable=g-import-not-at-top

  vocab = seqio.get_mixture_or_task(name).output_features["inputs"].vocabulary
  print(f"  vocabulary: {vocab.sentencepiece_model_file} ({vocab.vocab_size} pieces)")
  print("  three examples (train split, from the seqio Task):")
  for k, ex in enumerate(ds.take(3).as_numpy_iterator()):
    _print_example(k, task, vocab, ex)


@dataclasses.dataclass(frozen=True)
class Settings:
  """The flags of `python -m levi_jax.data.inspect` (`--list`, or `--task`)."""
  list: bool = cli.field(False, "list the registered tasks")
  task: str | None = cli.field(None, "summarize this task")
  data_dir: str | None = cli.field(
      None, "raw files, tfds[:DIR]; unset: LEVI_DATA_DIR or the synthetic world")
  inputs_length: int = cli.field(input_pipeline.DEFAULT_INPUTS_LENGTH, "tokens of `inputs`")
  vocab_path: str | None = cli.field(
      None, "vocabulary for inputs: a SentencePiece model or a WordPiece vocab.txt")
  backbone: str | None = cli.field(
      None, "read inputs as this backbone does: 'minilm' or a checkpoint path")

  def __post_init__(self):
    if self.list == bool(self.task):
      raise ValueError("give one of --list and --task")
    if self.vocab_path and self.backbone:
      raise ValueError("give at most one of --vocab_path and --backbone")


def inspect(settings: Settings) -> int:
  """Lists the tasks or summarizes one; returns the exit status."""
  try:
    if settings.list:
      _list()
    else:
      vocab_path = (backbone_vocab_path(settings.backbone) if settings.backbone
                    else settings.vocab_path)
      _describe(settings.task, settings.data_dir, settings.inputs_length, vocab_path)
  except (input_pipeline.UnknownTaskError, input_pipeline.MissingFilesError,
          input_pipeline.MalformedDataError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; returns the exit status. `argv` (arguments without the program
  name) for a call from Python."""
  if argv is not None:
    return inspect(cli.parse(Settings, argv))
  cli.main(Settings, lambda settings, _: inspect(settings), "levi_jax.data.inspect")
  return 0


if __name__ == "__main__":
  main()
