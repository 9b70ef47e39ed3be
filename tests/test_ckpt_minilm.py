"""The real all-MiniLM-L6-v2, loaded offline through `gin/models/minilm_l6.gin`.

Golden outputs (`minilm_l6_golden.npz`) and token ids come from `transformers`'
`BertModel` and `BertTokenizer` on the same packaged folder.
"""

import json
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from levi_jax.checkpoints import backbones
from levi_jax.models.bert import BertEncoder

ROOT = os.path.dirname(os.path.dirname(__file__))
DATA = os.path.join(os.path.dirname(__file__), "data", "ckpt", "hf")


@pytest.fixture(scope="module")
def minilm():
  gin.clear_config()
  gin.parse_config_file(os.path.join(ROOT, "gin", "models", "minilm_l6.gin"))
  try:
    assert gin.query_parameter("backbones.PretrainedConfig.format") == "minilm_l6"
    backbone = backbones.load_pretrained(gin.get_configurable(backbones.PretrainedConfig)())
  finally:
    gin.clear_config()
  vocab = backbone.vocabulary()
  apply = jax.jit(lambda p, t: backbone.module.apply({"params": p}, t))
  return backbone, vocab, apply


def _embed(minilm, sentences):
  """Mean-pooled, L2-normalised sentence embeddings (sentence-transformers')."""
  _, vocab, apply = minilm
  ids = [vocab.encode(s) + [vocab.eos_id] for s in sentences]
  tokens = np.zeros((len(ids), 32), np.int32)
  for i, x in enumerate(ids):
    tokens[i, :len(x)] = x
  out = apply(minilm[0].params, jnp.asarray(tokens))
  mask = np.asarray(out.mask)[..., None]
  pooled = (np.asarray(out.final) * mask).sum(1) / mask.sum(1)
  return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def test_minilm_is_the_packaged_bert(minilm):
  backbone, vocab, _ = minilm
  assert isinstance(backbone.module, BertEncoder)
  cfg = backbone.module.config
  assert (cfg.vocab_size, cfg.emb_dim, cfg.num_layers, cfg.num_heads) == (30522, 384, 6, 12)
  assert backbone.source == backbones.minilm_l6_folder()
  with open(os.path.join(DATA, "goldens.json")) as f:
    tok = json.load(f)["tokenizer"]
  for sentence, ids in zip(tok["sentences"], tok["minilm_l6"]):
    assert vocab.encode(sentence) + [vocab.eos_id] == ids, sentence


def test_minilm_matches_transformers(minilm):
  with np.load(os.path.join(DATA, "minilm_l6_golden.npz")) as z:
    golden = {k: z[k] for k in z.files}
  backbone, _, apply = minilm
  out = apply(backbone.params, jnp.asarray(golden["tokens"]))
  real = golden["tokens"] != 0
  for key, i in (("layer_0", 0), ("layer_2", 2), ("final", 5)):
    np.testing.assert_allclose(np.asarray(out.layers[i])[real], golden[key][real],
                               atol=1e-4, rtol=0, err_msg=key)
  with open(os.path.join(DATA, "goldens.json")) as f:
    sentences = json.load(f)["tokenizer"]["minilm_sentences"]
  np.testing.assert_allclose(_embed(minilm, sentences), golden["sentence_embedding"],
                             atol=1e-4, rtol=0)


PAIRS = [
    ("A man is playing a guitar.", "Someone is strumming a guitar."),
    ("The cat is sleeping on the sofa.", "A kitten naps on the couch."),
    ("Stock markets fell sharply today.", "Share prices dropped steeply this afternoon."),
    ("How do I bake bread at home?", "What is a good recipe for homemade bread?"),
    ("The train to Paris was delayed by an hour.", "Our Paris train left sixty minutes late."),
]


def test_minilm_ranks_paraphrases_above_unrelated_pairs(minilm):
  a = _embed(minilm, [p[0] for p in PAIRS])
  b = _embed(minilm, [p[1] for p in PAIRS])
  sim = a @ b.T
  paraphrase = np.diag(sim)
  unrelated = sim[~np.eye(len(PAIRS), dtype=bool)]
  assert paraphrase.min() > unrelated.max(), sim
  assert (sim.argmax(1) == np.arange(len(PAIRS))).all()
