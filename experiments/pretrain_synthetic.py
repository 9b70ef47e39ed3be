"""Pre-trains the demo's small T5 encoder on the synthetic world's pre-training corpus.

    python -m experiments.pretrain_synthetic --out experiments/checkpoints/synthetic_t5_small

The demo has no network, so it cannot download T5 weights. This gives it a
backbone that is honestly pre-trained and, as the paper's setting requires,
carries a pre-training bias: the T5 1.1 architecture with the demo's sizes
(`demo_backbone`, read from `gin/models/synthetic_t5_small.gin`, the one
place they are set; the fine-tuning world's SentencePiece vocabulary,
which the corpus shares) is trained end to end (`ft`: backbone, mean-pooled
final output, linear head) to predict the ratings of `pretrain_corpus.all`,
where a prestige word in a film's title goes with a higher rating
(`levi_jax.data.synthetic`, spurious feature (b)). In the fine-tuning world
the prestige word says nothing about the rating.

Writes into --out an orbax tree `{backbone, head}` (`checkpointing.save_tree`;
`INITIAL_CHECKPOINT_PATH` reads its backbone) with the SentencePiece model it
was trained with (`pretrained.attach_vocabulary`: fine-tuning tokenizes with
it, never with a regenerated one) and, next to it, `<out>.json`: the command,
the configs, the vocabulary's sha256, the hashes of the first batches (per
array), the logged losses, the final metrics, the backbone's content hash and
the measured prestige effect (`prestige_effect`). Runs are deterministic: the
batches are a function of (seed, step) and the init of the seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from typing import Any

import jax
import numpy as np

from levi_jax import cli
from clu import parameter_overview

from levi_jax import checkpointing, gin_utils, input_pipeline, pretrained, train_setup, trainer
from levi_jax.checkpointing import CheckpointConfig
from levi_jax.optim import OptimizerConfig
from levi_jax.data import synthetic

DEMO_MODEL_GIN = "models/synthetic_t5_small.gin"
TASK = "pretrain_corpus.all"
PROBE_TASK = "movielens_100k.gender_m_to_f"
SEQ_LENGTH = 48
PRESTIGE = re.compile(r"movie: (?:The )?(%s) " % "|".join(synthetic.PRESTIGE_WORDS))
PLAIN_WORD = "Silent"  # a non-prestige title adjective of the world


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """What `pretrain` trains.

  Attributes:
    steps, batch_size, learning_rate, warmup_steps: the optimisation (AdamW,
      warmup then cosine decay); the first `warmup_steps` steps do not depend
      on `steps`, so a short rerun retraces the start of a long one.
    seed: init and batch-order seed.
    data_dir: the synthetic world ("" = the embedded default).
    log_every: how often losses are logged (and recorded in the manifest).
  """

  steps: int = 2000
  batch_size: int = 64
  learning_rate: float = 1e-3
  warmup_steps: int = 100
  seed: int = 0
  data_dir: str = ""
  log_every: int = 5


def demo_backbone() -> tuple[str, dict[str, int]]:
  """The demo's backbone preset and sizes, as `DEMO_MODEL_GIN` binds them; its
  `vocab_size` is left out (the world's SentencePiece model sets it)."""
  import gin
  gin.clear_config()
  gin.parse_config_file(gin_utils.resolve_gin_file(DEMO_MODEL_GIN, gin_utils.GIN_SEARCH_PATHS))
  backbone = gin.query_parameter("%BACKBONE")
  overrides = dict(gin.query_parameter("trainer.ModelConfig.backbone_overrides"))
  gin.clear_config()
  overrides.pop("vocab_size", None)
  return backbone, overrides


def model_config() -> trainer.ModelConfig:
  """The probe the backbone is pre-trained in (all of it trains)."""
  backbone, overrides = demo_backbone()
  return trainer.ModelConfig(method="ft", backbone=backbone, backbone_overrides=overrides)


def data_config(cfg: PretrainConfig, task: str = TASK) -> trainer.DataConfig:
  """The pre-training data (or, with `task`, a probe's) at the demo's sequence length."""
  return trainer.DataConfig(task=task, data_dir=cfg.data_dir, batch_size=cfg.batch_size,
                            seq_length=SEQ_LENGTH, seed=cfg.seed)


def batches_digest(data: trainer.TaskData, cfg: PretrainConfig, steps: int = 3
                   ) -> tuple[str, dict[str, str]]:
  """sha256 of the first `steps` training batches (what the run starts from).

  Returns the digest over every array and one digest per array (so a mismatch
  says which array changed: tokens, a feature's ids, the targets).
  """
  rows = (data.train if "validation" in data.evals
          else input_pipeline.split_validation(data.train, 0.1, cfg.seed)[0])
  n = len(rows["targets"])
  h = hashlib.sha256()
  per = {k: hashlib.sha256() for k in rows}
  for s in range(steps):
    idx = input_pipeline.batch_indices(n, s, cfg.batch_size, cfg.seed)
    for k in sorted(rows):
      blob = np.ascontiguousarray(rows[k][idx]).tobytes()
      h.update(k.encode() + blob)
      per[k].update(blob)
  return h.hexdigest(), {k: v.hexdigest() for k, v in sorted(per.items())}


def vocabulary_file(cfg: PretrainConfig) -> str:
  """The SentencePiece model of the world's text (what the backbone learns)."""
  return input_pipeline.vocabulary_path(TASK, cfg.data_dir or None)


def _restore_params(model_dir: str) -> dict:
  ckpt = checkpointing.Checkpointer(os.path.join(model_dir, "checkpoints"),
                                    CheckpointConfig(async_save=False))
  state = ckpt.restore(ckpt.latest_step(), None)
  ckpt.close()
  return jax.device_get(state["params"])


def pretrain(out: str, cfg: PretrainConfig = PretrainConfig(), measure: bool = True,
             command: str | None = None) -> dict[str, Any]:
  """Pre-trains, writes the checkpoint to `out` and `<out>.json`; returns the manifest."""
  vocab = vocabulary_file(cfg)
  data = input_pipeline.load_task_data(data_config(cfg), vocab)
  work = tempfile.mkdtemp(prefix="pretrain_")
  try:
    results = trainer.train(
        work, model=model_config(), data=data_config(cfg),
        optimizer=OptimizerConfig(learning_rate=cfg.learning_rate,
                                  warmup_steps=cfg.warmup_steps, schedule="cosine"),
        loop=trainer.LoopConfig(num_steps=cfg.steps, log_every=cfg.log_every, seed=cfg.seed),
        checkpoint=CheckpointConfig(every_steps=cfg.steps, keep=1, async_save=False),
        task_data=data)
    with open(os.path.join(work, "metrics.jsonl")) as f:
      losses = [(r["step"], r["train/loss"]) for r in map(json.loads, f) if "train/loss" in r]
    params = _restore_params(work)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  tree = {"backbone": params["backbone"], "head": params["head"]}
  checkpointing.save_tree(out, tree)
  vocab_record = pretrained.attach_vocabulary(out, vocab)
  digest, per_array = batches_digest(data, cfg)
  backbone, overrides = demo_backbone()
  manifest = {
      "command": command,
      "config": dataclasses.asdict(cfg),
      "task": TASK, "backbone": backbone, "backbone_overrides": overrides,
      "seq_length": SEQ_LENGTH, "vocab_size": data.vocab_size,
      "vocabulary_sha256": vocab_record["sha256"],
      "first_batches_sha256": digest,
      "first_batches_sha256_per_array": per_array,
      "losses": losses,
      "metrics": results["metrics"],
      "train_time_s": results["train_time_s"],
      "backbone_sha256": checkpointing.tree_hash(params["backbone"]),
      "params": int(parameter_overview.count_parameters(params["backbone"])),
  }
  if measure:
    manifest["prestige_effect"] = {
        "finetune_world": prestige_effect(out, PROBE_TASK, cfg.data_dir),
        "pretrain_corpus": prestige_effect(out, TASK, cfg.data_dir)}
  with open(out.rstrip("/") + ".json", "w") as f:
    json.dump(manifest, f, indent=1)
  return manifest


def _predict(method, params, inputs: np.ndarray, batch: int = 512) -> np.ndarray:
  fn = jax.jit(lambda p, x: method.apply(p, {"inputs": x})["prediction"][:, 0])
  out = []
  for s in range(0, len(inputs), batch):
    chunk = inputs[s:s + batch]
    pad = batch - len(chunk)
    out.append(np.asarray(fn(params, np.pad(chunk, ((0, pad), (0, 0)))))[:len(chunk)])
  return np.concatenate(out)


def prestige_effect(path: str, task: str = PROBE_TASK, data_dir: str = "",
                    max_rows: int | None = None) -> dict[str, float]:
  """How much the pre-trained probe at `path` rates prestige titles up.

  Over the rows of `task` (its train and test splits; the first `max_rows`):
  `observed`: mean prediction on prestige-title rows minus the rest;
  `true`: the same difference of the actual ratings; `counterfactual`: the
  mean change in prediction when each prestige word is replaced by a plain
  adjective (same rows, only that word differs).
  """
  prepared = input_pipeline.prepare(task, data_dir or None)
  carried = pretrained.checkpoint_vocabulary(path)
  if carried is None:
    raise ValueError(f"{path} carries no vocabulary ({pretrained.VOCAB_MANIFEST})")
  vocab = carried.path
  texts, targets = [], []
  for split in prepared.splits:
    src = prepared.source_arrays(split)
    texts += src["inputs"]
    targets.append(src["targets"])
  targets = np.concatenate(targets)
  if max_rows:
    texts, targets = texts[:max_rows], targets[:max_rows]
  prestige = np.array([bool(PRESTIGE.search(t)) for t in texts])
  swapped = [PRESTIGE.sub(lambda m: m.group(0).replace(m.group(1), PLAIN_WORD), t)
             for t in texts]
  tree = checkpointing.restore_tree(path)
  method = train_setup.build_method(model_config(), trainer.TaskData(
      {"targets": targets}, {}, (), input_pipeline.vocabulary_size(vocab)))
  params = jax.device_put({"backbone": tree["backbone"], "head": tree["head"]})
  pred = _predict(method, params, input_pipeline.tokenize(texts, vocab, SEQ_LENGTH))
  pred_swapped = _predict(method, params, input_pipeline.tokenize(swapped, vocab, SEQ_LENGTH))
  return {"rows": int(len(texts)), "prestige_rows": int(prestige.sum()),
          "observed": float(pred[prestige].mean() - pred[~prestige].mean()),
          "true": float(targets[prestige].mean() - targets[~prestige].mean()),
          "counterfactual": float((pred - pred_swapped)[prestige].mean())}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings(PretrainConfig):
  """The flags: the checkpoint folder, `PretrainConfig`'s fields, and the measurement."""

  out: str = cli.field(help="checkpoint folder to write (and <out>.json)")
  no_measure: bool = cli.field(False, "skip the prestige measurement")


def main(args: Settings, command: str):
  """The command line's run: pre-trains, writes the checkpoint and its manifest."""
  cfg = PretrainConfig(**{f.name: getattr(args, f.name)
                          for f in dataclasses.fields(PretrainConfig)})
  t0 = time.time()
  manifest = pretrain(args.out, cfg, measure=not args.no_measure, command=command)
  m = manifest["metrics"]
  print(f"pre-trained {manifest['params']:,} backbone params in {time.time() - t0:.0f}s; "
        f"validation RMSE {m['validation']['rmse']:.4f}, id_test {m['id_test']['rmse']:.4f}")
  for where, e in manifest.get("prestige_effect", {}).items():
    print(f"prestige effect ({where}): observed {e['observed']:+.3f}, true {e['true']:+.3f}, "
          f"counterfactual {e['counterfactual']:+.3f} stars")
  print(f"wrote {args.out} and {args.out.rstrip('/')}.json")


if __name__ == "__main__":
  cli.main(Settings, main, "experiments.pretrain_synthetic")
