"""A seqio Vocabulary for BERT-family WordPiece vocabularies (`vocab.txt`).

Tokenizes with tensorflow-text's `BertTokenizer` (lower-casing, accent
stripping and punctuation splitting as HF's uncased `BertTokenizer`), so it
runs inside tf.data pipelines. TensorFlow is imported with this module only:
`levi_jax.models`, `levi_jax.checkpoints` and the SentencePiece path of
`levi_jax.data.tokens` do not need it.

BERT inputs are `[CLS] pieces... [SEP]`: `encode` returns `[CLS]` and the
pieces, and `eos_id` is `[SEP]`, so seqio's usual EOS appending (`append_eos`,
or a feature converter's `add_eos`) completes the input. Padding is id 0
(`[PAD]`), as seqio assumes.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

from levi_jax import quiet

quiet.import_tensorflow()
import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_text as tf_text  # noqa: E402


class WordPieceVocabulary(seqio.Vocabulary):
  """WordPiece vocabulary from a `vocab.txt` (one token per line, id = line)."""

  def __init__(self, vocab_file: str, lower_case: bool = True,
               max_input_chars_per_word: int = 100):
    if not os.path.isfile(vocab_file):
      raise FileNotFoundError(f"no WordPiece vocabulary at {vocab_file}")
    with open(vocab_file, encoding="utf-8") as f:
      self._tokens = [line.rstrip("\n") for line in f]
    index = {t: i for i, t in enumerate(self._tokens)}
    for special in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"):
      if special not in index:
        raise ValueError(f"{vocab_file} lacks the special token {special}")
    if index["[PAD]"] != 0:
      raise ValueError(f"{vocab_file}: [PAD] must be id 0, is {index['[PAD]']}")
    self._vocab_file = vocab_file
    self._lower_case = lower_case
    self._max_chars = max_input_chars_per_word
    self._unk, self._cls, self._sep = index["[UNK]"], index["[CLS]"], index["[SEP]"]
    self._special = sorted({0, self._cls, self._sep, index.get("[MASK]", 0)})
    self._tf_tokenizer = None
    super().__init__(extra_ids=0)

  @property
  def tokenizer(self) -> tf_text.BertTokenizer:
    """The tensorflow-text tokenizer (built on first use)."""
    if self._tf_tokenizer is None:
      table = tf.lookup.StaticVocabularyTable(
          tf.lookup.KeyValueTensorInitializer(
              self._tokens, tf.range(len(self._tokens), dtype=tf.int64)),
          num_oov_buckets=1)
      self._tf_tokenizer = tf_text.BertTokenizer(
          table, token_out_type=tf.int64, lower_case=self._lower_case,
          unknown_token="[UNK]", max_chars_per_token=self._max_chars)
    return self._tf_tokenizer

  @property
  def vocab_file(self) -> str:
    """The `vocab.txt` this vocabulary was read from."""
    return self._vocab_file

  @property
  def eos_id(self) -> int:
    return self._sep

  @property
  def unk_id(self) -> int:
    return self._unk

  @property
  def cls_id(self) -> int:
    return self._cls

  @property
  def _base_vocab_size(self) -> int:
    return len(self._tokens)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    pieces = self.tokenizer.tokenize(tf.reshape(s, [1])).merge_dims(1, -1)[0]
    cls = tf.constant([self._cls], tf.int64)
    return tf.cast(tf.concat([cls, pieces], 0), tf.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """`encode` of each text ([CLS] and the pieces), tokenized as one batch.

    `levi_jax.data.tokens.encode` truncates the ids and appends EOS ([SEP]).
    """
    pieces = self.tokenizer.tokenize(tf.constant(list(texts))).merge_dims(1, -1)
    return [[self._cls] + ids for ids in pieces.to_list()]

  def _encode(self, s: str) -> Sequence[int]:
    return self._encode_tf(tf.constant(s)).numpy().tolist()

  def _decode(self, ids: Iterable[int]) -> str:
    words = [self._tokens[i] for i in ids if i not in self._special]
    return " ".join(words).replace(" ##", "")

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    ids = tf.cast(ids, tf.int32)
    keep = tf.reduce_all(ids[..., None] != tf.constant(self._special, tf.int32), -1)
    table = tf.constant(self._tokens)
    words = tf.ragged.boolean_mask(tf.gather(table, ids), keep)
    text = tf.strings.reduce_join(words, axis=-1, separator=" ")
    return tf.strings.regex_replace(text, " ##", "")

  def __eq__(self, other) -> bool:
    return (isinstance(other, WordPieceVocabulary) and other._tokens == self._tokens
            and other._lower_case == self._lower_case)

  def __hash__(self) -> int:
    return hash((self._vocab_file, self._lower_case))
