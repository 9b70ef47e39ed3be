"""The tap cache on disk: entries written in chunks, read a batch of rows at a time, in
float32 or bfloat16, never left half-written, and read in bounded memory."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import ml_dtypes
import numpy as np
import pytest

from levi_jax import methods, step, tap_cache, train_setup, trainer
from levi_jax.models.levi import CACHED_TAPS, resolve_taps
from levi_jax.optim import OptimizerConfig, make_optimizer

from trainer_fixtures import task_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(adapter_dim=16, fusion_hidden=(16,), task_hidden=(16,))


def _attach(cache, data, dtype="float32"):
  """The `levi` method's params (init seed 0) and its splits with cached taps."""
  method = train_setup.build_method(trainer.ModelConfig(method="levi", **SMALL), data)
  boxed = method.init(jax.random.PRNGKey(0), data.train)
  params = jax.tree.map(lambda x: np.asarray(getattr(x, "value", x)), boxed,
                        is_leaf=lambda x: hasattr(x, "value"))
  with jax.set_mesh(_mesh()):
    splits, stats = tap_cache.attach(str(cache), "toy", method, params,
                                     {"train": data.train, **data.evals}, _mesh(), (),
                                     batch_size=24, dtype=dtype)
  return method, params, splits, stats


def _mesh():
  return jax.make_mesh((1, 1), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _chunks(array, sizes):
  start = 0
  for n in sizes:
    yield array[start:start + n]
    start += n


def test_write_npz_streams_chunks_that_read_back_exactly(tmp_path):
  x = np.random.default_rng(0).standard_normal((1000, 2, 8)).astype(np.float32)
  path = str(tmp_path / "a.npz")
  tap_cache.write_npz(path, {"key": "k"}, "taps", x.shape, np.float32,
                      _chunks(x, [7, 0, 300, 693]))
  taps = tap_cache.read_npz_array(path, "taps")
  assert taps.shape == x.shape and taps.dtype == np.float32 and len(taps) == 1000
  np.testing.assert_array_equal(np.asarray(taps), x)
  idx = np.array([999, 0, 5, 5, 512])
  np.testing.assert_array_equal(taps[idx], x[idx])
  with np.load(path) as f:  # still an ordinary .npz
    np.testing.assert_array_equal(f["taps"], x)
    assert str(f["key"]) == "k"
  # bfloat16: half the bytes, each value the float32 one rounded to nearest.
  half = str(tmp_path / "b.npz")
  tap_cache.write_npz(half, {}, "taps", x.shape, ml_dtypes.bfloat16, _chunks(x, [500, 500]))
  taps16 = tap_cache.read_npz_array(half, "taps", ml_dtypes.bfloat16)
  assert taps16.dtype == ml_dtypes.bfloat16 and taps16.nbytes == x.nbytes // 2
  np.testing.assert_array_equal(taps16[idx].view(np.uint16),
                                x[idx].astype(ml_dtypes.bfloat16).view(np.uint16))
  assert os.path.getsize(half) < 0.51 * os.path.getsize(path)
  # An empty array reads too.
  empty = str(tmp_path / "e.npz")
  tap_cache.write_npz(empty, {}, "taps", (0, 2, 8), np.float32, [])
  assert tap_cache.read_npz_array(empty, "taps").shape == (0, 2, 8)


def test_disk_arrays_index_like_numpy_arrays(tmp_path):
  x = np.arange(300 * 6, dtype=np.float32).reshape(300, 2, 3)
  path = str(tmp_path / "a.npz")
  tap_cache.write_npz(path, {}, "taps", x.shape, np.float32, _chunks(x, [300]))
  a = tap_cache.read_npz_array(path, "taps")
  rng = np.random.default_rng(0)
  for index in [rng.integers(0, 300, 64), np.array([5, 5, 4, 6, 299, 0, -1]), np.arange(10, 90),
                rng.integers(0, 300, (4, 8)), x[:, 0, 0] % 7 == 0, np.array([], int), 17, -3,
                slice(None), slice(5, 50), slice(None, None, -3), slice(290, 400)]:
    got = a[index]
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    np.testing.assert_array_equal(got, x[index], err_msg=str(index))
  for bad in [300, np.array([0, -301])]:
    with pytest.raises(IndexError):
      a[bad]


def test_a_failed_write_leaves_nothing_and_a_killed_one_no_entry(tmp_path):
  x = np.ones((100, 4), np.float32)
  path = tmp_path / "a.npz"

  def failing():
    yield x[:50]
    raise RuntimeError("interrupted")

  with pytest.raises(RuntimeError, match="interrupted"):
    tap_cache.write_npz(str(path), {}, "taps", x.shape, np.float32, failing())
  with pytest.raises(ValueError, match="50 rows written of 100"):
    tap_cache.write_npz(str(path), {}, "taps", x.shape, np.float32, [x[:50]])
  with pytest.raises(ValueError, match="does not fit"):
    tap_cache.write_npz(str(path), {}, "taps", x.shape, np.float32, [x, x[:1]])
  assert not os.listdir(tmp_path)
  # A process killed mid-write leaves its temporary file, never the entry.
  code = textwrap.dedent(f"""
      import os, numpy as np
      from levi_jax import tap_cache
      def chunks():
        yield np.ones((50, 4), np.float32)
        os._exit(3)
      tap_cache.write_npz({str(path)!r}, {{}}, "taps", (100, 4), np.float32, chunks())
      """)
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 3, proc.stderr
  assert not path.exists() and [p.name.split(".tmp-")[0] for p in tmp_path.iterdir()] == [
      "a.npz"]


def _every_layer_taps(method, params, arrays):
  """What the cache stored before it wrote in chunks: every layer's taps computed in
  memory in one call, the method's taps picked from them."""
  source, _ = tap_cache.tap_source(method)
  every = tap_cache.TapSource(source.module.clone(taps=tap_cache.all_taps(source)), "")
  pick = [tap_cache.all_taps(source).index(t) for t in
          resolve_taps(source.module.taps, source.module.backbone.config.num_layers)]
  with jax.set_mesh(_mesh()):
    layers = tap_cache.compute_taps(every, params["backbone"], arrays["inputs"], _mesh(), (), 24)
  return layers[:, pick]


def test_entries_on_disk_equal_in_memory_taps_float32_exactly_bfloat16_rounded(
    tmp_path, monkeypatch):
  monkeypatch.setattr(tap_cache, "CHUNK_BYTES", 7 * 2 * 8 * 4)  # 7 rows per entry write
  data = task_data(64)
  method, params, splits, stats = _attach(tmp_path, data)
  expected = {k: _every_layer_taps(method, params, a)
              for k, a in {"train": data.train, **data.evals}.items()}
  assert stats["misses"] == 3 and stats["dtype"] == "float32"
  for name, taps in expected.items():
    got = splits[name][CACHED_TAPS]
    assert isinstance(got, tap_cache.DiskArray) and got.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(got), taps)
  _, _, again, hits = _attach(tmp_path, data)
  assert hits["hits"] == 3
  np.testing.assert_array_equal(again["train"][CACHED_TAPS][np.arange(64)[::-1]],
                                expected["train"][::-1])
  # bfloat16: entries and a row store of their own, each tap the float32 one rounded.
  _, _, half, hstats = _attach(tmp_path, data, dtype="bfloat16")
  assert hstats["misses"] == 3 and hstats["rows_computed"] > 0 and hstats["dtype"] == "bfloat16"
  assert hstats["bytes"] * 2 == stats["bytes"]
  for name, taps in expected.items():
    got = half[name][CACHED_TAPS][np.arange(len(taps))]
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.view(np.uint16),
                                  taps.astype(ml_dtypes.bfloat16).view(np.uint16))
  assert len(list((tmp_path / "rows").iterdir())) == 2
  keys = set()
  for entry in (tmp_path / "toy").glob("train-*.npz"):
    with np.load(entry) as f:
      keys.add(json.dumps(json.loads(str(f["key"]))["storage"], sort_keys=True))
  assert keys == {json.dumps({"dtype": d, "layout": tap_cache.LAYOUT}, sort_keys=True)
                  for d in ("float32", "bfloat16")}
  with pytest.raises(ValueError, match="tap cache dtype"):
    _attach(tmp_path, data, dtype="float16")


def test_an_interrupted_split_leaves_no_entry_read_as_complete(tmp_path, monkeypatch):
  data = task_data(64)
  real_iter, real_gather = tap_cache.iter_taps, tap_cache.RowStore.gather

  def backbone_dies(*args, **kw):
    it = real_iter(*args, **kw)
    yield next(it)
    raise KeyboardInterrupt

  monkeypatch.setattr(tap_cache, "iter_taps", backbone_dies)
  with pytest.raises(KeyboardInterrupt):
    _attach(tmp_path, data)
  assert not [p for p in tmp_path.rglob("*") if p.is_file()]
  # The backbone finished (the row store has its part), the entry's write did not.
  monkeypatch.setattr(tap_cache, "iter_taps", real_iter)

  def assembly_dies(self, hashes, pick):
    it = real_gather(self, hashes, pick)
    yield next(it)
    raise KeyboardInterrupt

  monkeypatch.setattr(tap_cache, "CHUNK_BYTES", 8 * 3 * 8 * 4)  # 8 rows of 3 layers
  monkeypatch.setattr(tap_cache.RowStore, "gather", assembly_dies)
  with pytest.raises(KeyboardInterrupt):
    _attach(tmp_path, data)
  files = [p for p in tmp_path.rglob("*") if p.is_file()]
  assert [p.parent.parent.name for p in files] == ["rows"]  # one committed part, no entry
  monkeypatch.setattr(tap_cache.RowStore, "gather", real_gather)
  method, params, splits, stats = _attach(tmp_path, data)
  assert stats["misses"] == 3
  assert 0 < stats["rows_computed"] < len(np.unique(
      np.concatenate([a["inputs"] for a in [data.train, *data.evals.values()]]), axis=0))
  np.testing.assert_array_equal(np.asarray(splits["train"][CACHED_TAPS]),
                                _every_layer_taps(method, params, data.train))


def test_bfloat16_taps_train_close_to_float32_ones(tmp_path):
  """Steps on bfloat16 taps (cast to the model's dtype) land near the float32 ones."""
  data = task_data(64)
  method, params, f32, _ = _attach(tmp_path, data)
  _, _, bf16, _ = _attach(tmp_path, data, dtype="bfloat16")
  idx = np.arange(16)
  opt = make_optimizer(OptimizerConfig(learning_rate=3e-3, schedule="constant"), 4)
  train_step = jax.jit(step.make_train_step(method, step.LossConfig()))
  state = step.create_train_state(*methods.partition(params, method.stages[0].frozen), opt)
  out = []
  for splits in (f32, bf16):
    batch = {k: v[idx] for k, v in splits["train"].items()}
    s = state
    for _ in range(4):
      s, m = train_step(s, batch, jax.random.PRNGKey(1))
    out.append(float(m["loss"]))
  assert out[0] != out[1]
  np.testing.assert_allclose(out[0], out[1], rtol=2e-2)


BUDGET_SCRIPT = """
import json, sys, time
import numpy as np
from levi_jax import input_pipeline, tap_cache
from levi_jax.models.levi import CACHED_TAPS

def status(field):
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))

path, rows, width, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
base = np.random.default_rng(0).standard_normal((4096, 2, width // 2)).astype(np.float32)

def chunks():
  for start in range(0, rows, len(base)):
    yield (base + np.float32(start))[:rows - start]

rss0 = status("VmRSS")
tap_cache.write_npz(path, {}, "taps", (rows, 2, width // 2), np.float32, chunks())
write_peak = status("VmHWM")
taps = tap_cache.read_npz_array(path, "taps")
split = {"targets": np.zeros(rows, np.float32), CACHED_TAPS: taps}
order = np.random.default_rng([0, 0]).permutation(rows)  # the trainer's first epoch (seed 0)
assert (order[:batch] == input_pipeline.batch_indices(rows, 0, batch, 0)).all()
seen = 0
for start in range(0, rows - batch + 1, batch):  # its training batches, gathered as it does
  seen += split[CACHED_TAPS][order[start:start + batch]].shape[0]
for b in input_pipeline.eval_batches(split, 4 * batch):  # and every row once, in order
  assert b[CACHED_TAPS][0, 0, 0] != 12345.0
json.dump({"rss0": rss0, "write_peak": write_peak, "read_peak": status("VmHWM"),
           "seen": seen, "bytes": taps.nbytes}, sys.stdout)
"""


@pytest.mark.slow
def test_reading_an_entry_larger_than_the_memory_budget_stays_within_it(tmp_path):
  rows, width = 600_000, 128  # 600K rows x 2 taps x 64 floats: 307 MB of float32
  proc = subprocess.run(
      [sys.executable, "-c", BUDGET_SCRIPT, str(tmp_path / "big.npz"), str(rows), str(width),
       "256"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  got = json.loads(proc.stdout)
  size = got["bytes"]
  assert size == rows * width * 4 and os.path.getsize(tmp_path / "big.npz") > size
  assert got["seen"] >= rows - 256
  budget = size / 3
  assert got["write_peak"] - got["rss0"] < budget, got
  assert got["read_peak"] - got["rss0"] < budget, got
