"""Core model tests: encoder taps and masks, presets, LEVI, baselines, freezing."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from levi_jax import methods, step, trainer
from levi_jax.models import bert
from levi_jax.models import levi as levi_lib
from levi_jax.models import lora as lora_lib
from levi_jax.models import t5_encoder as t5
from levi_jax.models.levi import pool, resolve_taps
from levi_jax.models.task_net import (CategoricalFeature, FeatureTower, TokenTower,
                                      validate_features)
from levi_jax.optim import OptimizerConfig, make_optimizer

VOCAB = 64
FEATS = (CategoricalFeature("user_id", 10), CategoricalFeature("genres", 6, bag_size=3))


def tiny_cfg(**kw):
  return t5.preset("t5_1_1_tiny", vocab_size=VOCAB, **kw)


def make_batch(b=8, length=12, seed=0, pad_from=9):
  rs = np.random.RandomState(seed)
  batch = {"inputs": rs.randint(1, VOCAB, (b, length)).astype(np.int32),
           "user_id": rs.randint(0, 10, (b,)).astype(np.int32),
           "genres": rs.randint(0, 6, (b, 3)).astype(np.int32),
           "targets": (rs.randn(b) + 3.0).astype(np.float32)}
  batch["inputs"][:, pad_from:] = 0
  return batch


def build(name, **kw):
  kw.setdefault("adapter_dim", 8)
  kw.setdefault("fusion_hidden", (8,))
  return methods.make_method(name, backbone=t5.T5Encoder(tiny_cfg()),
                             task_net=FeatureTower(FEATS, hidden=(16,)), **kw)


def init_state(m, batch, lr=1e-2, stage=0):
  params = nn.meta.unbox(m.init(jax.random.PRNGKey(0), batch))
  opt = make_optimizer(OptimizerConfig(learning_rate=lr, schedule="constant"), 100)
  trainable, frozen = methods.partition(params, m.stages[stage].frozen)
  return step.create_train_state(trainable, frozen, opt), opt


def assert_six_steps_lower_the_loss(m, opt, state, batch):
  """Six jitted train steps on one batch; the loss drops by 10%. Returns the state."""
  train_step = jax.jit(step.make_train_step(m, step.LossConfig()))
  losses = []
  for _ in range(6):
    state, metrics = train_step(state, batch, jax.random.PRNGKey(1))
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.9 * losses[0], losses
  return state


def test_encoder_shapes_and_mask():
  cfg = tiny_cfg()
  enc = t5.T5Encoder(cfg)
  tokens = make_batch()["inputs"]
  params = enc.init(jax.random.PRNGKey(0), tokens)
  out = enc.apply(params, tokens)
  assert out.final.shape == (8, 12, cfg.emb_dim)
  assert len(out.layers) == cfg.num_layers
  assert all(h.shape == (8, 12, cfg.emb_dim) for h in out.layers)
  np.testing.assert_array_equal(out.mask, tokens > 0)
  assert not np.allclose(out.layers[0], out.layers[1])


def test_padding_never_changes_pooled_taps():
  enc = t5.T5Encoder(tiny_cfg())
  short = make_batch(length=9, pad_from=6)["inputs"]
  long = np.concatenate([short, np.zeros((8, 7), np.int32)], axis=1)
  params = enc.init(jax.random.PRNGKey(0), short)
  a, b = enc.apply(params, short), enc.apply(params, long)
  for ha, hb in zip(a.layers + (a.final,), b.layers + (b.final,)):
    np.testing.assert_allclose(pool(ha, a.mask, "mean"), pool(hb, b.mask, "mean"),
                               atol=1e-5)
  # ...while garbage in a padded slot would change nothing either (it is masked).
  dirty = long.copy()
  dirty[:, 10:] = 0
  np.testing.assert_array_equal(enc.apply(params, dirty).final, b.final)


def test_one_hot_embedding_matches_gather():
  tokens = make_batch()["inputs"]
  params = t5.T5Encoder(tiny_cfg()).init(jax.random.PRNGKey(0), tokens)
  a = t5.T5Encoder(tiny_cfg()).apply(params, tokens).final
  b = t5.T5Encoder(tiny_cfg(one_hot_embedding=True)).apply(params, tokens).final
  np.testing.assert_array_equal(a, b)


def expected_tree(cfg: t5.T5Config) -> dict:
  """T5X's token_embedder + encoder names and shapes for a config."""
  kv = cfg.num_heads * cfg.head_dim
  tree = {"token_embedder/embedding": ((cfg.vocab_size, cfg.emb_dim), ("vocab", "embed")),
          "encoder/relpos_bias/rel_embedding": ((cfg.num_heads, 32), ("heads", "relpos_buckets")),
          "encoder/encoder_norm/scale": ((cfg.emb_dim,), ("embed",))}
  wi = ["wi"] if len(cfg.mlp_activations) == 1 else ["wi_0", "wi_1"]
  for i in range(cfg.num_layers):
    p = f"encoder/layers_{i}/"
    tree[p + "pre_attention_layer_norm/scale"] = ((cfg.emb_dim,), ("embed",))
    tree[p + "pre_mlp_layer_norm/scale"] = ((cfg.emb_dim,), ("embed",))
    for n in ("query", "key", "value"):
      tree[p + f"attention/{n}/kernel"] = ((cfg.emb_dim, kv), ("embed", "joined_kv"))
    tree[p + "attention/out/kernel"] = ((kv, cfg.emb_dim), ("joined_kv", "embed"))
    for n in wi:
      tree[p + f"mlp/{n}/kernel"] = ((cfg.emb_dim, cfg.mlp_dim), ("embed", "mlp"))
    tree[p + "mlp/wo/kernel"] = ((cfg.mlp_dim, cfg.emb_dim), ("mlp", "embed"))
  return tree


@pytest.mark.parametrize("name", sorted(t5.PRESETS))
def test_preset_param_tree_is_t5x(name):
  cfg = t5.preset(name)
  tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)
  abstract = jax.eval_shape(lambda t: t5.T5Encoder(cfg).init(jax.random.PRNGKey(0), t),
                            tokens)["params"]
  flat = traverse_util.flatten_dict(abstract, sep="/")
  got = {k: (tuple(v.value.shape), tuple(v.names)) for k, v in flat.items()}
  assert got == expected_tree(cfg)
  assert all(v.value.dtype == jnp.float32 for v in flat.values())


def test_bfloat16_activations_keep_float32_params():
  cfg = tiny_cfg(dtype="bfloat16")
  tokens = make_batch()["inputs"]
  variables = t5.T5Encoder(cfg).init(jax.random.PRNGKey(0), tokens)
  assert {x.dtype for x in jax.tree.leaves(nn.meta.unbox(variables))} == {jnp.dtype("float32")}
  assert t5.T5Encoder(cfg).apply(variables, tokens).final.dtype == jnp.bfloat16


@pytest.mark.parametrize("name", ["levi", "levi_ft", "levi_lora"])
def test_levi_without_taps_is_an_error(name):
  with pytest.raises(ValueError, match="taps=\\(\\): LEVI without backbone taps"):
    methods.make_method(name, backbone=t5.T5Encoder(t5.preset("t5_1_1_tiny")),
                        task_net=FeatureTower(FEATS, embed_dim=4, hidden=(8,)), taps=())


def test_resolve_taps():
  assert resolve_taps(("middle", -1), 8) == (3, 7)
  assert resolve_taps((0, -8, "final", 7, -1), 8) == (0, "final", 7)
  with pytest.raises(ValueError, match=r"tap layer index 8 is out of range.*8 layers"):
    resolve_taps((8,), 8)
  with pytest.raises(ValueError, match="out of range"):
    resolve_taps((-9,), 8)
  with pytest.raises(ValueError, match="unknown tap"):
    resolve_taps(("top",), 8)


def test_out_of_range_tap_fails_at_init():
  m = build("levi", taps=(0, 5))
  with pytest.raises(ValueError, match="tap layer index 5 is out of range.*2 layers"):
    m.init(jax.random.PRNGKey(0), make_batch())


def test_unknown_method_lists_close_matches():
  with pytest.raises(ValueError, match=r"unknown method 'levy'.*did you mean levi"):
    build("levy")


def test_missing_parts_are_named():
  with pytest.raises(ValueError, match="needs a task_net"):
    methods.make_method("levi", backbone=t5.T5Encoder(tiny_cfg()))
  with pytest.raises(ValueError, match="needs a backbone"):
    methods.make_method("ft", task_net=FeatureTower(FEATS))


def test_feature_vocab_mismatch_is_named():
  batch = make_batch()
  batch["user_id"][0] = 10
  with pytest.raises(ValueError, match=r"feature 'user_id'.*\[0, 10\).*\[.*10\]"):
    validate_features(batch, FEATS)
  with pytest.raises(ValueError, match=r"feature 'genres': expected shape \[batch, 3\]"):
    validate_features(dict(make_batch(), genres=np.zeros((8, 4), np.int32)), FEATS)
  with pytest.raises(KeyError, match="no feature 'item_id'"):
    validate_features(make_batch(), FEATS + (CategoricalFeature("item_id", 5),))
  validate_features(make_batch(), FEATS)


def test_bag_mean_ignores_padding():
  tower = FeatureTower((CategoricalFeature("g", 6, bag_size=3),), hidden=(4,))
  a = {"g": np.array([[2, 3, 0]], np.int32)}
  b = {"g": np.array([[3, 2, 0]], np.int32)}
  c = {"g": np.array([[2, 3, 3]], np.int32)}
  params = tower.init(jax.random.PRNGKey(0), a)
  np.testing.assert_allclose(tower.apply(params, a), tower.apply(params, b), atol=1e-6)
  assert not np.allclose(tower.apply(params, a), tower.apply(params, c))


@pytest.mark.parametrize("num_layers", [0, 1])
def test_token_tower(num_layers):
  tower = TokenTower(VOCAB, embed_dim=8, num_layers=num_layers, out_dim=5, max_length=16)
  batch = make_batch()
  params = tower.init(jax.random.PRNGKey(0), batch)
  assert tower.apply(params, batch).shape == (8, 5)


@pytest.mark.parametrize("name", methods.METHODS)
def test_every_method_lowers_the_loss(name):
  m = build(name)
  batch = make_batch()
  state, opt = init_state(m, batch, lr=0.1)
  train_step = jax.jit(step.make_train_step(m, step.LossConfig()))
  losses = []
  for _ in range(6):
    state, metrics = train_step(state, batch, jax.random.PRNGKey(1))
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("name", ["levi", "lp", "lora", "levi_lora", "ensemble"])
def test_frozen_params_unchanged_and_stateless(name):
  m = build(name)
  batch = make_batch()
  state, opt = init_state(m, batch)
  frozen0 = jax.tree.map(np.array, state.frozen)
  train_step = jax.jit(step.make_train_step(m, step.LossConfig()))
  for _ in range(3):
    state, _ = train_step(state, batch, jax.random.PRNGKey(1))
  jax.tree.map(np.testing.assert_array_equal, frozen0, jax.tree.map(np.array, state.frozen))
  frozen_paths = traverse_util.flatten_dict(state.frozen, sep="/")
  assert frozen_paths and all("backbone" in p for p in frozen_paths)
  # Optimizer state covers exactly the trainable leaves: Adam's mu and nu.
  n_train = len(jax.tree.leaves(state.params))
  big = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
  assert len(big) == 2 * n_train
  trainable_paths = traverse_util.flatten_dict(state.params, sep="/")
  assert not any(p.startswith("backbone/") for p in trainable_paths)


def _backbone_kernel_shapes() -> set[tuple]:
  """The tiny backbone's kernel shapes, 2-D and as the projections split them
  (heads x head_dim). Weight-gradient matmuls produce the kernel's own shape; the
  forward never does (its outputs carry batch/length axes)."""
  cfg = tiny_cfg()
  kv = cfg.num_heads * cfg.head_dim
  heads = (cfg.num_heads, cfg.head_dim)
  return {(cfg.emb_dim, kv), (kv, cfg.emb_dim), (cfg.emb_dim, cfg.mlp_dim),
          (cfg.mlp_dim, cfg.emb_dim), (cfg.emb_dim, *heads), (*heads, cfg.emb_dim)}


def _dot_shapes(jaxpr) -> list[tuple]:
  shapes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      shapes.append(tuple(eqn.outvars[0].aval.shape))
    for sub in jax.core.jaxprs_in_params(eqn.params):
      shapes.extend(_dot_shapes(sub))
  return shapes


@pytest.mark.parametrize("name,expect_backbone_grads", [
    ("levi", False), ("lp", False), ("lora", False), ("levi_lora", False), ("ft", True),
    ("levi_ft", True)])
def test_backbone_backprop_is_structurally_absent(name, expect_backbone_grads):
  """The train step's program computes no backbone-kernel gradient when frozen.

  LoRA's factors sit beside the frozen kernels, so a LoRA step backpropagates
  through the backbone's activations only (rank 2: no factor or factor
  gradient has a kernel's shape).
  """
  m = build(name, lora=lora_lib.LoraConfig(rank=2))
  batch = make_batch(b=5)  # a batch size no kernel dimension shares
  state, opt = init_state(m, batch)
  train_step = step.make_train_step(m, step.LossConfig())
  jaxpr = jax.make_jaxpr(train_step)(state, batch, jax.random.PRNGKey(1)).jaxpr
  found = _backbone_kernel_shapes() & set(_dot_shapes(jaxpr))
  assert bool(found) == expect_backbone_grads, found


def test_lora_with_zero_b_equals_base_model():
  batch = make_batch()
  lp = build("ft")
  lo = build("lora", lora=lora_lib.LoraConfig(rank=2))
  params = nn.meta.unbox(lo.init(jax.random.PRNGKey(0), batch))
  base = {k: v for k, v in params.items() if k != "lora"}
  np.testing.assert_allclose(lo.apply(params, batch)["prediction"],
                             lp.apply(base, batch)["prediction"], atol=1e-6)
  flat = traverse_util.flatten_dict(params["lora"], sep="/")
  assert len(flat) == 2 * 7 * 2  # 2 layers x 7 kernels (q, k, v, o, wi_0, wi_1, wo) x (a, b)
  assert flat["encoder/layers_0/attention/query/a"].shape == (8, 2)
  # A nonzero B changes the output.
  params["lora"] = jax.tree.map(lambda x: x + 0.1, params["lora"])
  assert not np.allclose(lo.apply(params, batch)["prediction"],
                         lp.apply(base, batch)["prediction"])


def _merged_prediction(m, params, batch):
  """The prediction with the LoRA factors merged into the kernels (`lora.merge`)."""
  rest = {k: v for k, v in params.items() if k != methods.LORA}
  rest[methods.BACKBONE] = lora_lib.merge(params[methods.BACKBONE], params[methods.LORA],
                                          m.lora)
  return m.module.apply({"params": rest}, batch)["prediction"]


@pytest.mark.parametrize("backbone", ["t5", "bert"])
@pytest.mark.parametrize("name", ["lora", "levi_lora"])
def test_lora_beside_the_kernel_equals_the_merged_kernel(name, backbone):
  encoder = (t5.T5Encoder(tiny_cfg()) if backbone == "t5"
             else bert.BertEncoder(bert.preset("bert_tiny", vocab_size=VOCAB)))
  m = methods.make_method(name, backbone=encoder, task_net=FeatureTower(FEATS, hidden=(16,)),
                          adapter_dim=8, fusion_hidden=(8,), lora=lora_lib.LoraConfig(rank=2))
  batch = make_batch()
  params = nn.meta.unbox(m.init(jax.random.PRNGKey(0), batch))
  flat = traverse_util.flatten_dict(params[methods.LORA], sep="/")
  assert len(flat) == 2 * 2 * (7 if backbone == "t5" else 6)  # every attention/MLP kernel
  fresh = m.apply(params, batch)["prediction"]
  rs = np.random.RandomState(1)
  params[methods.LORA] = traverse_util.unflatten_dict(
      {k: v if k.endswith("/a") else 0.5 * rs.randn(*v.shape).astype(np.float32)
       for k, v in flat.items()}, sep="/")
  beside = np.asarray(m.apply(params, batch)["prediction"])
  merged = np.asarray(_merged_prediction(m, params, batch))
  norm = np.linalg.norm(merged)
  assert np.linalg.norm(beside - merged) <= 1e-5 * norm
  assert np.linalg.norm(beside - np.asarray(fresh)) > 1e-2 * norm  # b moved the output


class _PlainBackbone(nn.Module):
  """A backbone whose projection ignores LoRA factors (no `lora.low_rank`)."""

  config: t5.T5Config

  @nn.compact
  def __call__(self, tokens, deterministic=True):
    x = nn.Embed(VOCAB, self.config.emb_dim)(tokens)
    x = nn.Dense(self.config.emb_dim, use_bias=False, name="proj")(x)
    return t5.EncoderOutput(final=x, layers=(x,) * self.config.num_layers, mask=tokens > 0)


def test_lora_factors_the_backbone_never_reads_are_an_error():
  m = methods.make_method("lora", backbone=_PlainBackbone(tiny_cfg()),
                          lora=lora_lib.LoraConfig(targets=(r"proj/kernel$",)))
  with pytest.raises(ValueError, match=r"never reads the LoRA factors \['proj/a', 'proj/b'\]"):
    m.init(jax.random.PRNGKey(0), make_batch())


def test_ensemble_is_mean_of_members():
  m = build("ensemble")
  batch = make_batch()
  params = nn.meta.unbox(m.init(jax.random.PRNGKey(0), batch))
  out = m.apply(params, batch)
  assert len(out["members"]) == 2
  np.testing.assert_allclose(out["prediction"], (out["members"][0] + out["members"][1]) / 2,
                             atol=1e-6)


def test_two_stage_and_wise_methods():
  lpft = build("lpft", lp_fraction=0.3)
  assert [s.name for s in lpft.stages] == ["lp", "ft"]
  assert lpft.stages[0].frozen == ("backbone",) and lpft.stages[1].frozen == ()
  assert lpft.stages[0].fraction == pytest.approx(0.3)
  wise = build("wiseft", wise_alphas=(0.5,))
  assert wise.wise_alphas == (0.5,)
  p0 = {"a": jnp.zeros(3)}
  p1 = {"a": jnp.ones(3) * 2}
  np.testing.assert_allclose(methods.wise_interpolate(p0, p1, 0.25)["a"], 0.5)
  with pytest.raises(ValueError, match="alpha"):
    methods.wise_interpolate(p0, p1, 1.5)


def test_aux_heads_add_weighted_loss():
  batch = make_batch()
  m = build("levi", aux_heads=True)
  params = nn.meta.unbox(m.init(jax.random.PRNGKey(0), batch))
  out = m.apply(params, batch)
  assert len(out["aux"]) == 3  # two taps + task net
  base, _ = step.compute_loss(out, batch, step.LossConfig())
  with_aux, _ = step.compute_loss(out, batch, step.LossConfig(aux_weight=0.5))
  expected = base + 0.5 * sum(np.mean((a[:, 0] - batch["targets"]) ** 2) for a in out["aux"])
  np.testing.assert_allclose(with_aux, expected, rtol=1e-5)


def test_classification_head_and_eval_sums():
  batch = make_batch()
  batch["targets"] = np.arange(8, dtype=np.int32) % 3
  m = build("levi", num_outputs=3)
  params = nn.meta.unbox(m.init(jax.random.PRNGKey(0), batch))
  assert m.apply(params, batch)["prediction"].shape == (8, 3)
  loss, _ = step.compute_loss(m.apply(params, batch), batch,
                              step.LossConfig(task="classification"))
  assert np.isfinite(loss) and loss > 0
  sums = step.make_eval_step(m, step.LossConfig(task="classification"))(params, batch)
  assert float(sums["weight"]) == 8 and 0 <= float(sums["correct"]) <= 8


def test_eval_padding_weights_are_ignored():
  m = build("scratch")
  batch = make_batch()
  params = nn.meta.unbox(m.init(jax.random.PRNGKey(0), batch))
  eval_step = step.make_eval_step(m, step.LossConfig())
  real = step.finalize_metrics(eval_step(params, batch), "regression")
  padded = {k: np.concatenate([v, v[:3]]) for k, v in batch.items()}
  padded["targets"][8:] = 1e6
  padded["weights"] = np.array([1.0] * 8 + [0.0] * 3, np.float32)
  got = step.finalize_metrics(eval_step(params, padded), "regression")
  assert got["count"] == 8
  np.testing.assert_allclose(got["rmse"], real["rmse"], rtol=1e-6)
  pred = np.asarray(m.apply(params, batch, train=False)["prediction"][:, 0], np.float64)
  np.testing.assert_allclose([got["pred_mean"], got["pred_std"]], [pred.mean(), pred.std()],
                             rtol=1e-4, atol=1e-6)
  assert got["pred_std"] > 0


def test_cached_taps_give_the_same_trajectory():
  m = build("levi")
  batch = make_batch()
  state, opt = init_state(m, batch)
  params = methods.combine(state.params, state.frozen)
  taps = m.module.apply({"params": params}, batch, method=m.module.pooled_taps)
  assert taps.shape == (8, 2, tiny_cfg().emb_dim)
  cached = dict(batch, pooled_taps=np.asarray(taps))
  cached["inputs"] = np.zeros_like(batch["inputs"])  # proves the backbone is not read
  train_step = jax.jit(step.make_train_step(m, step.LossConfig()))
  a, b = state, state
  for _ in range(4):
    a, ma = train_step(a, batch, jax.random.PRNGKey(1))
    b, mb = train_step(b, cached, jax.random.PRNGKey(1))
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), a.params, b.params)
  bad = dict(cached, pooled_taps=np.asarray(taps)[:, :1])
  with pytest.raises(ValueError, match="holds 1 taps"):
    m.apply(params, bad)


@pytest.mark.parametrize("name", ["adafactor", "sgd"])
def test_other_optimizers_lower_the_loss(name):
  m = build("levi")
  batch = make_batch()
  params = nn.meta.unbox(m.init(jax.random.PRNGKey(0), batch))
  opt = make_optimizer(OptimizerConfig(name=name, learning_rate=0.05, schedule="constant"), 10)
  state = step.create_train_state(*methods.partition(params, m.stages[0].frozen), opt)
  assert_six_steps_lower_the_loss(m, opt, state, batch)


def test_gradient_accumulation_updates_every_k_steps():
  m = build("scratch")
  batch = make_batch()
  params = nn.meta.unbox(m.init(jax.random.PRNGKey(0), batch))
  opt = make_optimizer(OptimizerConfig(learning_rate=0.01, grad_accum_steps=2), 10)
  state = step.create_train_state(*methods.partition(params, ()), opt)
  train_step = jax.jit(step.make_train_step(m, step.LossConfig()))
  p0 = jax.tree.map(np.array, state.params)
  state, _ = train_step(state, batch, jax.random.PRNGKey(1))
  jax.tree.map(np.testing.assert_array_equal, p0, jax.tree.map(np.array, state.params))
  state, _ = train_step(state, batch, jax.random.PRNGKey(1))
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), p0,
                         jax.tree.map(np.array, state.params))
  assert all(jax.tree.leaves(changed))


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_gradient_accumulation_keeps_the_schedule_in_train_steps(schedule):
  # SGD on a constant gradient of 1: each update is -lr, so the updates read
  # the learning rate the optimizer applied. With k = 4 the 10 updates of a
  # 40-step run must follow the 40-step schedule at train steps 0, 4, ..., 36
  # (warmup over 8 train steps = 2 updates, then the whole decay), not its
  # first 10 steps.
  from levi_jax.optim import make_schedule
  k, total = 4, 40
  cfg = OptimizerConfig(name="sgd", learning_rate=1.0, warmup_steps=8, schedule=schedule,
                        clip_norm=None, grad_accum_steps=k)
  opt = make_optimizer(cfg, total)
  params = {"w": jnp.zeros(())}
  state = opt.init(params)
  applied = []
  for _ in range(total):
    updates, state = opt.update({"w": jnp.ones(())}, state, params)
    if float(updates["w"]) != 0.0:
      applied.append(-float(updates["w"]))
  expected = [float(make_schedule(cfg, total)(u * k)) for u in range(total // k)]
  assert len(applied) == total // k - 1 and expected[0] == 0.0  # lr 0 at step 0
  np.testing.assert_allclose(applied, expected[1:], rtol=1e-6)
  assert applied[-1] < 0.15 and max(applied) == pytest.approx(1.0)


def test_schedules_warm_up_and_decay():
  from levi_jax.optim import make_schedule
  for sched in ("cosine", "linear", "rsqrt", "constant"):
    lr = make_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=10, schedule=sched), 100)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    if sched != "constant":
      assert float(lr(90)) < 0.5
  with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
    OptimizerConfig(name="adam")


def test_tap_layers_spread_taps_over_the_small_model():
  assert levi_lib.tap_layers(2, 2) == [0, 1]
  assert levi_lib.tap_layers(1, 3) == [2]  # one tap joins at the last layer
  assert levi_lib.tap_layers(4, 2) == [0, 0, 1, 1]
  assert levi_lib.tap_layers(3, 3) == [0, 1, 2]


def test_layerwise_fusion_joins_taps_inside_the_small_model():
  """Each tap's adapter feeds a hidden layer of the small model; training lowers the
  loss, keeps the backbone frozen and computes no backbone weight gradient."""
  m = methods.make_method("levi", backbone=t5.T5Encoder(tiny_cfg()),
                          task_net=FeatureTower(FEATS, hidden=(10, 7)), adapter_dim=5,
                          fusion_hidden=(6,), fusion="layerwise")  # no backbone-kernel sizes
  batch = make_batch(b=5)
  params = nn.meta.unbox(m.init(jax.random.PRNGKey(0), batch))
  # Adapters end at the width of the small-model layer they join: middle -> 10, last -> 7.
  assert params["adapter_0"]["dense_1"]["kernel"].shape == (5, 10)
  assert params["adapter_1"]["dense_1"]["kernel"].shape == (5, 7)
  assert params["head"]["dense_0"]["kernel"].shape == (7, 6)  # the fused state, alone
  # Changing a tap changes the small model's hidden state, hence the prediction.
  taps = m.module.apply({"params": params}, batch, method=m.module.pooled_taps)
  base = m.module.apply({"params": params}, dict(batch, pooled_taps=np.asarray(taps)))
  shifted = np.array(taps)
  # Only the middle tap, which joins the first hidden layer (not a constant shift:
  # the adapter's LayerNorm removes those).
  shifted[:, 0] += np.random.RandomState(0).randn(*shifted[:, 0].shape)
  moved = m.module.apply({"params": params}, dict(batch, pooled_taps=shifted))
  assert not np.allclose(base["prediction"], moved["prediction"])
  state, opt = init_state(m, batch, lr=0.1)
  frozen0 = jax.tree.map(np.array, state.frozen)
  state = assert_six_steps_lower_the_loss(m, opt, state, batch)
  jax.tree.map(np.testing.assert_array_equal, frozen0, jax.tree.map(np.array, state.frozen))
  jaxpr = jax.make_jaxpr(step.make_train_step(m, step.LossConfig()))(
      state, batch, jax.random.PRNGKey(1)).jaxpr
  assert not _backbone_kernel_shapes() & set(_dot_shapes(jaxpr))


def test_layerwise_fusion_needs_a_small_model_with_layers():
  m = methods.make_method("levi", backbone=t5.T5Encoder(tiny_cfg()),
                          task_net=TokenTower(VOCAB), fusion="layerwise")
  with pytest.raises(ValueError, match="layerwise"):
    m.init(jax.random.PRNGKey(0), make_batch())
  with pytest.raises(ValueError, match="fusion"):
    trainer.ModelConfig(fusion="early")


def test_feature_dropout_drops_whole_features_in_training_only():
  rate = 0.3
  tower = FeatureTower(FEATS, hidden=(16,), feature_dropout=rate)
  batch = make_batch(b=4000)
  params = tower.init(jax.random.PRNGKey(0), batch)
  out, state = tower.apply(params, batch, deterministic=False,
                           rngs={"dropout": jax.random.PRNGKey(3)}, capture_intermediates=True)
  inter = state["intermediates"]  # each Dropout's output: the feature's kept/zeroed embedding
  for f in FEATS:
    dropped = np.asarray(inter[f"dropout_{f.name}"]["__call__"][0])
    per_example = np.abs(dropped).max(-1)
    zero = per_example == 0
    # Each example's whole embedding of the feature is zeroed or kept, never part of it.
    assert np.all((dropped == 0).all(-1) == zero)
    assert abs(zero.mean() - rate) < 0.03, (f.name, zero.mean())
  # Evaluation: no dropout, the same function as the tower without it (same params).
  want = FeatureTower(FEATS, hidden=(16,)).apply(params, batch)
  got = tower.apply(params, batch)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert not np.allclose(np.asarray(out), np.asarray(want))
  # The kept embeddings are scaled by 1 / (1 - rate): the ID embedding of an example kept.
  table = np.asarray(nn.meta.unbox(params)["params"]["embed_user_id"])
  dropped = np.asarray(inter["dropout_user_id"]["__call__"][0])
  kept = np.abs(dropped).max(-1) > 0
  np.testing.assert_allclose(dropped[kept], table[batch["user_id"][kept]] / (1 - rate),
                             rtol=1e-6)


def test_levi_with_feature_dropout_trains_with_the_backbone_frozen():
  m = methods.make_method("levi", backbone=t5.T5Encoder(tiny_cfg()),
                          task_net=FeatureTower(FEATS, hidden=(16,), feature_dropout=0.2),
                          adapter_dim=8, fusion_hidden=(8,))
  batch = make_batch()
  state, opt = init_state(m, batch, lr=0.1)
  frozen0 = jax.tree.map(np.array, state.frozen)
  state = assert_six_steps_lower_the_loss(m, opt, state, batch)
  jax.tree.map(np.testing.assert_array_equal, frozen0, jax.tree.map(np.array, state.frozen))
  # A training step draws its dropout from the step's key: two keys, two losses.
  loss = jax.jit(lambda s, k: step.make_train_step(m, step.LossConfig())(s, batch, k)[1]["loss"])
  assert float(loss(state, jax.random.PRNGKey(1))) != float(loss(state, jax.random.PRNGKey(2)))


@pytest.mark.parametrize("kw,match", [
    (dict(feature_dropout=1.0), "feature_dropout must be in"),
    (dict(feature_dropout=-0.1), "feature_dropout must be in"),
    (dict(feature_dropout=0.1, task_net="tokens"), "feature_dropout.*FeatureTower"),
])
def test_feature_dropout_settings_are_checked(kw, match):
  with pytest.raises(ValueError, match=match):
    trainer.ModelConfig(**kw)
  if "task_net" not in kw:
    with pytest.raises(ValueError, match=match):
      FeatureTower(FEATS, feature_dropout=kw["feature_dropout"]).init(
          jax.random.PRNGKey(0), make_batch())
