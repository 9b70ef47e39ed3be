"""Scale on one host: generated Amazon worlds of N ratings, from raw files to training steps.

    python -m experiments.scale --ratings=1000000,20000000 --work_dir=/tmp/scale \\
        --out=experiments/results/scale/results.json

For each N, in fresh processes (so each peak RSS, VmHWM, is the phase's own):

1. `generate`: the synthetic Amazon 2018 world of N ratings
   (`levi_jax.data.synthetic_scale`), unless `work_dir` already holds it;
2. `preprocess`: the examples cache of `--task` (`levi_jax.data.example_cache`:
   parse, split, tokenize, write): rows/s, peak RSS, bytes on disk per row;
3. `small` twice: the small model alone (method `scratch`) trained
   `--steps` steps from the examples on disk through the trainer's data path
   (`train_setup.load_data`, `RunData.train_batch`); the second run is the one
   reported: time from launching the process to the end of its first step,
   examples/s over the steps after the first, peak RSS;
4. `levi_cached` twice: LEVI around the `t5_1_1_tiny` preset on cached taps
   (`tap_cache`, `--tap_dtype`): the first run computes the taps of every
   split (rows/s, bytes per row, peak RSS while computing), the second reads
   them (time to first step, examples/s, peak RSS);
5. `tap_cost` (the first N only): the forward of the demo's backbone
   (`experiments/checkpoints/synthetic_t5_small`) over `--tap_cost_rows` rows
   of the split, rows/s, extrapolated to every row of the world.

Every number is measured in one run of this script on the machine it runs
on; the JSON holds the machine (CPU, cores, load before and after) and the
command. Nothing here asserts a target: experiments/README.md compares.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Sequence

import numpy as np

from levi_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ("preprocess", "small", "levi_cached", "tap_cost")


@dataclasses.dataclass(frozen=True)
class Settings:
  """Scale measurements (see the module docstring)."""

  ratings: tuple[int, ...] = cli.field((1_000_000, 20_000_000), "world sizes, comma-separated")
  work_dir: str = cli.field("/tmp/levi_scale", "worlds, examples and tap caches go here")
  out: str = cli.field("", "results JSON ('' = print only)")
  task: str = cli.field("amazon_2018.time_later", "the task of every world")
  seq_length: int = cli.field(64, "`inputs` length in tokens")
  batch_size: int = cli.field(256, "training batch size")
  steps: int = cli.field(200, "training steps per run (after the first)")
  tap_dtype: str = cli.field("bfloat16", "tap cache storage", choices=("float32", "bfloat16"))
  tap_cost_rows: int = cli.field(16384, "rows the demo backbone's forward is timed over")
  phase: str = cli.field("", "internal: run one phase in this process", choices=("",) + PHASES)
  phase_ratings: int = cli.field(0, "internal: the world size of --phase")


def _paths(settings: Settings, n: int) -> dict[str, str]:
  root = os.path.join(settings.work_dir, f"n{n}")
  return {"world": os.path.join(root, "world"), "examples": os.path.join(root, "examples"),
          "taps": os.path.join(root, f"taps_{settings.tap_dtype}")}


def _data_config(settings: Settings, n: int, taps: bool = False):
  from levi_jax import trainer
  p = _paths(settings, n)
  return trainer.DataConfig(task=settings.task, data_dir=p["world"], seq_length=settings.seq_length,
                            batch_size=settings.batch_size, eval_batch_size=1024,
                            example_cache_dir=p["examples"],
                            tap_cache_dir=p["taps"] if taps else "",
                            tap_cache_dtype=settings.tap_dtype)


# --- Phases (each in its own process) ----------------------------------------------


def _preprocess(settings: Settings, n: int) -> dict[str, Any]:
  from levi_jax.data import example_cache
  p = _paths(settings, n)
  entry, hit = example_cache.load(p["examples"], settings.task, p["world"], None,
                                  settings.seq_length)
  m = entry.manifest
  rows = sum(v["rows"] for v in m["splits"].values())
  disk = sum(os.path.getsize(os.path.join(entry.path, f)) for f in os.listdir(entry.path))
  return {"hit": hit, "rows": rows, "split_rows": {k: v["rows"] for k, v in m["splits"].items()},
          "seconds": m["written"]["seconds"], "parse_seconds": m["written"]["parse_seconds"],
          "rows_per_s": m["written"]["rows_per_second"], "bytes": disk,
          "bytes_per_row": disk / rows, "record_bytes": m["record_bytes"],
          "features": m["features"]}


def _train(settings: Settings, n: int, method_name: str) -> dict[str, Any]:
  import jax
  from levi_jax import methods, partitioning, step, train_setup, trainer
  from levi_jax.optim import OptimizerConfig, make_optimizer

  out: dict[str, Any] = {}
  t0 = time.time()
  taps = method_name == "levi"
  data = _data_config(settings, n, taps)
  mesh_cfg = partitioning.MeshConfig()
  mesh, rules = partitioning.make_mesh(mesh_cfg), partitioning.rules_for(mesh_cfg)
  run_data = train_setup.load_data(data, mesh)
  out["load_s"] = time.time() - t0
  model = trainer.ModelConfig(method=method_name, backbone="t5_1_1_tiny")
  method = train_setup.build_method(model, run_data.task_data)
  opt = make_optimizer(OptimizerConfig(learning_rate=1e-3, schedule="constant"), 10**6)
  first = run_data.train_batch(0)

  def init():
    params = method.init(jax.random.PRNGKey(0), first)
    trainable, frozen = methods.partition(params, method.stages[0].frozen)
    return step.create_train_state(trainable, frozen, opt)

  with jax.set_mesh(mesh):
    state, shardings = partitioning.sharded_init(init, mesh, rules)
    out["params_trained"] = int(sum(x.size for x in jax.tree.leaves(state.params)))
    if taps:
      t = time.time()
      run_data, stats = train_setup.attach_tap_cache(
          run_data, data, method, methods.combine(state.params, state.frozen), mesh, rules)
      out["tap_cache"] = {k: v for k, v in stats.items()}
      out["tap_cache"]["attach_s"] = time.time() - t
      rows = sum(run_data.sizes.values())
      out["tap_cache"]["bytes_per_row"] = stats["bytes"] / rows
      if stats.get("rows_computed"):
        out["tap_cache"]["rows_computed_per_s"] = stats["rows_computed"] / stats["seconds"]
    train_step = partitioning.jit_train_step(step.make_train_step(method, step.LossConfig()),
                                             shardings, mesh, rules)
    rng = jax.random.PRNGKey(1)
    times = []
    for s in range(settings.steps + 1):
      t = time.perf_counter()
      batch = partitioning.global_batch(run_data.train_batch(s), mesh)
      state, metrics = train_step(state, batch, rng)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t)
      if s == 0:
        out["first_step_done"] = time.time()
        out["compile_and_first_step_s"] = times[0]
  steady = sorted(times[1:])
  out["step_median_s"] = steady[len(steady) // 2]
  out["examples_per_s"] = settings.batch_size * len(steady) / sum(steady)
  out["loss_finite"] = bool(np.isfinite(float(metrics["loss"])))
  return out


DEMO_BACKBONE = {"emb_dim": 128, "num_heads": 4, "head_dim": 32, "mlp_dim": 256, "num_layers": 4,
                 "vocab_size": 800}  # gin/models/synthetic_t5_small.gin


def _tap_cost(settings: Settings, n: int) -> dict[str, Any]:
  """The pooled-taps forward of the demo's backbone architecture over `tap_cost_rows`
  training rows (the cost does not depend on the weights: a fresh init is timed)."""
  import jax
  from levi_jax import methods, partitioning, tap_cache, train_setup, trainer

  data = _data_config(settings, n)
  mesh_cfg = partitioning.MeshConfig()
  mesh, rules = partitioning.make_mesh(mesh_cfg), partitioning.rules_for(mesh_cfg)
  run_data = train_setup.load_data(data, mesh)
  model = trainer.ModelConfig(method="levi", backbone="t5_1_1_small",
                              backbone_overrides=DEMO_BACKBONE)
  method = train_setup.build_method(model, run_data.task_data)
  source, _ = tap_cache.tap_source(method)
  inputs = run_data.train["inputs"]
  k = min(settings.tap_cost_rows, len(inputs))
  sample = np.minimum(np.asarray(inputs[np.arange(k)]), DEMO_BACKBONE["vocab_size"] - 1)
  params = method.init(jax.random.PRNGKey(0), run_data.train_batch(0))
  bb = tap_cache.backbone_params(source, params)
  with jax.set_mesh(mesh):
    tap_cache.compute_taps(source, bb, sample[:1024], mesh, rules, 1024)  # compile
    t = time.perf_counter()
    taps = tap_cache.compute_taps(source, bb, sample, mesh, rules, 1024)
    secs = time.perf_counter() - t
  rows = sum(run_data.sizes.values())
  return {"backbone": DEMO_BACKBONE, "rows_timed": k, "seconds": secs, "rows_per_s": k / secs,
          "tap_shape": list(taps.shape[1:]), "all_rows": rows,
          "all_rows_hours": rows / (k / secs) / 3600,
          "params_backbone": int(sum(x.size for x in jax.tree.leaves(bb)))}


def _phase(settings: Settings) -> None:
  n = settings.phase_ratings
  fn = {"preprocess": _preprocess, "tap_cost": _tap_cost,
        "small": lambda s, n: _train(s, n, "scratch"),
        "levi_cached": lambda s, n: _train(s, n, "levi")}[settings.phase]
  out = fn(settings, n)
  from experiments.tap_cache_memory import status  # pylint: disable=g-import-not-at-top
  out["peak_rss_mb"] = status("VmHWM") / 2**20
  print("PHASE_RESULT " + json.dumps(out, default=float), flush=True)


# --- The driver ------------------------------------------------------------------


def _run_phase(settings: Settings, phase: str, n: int) -> dict[str, Any]:
  cmd = [sys.executable, "-m", "experiments.scale", f"--phase={phase}", f"--phase_ratings={n}",
         f"--work_dir={settings.work_dir}", f"--task={settings.task}",
         f"--seq_length={settings.seq_length}", f"--batch_size={settings.batch_size}",
         f"--steps={settings.steps}", f"--tap_dtype={settings.tap_dtype}",
         f"--tap_cost_rows={settings.tap_cost_rows}"]
  start = time.time()
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f"phase {phase} (N={n}) failed:\n{proc.stdout[-3000:]}\n"
                       f"{proc.stderr[-3000:]}")
  line = next(x for x in proc.stdout.splitlines()[::-1] if x.startswith("PHASE_RESULT "))
  out = json.loads(line[len("PHASE_RESULT "):])
  out["process_wall_s"] = time.time() - start
  if "first_step_done" in out:
    out["time_to_first_step_s"] = out.pop("first_step_done") - start
  print(f"  {phase} N={n:,}: {json.dumps({k: v for k, v in out.items() if k != 'features'})}",
        flush=True)
  return out


def _machine() -> dict[str, Any]:
  cpu = ""
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                 "")
  return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
          "load_average": os.getloadavg()}


def run(settings: Settings, command: str = "") -> dict[str, Any]:
  from levi_jax.data import synthetic_scale
  results: dict[str, Any] = {"command": command, "settings": dataclasses.asdict(settings),
                             "machine_before": _machine(), "worlds": {}}
  for i, n in enumerate(settings.ratings):
    p = _paths(settings, n)
    world: dict[str, Any] = {}
    manifest = os.path.join(p["world"], synthetic_scale.MANIFEST)
    if not os.path.isfile(manifest):
      rep = synthetic_scale.write_scale_world(p["world"], n)
      world["generate"] = dataclasses.asdict(rep)
    else:
      with open(manifest) as f:
        world["generate"] = json.load(f)
    world["preprocess"] = _run_phase(settings, "preprocess", n)
    for phase in ("small", "levi_cached"):
      world[f"{phase}_first"] = _run_phase(settings, phase, n)
      world[phase] = _run_phase(settings, phase, n)
    if i == 0:
      world["tap_cost"] = _run_phase(settings, "tap_cost", n)
    results["worlds"][str(n)] = world
    if settings.out:
      _write(settings.out, results)
  results["machine_after"] = _machine()
  if settings.out:
    _write(settings.out, results)
  return results


def _write(path: str, results: dict[str, Any]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(results, f, indent=1, default=float)
  os.replace(path + ".tmp", path)


def main(argv: Sequence[str] | None = None):
  def go(settings: Settings, command: str):
    if settings.phase:
      return _phase(settings)
    run(settings, command)
    return None

  if argv is not None:
    return go(cli.parse(Settings, argv), cli.command_line("experiments.scale", argv))
  cli.main(Settings, go, "experiments.scale")
  return None


if __name__ == "__main__":
  main()
