"""The token ids of `inputs`: one definition, for the array path and the seqio Tasks.

An example's `inputs` are the ids of its text in the vocabulary, truncated to
`length - 1`, then EOS, then padded with 0 up to `length`. `encode` does the
truncation and EOS for both readers of examples: `tokenize` (the numpy arrays
of `levi_jax.input_pipeline`) pads its rows, and the seqio Tasks'
preprocessor (`levi_jax.data.tasks`) calls `encode` per example and leaves
the padding to the feature converter.

A vocabulary is named by its file:

* a SentencePiece model (T5's ids: 0 pad, 1 EOS), encoded with the python
  `sentencepiece` library, the one seqio's `SentencePieceVocabulary.encode`
  calls (tensorflow-text's tokenizer, behind seqio's `tokenize` preprocessor,
  can split a word into equal-score pieces in the other order);
* a BERT WordPiece `vocab.txt` (`levi_jax.data.wordpiece`, which imports
  TensorFlow): `[CLS] pieces`, with `[SEP]` as EOS.

A WordPiece vocabulary imports TensorFlow, a local SentencePiece model does not.
"""

from __future__ import annotations

import functools
from typing import Protocol, Sequence

import numpy as np

from levi_jax.data import spm

DEFAULT_INPUTS_LENGTH = 64
WORDPIECE_SUFFIX = ".txt"


class Encoder(Protocol):
  """What `encode` needs of a vocabulary."""

  @property
  def eos_id(self) -> int: ...

  @property
  def vocab_size(self) -> int: ...

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...


class SentencePieceEncoder:
  """A SentencePiece model with T5's special ids (pad 0, EOS 1), through python sentencepiece."""

  def __init__(self, model_path: str):
    import sentencepiece  # pylint: disable=g-import-not-at-top

    self._proc = sentencepiece.SentencePieceProcessor(model_proto=spm.read_model(model_path))
    if self._proc.pad_id() != 0 or self._proc.eos_id() != 1:
      raise ValueError(f"{model_path}: expected pad id 0 and EOS id 1 (T5's convention), got "
                       f"pad {self._proc.pad_id()}, EOS {self._proc.eos_id()}")

  @property
  def eos_id(self) -> int:
    return self._proc.eos_id()

  @property
  def vocab_size(self) -> int:
    """Number of pieces (pad, EOS and UNK included)."""
    return self._proc.get_piece_size()

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """The ids of each text (no EOS)."""
    return self._proc.encode(list(texts))


def is_wordpiece(vocab_path: str) -> bool:
  """Whether `vocab_path` names a WordPiece `vocab.txt` (else a SentencePiece model)."""
  return vocab_path.endswith(WORDPIECE_SUFFIX)


@functools.lru_cache(maxsize=4)
def encoder(vocab_path: str) -> Encoder:
  """The encoder of the vocabulary file `vocab_path` (loaded once per process)."""
  if is_wordpiece(vocab_path):
    from levi_jax.data.wordpiece import WordPieceVocabulary  # pylint: disable=g-import-not-at-top

    return WordPieceVocabulary(vocab_path)
  return SentencePieceEncoder(vocab_path)


def vocabulary_size(vocab_path: str) -> int:
  """Number of ids of the vocabulary file `vocab_path`."""
  return encoder(vocab_path).vocab_size


def encode(texts: Sequence[str], vocab_path: str, max_length: int | None = None
           ) -> list[list[int]]:
  """Each text's ids, truncated to `max_length - 1` (None: kept whole), then EOS."""
  if not texts:
    return []
  enc = encoder(vocab_path)
  keep = None if max_length is None else max_length - 1
  return [ids[:keep] + [enc.eos_id] for ids in enc.encode_batch(texts)]


def tokenize(texts: Sequence[str], vocab_path: str, length: int) -> np.ndarray:
  """int32 [n, length]: `encode`'s ids of each text, padded with 0."""
  out = np.zeros((len(texts), length), np.int32)
  for r, ids in enumerate(encode(texts, vocab_path, length)):
    out[r, :len(ids)] = ids
  return out
