"""LEVI under T5X's own trainer and evaluator (`python -m t5x.train` / `t5x.eval`).

Runs where t5x imports (`.ci/run` puts `../shared/third_party` on PYTHONPATH);
elsewhere the module is skipped with one reason. The subprocess runs use the
gin files shipped in `gin/t5x/` exactly as README's "Run under T5X" shows, on
4 fake CPU devices: T5X's CPU mesh is (processes x local devices), so its
`PjitPartitioner` shards our params 4-way model-parallel by their logical names
(on CPU it ignores `num_partitions`; 8 would not divide the demo backbone's 4
heads).
"""

import glob
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("t5x", reason="t5x is not importable (put ../shared/third_party/{t5x,airio,"
                    "jestimator} on PYTHONPATH, as .ci/run does)")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import traverse_util  # noqa: E402

from levi_jax import methods, optim, step as step_lib, trainer  # noqa: E402
from levi_jax.checkpoints import t5x as t5x_ckpt  # noqa: E402
from levi_jax import input_pipeline  # noqa: E402
from levi_jax.t5x import GIN_DIR, backbone as levi_backbone  # noqa: E402
from levi_jax.t5x import models as levi_t5x  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CKPT = os.path.join(ROOT, "experiments", "checkpoints", "synthetic_t5_small")
TASK = "movielens_100k.gender_m_to_f"
STEPS = 6


def _run(module, args, env_extra=None, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", **(env_extra or {}))
  proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                        env=env, timeout=timeout)
  assert proc.returncode == 0, f"{module} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
  return proc


def _tb_scalars(folder, tag):
  """(step, value) of a scalar tag in the TensorBoard events under `folder`."""
  import tensorflow as tf
  out = []
  for f in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(f):
      for v in event.summary.value:
        if v.tag == tag:
          value = float(tf.make_ndarray(v.tensor)) if v.HasField("tensor") else v.simple_value
          out.append((event.step, value))
  return sorted(out)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """The demo backbone as a T5X checkpoint carrying its vocabulary."""
  out = tmp_path_factory.mktemp("t5x_backbone")
  return levi_backbone.export(DEMO_CKPT, str(out))


@pytest.fixture(scope="module")
def t5x_run(exported, tmp_path_factory):
  """`python -m t5x.train` with gin/t5x/levi_demo.gin, STEPS steps, 4-way model parallel."""
  model_dir = str(tmp_path_factory.mktemp("t5x_levi") / "run")
  _run("t5x.train", [
      f"--gin_search_paths={GIN_DIR}", "--gin_file=t5x/levi_demo.gin",
      f"--gin.INITIAL_CHECKPOINT_PATH='{exported}'", f"--gin.MODEL_DIR='{model_dir}'",
      f"--gin.TRAIN_STEPS={STEPS}", "--gin.EVAL_PERIOD=2", "--gin.EVAL_STEPS=2",
      f"--gin.utils.SaveCheckpointConfig.period={STEPS}",
      "--gin.optim.OptimizerConfig.warmup_steps=0"],
      {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  return model_dir


@pytest.mark.slow
def test_t5x_train_fine_tunes_levi_with_our_gin_files(t5x_run, exported):
  ckpt = os.path.join(t5x_run, f"checkpoint_{STEPS}")
  assert os.path.isdir(ckpt), os.listdir(t5x_run)
  # Loss falls (T5X's train summaries, one per EVAL_PERIOD of 2 steps).
  losses = _tb_scalars(os.path.join(t5x_run, "train"), "loss")
  assert len(losses) == STEPS // 2 and losses[-1][1] < losses[0][1], losses
  # The frozen backbone is bit-identical to the initial checkpoint after training.
  start, _ = t5x_ckpt.read_t5x(exported, prefixes=("target/",))
  after, names = t5x_ckpt.read_t5x(ckpt, prefixes=("target/backbone/",))
  assert len(after) == len(start) == 39
  for name, value in start.items():
    np.testing.assert_array_equal(after[name.replace("target/", "target/backbone/", 1)], value)
  # ...and has no optimizer state; the trained parameters do.
  states = [n for n in names if n.startswith("state/param_states/")]
  assert states and not [n for n in states if "/backbone/" in n], states[:5]
  assert any("/adapter_1/" in n for n in states)
  # PjitPartitioner shards our params by their logical names (4-way model parallel).
  info = open(os.path.join(t5x_run, "model-info.txt")).read()
  row = next(l for l in info.splitlines()
             if l.startswith("Variable backbone/encoder/layers_0/mlp/wi_0/kernel "))
  assert "(embed=128, mlp=256)" in row and "(None, 'model')" in row
  # T5X's inference evaluation scored predicted ratings with the Task's metrics.
  with open(glob.glob(os.path.join(t5x_run, "inference_eval", "*-metrics.jsonl"))[0]) as f:
    rows = [json.loads(l) for l in f]
  assert [r["step"] for r in rows] == [2, 4, 6] and 0.3 < rows[-1]["rmse"] < 2.0


def _our_rmse(model, params, split, inputs_length=48):
  """RMSE of `params` on `split` through levi_jax's own eval step (as levi_jax.eval)."""
  arrays = input_pipeline.load_split_arrays(TASK, split, inputs_length=inputs_length,
                                            vocab_path=model.vocabulary_path)
  eval_step = jax.jit(step_lib.make_eval_step(model.method, step_lib.LossConfig()))
  sums = {}
  n = len(arrays["targets"])
  for i in range(0, n, 512):
    batch = {k: jnp.asarray(v[i:i + 512]) for k, v in arrays.items()}
    for k, v in eval_step(params, batch).items():
      sums[k] = sums.get(k, 0.0) + float(v)
  return step_lib.finalize_metrics(sums, "regression")


@pytest.mark.slow
def test_t5x_eval_gives_the_rmse_of_our_eval(t5x_run, exported, tmp_path):
  ckpt = os.path.join(t5x_run, f"checkpoint_{STEPS}")
  out = str(tmp_path / "eval")
  _run("t5x.eval", [f"--gin_search_paths={GIN_DIR}", "--gin_file=t5x/levi_demo_eval.gin",
                    f"--gin.CHECKPOINT_PATH='{ckpt}'", f"--gin.INITIAL_CHECKPOINT_PATH='{exported}'",
                    f"--gin.EVAL_OUTPUT_DIR='{out}'", "--gin.SPLIT='ood_test'"])
  with open(glob.glob(os.path.join(out, "inference_eval", "*-metrics.jsonl"))[0]) as f:
    t5x_metrics = json.loads(f.readlines()[-1])
  # The same checkpoint through our eval step.
  model = _demo_model(exported)
  flat, _ = t5x_ckpt.read_t5x(ckpt, prefixes=("target/",))
  params = traverse_util.unflatten_dict({k[len("target/"):]: v for k, v in flat.items()},
                                        sep="/")
  ours = _our_rmse(model, params, "ood_test")
  assert ours["count"] == len(input_pipeline.prepare(TASK).rows("ood_test"))
  assert abs(t5x_metrics["rmse"] - ours["rmse"]) <= 1e-5 * ours["rmse"], (t5x_metrics, ours)
  assert abs(t5x_metrics["mae"] - ours["mae"]) <= 1e-5 * ours["mae"], (t5x_metrics, ours)


def _demo_model(initial_checkpoint, method="levi", lr=2e-3, total_steps=STEPS):
  import gin
  gin.clear_config()
  gin.parse_config_file(os.path.join(GIN_DIR, "models", "synthetic_t5_small.gin"))
  cfg = gin.get_configurable(trainer.ModelConfig)(method=method)
  gin.clear_config()
  return levi_t5x.LeviT5XModel(
      TASK, cfg, optim.OptimizerConfig(learning_rate=lr, schedule="constant", clip_norm=1.0),
      total_steps=total_steps, initial_checkpoint_path=initial_checkpoint)


def _batches(model, n, size=32):
  arrays = input_pipeline.load_split_arrays(TASK, "train", inputs_length=48,
                                            vocab_path=model.vocabulary_path)
  order = np.random.default_rng(0).permutation(len(arrays["targets"]))
  return [{k: jnp.asarray(v[order[i * size:(i + 1) * size]]) for k, v in arrays.items()}
          for i in range(n)]


@pytest.mark.parametrize("method", ["levi", "lora"])
def test_one_model_two_trainers(exported, method):
  """T5X's train step and levi_jax's give the same losses and params over 4 steps."""
  from t5x import train_state as t5x_train_state
  from t5x import trainer as t5x_trainer
  model = _demo_model(exported, method)
  batches = _batches(model, 4)
  shapes = {k: v.shape for k, v in batches[0].items()}
  types = {k: v.dtype for k, v in batches[0].items()}
  variables = model.get_initial_variables(jax.random.PRNGKey(0), shapes, types)
  # T5X: its train state over the OptaxWrapper and its train step.
  state = t5x_train_state.FlaxOptimTrainState.create(model.optimizer_def, variables)
  t5x_step = jax.jit(lambda s, b: t5x_trainer.train_with_lr(
      s, b, learning_rate=jnp.float32(0.0), dropout_rng=jax.random.PRNGKey(1), model=model,
      num_microbatches=None))
  # levi_jax: the same params split into trainable/frozen, our optimizer and step.
  params = jax.tree.map(jnp.asarray, dict(variables["params"]))
  trainable, frozen = methods.partition(params, model.frozen)
  opt = optim.make_optimizer(optim.OptimizerConfig(learning_rate=2e-3, schedule="constant",
                                                   clip_norm=1.0), STEPS)
  ours = step_lib.create_train_state(trainable, frozen, opt)
  our_step = jax.jit(step_lib.make_train_step(model.method, step_lib.LossConfig()))
  for batch in batches:
    state, t5x_metrics = t5x_step(state, batch)
    ours, our_metrics = our_step(ours, batch, jax.random.PRNGKey(1))
    t5x_loss = float(t5x_metrics["loss"].compute())
    np.testing.assert_allclose(t5x_loss, float(our_metrics["loss"]), rtol=1e-5)
  ours_flat = jax.tree_util.tree_leaves_with_path(ours.all_params())
  theirs = dict(jax.tree_util.tree_leaves_with_path(jax.tree.map(np.asarray, dict(state.params))))
  assert len(theirs) == len(ours_flat)
  for path, ours_leaf in ours_flat:
    ref = theirs[path]
    scale = max(float(np.abs(ref).max()), 1e-6)
    assert np.abs(np.asarray(ours_leaf) - ref).max() <= 1e-5 * scale, path
  # The frozen backbone: unchanged, no T5X optimizer state.
  backbone = dict(jax.tree_util.tree_leaves_with_path(dict(variables["params"])["backbone"]))
  for path, leaf in jax.tree_util.tree_leaves_with_path(dict(state.params)["backbone"]):
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(backbone[path]))
  state_names = ["/".join(str(getattr(k, "key", k)) for k in p)
                 for p, _ in jax.tree_util.tree_leaves_with_path(state.state_dict()["state"])]
  assert not [n for n in state_names if "backbone" in n]


@pytest.mark.parametrize("method", ["levi", "lora", "ft"])
def test_frozen_backbone_gets_no_weight_gradient_under_t5x(exported, method):
  """T5X's train step has no dot_general producing a frozen backbone kernel's gradient
  (FT, whose backbone trains, shows that the check sees them)."""
  from t5x import train_state as t5x_train_state
  from t5x import trainer as t5x_trainer
  model = _demo_model(exported, method)
  batch = _batches(model, 1)[0]
  variables = model.get_initial_variables(
      jax.random.PRNGKey(0), {k: v.shape for k, v in batch.items()},
      {k: v.dtype for k, v in batch.items()})
  state = t5x_train_state.FlaxOptimTrainState.create(model.optimizer_def, variables)
  jaxpr = jax.make_jaxpr(lambda s, b: t5x_trainer.train_with_lr(
      s, b, jnp.float32(0.0), jax.random.PRNGKey(1), model, None))(state, batch).jaxpr
  # Weight-gradient matmuls produce a kernel's shape, 2-D or split per head (the
  # demo backbone: 4 heads of 32); the forward's outputs carry batch/length axes.
  kernels = {tuple(np.shape(v)) for p, v in jax.tree_util.tree_leaves_with_path(
      dict(variables["params"])["backbone"]) if "kernel" in str(p[-1])}
  kernels |= {(128, 4, 32), (4, 32, 128)}
  produced = set()

  def walk(jx):
    for eqn in jx.eqns:
      if eqn.primitive.name == "dot_general":
        produced.add(tuple(eqn.outvars[0].aval.shape))
      for sub in jax.core.jaxprs_in_params(eqn.params):
        walk(sub)
  walk(jaxpr)
  if method == "ft":
    assert produced & kernels
  else:
    assert not produced & kernels, f"backbone weight gradients: {produced & kernels}"


def test_two_stage_methods_and_bad_prefixes_are_refused(exported):
  with pytest.raises(ValueError, match="two stages"):
    _demo_model(exported, "lpft")
  with pytest.raises(ValueError, match="prefix"):
    levi_backbone.backbone_assignment_map("backbone/(.*)")
  with pytest.raises(FileExistsError):
    levi_backbone.export(DEMO_CKPT, os.path.dirname(exported))


TOY_TASKS = textwrap.dedent('''
    import os
    import seqio
    import tensorflow as tf
    VOCAB = seqio.SentencePieceVocabulary(os.environ["TOY_SPM"])
    TEXTS = ["a quiet film about the sea", "the best comedy of the year",
             "a slow drama with a good cast", "an old western", "a loud action movie"] * 8
    def _source(split, shuffle_files, seed=None):
      return tf.data.Dataset.from_tensor_slices({"inputs": TEXTS, "targets": TEXTS[::-1]})
    seqio.TaskRegistry.add(
        "levi_toy_copy", source=seqio.FunctionDataSource(_source, splits=["train", "validation"]),
        output_features={"inputs": seqio.Feature(VOCAB), "targets": seqio.Feature(VOCAB)},
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim])
''')


@pytest.mark.slow
def test_t5x_written_encoder_decoder_restores_into_levi(tmp_path):
  """T5X's own trainer writes a tiny T5 1.1 (2 steps); the assignment map restores its
  encoder into LEVI's backbone: encoder arrays equal, decoder absent, LEVI's own fresh."""
  (tmp_path / "toy_tasks.py").write_text(TOY_TASKS)
  spm = input_pipeline.vocabulary_path(TASK)
  model_dir = str(tmp_path / "t5x_tiny")
  _run("t5x.train", [
      "--gin_file=t5x/examples/t5/t5_1_1/tiny.gin", "--gin_file=t5x/configs/runs/pretrain.gin",
      f"--gin.MODEL_DIR='{model_dir}'", "--gin.MIXTURE_OR_TASK_NAME='levi_toy_copy'",
      "--gin.MIXTURE_OR_TASK_MODULE='toy_tasks'", "--gin.USE_CACHED_TASKS=False",
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 16}", "--gin.TRAIN_STEPS=2",
      "--gin.BATCH_SIZE=8", "--gin.DROPOUT_RATE=0.0", "--gin.network.T5Config.dtype='float32'",
      f"--gin.seqio.SentencePieceVocabulary.sentencepiece_model_file='{spm}'",
      "--gin.utils.SaveCheckpointConfig.period=2", "--gin.train.use_orbax=False"],
      {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
       "TOY_SPM": spm})
  ckpt = os.path.join(model_dir, "checkpoint_2")
  enc_dec, names = t5x_ckpt.read_t5x(ckpt, prefixes=("target/",))
  assert any(n.startswith("target/decoder/") for n in names)

  # LEVI restores it through T5X's own restore (as t5x.train does with
  # t5x/finetune.gin): its RestoreCheckpointConfig with our assignment map and
  # fallback_to_scratch, into a train state T5X's initializer builds for LEVI.
  from t5x import partitioning, utils
  cfg = trainer.ModelConfig(method="levi", backbone="t5_1_1_tiny", adapter_dim=8,
                            fusion_hidden=(16,), task_hidden=(16,), feature_embed_dim=4)
  model = levi_t5x.LeviT5XModel(TASK, cfg, vocabulary_path=spm)
  batch = _batches(model, 1, size=8)[0]
  init = utils.TrainStateInitializer(
      optimizer_def=model.optimizer_def, init_fn=model.get_initial_variables,
      input_shapes={k: v.shape for k, v in batch.items()},
      input_types={k: v.dtype for k, v in batch.items()},
      partitioner=partitioning.PjitPartitioner(num_partitions=1))
  restore = utils.RestoreCheckpointConfig(
      path=ckpt, mode="specific", dtype="float32", fallback_to_scratch=True,
      assignment_map=levi_backbone.backbone_assignment_map())
  state = init.from_checkpoint([restore], init_rng=jax.random.PRNGKey(0))
  fresh = init.from_scratch(jax.random.PRNGKey(0))
  flat = lambda tree: {"/".join(str(k.key) for k in p): np.asarray(v)
                       for p, v in jax.tree_util.tree_leaves_with_path(dict(tree))}
  levi, ref = flat(state.params), flat(fresh.params)
  encoder = {k: v for k, v in enc_dec.items()
             if k.startswith(("target/encoder/", "target/token_embedder/"))}
  assert len(encoder) == len([n for n in levi if n.startswith("backbone/")]) == 21
  for name, value in encoder.items():
    np.testing.assert_array_equal(levi["backbone/" + name[len("target/"):]], value)
  assert not [n for n in levi if "decoder" in n]
  np.testing.assert_array_equal(levi["adapter_1/dense_0/kernel"], ref["adapter_1/dense_0/kernel"])
  assert int(state.step) == 2


def test_t5x_reads_our_tasks_as_our_trainer_does(exported):
  """T5X's get_dataset (seqio, tf.data, one host's shard) gives our arrays' examples."""
  from t5x import utils
  model = _demo_model(exported)
  cfg = utils.DatasetConfig(mixture_or_task_name=TASK, task_feature_lengths={"inputs": 48},
                            split="validation", batch_size=16, shuffle=False, seed=0,
                            use_cached=False, pack=False, module="levi_jax.data.tasks")
  ds = utils.get_dataset(cfg, shard_id=1, num_shards=2,
                         feature_converter_cls=model.FEATURE_CONVERTER_CLS, num_epochs=1)
  got = {}
  for batch in ds.as_numpy_iterator():
    for k, v in batch.items():
      got.setdefault(k, []).append(v)
  got = {k: np.concatenate(v) for k, v in got.items()}
  mine = input_pipeline.load_split_arrays(TASK, "validation", inputs_length=48,
                                          vocab_path=model.vocabulary_path, shard=(1, 2))
  n = len(got["targets"])  # T5X drops the last partial batch
  assert set(got) == set(mine) and n == len(mine["targets"]) // 16 * 16 > 0
  for k in mine:
    np.testing.assert_array_equal(got[k], mine[k][:n], err_msg=k)


PAPER_FILES_CHECK = textwrap.dedent('''
    import sys
    import gin
    import t5x.train as t5x_train
    sys.modules["__main__"] = t5x_train  # T5X's run files configure `__main__.train`
    from t5x import gin_utils
    from levi_jax import input_pipeline
    gin_dir, t5x_root, spm = sys.argv[1:4]
    for size, emb in (("small", 512), ("base", 768), ("large", 1024)):
      gin.clear_config()
      gin_utils.parse_gin_flags([gin_dir, t5x_root], [f"t5x/levi_t5_1_1_{size}.gin"], [
          "MODEL_DIR = '/tmp/unused'", "MIXTURE_OR_TASK_NAME = 'movielens_1m.gender_m_to_f'",
          "INITIAL_CHECKPOINT_PATH = 'gs://unreachable/checkpoint_1000000'",
          "TRAIN_STEPS = 1_010_000", f"VOCABULARY_PATH = '{spm}'"], finalize_config=False)
      model = gin.query_parameter("%MODEL").scoped_configurable_fn()
      cfg = model.method.module.backbone.config
      lengths = gin.query_parameter("%TASK_FEATURE_LENGTHS")
      print(size, type(model).__name__, model.method.name, cfg.emb_dim, cfg.vocab_size,
            cfg.dtype, gin.query_parameter("%BATCH_SIZE"), lengths["inputs"],
            gin.query_parameter("%USE_CACHED_TASKS"), model.frozen)
''')


def test_paper_run_files_build_their_models():
  """The TPU-pod run files parse as T5X parses them and build LEVI on T5 1.1 small/base/large
  (with a local vocabulary standing in for T5's on Cloud Storage)."""
  import t5x
  t5x_root = os.path.dirname(os.path.dirname(os.path.abspath(t5x.__file__)))
  spm = input_pipeline.vocabulary_path("movielens_1m.gender_m_to_f")
  proc = subprocess.run([sys.executable, "-c", PAPER_FILES_CHECK, GIN_DIR, t5x_root, spm],
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3"))
  assert proc.returncode == 0, proc.stderr[-4000:]
  rows = [l.split() for l in proc.stdout.splitlines() if l.split()[:1] in (["small"], ["base"],
                                                                         ["large"])]
  assert rows == [[size, "LeviT5XModel", "levi", emb, "32128", "bfloat16", "512", "128", "False",
                   "('backbone',)"] for size, emb in (("small", "512"), ("base", "768"),
                                                      ("large", "1024"))]
