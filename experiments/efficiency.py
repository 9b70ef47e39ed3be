"""Efficiency of FT, LoRA-FT, LEVI, LEVI+LoRA and LEVI on cached taps.

    python -m experiments.efficiency --out experiments/results/efficiency

For each variant, on the base gin's model and task (default
`experiments/demo.gin`: the demo's backbone, batch and sequence length, real
batches of its task): trainable and total parameters, the train step's
compile time and median time (sharded and donated as the trainer jits it),
XLA's memory plan of the step (arguments + outputs + temporaries - donated),
the process's peak RSS while stepping, the device's peak memory where it
reports one, and inference time per example (the prediction on an
evaluation batch). LEVI-cached is LEVI fed precomputed pooled taps
(`levi_jax.tap_cache`), so the backbone does not run; the one-off cost of
computing the taps of every split is measured too.

End to end (`--e2e_steps`, default the gin's TRAIN_STEPS): the same LEVI run
trained by `trainer.train` without the cache, with a cold cache (the taps are
computed first) and with a warm one; wall time includes evaluation.
`experiments.benchmark` adds FLOP counts and the fraction of the
hardware's matmul peak. Writes `results.md`, `results.csv`, `results.json`
and `results.png` into --out.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import time
from typing import Any, Callable

import gin
import jax
import numpy as np

from experiments import benchmark, runs
from levi_jax import cli
from clu import parameter_overview

from levi_jax import input_pipeline, methods, partitioning, step, tap_cache, train_setup, trainer
from levi_jax.data import paths
from levi_jax.models.levi import CACHED_TAPS
from levi_jax.optim import OptimizerConfig, make_optimizer

VARIANTS = {"FT": "ft", "LoRA-FT": "lora", "LEVI": "levi", "LEVI+LoRA": "levi_lora",
            "LEVI-cached": "levi"}


def configs(gin_files, bindings) -> dict[str, Any]:
  """The model, data and optimizer configs and initial checkpoint the gin files bind."""
  runs.parse_base(gin_files, bindings)
  return {"model": gin.get_configurable(trainer.ModelConfig)(),
          "data": gin.get_configurable(trainer.DataConfig)(),
          "optimizer": gin.get_configurable(OptimizerConfig)(),
          "steps": gin.query_parameter("%TRAIN_STEPS"),
          "initial_checkpoint_path": paths.shipped_path(
              gin.query_parameter("%INITIAL_CHECKPOINT_PATH"))}


def timed(call: Callable[[], Any], steps: int, warmup: int) -> list[float]:
  """Seconds per call (each waited for) after `warmup` untimed calls."""
  for _ in range(warmup):
    jax.block_until_ready(call())
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - t)
  return times


def measure(name: str, cfg: dict[str, Any], data: trainer.TaskData, steps: int, warmup: int
            ) -> dict[str, Any]:
  """One variant's parameters, train step time and memory, and inference time."""
  model_cfg = dataclasses.replace(cfg["model"], method=VARIANTS[name])
  data_cfg = cfg["data"]
  method = train_setup.build_method(model_cfg, data)
  mesh = partitioning.make_mesh(partitioning.MeshConfig())
  rules = partitioning.rules_for(partitioning.MeshConfig())
  train_idx = np.arange(data_cfg.batch_size) % len(data.train["targets"])
  train = {k: v[train_idx] for k, v in data.train.items()}
  evals = data.evals["id_test"]
  eval_idx = np.arange(data_cfg.eval_batch_size) % len(evals["targets"])
  evaluate = {k: v[eval_idx] for k, v in evals.items()}
  opt = make_optimizer(cfg["optimizer"], 1000)

  def init():
    params = method.init(jax.random.PRNGKey(0), train)
    trainable, frozen = methods.partition(params, method.stages[0].frozen)
    return step.create_train_state(trainable, frozen, opt)

  out: dict[str, Any] = {"variant": name, "method": method.name}
  with jax.set_mesh(mesh):
    state, shardings = partitioning.sharded_init(init, mesh, rules)
    out["params_trained"] = int(parameter_overview.count_parameters(state.params))
    out["params_total"] = out["params_trained"] + int(
        parameter_overview.count_parameters(state.frozen))
    if name == "LEVI-cached":
      source, _ = tap_cache.tap_source(method)
      bb = tap_cache.backbone_params(source, methods.combine(state.params, state.frozen))
      for batch in (train, evaluate):
        batch[CACHED_TAPS] = tap_cache.compute_taps(
            source, bb, batch["inputs"], mesh, rules, data_cfg.eval_batch_size)
      t = time.perf_counter()
      every = {"train": data.train, **data.evals}
      rows = sum(len(v["inputs"]) for v in every.values())
      for v in every.values():
        tap_cache.compute_taps(source, bb, v["inputs"], mesh, rules, data_cfg.eval_batch_size)
      out["cache_build_s"], out["cache_rows"] = time.perf_counter() - t, rows
    train_step = partitioning.jit_train_step(
        step.make_train_step(method, step.LossConfig()), shardings, mesh, rules)
    batch = partitioning.global_batch(train, mesh)
    rng = jax.random.PRNGKey(1)
    t = time.perf_counter()
    compiled = train_step.lower(state, batch, rng).compile()
    out["compile_s"] = time.perf_counter() - t
    holder = {"state": state}

    def call():
      holder["state"], metrics = compiled(holder["state"], batch, rng)
      return metrics

    with benchmark.RssSampler() as rss:
      times = timed(call, steps, warmup)
    out["step_times_s"] = times
    out["step_s"] = statistics.median(times)
    out["train_examples_per_s"] = data_cfg.batch_size / out["step_s"]
    out["xla_memory"] = benchmark.xla_memory(compiled)
    out["device_memory"] = benchmark.device_memory()
    out["rss_peak_mb"] = rss.peak / 2**20
    params = holder.pop("state").all_params()
    predict = jax.jit(lambda p, b: method.apply(p, b)["prediction"])
    ebatch = partitioning.global_batch(evaluate, mesh)
    predict(params, ebatch)
    infer = timed(lambda: predict(params, ebatch), steps, warmup)
    out["inference_us_per_example"] = 1e6 * statistics.median(infer) / data_cfg.eval_batch_size
  return out


def end_to_end(cfg: dict[str, Any], gin_files, bindings, steps: int, work: str
               ) -> dict[str, Any]:
  """LEVI trained by `trainer.train` without the cache, with a cold and a warm one."""
  cache = os.path.join(work, "tap_cache")
  shutil.rmtree(work, ignore_errors=True)
  out = {}
  for label, cache_dir in (("uncached", ""), ("cold cache", cache), ("warm cache", cache)):
    model_dir = os.path.join(work, label.replace(" ", "_"))
    b = runs.run_bindings(model_dir, "levi", cfg["data"].task, 0, steps=steps,
                          tap_cache_dir=cache_dir, extra=bindings)
    t = time.time()
    r = runs.train_run(model_dir, b, gin_files)
    out[label] = {"wall_s": time.time() - t, "train_time_s": r["train_time_s"],
                  "examples_per_s": r["examples_per_s"],
                  "tap_cache_s": r.get("tap_cache", {}).get("seconds", 0.0),
                  "tap_cache_hits": r.get("tap_cache", {}).get("hits", 0),
                  "ood_rmse": r["metrics"]["ood_test"]["rmse"],
                  "final_train_loss": r["final_train_loss"]}
  shutil.rmtree(work, ignore_errors=True)
  return out


def markdown(report: dict[str, Any]) -> str:
  """The results page: one row per variant, the cached-taps and end-to-end ratios."""
  rows = report["variants"]
  ft = next((r for r in rows if r["variant"] == "FT"), None)
  cfg = report["config"]
  lines = ["# Efficiency: FT, LoRA-FT, LEVI, LEVI+LoRA, LEVI on cached taps", "",
           f"Backbone {cfg['backbone']} {cfg['backbone_overrides']}, batch {cfg['batch_size']} x "
           f"{cfg['seq_length']} tokens (task {cfg['task']}), inference on batches of "
           f"{cfg['eval_batch_size']}; {report['machine']['device_count']} x "
           f"{report['machine']['device_kind']}, {report['machine']['cpu_count']} CPUs. Step and "
           f"inference times: medians of {cfg['steps']} runs after {cfg['warmup']} warm-up runs.",
           "", f"Command: `{report['command']}`", "",
           "| variant | trainable params | total params | train step (ms) | vs FT | examples/s "
           "| XLA step memory (MB) | peak RSS (MB) | inference (µs/example) | compile (s) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    xm = r["xla_memory"]["peak_estimate"] / 2**20 if r["xla_memory"] else float("nan")
    vs = f"{r['step_s'] / ft['step_s']:.2g}x" if ft else "-"
    lines.append(f"| {r['variant']} | {r['params_trained']:,} | {r['params_total']:,} | "
                 f"{1e3 * r['step_s']:.1f} | {vs} | {r['train_examples_per_s']:.0f} | {xm:.1f} | "
                 f"{r['rss_peak_mb']:.0f} | {r['inference_us_per_example']:.1f} | "
                 f"{r['compile_s']:.1f} |")
  by = {r["variant"]: r for r in rows}
  lines.append("")
  if "LEVI" in by and "LEVI-cached" in by:
    c = by["LEVI-cached"]
    lines.append(f"Cached taps: a LEVI train step takes {by['LEVI']['step_s'] / c['step_s']:.1f}x "
                 f"less time on cached taps; computing the taps of all {c['cache_rows']:,} rows of "
                 f"the task's splits once took {c['cache_build_s']:.1f}s (the cost of "
                 f"{c['cache_build_s'] / by['LEVI']['step_s']:.0f} uncached LEVI steps).")
  e2e = report.get("end_to_end")
  if e2e:
    lines += ["", f"End to end, LEVI trained for {report['config']['e2e_steps']} steps by "
              "`trainer.train` (wall time includes evaluations and, cold, computing the cache):",
              "", "| run | wall (s) | train loop (s) | examples/s | tap cache (s) | OOD RMSE "
              "| final train loss |", "|---|---|---|---|---|---|---|"]
    for label, r in e2e.items():
      lines.append(f"| {label} | {r['wall_s']:.1f} | {r['train_time_s']:.1f} | "
                   f"{r['examples_per_s']:.0f} | {r['tap_cache_s']:.1f} | {r['ood_rmse']:.4f} | "
                   f"{r['final_train_loss']:.5f} |")
    u, w = e2e["uncached"], e2e["warm cache"]
    lines += ["", f"Speed-up of the training loop: {u['train_time_s'] / w['train_time_s']:.1f}x; "
              f"of the whole run (warm cache): {u['wall_s'] / w['wall_s']:.1f}x; cold cache: "
              f"{u['wall_s'] / e2e['cold cache']['wall_s']:.1f}x."]
  return "\n".join(lines) + "\n"


def chart(report: dict[str, Any], path: str):
  """Train step time, inference time and trainable parameters per variant."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = report["variants"]
  names = [r["variant"] for r in rows]
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
  for ax, (key, scale, label) in zip(axes, (
      ("step_s", 1e3, "train step (ms)"), ("inference_us_per_example", 1.0, "inference (µs/example)"),
      ("params_trained", 1e-6, "trainable params (M)"))):
    ax.bar(names, [r[key] * scale for r in rows], color="tab:blue")
    ax.set_title(label, fontsize=9)
    ax.tick_params(axis="x", rotation=30, labelsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


@dataclasses.dataclass(frozen=True)
class Settings:
  """The flags of the efficiency table."""

  out: str = cli.field(help="results folder")
  variants: tuple[str, ...] = cli.field(tuple(VARIANTS), f"of {','.join(VARIANTS)}")
  steps: int = cli.field(10, "timed steps (median reported)")
  warmup: int = cli.field(2, "untimed steps after compiling")
  e2e_steps: int | None = cli.field(None, "end-to-end training steps (default: the gin's "
                                          "TRAIN_STEPS; 0: skip)")
  backbone: str = runs.backbone_flag()
  gin_file: tuple[str, ...] = runs.gin_file_flag()
  gin_bindings: tuple[str, ...] = runs.gin_bindings_flag()

  def __post_init__(self):
    unknown = set(self.variants) - set(VARIANTS)
    if unknown:
      raise ValueError(f"unknown variants {sorted(unknown)}; expected some of {list(VARIANTS)}")
    if not self.gin_file:
      object.__setattr__(self, "gin_file", runs.BASE_GIN)


def run(settings: Settings, command: str = "") -> dict[str, Any]:
  """Measures every variant (and the end-to-end runs) and writes the outputs into --out."""
  out = os.path.abspath(settings.out)
  bindings = [*runs.BACKBONES[settings.backbone], *settings.gin_bindings]
  cfg = configs(settings.gin_file, bindings)
  pretrained = None
  if cfg["model"].pretrained is not None:
    from levi_jax.checkpoints import backbones
    pretrained = backbones.load_pretrained(cfg["model"].pretrained)
  data = input_pipeline.load_task_data(cfg["data"], train_setup.backbone_vocabulary(
      cfg["data"], pretrained, cfg.get("initial_checkpoint_path")))
  rows = [measure(v, cfg, data, settings.steps, settings.warmup) for v in settings.variants]
  e2e_steps = cfg["steps"] if settings.e2e_steps is None else settings.e2e_steps
  report = {
      "command": command, "machine": benchmark.machine_info(),
      "config": {"backbone": cfg["model"].backbone,
                 "backbone_overrides": dict(cfg["model"].backbone_overrides),
                 "pretrained": str(cfg["model"].pretrained), "task": cfg["data"].task,
                 "batch_size": cfg["data"].batch_size, "seq_length": cfg["data"].seq_length,
                 "eval_batch_size": cfg["data"].eval_batch_size, "steps": settings.steps,
                 "warmup": settings.warmup, "e2e_steps": e2e_steps},
      "variants": rows,
  }
  if e2e_steps:
    report["end_to_end"] = end_to_end(cfg, settings.gin_file, bindings, e2e_steps,
                                      os.path.join(out, "e2e_work"))
  os.makedirs(out, exist_ok=True)
  md = markdown(report)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(md)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(report, f, indent=1)
  runs.write_csv(os.path.join(out, "results.csv"), [
      {k: v for k, v in r.items() if k not in ("step_times_s", "xla_memory", "device_memory")}
      | {"xla_step_memory_mb": r["xla_memory"]["peak_estimate"] / 2**20 if r["xla_memory"]
         else None} for r in rows])
  chart(report, os.path.join(out, "results.png"))
  report["markdown"] = md
  return report


def main(settings: Settings, command: str):
  """The command line's run: measures, writes and prints the table."""
  report = run(settings, command)
  print(report["markdown"])
  print(f"wrote {settings.out}/results.md, results.csv, results.json, results.png")


if __name__ == "__main__":
  cli.main(Settings, main, "experiments.efficiency")
