"""Train-step speed of LEVI against fine-tuning, next to the hardware's matmul peak.

    python -m experiments.benchmark --out bench.json
    python -m experiments.benchmark --preset t5_1_1_base --batch 64 --length 128 \\
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
  - donated buffers), the process RSS sampled while each step runs (every
  method's state is resident throughout), and the device allocator's peak
  over the whole run where the device reports one (GPU, TPU).

Every timing is kept raw in the JSON; reported figures are medians of
`--steps` timed rounds after `--warmup` rounds. A round runs every item
once (matmuls, backbone forward, each method's step), so background load on
a shared machine hits them alike; compilation is timed apart.
"""

from __future__ import annotations

import dataclasses
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
import jax
import jax.numpy as jnp
import numpy as np
import optax

from levi_jax import cli
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


@dataclasses.dataclass(frozen=True)
class Settings:
  """The flags of the benchmark."""

  out: str = cli.field(help="JSON file to write")
  preset: str = cli.field("t5_1_1_small", "backbone preset", choices=sorted(t5.PRESETS))
  num_layers: int | None = cli.field(None, "override the preset's")
  vocab_size: int | None = cli.field(None, "override the preset's")
  batch: int = cli.field(32, "batch size")
  length: int = cli.field(64, "sequence length")
  dtype: str = cli.field("float32", "compute dtype", choices=("float32", "bfloat16"))
  steps: int = cli.field(5, "timed runs (median reported)")
  warmup: int = cli.field(1, "untimed runs after compiling")
  methods: tuple[str, ...] = cli.field(METHODS, f"comma-separated subset of {','.join(METHODS)}")
  lora_rank: int = cli.field(8, "LoRA rank")
  mesh_model: int = cli.field(1, "model-axis size; the data axis takes the remaining devices")
  matmul_sizes: tuple[int, ...] = cli.field((), "sides of the square matmuls whose best median "
                                                "FLOP/s is the peak (default 1024,2048 on CPU; "
                                                "4096,8192 otherwise)")

  def __post_init__(self):
    unknown = set(self.methods) - set(METHODS)
    if unknown:
      raise ValueError(f"unknown methods {sorted(unknown)}; expected some of {METHODS}")
    if self.steps < 1 or self.warmup < 0:
      raise ValueError("--steps must be >= 1 and --warmup >= 0")


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


@dataclasses.dataclass
class Timed:
  """A compiled call to time, and what is reported about it."""

  name: str
  call: Callable[[], Any]
  info: dict[str, Any]
  times: list[float] = dataclasses.field(default_factory=list)
  rss_peak: int = 0
  last: Any = None


def measure(items: list[Timed], steps: int, warmup: int):
  """Times every item `steps` times, round-robin, after `warmup` untimed rounds.

  Interleaving puts every item under the same background load (a shared
  machine's noise hits all methods alike instead of whichever ran last).
  Each call is waited for; the process RSS is sampled during each.
  """
  for _ in range(warmup):
    for item in items:
      jax.block_until_ready(item.call())
  for _ in range(steps):
    for item in items:
      with RssSampler() as rss:
        t = time.perf_counter()
        item.last = jax.block_until_ready(item.call())
        item.times.append(time.perf_counter() - t)
      item.rss_peak = max(item.rss_peak, rss.peak)


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


def matmul(dtype: str, size: int) -> Timed:
  """One large square matrix product in `dtype` (the peak to compare against)."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(k1, (size, size), dtype)
  b = jax.random.normal(k2, (size, size), dtype)
  compiled = jax.jit(jnp.matmul).lower(a, b).compile()
  return Timed(f"matmul_{dtype}_{size}", lambda: compiled(a, b),
               {"dtype": dtype, "size": size, "flops": 2 * size ** 3})


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
      return step.create_train_state(trainable, frozen, self.optimizer)
    return partitioning.sharded_init(init, self.mesh, self.rules)

  def backbone_forward(self) -> Timed:
    """The pooled taps LEVI reads (the whole backbone runs), counted analytically and by XLA."""
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
    return Timed("backbone_forward", lambda: compiled(params, batch), {
        "analytic_flops": forward_flops(self.cfg, self.args.batch, self.args.length),
        "xla_flops": xla_flops(compiled), "compile_s": compile_s,
        "memory": {"xla": xla_memory(compiled)}})

  def train_step(self, name: str, cached_taps: np.ndarray | None) -> Timed:
    """One method's sharded, donated train step, compiled."""
    method = self.method(name)
    state, shardings = self.state(method)
    host = dict(self.host_batch)
    if name == "levi_cached":
      host[CACHED_TAPS] = cached_taps
    batch = partitioning.global_batch(host, self.mesh)
    train_step = step.make_train_step(method, step.LossConfig())
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
    return Timed(name, call, {
        "method": _METHOD_OF[name], "compile_s": compile_s, "xla_flops": xla_flops(compiled),
        "trainable_params": count(state.params), "frozen_params": count(state.frozen),
        "memory": {"xla": xla_memory(compiled)}})


def _summary(item: Timed, batch: int | None = None) -> dict[str, Any]:
  med = _median(item.times)
  out = dict(item.info, times_s=item.times, median_s=med)
  if batch:
    out["examples_per_s"] = batch / med
  if "memory" in out:
    out["memory"] = dict(out["memory"], rss_peak_bytes=item.rss_peak)
  return out


def run(args: Settings) -> dict[str, Any]:
  """The whole benchmark; returns what is written to `--out`."""
  load_before = os.getloadavg()
  bench = Bench(args)
  on_cpu = jax.devices()[0].platform == "cpu"
  sizes = args.matmul_sizes or ((1024, 2048) if on_cpu else (4096, 8192))
  matmuls = [matmul(dt, n) for dt in dict.fromkeys(("float32", args.dtype)) for n in sizes]
  backbone = bench.backbone_forward()
  cached_taps = np.asarray(backbone.call())
  steps = [bench.train_step(name, cached_taps) for name in args.methods]
  measure(matmuls + [backbone] + steps, args.steps, args.warmup)

  peaks = {}
  for item in matmuls:
    rate = item.info["flops"] / _median(item.times)
    runs = peaks.setdefault(item.info["dtype"], {"runs": []})["runs"]
    runs.append(dict(item.info, times_s=item.times, median_s=_median(item.times),
                     flops_per_s=rate))
    if rate > peaks[item.info["dtype"]].get("flops_per_s", 0):
      peaks[item.info["dtype"]].update(flops_per_s=rate, size=item.info["size"])
  peak = peaks[args.dtype]["flops_per_s"]
  fwd = _summary(backbone)
  fwd["achieved_flops_per_s"] = fwd["analytic_flops"] / fwd["median_s"]
  fwd["fraction_of_matmul_peak"] = fwd["achieved_flops_per_s"] / peak
  results = {}
  for item in steps:
    r = results[item.name] = _summary(item, args.batch)
    r["final_loss"] = float(item.last["loss"])
    r["achieved_flops_per_s"] = r["xla_flops"] / r["median_s"] if r["xla_flops"] else None
    r["fraction_of_matmul_peak"] = (r["achieved_flops_per_s"] / peak
                                    if r["achieved_flops_per_s"] else None)
  ratios = {f"{m}_step_over_ft_step": results[m]["median_s"] / results["ft"]["median_s"]
            for m in results if "ft" in results and m != "ft"}
  return {
      "machine": dict(machine_info(), load_average_before=load_before,
                      load_average_after=os.getloadavg(), device_memory=device_memory()),
      "config": {"preset": args.preset, "backbone": {
          k: str(v) if k == "dtype" else v for k, v in vars(bench.cfg).items()},
                 "batch": args.batch, "length": args.length, "dtype": args.dtype,
                 "steps": args.steps, "warmup": args.warmup, "lora_rank": args.lora_rank,
                 "mesh": dict(bench.mesh.shape), "methods": list(args.methods)},
      "matmul_peak": peaks,
      "backbone_forward": fwd,
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


def main(args: Settings, command: str = ""):
  """The command line's run: benchmarks, writes --out and prints the table."""
  del command
  report = run(args)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=1)
  print(table(report))
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  cli.main(Settings, main, "experiments.benchmark")
