"""SentencePiece vocabularies: where a dataset's comes from, and training one offline.

Resolution order for the vocabulary of the `inputs` text:

1. an explicit path (argument, or the `LEVI_VOCAB_PATH` environment variable),
   e.g. T5's `gs://t5-data/vocabs/cc_all.32000/sentencepiece.model` for real runs;
2. `spm.model` in the dataset's directory, then in the data dir (synthetic
   worlds ship one, trained on their fine-tuning and pre-training text);
3. a small model trained with the `sentencepiece` trainer on the dataset's
   (label-free) user and item texts, cached under
   `<cache dir>/spm/<hash of corpus and settings>.model`.

Models use T5's special ids: 0 = pad, 1 = EOS, 2 = UNK, no BOS. Training is
single-threaded and unshuffled, so the same corpus gives the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Iterable, Sequence

from levi_jax.data import paths

VOCAB_FILENAME = "spm.model"
VOCAB_ENV = "LEVI_VOCAB_PATH"
DEFAULT_VOCAB_SIZE = 800


def train_sentencepiece(texts: Sequence[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> bytes:
  """Trains a unigram SentencePiece model on `texts`; returns the serialized model."""
  import sentencepiece as sp  # pylint: disable=g-import-not-at-top

  if not texts:
    raise ValueError("cannot train a SentencePiece model on an empty corpus")
  out = io.BytesIO()
  sp.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=out, vocab_size=vocab_size,
      model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
      hard_vocab_limit=False, num_threads=1, shuffle_input_sentence=False,
      input_sentence_size=0, max_sentence_length=16384, minloglevel=2)
  return out.getvalue()


def write_atomic(path: str, data: bytes) -> None:
  """Writes `data` to `path` via a temporary file and a rename."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def cached_sentencepiece(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> str:
  """Path of a model trained on the unique `texts`, trained now if not cached yet."""
  corpus = sorted(set(texts))
  code = paths.code_digest(("levi_jax.data.spm",), ("sentencepiece",))
  h = hashlib.sha256(f"unigram|{vocab_size}|{code}|".encode())
  for t in corpus:
    h.update(t.encode("utf-8") + b"\n")
  path = os.path.join(paths.cache_dir(), "spm", f"{h.hexdigest()[:24]}.model")
  if not os.path.exists(path):
    write_atomic(path, train_sentencepiece(corpus, vocab_size))
  return path


def find_shipped(dirs: Iterable[str]) -> str | None:
  """The first `spm.model` in `dirs`, if any."""
  for d in dirs:
    p = os.path.join(d, VOCAB_FILENAME)
    if os.path.isfile(p):
      return p
  return None


def read_model(path: str) -> bytes:
  """The bytes of a model file (local, or any path TensorFlow's gfile reads)."""
  if os.path.exists(path):
    with open(path, "rb") as f:
      return f.read()
  from levi_jax import quiet  # pylint: disable=g-import-not-at-top
  quiet.import_tensorflow()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  with tf.io.gfile.GFile(path, "rb") as f:
    return f.read()
