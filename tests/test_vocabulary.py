"""A backbone checkpoint carries its vocabulary; fine-tuning tokenizes with it.

Covers every backbone format: a tree with `vocabulary.json` (the committed
demo backbone's format), a Hugging Face folder's `spiece.model`, the
SentencePiece model a T5X model dir's `config.gin` names; a configured
vocabulary with another hash fails before training, naming both.
"""

import os

import numpy as np
import pytest

from levi_jax import checkpointing, pretrained, train_setup, trainer
from levi_jax.data import spm, synthetic
from levi_jax.input_pipeline import load_task_data

TASK = "movielens_100k.gender_m_to_f"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("world"))
  synthetic.write_world(path, num_users=60, num_items=30, pretrain_num_users=20,
                        pretrain_num_items=20, formats=("ml-100k",))
  return path


@pytest.fixture(scope="module")
def other_vocab(tmp_path_factory):
  """A SentencePiece model of another corpus (not the world's)."""
  path = str(tmp_path_factory.mktemp("vocab") / "other.model")
  texts = [f"user: {w} likes item {i} of kind {w[::-1]}" for i, w in
           enumerate(["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"] * 5)]
  spm.write_atomic(path, spm.train_sentencepiece(texts, vocab_size=60))
  return path


@pytest.fixture
def backbone_ckpt(tmp_path, other_vocab):
  path = str(tmp_path / "backbone")
  checkpointing.save_tree(path, {"token_embedder": {"embedding": np.zeros((3, 2), np.float32)}})
  pretrained.attach_vocabulary(path, other_vocab)
  return path


def data_config(world, **kw):
  return trainer.DataConfig(task=TASK, data_dir=world, seq_length=24, **kw)


def test_tree_checkpoint_vocabulary_tokenizes_inputs(world, backbone_ckpt, other_vocab):
  carried = pretrained.checkpoint_vocabulary(backbone_ckpt)
  assert carried.sha256 == pretrained.file_sha256(other_vocab)
  assert os.path.dirname(carried.path) == backbone_ckpt  # a copy inside the checkpoint
  vocab = train_setup.backbone_vocabulary(data_config(world), None, backbone_ckpt)
  assert vocab == carried.path
  with_backbone_vocab = load_task_data(data_config(world), vocab)
  own = load_task_data(data_config(world))
  assert with_backbone_vocab.vocab_size < own.vocab_size  # 60-odd pieces vs the world's
  assert with_backbone_vocab.train["inputs"].max() < with_backbone_vocab.vocab_size
  assert not np.array_equal(with_backbone_vocab.train["inputs"], own.train["inputs"])
  np.testing.assert_array_equal(with_backbone_vocab.train["targets"], own.train["targets"])


def test_same_vocabulary_configured_explicitly_is_accepted(world, backbone_ckpt, other_vocab):
  cfg = data_config(world, vocabulary_path=other_vocab)
  assert train_setup.backbone_vocabulary(cfg, None, backbone_ckpt).startswith(backbone_ckpt)


def test_other_vocabulary_fails_before_training_naming_both(tmp_path, world, backbone_ckpt,
                                                            other_vocab):
  world_vocab = os.path.join(world, "spm.model")
  cfg = data_config(world, vocabulary_path=world_vocab)
  with pytest.raises(pretrained.VocabularyMismatchError) as e:
    trainer.train(str(tmp_path / "run"), data=cfg, initial_checkpoint_path=backbone_ckpt)
  msg = str(e.value)
  assert pretrained.file_sha256(other_vocab) in msg and pretrained.file_sha256(world_vocab) in msg
  assert world_vocab in msg and backbone_ckpt in msg
  assert not (tmp_path / "run" / "checkpoints").exists()
  assert not (tmp_path / "run" / "config.gin").exists()


def test_env_vocabulary_is_checked_too(world, backbone_ckpt, monkeypatch):
  monkeypatch.setenv("LEVI_VOCAB_PATH", os.path.join(world, "spm.model"))
  with pytest.raises(pretrained.VocabularyMismatchError, match="configured vocabulary"):
    train_setup.backbone_vocabulary(data_config(world), None, backbone_ckpt)


def test_damaged_vocabulary_is_caught_on_load(backbone_ckpt):
  carried = pretrained.checkpoint_vocabulary(backbone_ckpt)
  with open(carried.path, "ab") as f:
    f.write(b"\0")
  with pytest.raises(pretrained.VocabularyMismatchError, match="damaged"):
    pretrained.checkpoint_vocabulary(backbone_ckpt)


def test_hf_folder_carries_its_spiece_model(tmp_path, other_vocab):
  folder = tmp_path / "hf"
  folder.mkdir()
  (folder / "config.json").write_text('{"model_type": "t5"}')
  (folder / "spiece.model").write_bytes(open(other_vocab, "rb").read())
  carried = pretrained.checkpoint_vocabulary(str(folder))
  assert carried.path == str(folder / "spiece.model")
  assert carried.sha256 == pretrained.file_sha256(other_vocab)


def test_t5x_model_dir_names_its_vocabulary_in_gin(tmp_path, world, other_vocab):
  model_dir = tmp_path / "t5x"
  (model_dir / "checkpoint_2").mkdir(parents=True)
  (model_dir / "config.gin").write_text(
      "seqio.SentencePieceVocabulary.sentencepiece_model_file = "
      f"'{other_vocab}'\nseqio.SentencePieceVocabulary.extra_ids = 100\n")
  for path in (model_dir, model_dir / "checkpoint_2"):
    carried = pretrained.checkpoint_vocabulary(str(path))
    assert carried.path == other_vocab and carried.sha256 == pretrained.file_sha256(other_vocab)
  with pytest.raises(pretrained.VocabularyMismatchError):
    train_setup.backbone_vocabulary(data_config(world, vocabulary_path=os.path.join(
        world, "spm.model")), None, str(model_dir))


def test_t5x_vocabulary_out_of_reach_needs_a_local_copy(tmp_path, world, other_vocab):
  model_dir = tmp_path / "t5x"
  (model_dir / "checkpoint_2").mkdir(parents=True)
  named = "gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model"
  (model_dir / "config.gin").write_text(
      f'seqio.SentencePieceVocabulary.sentencepiece_model_file = "{named}"\n')
  with pytest.raises(pretrained.VocabularyMismatchError, match=r"cannot be read here"):
    train_setup.backbone_vocabulary(data_config(world), None, str(model_dir))
  # A local copy, configured explicitly, is used (its hash can't be compared).
  cfg = data_config(world, vocabulary_path=other_vocab)
  assert train_setup.backbone_vocabulary(cfg, None, str(model_dir)) == other_vocab


def test_checkpoint_without_vocabulary_uses_the_data_vocabulary(tmp_path, world):
  path = str(tmp_path / "plain")
  checkpointing.save_tree(path, {"a": np.zeros(2)})
  assert pretrained.checkpoint_vocabulary(path) is None
  assert train_setup.backbone_vocabulary(data_config(world), None, path) is None
