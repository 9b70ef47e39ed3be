"""seqio Tasks, the feature converter, the numpy path, vocabularies and the inspect CLI."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from levi_jax import input_pipeline
from levi_jax.data import spm, tokens
from levi_jax.models.task_net import validate_features

from world_fixtures import SMALL_WORLD, write_small_world

TASK = "movielens_100k.gender_m_to_f"


@pytest.fixture(scope="module")
def world(small_world):
  return small_world


@pytest.fixture(scope="module")
def tasks(world):
  from levi_jax.data import tasks as tasks_module

  tasks_module.register_tasks(data_dir=world)
  return tasks_module


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("LEVI_CACHE_DIR", str(tmp_path / "cache"))


def _collect(ds):
  out = {}
  for ex in ds.as_numpy_iterator():
    for k, v in ex.items():
      out.setdefault(k, []).append(v)
  return {k: np.stack(v) for k, v in out.items()}


def test_task_batches_have_the_model_shapes_and_dtypes(tasks, world):
  ds = tasks.get_dataset(TASK, "train", inputs_length=48, batch_size=16)
  batch = next(ds.as_numpy_iterator())
  specs = input_pipeline.feature_specs(TASK, world)
  assert batch["inputs"].shape == (16, 48) and batch["inputs"].dtype == np.int32
  assert batch["targets"].shape == (16,) and batch["targets"].dtype == np.float32
  assert set(batch) == {"inputs", "targets", *(f.name for f in specs)}
  assert batch["movie_genres"].shape == (16, 6)
  validate_features(batch, specs)
  assert np.all(batch["inputs"][:, 0] > 1), "text starts with real tokens"
  assert np.all(np.isin(batch["targets"], [1, 2, 3, 4, 5]))


@pytest.mark.parametrize("task,split", [(TASK, "ood_test"), ("amazon_2018.price_low_to_high",
                                                             "validation")])
def test_seqio_and_numpy_paths_give_identical_examples(tasks, world, task, split):
  via_seqio = _collect(tasks.get_dataset(task, split, inputs_length=24))
  via_numpy = input_pipeline.load_split_arrays(task, split, data_dir=world, inputs_length=24)
  assert set(via_seqio) == set(via_numpy)
  for k in via_numpy:
    assert via_seqio[k].dtype == via_numpy[k].dtype, k
    np.testing.assert_array_equal(via_seqio[k], via_numpy[k], err_msg=k)
  # Truncated texts end in EOS; short ones are padded with 0 after EOS.
  inputs = via_numpy["inputs"]
  lengths = (inputs > 0).sum(1)
  assert np.all(inputs[np.arange(len(inputs)), lengths - 1] == 1)
  assert lengths.max() == 24
  assert not via_numpy["inputs"].flags.writeable


def test_task_preprocessor_gives_the_array_path_ids(tasks, world):
  """The Task's `inputs` are `tokens.encode`'s ids, with and without a length."""
  import seqio
  import tensorflow as tf

  features = seqio.get_mixture_or_task(TASK).output_features
  vocab = features["inputs"].vocabulary.sentencepiece_model_file
  texts = input_pipeline.prepare(TASK, world).source_arrays("train", np.arange(5))["inputs"]
  ds = tf.data.Dataset.from_tensor_slices({"inputs": texts})
  for length in (None, 8):
    lengths = None if length is None else {"inputs": length}
    got = [ex["inputs"].tolist()
           for ex in tasks.tokenize_inputs(ds, features, lengths).as_numpy_iterator()]
    assert got == tokens.encode(texts, vocab, length)
  assert max(len(ids) for ids in tokens.encode(texts, vocab)) > 8


def test_host_shards_partition_the_split_deterministically(tasks):
  import seqio

  def rows(shard, seed):
    ds = tasks.get_dataset(TASK, "id_test", inputs_length=32, shuffle=True, seed=seed,
                           shard_info=seqio.ShardInfo(shard, 2))
    ex = _collect(ds)
    return [tuple(x) for x in np.concatenate([ex["inputs"], ex["user_id"][:, None],
                                              ex["item_id"][:, None]], 1)]

  full = _collect(tasks.get_dataset(TASK, "id_test", inputs_length=32))
  a, b = rows(0, 1), rows(1, 1)
  assert len(a) + len(b) == len(full["targets"]) and not set(a) & set(b)
  assert rows(0, 1) == a, "same seed, same order"
  assert rows(0, 2) != a


def test_numpy_shards_are_seqios_shards(tasks, world):
  """`load_split_arrays(shard=...)`: the rows seqio yields for that ShardInfo."""
  import seqio

  full = input_pipeline.load_split_arrays(TASK, "train", data_dir=world, inputs_length=24)
  for index in range(3):
    via_seqio = _collect(tasks.get_dataset(TASK, "train", inputs_length=24,
                                           shard_info=seqio.ShardInfo(index, 3)))
    mine = input_pipeline.load_split_arrays(TASK, "train", data_dir=world, inputs_length=24,
                                            shard=(index, 3))
    assert set(mine) == set(via_seqio)
    for k in mine:
      np.testing.assert_array_equal(mine[k], via_seqio[k], err_msg=k)
      np.testing.assert_array_equal(mine[k], full[k][index::3], err_msg=k)
  with pytest.raises(ValueError, match="shard index 3 is out of range for 3 shards"):
    input_pipeline.load_split_arrays(TASK, "train", data_dir=world, inputs_length=24, shard=(3, 3))


def test_registration_is_idempotent_and_rebinds_the_data_dir(tasks, world, tmp_path):
  import seqio

  names = tasks.register_tasks(data_dir=world)
  assert tasks.register_tasks(data_dir=world) == names
  assert len(names) == len(input_pipeline.task_names())
  assert set(names) <= set(seqio.TaskRegistry.names())
  other = str(tmp_path / "other")
  write_small_world(other, seed=9)
  tasks.register_tasks(data_dir=other)
  try:
    n_other = len(_collect(tasks.get_dataset(TASK, "id_test"))["targets"])
    other_split = input_pipeline.load_split_arrays(TASK, "id_test", data_dir=other)
    assert n_other == len(other_split["targets"])
  finally:
    tasks.register_tasks(data_dir=world)
  n_world = len(_collect(tasks.get_dataset(TASK, "id_test"))["targets"])
  world_split = input_pipeline.load_split_arrays(TASK, "id_test", data_dir=world)
  assert n_world == len(world_split["targets"])
  assert n_world != n_other
  with pytest.raises(input_pipeline.UnknownTaskError, match="close matches"):
    tasks.get_dataset("movielens_100k.gender_m_to_ff", "train")


def test_pretrain_corpus_task(tasks, world):
  ds = tasks.get_dataset("pretrain_corpus.all", "train", inputs_length=32, batch_size=4)
  assert next(ds.as_numpy_iterator())["inputs"].shape == (4, 32)
  with pytest.raises(ValueError, match="ood_test"):
    input_pipeline.load_split_arrays("pretrain_corpus.all", "ood_test", data_dir=world)


def test_vocabulary_shipped_with_world_and_trained_for_raw_dirs(tasks, world, tmp_path):
  import seqio

  vocab = seqio.get_mixture_or_task(TASK).output_features["inputs"].vocabulary
  assert vocab.sentencepiece_model_file == os.path.join(world, "spm.model")
  assert vocab.eos_id == 1 and vocab.vocab_size <= SMALL_WORLD["vocab_size"]
  assert vocab.vocab_size == input_pipeline.vocabulary_size(vocab.sentencepiece_model_file)
  other = seqio.get_mixture_or_task("movielens_1m.time_later").output_features["inputs"]
  assert other.vocabulary == vocab, "tasks of one world share a vocabulary (mixable)"
  assert pickle.loads(pickle.dumps(vocab)) == vocab
  # A raw directory without spm.model: a model is trained on its text and cached by content.
  raw = tmp_path / "raw"
  os.makedirs(raw)
  for f in ("u.data", "u.user", "u.item"):
    os.symlink(os.path.join(world, "ml-100k", f), raw / f)
  path = input_pipeline.vocabulary_path(TASK, str(raw))
  assert path.startswith(str(tmp_path / "cache" / "spm"))
  with open(path, "rb") as f:
    first = f.read()
  os.remove(path)
  assert input_pipeline.vocabulary_path(TASK, str(raw)) == path
  with open(path, "rb") as f:
    assert f.read() == first, "training is deterministic"
  assert input_pipeline.vocabulary_path(TASK, str(raw), vocab_path="/x/t5.model") == "/x/t5.model"


def test_spm_defaults_follow_t5_ids():
  import sentencepiece

  model = spm.train_sentencepiece(["user: 25-34, female, writer.", "movie: Café (1995)."] * 20,
                                  vocab_size=60)
  proc = sentencepiece.SentencePieceProcessor(model_proto=model)
  assert (proc.pad_id(), proc.eos_id(), proc.unk_id(), proc.bos_id()) == (0, 1, 2, -1)
  assert proc.decode(proc.encode("movie: Café (1995).")) == "movie: Café (1995)."
  with pytest.raises(ValueError, match="empty"):
    spm.train_sentencepiece([])


def test_inspect_cli(world, capsys):
  from levi_jax.data import inspect

  assert inspect.main(["--list"]) == 0
  out = capsys.readouterr().out
  assert TASK in out and f"{len(input_pipeline.task_names())} tasks" in out
  assert inspect.main(["--task", TASK, "--data_dir", world, "--inputs_length", "40"]) == 0
  out = capsys.readouterr().out
  task = input_pipeline.prepare(TASK, world)
  for split, rows in task.splits.items():
    r = task.table.rows["rating"][rows]
    assert f"{len(rows):>9}" in out and f"{r.mean():>8.3f}{r.std():>7.3f}" in out, split
  assert out.count("targets=") == 3 and "inputs (" in out and "user: " in out
  assert inspect.main(["--task", "movielens_1m.gendr_m_to_f", "--data_dir", world]) == 1
  assert "movielens_1m.gender_m_to_f" in capsys.readouterr().err
  assert inspect.main(["--task", TASK, "--data_dir", "/nonexistent"]) == 1
  assert "u.data" in capsys.readouterr().err


def test_inspect_shows_what_the_minilm_backbone_reads(world, capsys):
  from levi_jax.data import inspect

  vocab_file = inspect.backbone_vocab_path("minilm")
  assert inspect.main(["--task", TASK, "--data_dir", world, "--backbone", "minilm"]) == 0
  out = capsys.readouterr().out
  assert f"{vocab_file} (WordPiece, 30522 pieces)" in out and out.count("targets=") == 3
  # The first example is the first training row's text, lower-cased WordPieces.
  text = input_pipeline.prepare(TASK, world).source_arrays("train", [0])["inputs"][0]
  ids = tokens.tokenize([text], vocab_file, input_pipeline.DEFAULT_INPUTS_LENGTH)
  assert f"[0] inputs ({int((ids > 0).sum())} tokens)" in out
  assert text.lower().split()[0].rstrip(":") in out and "user: " not in out
  assert inspect.main(["--task", TASK, "--data_dir", world, "--backbone", "/nonexistent"]) == 1
  assert "neither 'minilm' nor a checkpoint" in capsys.readouterr().err


def test_models_and_numpy_path_do_not_import_tensorflow(world):
  code = ("import sys; import levi_jax.models, levi_jax.data\n"
          "from levi_jax import input_pipeline\n"
          f"a = input_pipeline.load_split_arrays({TASK!r}, 'train', data_dir={world!r})\n"
          "assert a['inputs'].shape[1] == 64\n"
          "bad = [m for m in ('tensorflow', 'seqio', 'tensorflow_datasets') if m in sys.modules]\n"
          "assert not bad, bad\n")
  res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert res.returncode == 0, res.stderr[-2000:]
