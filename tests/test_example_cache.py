"""Examples on disk (levi_jax.data.example_cache): the same batches as in memory, read lazily."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from levi_jax import disk_array, input_pipeline, trainer
from levi_jax.checkpointing import CheckpointConfig
from levi_jax.data import datasets, example_cache, prepare, synthetic
from levi_jax.optim import OptimizerConfig

from trainer_fixtures import TINY_BACKBONE

TASK = "movielens_100k.gender_m_to_f"
SMALL = dict(adapter_dim=16, fusion_hidden=(16,), task_hidden=(16,), backbone_overrides=TINY_BACKBONE)


def _data(cache_dir="", **kw):
  return trainer.DataConfig(task=TASK, example_cache_dir=str(cache_dir), seq_length=24,
                            batch_size=16, eval_batch_size=256, **kw)


def _splits(task_data):
  return {"train": task_data.train, **task_data.evals}


@pytest.mark.parametrize("shards", [None, input_pipeline.InputShards(4, 1, 2)])
def test_disk_examples_are_the_in_memory_arrays(tmp_path, shards):
  """Every split, column and row of the disk views equals the in-memory arrays, sharded too."""
  mem = input_pipeline.load_task_data(_data(), shards=shards)
  disk = input_pipeline.load_task_data(_data(tmp_path), shards=shards)
  assert disk.features == mem.features and disk.vocab_size == mem.vocab_size
  assert disk.split_sizes == mem.split_sizes
  for name, arrays in _splits(mem).items():
    views = _splits(disk)[name]
    assert list(views) == list(arrays), name  # same columns, same order
    assert all(isinstance(v, disk_array.RowView) for v in views.values())
    for k, v in arrays.items():
      got = np.asarray(views[k])
      assert got.dtype == v.dtype and got.shape == v.shape, (name, k)
      np.testing.assert_array_equal(got, v, err_msg=f"{name}/{k}")
    idx = np.random.default_rng(0).integers(0, len(arrays["targets"]), 40)
    for k, v in input_pipeline.take(views, idx).items():
      np.testing.assert_array_equal(v, arrays[k][idx], err_msg=f"{name}/{k} gathered")


def test_disk_and_memory_give_the_same_batches(tmp_path):
  """Training batches (by step, over input shards) and evaluation batches agree."""
  shards = input_pipeline.InputShards(2, 0, 1)
  mem = input_pipeline.load_task_data(_data(), shards=shards)
  disk = input_pipeline.load_task_data(_data(tmp_path), shards=shards)
  n = mem.split_sizes["train"]
  for step in (0, 1, 57, n // 16 + 3):  # the last one in the second epoch
    idx = input_pipeline.shard_batch_indices(shards, n, step, 16, seed=3)
    a, b = input_pipeline.take(mem.train, idx), input_pipeline.take(disk.train, idx)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f"step {step} {k}")
  ea = list(input_pipeline.eval_batches(mem.evals["ood_test"], 256))
  eb = list(input_pipeline.eval_batches(disk.evals["ood_test"], 256))
  assert len(ea) == len(eb) > 1
  for x, y in zip(ea, eb):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_a_second_load_reads_the_entry_without_parsing(tmp_path, monkeypatch):
  first, hit = example_cache.load(str(tmp_path), TASK, inputs_length=24)
  assert not hit and first.manifest["written"]["rows"] == sum(
      len(r) for r in first.splits.values())
  datasets.clear_cache()
  prepare.clear_cache()

  def no_parse(*a, **k):
    raise AssertionError("the raw files were parsed again")

  monkeypatch.setattr(datasets, "load_table", no_parse)
  monkeypatch.setattr(prepare, "prepare", no_parse)
  again, hit = example_cache.load(str(tmp_path), TASK, inputs_length=24)
  assert hit and again.path == first.path
  example_cache.verify(again)


def test_the_key_covers_the_data_files_vocabulary_and_length(tmp_path):
  world = prepare.resolve_data_dir(None)
  key = example_cache.cache_key(TASK, world, inputs_length=24)
  assert example_cache.cache_key(TASK, world, inputs_length=32) != key
  vocab = tmp_path / "v.model"
  vocab.write_bytes(open(prepare.vocabulary_path(TASK, world), "rb").read())
  with_vocab = example_cache.cache_key(TASK, world, str(vocab), inputs_length=24)
  assert with_vocab != key
  vocab.write_bytes(vocab.read_bytes() + b"\0")  # another file: another key
  assert example_cache.cache_key(TASK, world, str(vocab), inputs_length=24) != with_vocab
  # A copy of the world whose ratings file changed (same size, later mtime): another key.
  copy = tmp_path / "world"
  synthetic.write_world(str(copy))
  before = example_cache.cache_key(TASK, str(copy), inputs_length=24)
  udata = copy / "ml-100k" / "u.data"
  st = udata.stat()
  os.utime(udata, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  assert example_cache.cache_key(TASK, str(copy), inputs_length=24) != before


def test_bad_requests_fail_before_anything_is_written(tmp_path):
  with pytest.raises(prepare.UnknownTaskError):
    example_cache.load(str(tmp_path / "c"), "movielens_100k.no_such_shift")
  with pytest.raises(FileNotFoundError, match="vocabulary file .*missing.model does not exist"):
    example_cache.load(str(tmp_path / "c"), TASK, vocabulary_file=str(tmp_path / "missing.model"))
  with pytest.raises(ValueError, match="inputs_length must be >= 2"):
    example_cache.load(str(tmp_path / "c"), TASK, inputs_length=1)
  assert not (tmp_path / "c").exists()


def test_an_interrupted_write_leaves_no_entry(tmp_path, monkeypatch):
  calls = []
  real = example_cache.tokenize

  def fail_on_third(*a, **k):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt
    return real(*a, **k)

  monkeypatch.setattr(example_cache, "tokenize", fail_on_third)
  monkeypatch.setattr(example_cache, "CHUNK_ROWS", 1000)
  with pytest.raises(KeyboardInterrupt):
    example_cache.load(str(tmp_path), TASK, inputs_length=24)
  assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # no entry, no temporary files
  monkeypatch.setattr(example_cache, "tokenize", real)
  entry, hit = example_cache.load(str(tmp_path), TASK, inputs_length=24)
  assert not hit and len(entry.splits["train"]) > 1000


def test_damaged_entries_are_named(tmp_path):
  entry, _ = example_cache.load(str(tmp_path), TASK, inputs_length=24)
  file = os.path.join(entry.path, "validation.npz")
  records = entry.splits["validation"]
  with open(file, "r+b") as f:  # flip one byte of the last row's `targets`
    f.seek(records.offset + records.nbytes - 1)
    b = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([b[0] ^ 0x40]))
  with pytest.raises(ValueError, match="split 'validation' field 'targets' has sha256"):
    example_cache.verify(example_cache.open_entry(entry.path))
  with open(file, "r+b") as f:
    f.truncate(records.offset + records.nbytes // 2)
  with pytest.raises(ValueError, match="validation.npz is damaged or truncated"):
    example_cache.open_entry(entry.path)


def test_training_from_disk_examples_matches_in_memory_and_resumes_exactly(tmp_path):
  """A run on disk examples equals the in-memory run; one resumed from its step-4
  checkpoint ends as the uninterrupted one."""

  def train(model_dir, cache):
    return trainer.train(
        str(model_dir), model=trainer.ModelConfig(method="scratch", **SMALL), data=_data(cache),
        optimizer=OptimizerConfig(learning_rate=3e-3, schedule="constant"),
        loop=trainer.LoopConfig(num_steps=8, log_every=4),
        checkpoint=CheckpointConfig(every_steps=4, async_save=False))

  cache = tmp_path / "examples"
  mem = train(tmp_path / "mem", "")
  disk = train(tmp_path / "disk", cache)
  for split, metrics in mem["metrics"].items():
    for k, v in metrics.items():
      assert disk["metrics"][split][k] == pytest.approx(v, rel=1e-6, abs=1e-7), (split, k)
  assert disk["input"]["split_rows"] == mem["input"]["split_rows"]
  shutil.rmtree(tmp_path / "disk" / "checkpoints" / "8")  # as if stopped after step 4
  os.remove(tmp_path / "disk" / "results.json")
  resumed = train(tmp_path / "disk", cache)
  assert [s for s, _ in _logged(tmp_path / "disk")].count(8) == 2  # step 8 ran again
  for split, metrics in disk["metrics"].items():
    for k, v in metrics.items():
      assert resumed["metrics"][split][k] == pytest.approx(v, rel=1e-6, abs=1e-7), (split, k)
  entries = list(cache.rglob(example_cache.MANIFEST))
  assert len(entries) == 1  # written once, read by every later run
  assert json.loads(entries[0].read_text())["key"]["inputs_length"] == 24


def _logged(model_dir, key="train/loss"):
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [(r["step"], r[key]) for r in rows if key in r]


@pytest.mark.parametrize("num_shards,owned", [(1, [0]), (4, [1]), (4, [2, 3]), (3, [0, 1, 2])])
def test_row_map_is_the_input_shards_positions(num_shards, owned):
  for n in (0, 1, 5, 101):
    count = num_shards // len(owned)
    shards = input_pipeline.InputShards(num_shards, owned[0] // len(owned), count)
    assert list(shards.owned) == owned
    rows = disk_array.RowMap(n, num_shards, owned)
    want = shards.positions(n)
    assert len(rows) == len(want)
    np.testing.assert_array_equal(rows[np.arange(len(want))], want)


def test_row_views_read_fields_of_records_and_gather_them_in_one_pass(tmp_path):
  n = 1000
  dtype = np.dtype([("inputs", np.int32, (6,)), ("genres", np.int32, (3,)),
                    ("targets", np.float32)])
  rec = np.zeros(n, dtype)
  rec["inputs"] = np.arange(n * 6).reshape(n, 6)
  rec["genres"] = np.arange(n * 3).reshape(n, 3) % 7
  rec["targets"] = np.arange(n) / 4
  path = str(tmp_path / "r.npz")
  disk_array.write_npz(path, {}, "examples", (n,), dtype, [rec[:300], rec[300:]])
  base = disk_array.read_npz_array(path, "examples")
  rows = disk_array.RowMap(n, 4, [1, 2])
  views = {k: disk_array.RowView(base, k, rows) for k in dtype.names}
  views["extra"] = np.arange(len(rows)) * 10  # a column in memory rides along
  want = rec[np.concatenate([np.arange(1, n, 4), np.arange(2, n, 4)])]
  assert views["inputs"].shape == (500, 6) and views["targets"].shape == (500,)
  idx = np.asarray([499, 0, 3, 3, 250])
  got = disk_array.gather(views, idx)
  assert list(got) == list(views)
  for k in dtype.names:
    np.testing.assert_array_equal(got[k], want[k][idx])
    np.testing.assert_array_equal(np.asarray(views[k]), want[k])
    np.testing.assert_array_equal(views[k][10:20], want[k][10:20])
  np.testing.assert_array_equal(got["extra"], idx * 10)
  assert views["targets"][7] == want["targets"][7]
  with pytest.raises(IndexError):
    views["targets"][np.asarray([500])]


def test_an_epoch_of_batches_from_disk_examples_holds_one_batch(tmp_path):
  """Reading every batch of a ~120 MB examples file (two shards' views, the trainer's
  gather) grows peak RSS by a small part of the file."""
  script = f"""
import numpy as np
from levi_jax import disk_array, input_pipeline
n, path = 400_000, {str(tmp_path / 'big.npz')!r}
dtype = np.dtype([("inputs", np.int32, (64,)), ("user_id", np.int32), ("item_id", np.int32),
                  ("item_subcategories", np.int32, (4,)), ("targets", np.float32)])
def chunks():
  for s in range(0, n, 50_000):
    c = np.zeros(min(50_000, n - s), dtype)
    c["inputs"][:, 0] = np.arange(s, s + len(c))
    c["targets"] = 1.0
    yield c
disk_array.write_npz(path, {{}}, "examples", (n,), dtype, chunks())
def status(f):
  return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(f))
base = disk_array.read_npz_array(path, "examples")
shards = input_pipeline.InputShards(2, 0, 1)
rows = disk_array.RowMap(n, 2, shards.owned)
views = {{k: disk_array.RowView(base, k, rows) for k in dtype.names}}
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS: the write's peak is not counted
start, seen = status("VmRSS:"), 0
for s in range(n // 512):
  idx = input_pipeline.shard_batch_indices(shards, n, s, 512, seed=0)
  b = input_pipeline.take(views, idx)
  seen += int(b["targets"].sum())
assert seen == (n // 512) * 512, seen
print("GROWTH", status("VmHWM:") - start, base.nbytes)
"""
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  growth, size = map(int, out.stdout.split("GROWTH")[1].split())
  assert size > 100e6
  assert growth < size / 4, (growth, size)


def test_disk_inputs_name_their_content_for_the_tap_cache(tmp_path):
  """The tap cache keys disk examples by their recorded digest: one per split and shard set,
  changed by another shard set, and never the in-memory key of other content."""
  whole = input_pipeline.load_task_data(_data(tmp_path))
  half = input_pipeline.load_task_data(_data(tmp_path), shards=input_pipeline.InputShards(2, 0, 1))
  other = input_pipeline.load_task_data(_data(tmp_path), shards=input_pipeline.InputShards(2, 1, 2))
  ids = {x.train["inputs"].content_sha256 for x in (whole, half, other)}
  ids |= {whole.evals["validation"]["inputs"].content_sha256}
  assert len(ids) == 4 and None not in ids
  entry, _ = example_cache.load(str(tmp_path), TASK, inputs_length=24)
  assert whole.train["inputs"].content_sha256 == entry.manifest["splits"]["train"]["sha256"][
      "inputs"]


def test_scale_phases_run_on_a_small_generated_world(tmp_path):
  """experiments.scale's preprocess and training phases, in this process, on 20K ratings."""
  from experiments import scale
  from levi_jax.data import synthetic_scale
  settings = scale.Settings(ratings=(20_000,), work_dir=str(tmp_path), steps=3, batch_size=32,
                            seq_length=16)
  synthetic_scale.write_scale_world(scale._paths(settings, 20_000)["world"], 20_000)
  pre = scale._preprocess(settings, 20_000)
  assert not pre["hit"] and pre["rows"] == sum(pre["split_rows"].values()) > 15_000
  assert pre["bytes_per_row"] >= pre["record_bytes"] == 16 * 4 + 4 * sum(
      f["bag_size"] or 1 for f in pre["features"]) + 4
  small = scale._train(settings, 20_000, "scratch")
  assert small["loss_finite"] and small["examples_per_s"] > 0 and small["load_s"] < 60
  assert scale._preprocess(settings, 20_000)["hit"]  # the entry is read, not rewritten
