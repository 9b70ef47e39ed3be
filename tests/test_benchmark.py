"""`experiments.benchmark` on a tiny backbone: runs without TensorFlow, reports sane numbers."""

import json
import os
import subprocess
import sys

import pytest

from experiments import benchmark
from levi_jax import cli
from levi_jax.models import t5_encoder as t5

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_tiny_benchmark_runs_without_tensorflow(tmp_path):
  out = tmp_path / "bench.json"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.benchmark", "--out", str(out), "--preset", "t5_1_1_tiny",
       "--vocab_size", "128", "--batch", "8", "--length", "16", "--steps", "2",
       "--matmul_sizes", "128"],
      env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0"),
      capture_output=True, text=True, timeout=240, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert not report["tensorflow_imported"]
  assert set(report) >= {"machine", "config", "matmul_peak", "backbone_forward", "train_step",
                         "ratios", "targets"}
  assert report["machine"]["platform"] == "cpu" and report["machine"]["cpu_count"] > 0
  assert report["matmul_peak"]["float32"]["flops_per_s"] > 0
  b = report["backbone_forward"]
  assert b["analytic_flops"] == benchmark.forward_flops(
      t5.preset("t5_1_1_tiny", vocab_size=128), 8, 16)
  assert b["xla_flops"] > 0 and b["fraction_of_matmul_peak"] > 0
  assert len(b["times_s"]) == 2 and min(b["times_s"]) > 0
  assert list(report["train_step"]) == list(benchmark.METHODS)
  for name, r in report["train_step"].items():
    assert len(r["times_s"]) == 2 and min(r["times_s"]) > 0, name
    assert r["examples_per_s"] > 0 and r["compile_s"] > 0, name
    assert r["memory"]["xla"]["peak_estimate"] > 0 and r["memory"]["rss_peak_bytes"] > 0, name
  steps = report["train_step"]
  # FT trains the backbone LEVI freezes, plus its linear head (emb_dim + 1).
  assert steps["ft"]["frozen_params"] == 0 and steps["levi"]["frozen_params"] > 0
  assert steps["ft"]["trainable_params"] - steps["levi"]["frozen_params"] == 8 + 1
  assert set(report["ratios"]) == {f"{m}_step_over_ft_step" for m in benchmark.METHODS
                                   if m != "ft"}
  assert "levi" in proc.stdout and "matmul peak" in proc.stdout


def test_forward_flops_formula():
  """The hand count for T5 1.1 small at 32 x 64 tokens (2 per multiply-add)."""
  cfg = t5.preset("t5_1_1_small")
  tokens, d, hk, f = 32 * 64, 512, 6 * 64, 1024
  per_layer = (2 * tokens * d * hk * 4 + 2 * 2 * 32 * 6 * 64 * 64 * 64
               + 2 * tokens * d * f * 3)
  assert benchmark.forward_flops(cfg, 32, 64) == 8 * per_layer + 2 * 6 * 32 * 64 * 64
  one_hot = cfg.replace(one_hot_embedding=True)
  assert (benchmark.forward_flops(one_hot, 32, 64) - benchmark.forward_flops(cfg, 32, 64)
          == 2 * tokens * cfg.vocab_size * d)


def test_unknown_method_is_rejected():
  with pytest.raises(ValueError, match="fft"):
    cli.parse(benchmark.Settings, ["--out", "x.json", "--methods", "levi,fft"])


def test_imports_without_gin_seqio_or_tensorflow():
  """The GPU machine it runs on has jax, flax, optax and orbax only."""
  code = ("import sys; import experiments.benchmark; "
          "print(sorted({m.split('.')[0] for m in sys.modules} & {'gin', 'seqio', 'tensorflow'}))")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=120, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == "[]"
