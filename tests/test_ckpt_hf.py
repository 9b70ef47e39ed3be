"""Hugging Face T5 and BERT folders against golden outputs from `transformers`.

`tests/data/ckpt/hf/` holds tiny random HF folders saved by `transformers`
(`save_pretrained`: safetensors, or `flax_model.msgpack` converted by HF's own
Flax classes) and `<name>_golden.npz`: the tokens and every encoder layer's
output computed by the PyTorch reference (see the README there).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from levi_jax.checkpoints import CheckpointMismatchError, abstract_params, hf
from levi_jax.models.bert import BertEncoder
from levi_jax.models.t5_encoder import T5Encoder

DATA = os.path.join(os.path.dirname(__file__), "data", "ckpt", "hf")
ATOL = 1e-4
with open(os.path.join(DATA, "goldens.json")) as _f:
  META = json.load(_f)


def _golden(name):
  with np.load(os.path.join(DATA, f"{name}_golden.npz")) as z:
    return {k: z[k] for k in z.files}


def _check_against_golden(model, params, golden):
  out = model.apply({"params": params}, jnp.asarray(golden["tokens"]))
  # Compare at real tokens: at padded query positions HF and T5X mask differently.
  real = golden["tokens"] != 0
  assert len(out.layers) == model.config.num_layers
  for i, layer in enumerate(out.layers):
    np.testing.assert_allclose(np.asarray(layer)[real], golden[f"layer_{i}"][real],
                               atol=ATOL, rtol=0, err_msg=f"layer {i}")
  np.testing.assert_allclose(np.asarray(out.final)[real], golden["final"][real],
                             atol=ATOL, rtol=0)
  np.testing.assert_array_equal(np.asarray(out.mask), real)


@pytest.mark.parametrize("name,activations", [("t5_tiny", ("relu",)),
                                              ("t5_1_1_tiny_flax", ("gelu", "linear"))])
def test_hf_t5_matches_transformers(name, activations):
  model, params = hf.hf_t5_encoder(os.path.join(DATA, name))
  assert isinstance(model, T5Encoder)
  cfg = model.config
  assert (cfg.vocab_size, cfg.emb_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim,
          cfg.num_layers, cfg.mlp_activations) == (64, 8, 4, 3, 16, 2, activations)
  assert params["encoder"]["relpos_bias"]["rel_embedding"].shape == (4, 32)
  _check_against_golden(model, params, _golden(name))


@pytest.mark.parametrize("name", ["bert_tiny", "bert_tiny_mlm_flax"])
def test_hf_bert_matches_transformers(name):
  # bert_tiny_mlm_flax: the same weights as a FlaxBertForMaskedLM (`bert/` prefix,
  # an MLM head that is not read), in flax msgpack.
  model, params = hf.hf_bert_encoder(os.path.join(DATA, name))
  assert isinstance(model, BertEncoder)
  assert model.config.activation == "gelu" and model.config.layer_norm_epsilon == 1e-12
  _check_against_golden(model, params, _golden("bert_tiny"))


def test_t5_reads_only_encoder_tensors(monkeypatch):
  read = []
  real = hf._read_safetensors
  monkeypatch.setattr(hf, "_read_safetensors",
                      lambda index, names: read.extend(names) or real(index, names))
  hf.hf_t5_encoder(os.path.join(DATA, "t5_tiny"))
  _, all_names = hf.read_weights(os.path.join(DATA, "t5_tiny"), lambda n: False)
  assert any(n.startswith("decoder.") for n in all_names)
  assert read and all(n.startswith("encoder.") or n == "shared.weight" for n in read), read


def test_hf_mismatch_lists_every_difference():
  folder = os.path.join(DATA, "t5_tiny")
  cfg = hf.t5_config_from_hf(folder, num_layers=1, mlp_dim=32)
  with pytest.raises(CheckpointMismatchError) as e:
    hf.load_hf_t5(abstract_params(T5Encoder(cfg), jnp.zeros((1, 1), jnp.int32)), folder)
  assert "encoder/layers_1/attention/query/kernel" in e.value.unexpected
  assert ("encoder/layers_0/mlp/wi/kernel", (8, 16), (8, 32)) in e.value.shapes
  assert "encoder/layers_0/mlp/wo/kernel: (16, 8) vs (32, 8)" in str(e.value)
  bert = BertEncoder(hf.bert_config_from_hf(os.path.join(DATA, "bert_tiny"), num_layers=3))
  with pytest.raises(CheckpointMismatchError) as e:
    hf.load_hf_bert(abstract_params(bert, jnp.zeros((1, 1), jnp.int32)),
                    os.path.join(DATA, "bert_tiny"))
  assert "encoder/layer_2/output/LayerNorm/scale" in e.value.missing
  assert not e.value.unexpected


def test_config_errors_are_readable(tmp_path):
  with pytest.raises(FileNotFoundError, match="no config.json"):
    hf.t5_config_from_hf(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(ValueError, match="is not T5"):
    hf.t5_config_from_hf(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="no weights"):
    hf.read_weights(str(tmp_path), lambda n: True)


def test_wordpiece_matches_hf_tokenizer():
  from levi_jax.data.wordpiece import WordPieceVocabulary

  vocab = WordPieceVocabulary(os.path.join(DATA, "bert_tiny", "vocab.txt"))
  tok = META["tokenizer"]
  for sentence, ids in zip(tok["sentences"], tok["bert_tiny"]):
    assert vocab.encode(sentence) + [vocab.eos_id] == ids, sentence
  assert (vocab.pad_id, vocab.unk_id, vocab.cls_id, vocab.eos_id) == (0, 1, 2, 3)
  assert vocab.decode(tok["bert_tiny"][0] + [0, 0]) == (
      "the quick brown fox jumped over the lazy dog !")
  import tensorflow as tf
  ids = vocab.encode_tf(tf.constant(tok["sentences"][1]))
  assert ids.numpy().tolist() == tok["bert_tiny"][1][:-1]
  assert vocab.decode_tf(ids).numpy().decode() == "unbelievable , a cat running on the mat ?"


def _write_safetensors(path, tensors):
  """A minimal safetensors writer (header JSON, then raw little-endian bytes)."""
  names = {np.dtype(np.float32): "F32", np.dtype(jnp.bfloat16): "BF16"}
  header, blobs, offset = {}, [], 0
  for name, arr in tensors.items():
    data = np.ascontiguousarray(arr).tobytes()
    header[name] = {"dtype": names[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + len(data)]}
    blobs.append(data)
    offset += len(data)
  head = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def test_reads_bfloat16_and_sharded_safetensors(tmp_path):
  a = np.arange(6, dtype=np.float32).reshape(2, 3).astype(jnp.bfloat16)
  b = np.linspace(-1, 1, 4, dtype=np.float32)
  _write_safetensors(tmp_path / "model-00001-of-00002.safetensors", {"x.weight": a})
  _write_safetensors(tmp_path / "model-00002-of-00002.safetensors", {"y.bias": b})
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
      "x.weight": "model-00001-of-00002.safetensors",
      "y.bias": "model-00002-of-00002.safetensors"}}))
  arrays, names = hf.read_weights(str(tmp_path), lambda n: n != "y.bias")
  assert names == ["x.weight", "y.bias"] and list(arrays) == ["x.weight"]
  assert arrays["x.weight"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(arrays["x.weight"].astype(np.float32), a.astype(np.float32))
  np.testing.assert_array_equal(hf.read_weights(str(tmp_path), lambda n: True)[0]["y.bias"], b)


def test_bert_backbone_dtype_axes_and_levi_taps():
  import flax.linen as nn

  from levi_jax.models.levi import ViewFusionModel

  folder = os.path.join(DATA, "bert_tiny")
  golden = _golden("bert_tiny")
  model, params = hf.hf_bert_encoder(folder, dtype="bfloat16")
  out = jax.jit(model.apply)({"params": params}, jnp.asarray(golden["tokens"]))
  assert out.final.dtype == jnp.bfloat16
  real = golden["tokens"] != 0
  np.testing.assert_allclose(np.asarray(out.final, np.float32)[real], golden["final"][real],
                             atol=0.1)
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  axes = nn.get_partition_spec(boxed)
  assert tuple(axes["embeddings"]["word_embeddings"]["embedding"]) == ("vocab", "embed")
  attn = axes["encoder"]["layer_0"]["attention"]
  assert tuple(attn["self"]["query"]["kernel"]) == ("embed", "joined_kv")
  assert tuple(attn["output"]["dense"]["kernel"]) == ("joined_kv", "embed")
  assert tuple(axes["encoder"]["layer_1"]["intermediate"]["dense"]["kernel"]) == ("embed", "mlp")
  # LEVI taps the BERT backbone like the T5 one (traced, not compiled: seconds).
  levi = ViewFusionModel(backbone=BertEncoder(model.config.replace(dtype=jnp.float32)),
                         taps=("middle", -1), num_outputs=3)
  batch = {"inputs": jnp.asarray(golden["tokens"])}
  shapes = jax.eval_shape(levi.init, jax.random.key(1), batch)["params"]
  assert set(shapes) >= {"backbone", "adapter_0", "adapter_1", "head"}
  variables = {"params": {**nn.meta.unbox(shapes), "backbone": params}}
  pred = jax.eval_shape(levi.apply, variables, batch)["prediction"]
  assert pred.shape == (2, 3)
