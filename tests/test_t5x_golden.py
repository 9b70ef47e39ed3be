"""`T5Encoder` against golden outputs recorded from T5X's T5 encoder.

`tests/data/t5x_encoder_golden.json` says which T5X commit, configs and
parameter recipe produced `tests/data/t5x_encoder_golden.npz`. Here the
parameters are rebuilt from that recipe, our encoder is run on the stored
tokens, and every layer output and the final output must match T5X's at every
position (padding included) to 1e-5 in float32. The parameter tree must have
exactly T5X's `token_embedder`/`encoder` paths and shapes, and `PRESETS` must
carry the numbers of T5X's gin files.
"""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from levi_jax.models.t5_encoder import PRESETS, T5Encoder, preset

DATA = os.path.join(os.path.dirname(__file__), "data")
ATOL = 1e-5

with open(os.path.join(DATA, "t5x_encoder_golden.json")) as _f:
  META = json.load(_f)
CASES = sorted(META["cases"])


@pytest.fixture(scope="module")
def golden():
  with np.load(os.path.join(DATA, "t5x_encoder_golden.npz")) as z:
    return {k: z[k] for k in z.files}


def _flat(tree):
  return {"/".join(k.key for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflatten(flat):
  tree = {}
  for path, v in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for k in parents:
      node = node.setdefault(k, {})
    node[leaf] = v
  return tree


def _recipe_params(shapes, seed, head_dim):
  """The recipe in the json's `param_recipe`."""
  rs = np.random.RandomState(seed)
  out = {}
  for path in sorted(shapes):
    shape = tuple(shapes[path])
    z = rs.normal(size=shape).astype(np.float32)
    if path.endswith("/scale"):
      v = np.float32(1.0) + np.float32(0.1) * z
    elif path.endswith("/kernel"):
      s = 1.0 / np.sqrt(shape[0])
      if path.endswith("attention/query/kernel"):
        s /= np.sqrt(head_dim)
      v = z * np.float32(s)
    else:  # token_embedder/embedding, encoder/relpos_bias/rel_embedding
      v = z
    out[path] = v.astype(np.float32)
  return out


def _config(case):
  c = META["cases"][case]
  return preset(c["levi_preset"], **c["levi_overrides"])


def _abstract_params(cfg, tokens):
  variables = jax.eval_shape(
      lambda: T5Encoder(cfg).init(jax.random.PRNGKey(0), tokens))
  return _flat(nn.meta.unbox(variables["params"]))


def test_metadata_describes_npz(golden):
  assert len(META["t5x_commit"]) == 40
  for case in CASES:
    c = META["cases"][case]
    tok = golden[f"{case}/tokens"]
    assert tok.dtype == np.int32 and tok.ndim == 2
    # Rows with no, some and mostly padding; longer than T5's 8 exact buckets.
    assert (tok[0] > 0).all() and (tok == 0).any() and tok.shape[1] > 16
    n = c["t5x_T5Config"]["num_encoder_layers"]
    layer_keys = sorted(k for k in golden if k.startswith(f"{case}/layers_"))
    assert len(layer_keys) == n
    assert golden[f"{case}/final"].dtype == np.float32


@pytest.mark.parametrize("case", CASES)
def test_param_tree_matches_t5x(case, golden):
  cfg = _config(case)
  c = META["cases"][case]
  t5x_cfg = c["t5x_T5Config"]
  assert (cfg.vocab_size, cfg.emb_dim, cfg.num_heads, cfg.num_layers, cfg.head_dim,
          cfg.mlp_dim, list(cfg.mlp_activations)) == (
              t5x_cfg["vocab_size"], t5x_cfg["emb_dim"], t5x_cfg["num_heads"],
              t5x_cfg["num_encoder_layers"], t5x_cfg["head_dim"], t5x_cfg["mlp_dim"],
              t5x_cfg["mlp_activations"])
  ours = _abstract_params(cfg, golden[f"{case}/tokens"])
  assert {p: list(a.shape) for p, a in ours.items()} == c["param_shapes"]
  assert {str(a.dtype) for a in ours.values()} == {"float32"}


@pytest.mark.parametrize("case", CASES)
def test_outputs_match_t5x(case, golden):
  c = META["cases"][case]
  cfg = _config(case)
  assert cfg.dtype == np.float32
  params = _recipe_params(c["param_shapes"], c["seed"], c["t5x_T5Config"]["head_dim"])
  if case in META["params_stored"]:
    for path, v in params.items():
      np.testing.assert_array_equal(v, golden[f"{case}/params/{path}"], err_msg=path)
  tokens = golden[f"{case}/tokens"]
  # Op by op, as the golden outputs were made: under jax.jit, XLA's fusion may
  # reorder float32 sums differently for the two programs (~1 ulp per layer).
  out = T5Encoder(cfg).apply({"params": _unflatten(params)}, tokens)

  np.testing.assert_array_equal(np.asarray(out.mask), tokens > 0)
  assert len(out.layers) == cfg.num_layers
  got = {"final": out.final, **{f"layers_{i}": y for i, y in enumerate(out.layers)}}
  diffs = {}
  for name, y in got.items():
    want = golden[f"{case}/{name}"]
    y = np.asarray(y)
    assert y.dtype == np.float32 and y.shape == want.shape, name
    diffs[name] = float(np.max(np.abs(y - want)))
  print(f"{case}: max |ours - T5X| per output: {diffs}")
  assert max(diffs.values()) <= ATOL, f"max |ours - T5X| per output: {diffs}"


def test_t5x_fixed_constants():
  fixed = META["t5x_fixed_constants"]
  for name, cfg in PRESETS.items():
    assert cfg.num_relpos_buckets == fixed["num_relpos_buckets"], name
    assert cfg.relpos_max_distance == fixed["relpos_max_distance"], name
    assert cfg.layer_norm_epsilon == pytest.approx(fixed["layer_norm_epsilon"]), name


@pytest.mark.parametrize("name", sorted(META["gin_presets"]))
def test_presets_match_t5x_gin(name):
  gin = META["gin_presets"][name]
  cfg = PRESETS[name]
  assert gin["num_encoder_layers"] == gin["num_decoder_layers"]
  assert (cfg.vocab_size, cfg.emb_dim, cfg.num_heads, cfg.num_layers, cfg.head_dim,
          cfg.mlp_dim, list(cfg.mlp_activations)) == (
              gin["vocab_size"], gin["emb_dim"], gin["num_heads"],
              gin["num_encoder_layers"], gin["head_dim"], gin["mlp_dim"],
              gin["mlp_activations"]), gin["gin_file"]


def test_every_t5_preset_is_checked_against_gin():
  expected = {f"t5_1_1_{s}" for s in ("tiny", "small", "base", "large", "xl", "xxl")}
  expected |= {"t5_1_0_small", "t5_1_0_base"}
  assert expected <= set(META["gin_presets"])
  assert expected <= set(PRESETS)
