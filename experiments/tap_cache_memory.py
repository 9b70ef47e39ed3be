"""Host memory and speed of the tap cache on disk, at sizes no host could hold whole.

    python -m experiments.tap_cache_memory --rows 2000000 --width 128 \\
        --out experiments/results/tap_cache_memory/results.json

For each storage dtype (float32, bfloat16), a generated entry of `--rows`
rows of one `--width`-float tap is written through `tap_cache.write_npz` in
chunks of `--batch_size` rows (as the backbone's batches come), then read the
ways a run could read it: `DiskArray` (what `tap_cache.attach` hands the
trainer: two epochs of training batches in the trainer's order, then every
row once in evaluation batches), a memory map of the same bytes (`np.memmap`,
the same two epochs), and whole into memory (`np.load`, what the cache did
before). Each phase runs in a fresh process, so its peak RSS (VmHWM less the
RSS at its start, imports done) is its own; before each read phase the
entry's pages are dropped from the page cache (`posix_fadvise`, this file
only), so the first epoch reads from disk and the second from the page cache.
Reported: write throughput (rows/s, MB/s), disk bytes per row, peak RSS
growth while writing and reading, batch gather time (mean, median, p99) and
the phase's wall time. Results go to --out (JSON).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from levi_jax import cli
from levi_jax import input_pipeline, tap_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PHASES = ("write", "disk_array", "memmap", "load")


def status(field: str) -> int:
  """A /proc/self/status memory field in bytes (VmRSS, VmHWM)."""
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def drop_cached_pages(path: str):
  """Evicts the file's clean pages from the page cache (no other file is touched)."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
  finally:
    os.close(fd)


def gather_stats(seconds: list[float]) -> dict[str, float]:
  """Count, mean, median and p99 of batch gather times, in microseconds."""
  s = np.asarray(seconds) * 1e6
  return {"batches": len(s), "gather_us_mean": float(s.mean()),
          "gather_us_p50": float(np.median(s)), "gather_us_p99": float(np.percentile(s, 99))}


def run_phase(phase: str, path: str, rows: int, width: int, dtype: str, batch: int) -> dict:
  """One phase in this process; returns its measurements."""
  storage = tap_cache.STORAGE_DTYPES[dtype]
  shape = (rows, 1, width)
  order = np.random.default_rng([0, 0]).permutation(rows)  # the trainer's first epoch
  if phase == "write":
    base = np.random.default_rng(0).standard_normal((batch, 1, width)).astype(np.float32)

    def chunks():
      for start in range(0, rows, batch):
        yield (base + np.float32(start))[:rows - start]
  else:
    drop_cached_pages(path)
  rss0, t0 = status("VmRSS"), time.perf_counter()
  out: dict = {}
  if phase == "write":
    tap_cache.write_npz(path, {"key": "synthetic"}, "taps", shape, storage, chunks())
    seconds = time.perf_counter() - t0
    size = os.path.getsize(path)
    out.update(rows_per_s=rows / seconds, mb_per_s=size / seconds / 1e6,
               disk_bytes=size, disk_bytes_per_row=size / rows)
  elif phase in ("disk_array", "memmap"):
    taps = tap_cache.read_npz_array(path, "taps", storage)
    if phase == "memmap":
      taps = np.memmap(path, storage, "r", taps.offset, taps.shape)
    for epoch in ("train_epoch_cold", "train_epoch_warm"):  # the second from the page cache
      times = []
      for start in range(0, rows - batch + 1, batch):
        t = time.perf_counter()
        taps[order[start:start + batch]]
        times.append(time.perf_counter() - t)
      out[epoch] = gather_stats(times)
    if phase == "disk_array":  # then every row once, in order, as the evaluation reads it
      times, split = [], {"targets": np.zeros(rows, np.float32), "taps": taps}
      t = time.perf_counter()
      for b in input_pipeline.eval_batches(split, 4 * batch):
        times.append(time.perf_counter() - t)
        t = time.perf_counter()
      out.update(eval_pass=gather_stats(times))
  else:
    with np.load(path) as f:
      whole = f["taps"]
    out.update(loaded_bytes=int(whole.nbytes))
  out.update(seconds=time.perf_counter() - t0,
             peak_rss_growth_mb=(status("VmHWM") - rss0) / 1e6, rss_start_mb=rss0 / 1e6)
  return out


@dataclasses.dataclass(frozen=True)
class Settings:
  """The flags of the measurement."""

  rows: int = cli.field(500_000, "rows of the generated entry")
  width: int = cli.field(128, "floats per row")
  dtypes: tuple[str, ...] = cli.field(("float32", "bfloat16"), "storage dtypes")
  batch_size: int = cli.field(256, "rows per written chunk and per training batch")
  phases: tuple[str, ...] = cli.field(PHASES, f"of {','.join(PHASES)}")
  dir: str = cli.field("", "where the entries go (default: a temporary folder)")
  out: str = cli.field("", "JSON file to write ('' = none)")
  phase: str = cli.field("", "internal: run this one phase (in a subprocess)")
  path: str = cli.field("", "internal: the entry the phase reads or writes")


def main(args: Settings, command: str = "") -> dict | None:
  """Runs each dtype's phases, each in a fresh process; returns (and writes) the results."""
  if args.phase:
    dtype = args.dtypes[0]
    json.dump(run_phase(args.phase, args.path, args.rows, args.width, dtype, args.batch_size),
              sys.stdout)
    return None
  work = args.dir or tempfile.mkdtemp(prefix="tap_cache_memory-")
  os.makedirs(work, exist_ok=True)
  result = {"rows": args.rows, "width": args.width, "batch_size": args.batch_size,
            "command": command,
            "dtypes": {}}
  try:
    for dtype in args.dtypes:
      path = os.path.join(work, f"entry-{dtype}.npz")
      result["dtypes"][dtype] = phases = {
          "entry_bytes": args.rows * args.width * tap_cache.STORAGE_DTYPES[dtype].itemsize}
      for phase in args.phases:
        cmd = [sys.executable, "-m", "experiments.tap_cache_memory", "--phase", phase,
               "--path", path,
               "--rows", str(args.rows), "--width", str(args.width), "--dtypes", dtype,
               "--batch_size", str(args.batch_size)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if proc.returncode:
          raise RuntimeError(f"{phase} ({dtype}) failed:\n{proc.stderr}")
        phases[phase] = json.loads(proc.stdout)
        print(dtype, phase, json.dumps(phases[phase]), flush=True)
      os.remove(path)
  finally:
    if not args.dir:
      shutil.rmtree(work, ignore_errors=True)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  cli.main(Settings, main, "experiments.tap_cache_memory")
