"""Train-step speed of LEVI against fine-tuning, next to the hardware's matmul peak.

    python experiments/benchmark.py --out bench.json
    python experiments/benchmark.py --preset t5_1_1_base --batch 64 --length 128 \\
        --dtype bfloat16 --out bench_gpu.json

Measured side by side in one process, on one backbone preset, batch and
sequence length (synthetic tokens and ids: no TensorFlow, seqio or gin):

* the train step of each method in `--methods`: `ft` (full fine-tuning),
  `lora` (LoRA-FT), `levi`, `levi_lora`, and `levi_cached` (LEVI fed the
  pooled backbone taps, so the backbone does not run), jitted the way the
  trainer does (`partitioning.sharded_init` + `jit_train_step`);
* the backbone forward (the taps LEVI pools), its FLOPs counted analytically
  (`forward_flops`) and by XLA's cost analysis, and the FLOP/s it achieves as
  a fraction of a large matrix product's, measured in the same run;
* memory: XLA's plan of each compiled step (arguments + outputs + temporaries
  - donated), the device's peak where it reports one (cumulative over the
  run), and on CPU the process RSS sampled while the steps run.

Every timing is kept raw in the JSON; reported figures are medians of
`--steps` runs after `--warmup` runs (compilation is timed apart).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from levi_jax import methods, partitioning, step
from levi_jax.models import lora as lora_lib
from levi_jax.models import t5_encoder as t5
from levi_jax.models.levi import CACHED_TAPS
from levi_jax.models.task_net import CategoricalFeature, FeatureTower
from levi_jax.optim import OptimizerConfig, make_optimizer

METHODS = ("ft", "lora", "levi", "levi_lora", "levi_cached")
# Method name in levi_jax.methods for each benchmarked variant.
_METHOD_OF = {"ft": "ft", "lora": "lora", "levi": "levi", "levi_lora": "levi_lora",
              "levi_cached": "levi"}
FEATURES = (CategoricalFeature("user_id", 1000), CategoricalFeature("item_id", 2000))
TARGETS = {"levi_step_over_ft_step": 0.4, "backbone_fraction_of_matmul_peak_cpu": 0.35}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True, help="JSON file to write")
  p.add_argument("--preset", default="t5_1_1_small", choices=sorted(t5.PRESETS))
  p.add_argument("--num_layers", type=int, default=None, help="override the preset's")
  p.add_argument("--vocab_size", type=int, default=None, help="override the preset's")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--length", type=int, default=64)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--steps", type=int, default=5, help="timed runs (median reported)")
  p.add_argument("--warmup", type=int, default=1, help="untimed runs after compiling")
  p.add_argument("--methods", default=",".join(METHODS),
                 help=f"comma-separated subset of {','.join(METHODS)}")
  p.add_argument("--lora_rank", type=int, default=8)
  p.add_argument("--mesh_model", type=int, default=1,
                 help="model-axis size; the data axis takes the remaining devices")
  p.add_argument("--matmul_sizes", default="",
                 help="sides of the square matmuls whose best median FLOP/s is the peak "
                      "(default 1024,2048 on CPU; 4096,8192 otherwise)")
  args = p.parse_args(argv)
  args.methods = tuple(m for m in args.methods.split(",") if m)
  args.matmul_sizes = tuple(int(n) for n in args.matmul_sizes.split(",") if n)
  unknown = set(args.methods) - set(METHODS)
  if unknown:
    p.error(f"unknown methods {sorted(unknown)}; expected some of {METHODS}")
  if args.steps < 1 or args.warmup < 0:
    p.error("--steps must be >= 1 and --warmup >= 0")
  return args


def machine_info() -> dict[str, Any]:
  """What ran the benchmark: devices, host and library versions."""
  d = jax.devices()[0]
  return {"platform": d.platform, "device_kind": d.device_kind,
          "devices": [str(x) for x in jax.devices()], "device_count": jax.device_count(),
          "process_count": jax.process_count(), "cpu_count": os.cpu_count(),
          "host": platform.node(), "machine": platform.machine(),
          "system": platform.platform(), "cpu_model": _cpu_model(),
          "python": platform.python_version(),
          "versions": {"jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib"),
                       "flax": flax.__version__, "optax": optax.__version__,
                       "numpy": np.__version__}}


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def forward_flops(cfg: t5.T5Config, batch: int, length: int) -> int:
  """Matmul FLOPs (2 per multiply-add) of one `T5Encoder` forward.

  With B batch, L length, d = emb_dim, H heads of width k, f = mlp_dim,
  g = len(mlp_activations) input projections, R relpos buckets, N layers:

      per layer   2BL*d*3Hk       query, key, value
                + 2BL*Hk*d        attention output
                + 2*2BH*L^2*k     logits and the weighted sum of values
                + 2BL*d*f*g       MLP input (g = 2 for T5 1.1's gated GELU)
                + 2BL*f*d         MLP output
      total     N * per layer + 2*H*R*L^2 (relpos one-hot contraction)
                [+ 2BL*V*d for a one-hot embedding; a gather costs none]

  Norms, softmax, activations and residuals (O(BLd) each) are left out.
  """
  b, l, d = batch, length, cfg.emb_dim
  hk = cfg.num_heads * cfg.head_dim
  f, g = cfg.mlp_dim, len(cfg.mlp_activations)
  per_layer = (2 * b * l * d * 3 * hk + 2 * b * l * hk * d
               + 2 * 2 * b * cfg.num_heads * l * l * cfg.head_dim
               + 2 * b * l * d * f * g + 2 * b * l * f * d)
  total = cfg.num_layers * per_layer + 2 * cfg.num_heads * cfg.num_relpos_buckets * l * l
  if cfg.one_hot_embedding:
    total += 2 * b * l * cfg.vocab_size * d
  return int(total)


def synthetic_batch(cfg: t5.T5Config, batch: int, length: int, seed: int = 0
                    ) -> dict[str, np.ndarray]:
  """Random tokens (each example padded after a random length) and feature ids."""
  rs = np.random.RandomState(seed)
  tokens = rs.randint(1, cfg.vocab_size, (batch, length)).astype(np.int32)
  lengths = rs.randint(length // 2, length + 1, batch)
  tokens[np.arange(length)[None, :] >= lengths[:, None]] = 0
  return {"inputs": tokens,
          "user_id": rs.randint(2, FEATURES[0].vocab_size, batch).astype(np.int32),
          "item_id": rs.randint(2, FEATURES[1].vocab_size, batch).astype(np.int32),
          "targets": rs.uniform(1, 5, batch).astype(np.float32)}


def _median(xs) -> float:
  return float(statistics.median(xs))


def time_calls(call: Callable[[], Any], steps: int, warmup: int) -> tuple[list[float], Any]:
  """Seconds per call (each waited for) after `warmup` untimed calls, and the last result."""
  for _ in range(warmup):
    jax.block_until_ready(call())
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    out = jax.block_until_ready(call())
    times.append(time.perf_counter() - t)
  return times, out


def _rss_bytes() -> int:
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except OSError:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RssSampler:
  """Peak resident memory of the process while the `with` block runs."""

  def __init__(self, interval_s: float = 0.002):
    self.interval_s, self.peak, self.start = interval_s, 0, 0
    self._stop = threading.Event()

  def __enter__(self):
    self.start = self.peak = _rss_bytes()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, _rss_bytes())
      time.sleep(self.interval_s)

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, _rss_bytes())


def device_memory() -> dict[str, int] | None:
  """The first device's allocator stats (GPU/TPU); None where not reported (CPU)."""
  stats = jax.devices()[0].memory_stats()
  if not stats:
    return None
  return {k: int(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
          if k in stats}


def xla_memory(compiled) -> dict[str, int] | None:
  """XLA's buffer plan for one call of a compiled program, in bytes."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in
         ("argument", "output", "temp", "alias", "generated_code")}
  out["peak_estimate"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def xla_flops(compiled) -> float | None:
  """FLOPs of a compiled program by XLA's cost analysis (None if unavailable)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def matmul_peak(dtype: str, size: int, steps: int, warmup: int) -> dict[str, Any]:
  """FLOP/s of one large square matrix product in `dtype`."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(k1, (size, size), dtype)
  b = jax.random.normal(k2, (size, size), dtype)
  compiled = jax.jit(jnp.matmul).lower(a, b).compile()
  times, _ = time_calls(lambda: compiled(a, b), steps, warmup)
  flops = 2 * size ** 3
  return {"size": size, "flops": flops, "times_s": times, "median_s": _median(times),
          "flops_per_s": flops / _median(times)}


class Bench:
  """Builds, compiles and times each method on one backbone and batch."""

  def __init__(self, args):
    self.args = args
    overrides = {"dtype": args.dtype}
    if args.num_layers:
      overrides["num_layers"] = args.num_layers
    if args.vocab_size:
      overrides["vocab_size"] = args.vocab_size
    self.cfg = t5.preset(args.preset, **overrides)
    mesh_cfg = partitioning.MeshConfig(data=-1, model=args.mesh_model)
    self.mesh = partitioning.make_mesh(mesh_cfg)
    self.rules = partitioning.rules_for(mesh_cfg)
    self.host_batch = synthetic_batch(self.cfg, args.batch, args.length)
    self.optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-4), 1000)

  def method(self, name: str) -> methods.Method:
    return methods.make_method(
        _METHOD_OF[name], backbone=t5.T5Encoder(self.cfg), task_net=FeatureTower(FEATURES),
        lora=lora_lib.LoraConfig(rank=self.args.lora_rank), dtype=jnp.dtype(self.args.dtype))

  def state(self, method: methods.Method):
    def init():
      params = method.init(jax.random.PRNGKey(0), self.host_batch)
      trainable, frozen = methods.partition(params, method.stages[0].frozen)
      return step.TrainState.create(trainable, frozen, self.optimizer)
    return partitioning.sharded_init(init, self.mesh, self.rules)

  def backbone_forward(self) -> dict[str, Any]:
    """The pooled taps LEVI reads (the whole backbone runs), timed and counted."""
    method = self.method("levi")
    state, shardings = self.state(method)
    params = methods.combine(state.params, state.frozen)
    param_shardings = methods.combine(shardings.params, shardings.frozen)
    batch = partitioning.global_batch(self.host_batch, self.mesh)
    module = method.module
    taps = lambda p, b: module.apply({"params": p}, b, method=module.pooled_taps)
    fn = jax.jit(partitioning.with_logical_rules(taps, self.mesh, self.rules),
                 in_shardings=(param_shardings, partitioning.batch_sharding(self.mesh)))
    t = time.perf_counter()
    compiled = fn.lower(params, batch).compile()
    compile_s = time.perf_counter() - t
    times, taps_out = time_calls(lambda: compiled(params, batch), self.args.steps,
                                 self.args.warmup)
    analytic = forward_flops(self.cfg, self.args.batch, self.args.length)
    self.cached_taps = np.asarray(taps_out)
    return {"analytic_flops": analytic, "xla_flops": xla_flops(compiled),
            "compile_s": compile_s, "times_s": times, "median_s": _median(times),
            "achieved_flops_per_s": analytic / _median(times),
            "memory": {"xla": xla_memory(compiled)}}

  def train_step(self, name: str) -> dict[str, Any]:
    """Compiles and times one method's sharded, donated train step."""
    method = self.method(name)
    state, shardings = self.state(method)
    host = dict(self.host_batch)
    if name == "levi_cached":
      host[CACHED_TAPS] = self.cached_taps
    batch = partitioning.global_batch(host, self.mesh)
    train_step = step.make_train_step(method, self.optimizer, step.LossConfig())
    jitted = partitioning.jit_train_step(train_step, shardings, self.mesh, self.rules)
    rng = jax.random.PRNGKey(1)
    t = time.perf_counter()
    compiled = jitted.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - t
    holder = {"state": state}

    def call():
      holder["state"], metrics = compiled(holder["state"], batch, rng)
      return metrics

    count = lambda tree: int(sum(np.size(x) for x in jax.tree.leaves(tree)))
    with RssSampler() as rss:
      times, metrics = time_calls(call, self.args.steps, self.args.warmup)
    loss = float(metrics["loss"])
    del holder
    gc.collect()
    flops = xla_flops(compiled)
    return {"method": _METHOD_OF[name], "compile_s": compile_s, "times_s": times,
            "median_s": _median(times), "examples_per_s": self.args.batch / _median(times),
            "xla_flops": flops,
            "achieved_flops_per_s": flops / _median(times) if flops else None,
            "trainable_params": count(state.params), "frozen_params": count(state.frozen),
            "final_loss": loss,
            "memory": {"xla": xla_memory(compiled), "device": device_memory(),
                       "rss_before_bytes": rss.start, "rss_peak_bytes": rss.peak}}


def run(args) -> dict[str, Any]:
  """The whole benchmark; returns what is written to `--out`."""
  bench = Bench(args)
  on_cpu = jax.devices()[0].platform == "cpu"
  sizes = args.matmul_sizes or ((1024, 2048) if on_cpu else (4096, 8192))
  peaks = {}
  for dt in dict.fromkeys(("float32", args.dtype)):
    runs = [matmul_peak(dt, n, args.steps, args.warmup) for n in sizes]
    best = max(runs, key=lambda r: r["flops_per_s"])
    peaks[dt] = {"flops_per_s": best["flops_per_s"], "size": best["size"], "runs": runs}
  backbone = bench.backbone_forward()
  backbone["fraction_of_matmul_peak"] = (backbone["achieved_flops_per_s"]
                                         / peaks[args.dtype]["flops_per_s"])
  results = {}
  for name in args.methods:
    results[name] = bench.train_step(name)
    results[name]["fraction_of_matmul_peak"] = (
        results[name]["achieved_flops_per_s"] / peaks[args.dtype]["flops_per_s"]
        if results[name]["achieved_flops_per_s"] else None)
  ratios = {f"{m}_step_over_ft_step": results[m]["median_s"] / results["ft"]["median_s"]
            for m in results if "ft" in results and m != "ft"}
  return {
      "machine": machine_info(),
      "config": {"preset": args.preset, "backbone": {
          k: str(v) if k == "dtype" else v for k, v in vars(bench.cfg).items()},
                 "batch": args.batch, "length": args.length, "dtype": args.dtype,
                 "steps": args.steps, "warmup": args.warmup, "lora_rank": args.lora_rank,
                 "mesh": dict(bench.mesh.shape), "methods": list(args.methods)},
      "matmul_peak": peaks,
      "backbone_forward": backbone,
      "train_step": results,
      "ratios": ratios,
      "targets": TARGETS,
      "tensorflow_imported": any(m.split(".")[0] in ("tensorflow", "seqio")
                                 for m in sys.modules),
      "rss_high_water_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
  }


def table(report: dict[str, Any]) -> str:
  """A readable summary of the report."""
  cfg, m = report["config"], report["machine"]
  lines = [f"{cfg['preset']} (layers {cfg['backbone']['num_layers']}), batch {cfg['batch']} x "
           f"{cfg['length']} tokens, {cfg['dtype']}, mesh {cfg['mesh']}, on "
           f"{m['device_count']} x {m['device_kind']} ({m['cpu_count']} CPUs)", ""]
  lines.append(f"{'method':<12} {'step ms':>9} {'ex/s':>8} {'vs FT':>6} "
               f"{'GFLOP/s':>8} {'peak':>6} {'XLA mem MB':>10} {'RSS MB':>8} {'compile s':>9}")
  ft = report["train_step"].get("ft")
  for name, r in report["train_step"].items():
    vs = f"{r['median_s'] / ft['median_s']:.2f}" if ft else "-"
    gf = f"{r['achieved_flops_per_s'] / 1e9:.1f}" if r["achieved_flops_per_s"] else "-"
    frac = f"{r['fraction_of_matmul_peak']:.0%}" if r["fraction_of_matmul_peak"] else "-"
    xm = r["memory"]["xla"]
    lines.append(f"{name:<12} {r['median_s'] * 1e3:>9.1f} {r['examples_per_s']:>8.1f} "
                 f"{vs:>6} {gf:>8} {frac:>6} "
                 f"{(xm['peak_estimate'] / 2**20 if xm else float('nan')):>10.0f} "
                 f"{r['memory']['rss_peak_bytes'] / 2**20:>8.0f} {r['compile_s']:>9.1f}")
  b = report["backbone_forward"]
  lines += ["", f"backbone forward: {b['median_s'] * 1e3:.1f} ms, "
            f"{b['analytic_flops'] / 1e9:.2f} GFLOP analytic / "
            f"{(b['xla_flops'] or 0) / 1e9:.2f} GFLOP XLA, "
            f"{b['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s = "
            f"{b['fraction_of_matmul_peak']:.0%} of the matmul peak"]
  for dt, p in report["matmul_peak"].items():
    lines.append(f"matmul peak {dt} ({p['size']}^3): {p['flops_per_s'] / 1e9:.1f} GFLOP/s")
  for k, v in report["ratios"].items():
    lines.append(f"{k}: {v:.3f}")
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  report = run(args)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=1)
  print(table(report))
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
