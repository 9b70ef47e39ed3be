"""T5X checkpoint interop: fixtures written by T5X itself, round trips, diffs.

`tests/data/ckpt/t5x/` holds three tiny encoder-decoder checkpoints written by
T5X's own `Checkpointer` and `OrbaxCheckpointManagerInterface` (see the
README there) and `expected.npz`, the encoder arrays T5X held when saving.
"""

import json
import os
import shutil

import flax.serialization
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore

from levi_jax.checkpoints import (CheckpointMismatchError, abstract_params, load_t5x,
                                  read_t5x, save_t5x)
from levi_jax.checkpoints import msgpack_stream
from levi_jax.checkpoints import t5x as t5x_lib
from levi_jax.models.t5_encoder import T5Encoder, preset

DATA = os.path.join(os.path.dirname(__file__), "data", "ckpt", "t5x")
with open(os.path.join(DATA, "fixtures.json")) as _f:
  META = json.load(_f)
FIXTURES = sorted(META["checkpoints"])


@pytest.fixture(scope="module")
def expected():
  with np.load(os.path.join(DATA, "expected.npz")) as z:
    return {k: z[k] for k in z.files}


def _config(name, **overrides):
  acts = tuple(META["checkpoints"][name]["mlp_activations"])
  return preset("t5_1_1_tiny", vocab_size=64, mlp_activations=acts).replace(**overrides)


def _init(cfg):
  return abstract_params(T5Encoder(cfg), jnp.zeros((1, 4), jnp.int32))


@pytest.fixture
def spy_opens(monkeypatch):
  """Records the kvstore path of every tensorstore array opened."""
  opened = []
  real = tensorstore.open

  def spy(spec, *args, **kwargs):
    j = spec.to_json() if hasattr(spec, "to_json") else spec
    kv = j.get("kvstore", {})
    opened.append(kv.get("path", "") if isinstance(kv, dict) else str(kv))
    return real(spec, *args, **kwargs)

  monkeypatch.setattr(tensorstore, "open", spy)
  return opened


@pytest.mark.parametrize("name", FIXTURES)
def test_t5x_written_checkpoints_restore_exactly(name, expected):
  params = load_t5x(_init(_config(name)), os.path.join(DATA, name))
  flat = traverse_util.flatten_dict(params, sep="/")
  want = {k.split("/", 1)[1]: v for k, v in expected.items() if k.startswith(name + "/")}
  assert sorted(flat) == sorted(want)
  for k, v in flat.items():
    assert v.dtype == np.float32, k
    np.testing.assert_array_equal(v, want[k], err_msg=k)
  # The restored tree runs in the encoder.
  out = T5Encoder(_config(name)).apply({"params": params}, jnp.array([[5, 9, 3, 0]]))
  assert out.final.shape == (1, 4, 8) and np.isfinite(np.asarray(out.final)).all()


def test_bfloat16_checkpoint_reads_as_bfloat16():
  arrays, _ = read_t5x(os.path.join(DATA, "t5x_legacy_bf16"))
  assert {str(a.dtype) for a in arrays.values()} == {"bfloat16"}
  assert len(arrays) == 19


def test_finds_steps_and_formats():
  fmt, where = t5x_lib.find_checkpoint(os.path.join(DATA, "t5x_orbax"))
  assert fmt == "orbax" and where.endswith(os.path.join("checkpoint_1", "state"))
  fmt, where = t5x_lib.find_checkpoint(os.path.join(DATA, "t5x_legacy_f32", "checkpoint_3"))
  assert fmt == "legacy" and where.endswith(os.path.join("checkpoint_3", "checkpoint"))
  with pytest.raises(FileNotFoundError, match="no checkpoint_7"):
    t5x_lib.find_checkpoint(os.path.join(DATA, "t5x_legacy_f32"), step=7)


@pytest.mark.parametrize("name", ["t5x_legacy_f32", "t5x_legacy_bf16"])
def test_legacy_restore_never_touches_decoder_or_optimizer(name, tmp_path, spy_opens,
                                                           monkeypatch):
  decoded = []
  real_hook = msgpack_stream._ext_hook
  monkeypatch.setattr(msgpack_stream, "_ext_hook",
                      lambda code, data: decoded.append(code) or real_hook(code, data))
  src = os.path.join(DATA, name)
  dst = tmp_path / name
  shutil.copytree(src, dst)
  step_dir = next(p for p in dst.iterdir() if p.name.startswith("checkpoint_"))
  removed = 0
  for d in step_dir.iterdir():
    if d.is_dir() and not d.name.startswith(("target.encoder.", "target.token_embedder.")):
      shutil.rmtree(d)  # Decoder and optimizer-state arrays are gone...
      removed += 1
  assert removed > 20
  params = load_t5x(_init(_config(name)), str(dst))  # ...and the restore still works.
  n_params = len(traverse_util.flatten_dict(params))
  assert n_params == (21 if name.endswith("f32") else 19)
  names = [os.path.basename(p.rstrip("/")) for p in spy_opens]
  assert len(names) == n_params - (5 if name.endswith("f32") else 0)
  assert all(n.startswith(("target.encoder.", "target.token_embedder.")) for n in names), names
  # Inline msgpack arrays: only the encoder's 5 layer norms are decoded (the
  # decoder's norms and the inline optimizer state are skipped undecoded).
  assert len(decoded) == (5 if name.endswith("f32") else 0)


def test_orbax_restore_opens_only_encoder_arrays(spy_opens):
  load_t5x(_init(_config("t5x_orbax")), os.path.join(DATA, "t5x_orbax"))
  arrays = {p.rstrip("/") for p in spy_opens if p.startswith("target.") or p.startswith("state.")}
  assert len(arrays) == 21
  assert all(p.startswith(("target.encoder.", "target.token_embedder.")) for p in arrays)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_save_restore_round_trip(dtype, tmp_path):
  cfg = preset("t5_1_1_tiny", vocab_size=64)
  params = jax.tree.map(np.asarray, T5Encoder(cfg).init(
      jax.random.key(3), jnp.zeros((1, 4), jnp.int32))["params"])
  params = jax.tree.map(np.asarray, flax.linen.meta.unbox(params))
  step_dir = save_t5x(params, str(tmp_path), step=17, dtype=dtype)
  assert os.path.basename(step_dir) == "checkpoint_17"
  arrays, names = read_t5x(str(tmp_path))
  assert "state/step" in names
  assert {str(a.dtype) for a in arrays.values()} == {jnp.dtype(dtype).name}
  back = load_t5x(_init(cfg), str(tmp_path))
  back = traverse_util.flatten_dict(back, sep="/")
  for k, v in traverse_util.flatten_dict(params, sep="/").items():
    np.testing.assert_array_equal(back[k], v.astype(dtype).astype(np.float32), err_msg=k)
  with pytest.raises(FileExistsError):
    save_t5x(params, str(tmp_path), step=17)


def test_round_trip_of_t5x_fixture_through_our_writer(tmp_path, expected):
  cfg = _config("t5x_orbax")
  params = load_t5x(_init(cfg), os.path.join(DATA, "t5x_orbax"))
  save_t5x(params, str(tmp_path), step=1)
  again = load_t5x(_init(cfg), str(tmp_path))
  for k, v in traverse_util.flatten_dict(again, sep="/").items():
    np.testing.assert_array_equal(v, expected["t5x_orbax/" + k])


def _rewrite(tmp_path, name, edit):
  """Copies a legacy fixture and edits its msgpack `optimizer` tree."""
  dst = tmp_path / name
  shutil.copytree(os.path.join(DATA, name), dst)
  file = next(dst.glob("checkpoint_*/checkpoint"))
  contents = flax.serialization.msgpack_restore(file.read_bytes())
  edit(contents["optimizer"]["target"])
  file.write_bytes(flax.serialization.msgpack_serialize(contents))
  return str(dst)


def test_mismatch_lists_missing_unexpected_and_shapes(tmp_path):
  path = _rewrite(tmp_path, "t5x_legacy_f32",
                  lambda t: t["encoder"]["layers_1"]["mlp"].pop("wo"))
  cfg = _config("t5x_legacy_f32", num_layers=1, mlp_dim=32)
  with pytest.raises(CheckpointMismatchError) as e:
    load_t5x(_init(cfg), path)
  msg = str(e.value)
  assert not e.value.missing
  assert "encoder/layers_1/attention/query/kernel" in e.value.unexpected
  assert "encoder/layers_1/mlp/wo/kernel" not in e.value.unexpected
  assert ("encoder/layers_0/mlp/wi_0/kernel", (8, 16), (8, 32)) in e.value.shapes
  assert "encoder/layers_0/mlp/wi_0/kernel: (8, 16) vs (8, 32)" in msg
  assert "2 encoder layers" in msg
  with pytest.raises(CheckpointMismatchError) as e:
    load_t5x(_init(_config("t5x_legacy_f32")), path)
  assert e.value.missing == ["encoder/layers_1/mlp/wo/kernel"]
  assert "missing in the checkpoint (1):\n    encoder/layers_1/mlp/wo/kernel" in str(e.value)


def test_mismatch_wrong_dtype(tmp_path):
  cfg = preset("t5_1_1_tiny", vocab_size=64)
  params = flax.linen.meta.unbox(T5Encoder(cfg).init(
      jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
  # Old T5 checkpoints stored bfloat16 bits as uint16; T5X refuses them too.
  save_t5x(params, str(tmp_path), dtype=np.uint16)
  with pytest.raises(CheckpointMismatchError) as e:
    load_t5x(_init(cfg), str(tmp_path))
  assert len(e.value.dtypes) == 21
  assert "token_embedder/embedding: uint16 vs float32" in str(e.value)


def test_decoder_only_checkpoint_is_refused_with_a_reason(tmp_path):
  def drop_encoder(target):
    target.pop("encoder")
    target.pop("token_embedder")

  path = _rewrite(tmp_path, "t5x_legacy_f32", drop_encoder)
  with pytest.raises(CheckpointMismatchError, match="decoder-only") as e:
    load_t5x(_init(_config("t5x_legacy_f32")), path)
  assert "target/token_embedder/embedding" in e.value.missing
  assert "['target/decoder']" in str(e.value)


def test_dont_load_keeps_init_values(tmp_path):
  cfg = _config("t5x_legacy_f32")
  init = flax.linen.meta.unbox(T5Encoder(cfg).init(
      jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"])
  params = load_t5x(init, os.path.join(DATA, "t5x_legacy_f32"),
                    dont_load=[r"token_embedder/.*"])
  np.testing.assert_array_equal(params["token_embedder"]["embedding"],
                                init["token_embedder"]["embedding"])
