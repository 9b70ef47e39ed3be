"""Sharding tests: 8 fake CPU devices, two processes, resharded checkpoints.

The device count is fixed when JAX starts, so `sharding_worker.py` runs the
sharded trainings in subprocesses (all launched at once, to use every core)
while this process computes the single-device reference.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import sharding_worker as worker
from levi_jax import partitioning
from levi_jax import input_pipeline
from levi_jax.data import synthetic

WORKER = os.path.join(os.path.dirname(__file__), "sharding_worker.py")
TIMEOUT_S = 900  # the 8-device workers share the cores with a second test worker
# Optimisation level 0 halves XLA's CPU compile time; results agree to 1e-6.
FAST_COMPILE = "--xla_backend_optimization_level=0"
TOL = dict(rtol=1e-5, atol=1e-5)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _spawn(args, devices: int) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}")
  return subprocess.Popen([sys.executable, WORKER, *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _wait(proc: subprocess.Popen, what: str):
  """Waits for a worker (once; later calls check the same exit) and checks it succeeded."""
  if not hasattr(proc, "output"):
    try:
      proc.output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.output, _ = proc.communicate()
      pytest.fail(f"{what} ran past {TIMEOUT_S}s:\n{proc.output[-3000:]}")
  assert proc.returncode == 0, f"{what} failed:\n{proc.output[-3000:]}"


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
  """Starts the 8-device runs and the two-process runs; kills them at the end.

  The same two `jax.distributed` processes train on meshes spanning them, then
  run `trainer.train` together (their outputs share one folder).
  """
  mesh_dir = tmp_path_factory.mktemp("meshes")
  mp_dir = tmp_path_factory.mktemp("multiprocess")
  world = str(tmp_path_factory.mktemp("world"))
  synthetic.write_world(world, num_users=80, num_items=40, pretrain_num_users=20,
                        pretrain_num_items=20, formats=("ml-100k",))
  input_pipeline.vocabulary_path(worker.TRAINER_TASK, world)  # trained once, before the processes
  port = _free_port()
  procs = {name: _spawn(["meshes", str(mesh_dir), "--method", name], devices=8)
           for name in worker.METHODS}
  for i in range(2):
    procs[f"process_{i}"] = _spawn(["distributed", str(mp_dir), "--data_dir", world,
                                    "--port", str(port), "--process_id", str(i),
                                    "--num_processes", "2"], devices=2)
  try:
    yield {"procs": procs, "meshes": mesh_dir, "multiprocess": mp_dir, "trainer": mp_dir,
           "world": world}
  finally:
    for proc in procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def reference(workers):
  """Single-device runs (one process, one device) of each method."""
  mesh = partitioning.make_mesh(partitioning.MeshConfig(1, 1), jax.devices()[:1])
  return {name: worker.run_training(name, mesh, partitioning.LOGICAL_RULES)[0]
          for name in worker.METHODS}


@pytest.fixture(scope="module")
def meshes(workers):
  """The 8-device runs' arrays and reports, merged over methods."""
  arrays, report = {}, {}
  for name in worker.METHODS:
    _wait(workers["procs"][name], f"8-device {name} worker")
    with open(workers["meshes"] / f"{name}.json") as f:
      report.update(json.load(f))
    arrays.update(np.load(workers["meshes"] / f"{name}.npz"))
  return arrays, report


def _assert_same(got: dict, want: dict, prefix: str):
  assert set(want) == {k[len(prefix):] for k in got if k.startswith(prefix)}
  for k, v in want.items():
    np.testing.assert_allclose(got[prefix + k], v, err_msg=prefix + k, **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("name", worker.METHODS)
@pytest.mark.parametrize("mesh", ["1x8", "2x4", "4x2", "8x1", "2x4_fsdp"])
def test_mesh_matches_single_device(meshes, reference, mesh, name):
  """Loss per step, first gradients, final parameters and eval sums, on 8 devices."""
  arrays, _ = meshes
  want = reference[name]
  assert len(want["loss"]) == worker.STEPS and want["loss"][-1] < want["loss"][0]
  assert want["eval/weight"] == worker.BATCH and want["eval/sq_err"] > 0
  _assert_same(arrays, want, f"{mesh}/{name}/")


@pytest.mark.slow
@pytest.mark.parametrize("name", worker.METHODS)
def test_fingerprint_is_the_same_on_every_mesh(meshes, name):
  """`tree_fingerprint` of sharded params: computed where the shards live, equal
  to the host copy's, and for the same values the same on every mesh as on one
  device."""
  arrays, report = meshes
  want = report[f"1x8/{name}"]["host_fingerprint"]
  for mesh in ["1x8", "2x4", "4x2", "8x1", "2x4_fsdp"]:
    assert report[f"{mesh}/{name}"]["host_fingerprint"] == want, mesh
    assert report[f"{mesh}/{name}"]["init_fingerprint"] == want, mesh
    assert bool(arrays[f"{mesh}/{name}/fingerprint_matches_host"]), mesh


@pytest.mark.slow
def test_a_batch_the_mesh_cannot_split_fails_before_anything_is_written(meshes):
  got = meshes[1]["bad_batch"]
  assert got["error"] and not got["written"], got
  assert "DataConfig.batch_size = 12 does not split over the mesh" in got["error"]
  assert "8 shards (8 devices, 1 processes); use a multiple of 8" in got["error"]


@pytest.mark.slow
def test_pretrained_backbone_goes_straight_into_its_shardings(meshes):
  """`put_backbone` on the 2x4 FSDP mesh: each device gets only its shard of a
  host weight. (CPU devices report no memory statistics, so the host reads
  stand in for peak device memory: no read is larger than one shard.)"""
  got = meshes[1]["put_backbone"]
  assert got["leaves"] > 5 and got["split_leaves"] >= got["leaves"] // 2, got
  assert got["sharding_kept"] and got["values_equal"] and got["reads_are_shards"], got


@pytest.mark.slow
def test_params_and_optimizer_state_are_created_sharded(meshes):
  layout = meshes[1]["2x4/levi"]["layout"]
  emb, kv, mlp = worker.CONFIG.emb_dim, 16, worker.CONFIG.mlp_dim
  query = layout["frozen/backbone/encoder/layers_0/attention/query/kernel"]
  assert query["spec"] == [None, "model"] and query["shard_shapes"] == [[emb, kv // 4]]
  wo = layout["frozen/backbone/encoder/layers_1/mlp/wo/kernel"]
  assert wo["spec"] == ["model", None] and wo["shard_shapes"] == [[mlp // 4, emb]]
  vocab = layout["frozen/backbone/token_embedder/embedding"]
  assert vocab["shard_shapes"] == [[worker.VOCAB // 4, emb]]
  # Trainable kernels and Adam's moments for them are split the same way.
  for tree in ("params", "mu"):
    assert layout[f"{tree}/task_net/mlp/dense_0/kernel"]["shard_shapes"] == [[16, 4]]
  # A 1-wide head is not divisible by the model axis: kept whole.
  assert layout["params/head/dense_1/kernel"]["spec"] == [None, None]
  fsdp = meshes[1]["2x4_fsdp/levi"]["layout"]
  assert fsdp["frozen/backbone/encoder/layers_0/attention/query/kernel"]["shard_shapes"] == [
      [emb // 2, kv // 4]]


@pytest.mark.slow
def test_activation_constraints_reach_the_lowered_step(meshes):
  counts = meshes[1]["2x4/levi"]["constraints"]
  assert counts["without_rules"] == 0
  # Per encoder layer: q, k, v, the MLP hidden state and the layer output.
  assert counts["with_rules"] >= 4 * worker.CONFIG.num_layers, counts


@pytest.mark.slow
@pytest.mark.parametrize("target", ["8x1", "1x1"])
def test_checkpoint_restores_under_another_mesh(meshes, target):
  arrays, report = meshes
  info = report[f"restored_{target}"]
  assert info["shardings_match"]
  assert info["devices"] == [int(np.prod([int(n) for n in target.split("x")]))]
  saved = {k[len("2x4/levi/"):]: v for k, v in arrays.items()
           if k.startswith("2x4/levi/param/")}
  assert saved
  for k, v in saved.items():
    np.testing.assert_array_equal(arrays[f"restored_{target}/levi/{k}"], v, err_msg=k)


@pytest.mark.slow
def test_two_processes_match_one(workers, reference):
  """Two jax.distributed processes, 2 CPU devices each, end where one does."""
  for i in range(2):
    _wait(workers["procs"][f"process_{i}"], f"process {i}")
  runs = [dict(np.load(workers["multiprocess"] / f"process_{i}.npz")) for i in range(2)]
  for run in runs:
    assert int(run["process_count"]) == 2 and int(run["device_count"]) == 4
  # 2x2: each process feeds its own half of the batch; 1x4: both feed all of it.
  assert [tuple(r["2x2/shard"]) for r in runs] == [(0, 2), (1, 2)]
  assert [tuple(r["1x4/shard"]) for r in runs] == [(0, 1), (0, 1)]
  for mesh in ("2x2", "1x4"):
    for k in runs[0]:
      if k.startswith(mesh + "/") and not k.endswith("/shard"):
        np.testing.assert_array_equal(runs[0][k], runs[1][k], err_msg=k)
    # The fingerprint of arrays no process holds whole (1x4: the model axis spans
    # both processes): each process computes the value of the host copy.
    assert str(runs[0][f"{mesh}/init_fingerprint"]) == str(runs[0]["2x2/host_fingerprint"])
    assert bool(runs[0][f"{mesh}/fingerprint_matches_host"]), mesh
    _assert_same({k: v for k, v in runs[0].items()
                  if not k.endswith(("/shard", "_fingerprint"))},
                 reference["levi"], f"{mesh}/")


@pytest.mark.slow
def test_trainer_two_processes_read_their_shards(workers, tmp_path):
  """`trainer.train` on two processes: each loads only its input shard of every
  split, and the run equals one process reading both shards (input_shards=2)."""
  for i in range(2):
    _wait(workers["procs"][f"process_{i}"], f"process {i}")
  runs = [json.load(open(workers["trainer"] / f"trainer_{i}.json")) for i in range(2)]
  one = worker.trainer_run(str(tmp_path / "one"), workers["world"], input_shards=2)
  sizes = one["input"]["split_rows"]
  assert one["input"]["process_rows"] == sizes and one["input"]["input_shards"] == 2
  for i, run in enumerate(runs):
    assert run["input"]["input_shards"] == 2 and run["input"]["processes"] == 2
    assert run["input"]["split_rows"] == sizes
    # Round-robin: process i holds rows i, i + 2, ... of every split, no more.
    assert run["input"]["process_rows"] == {k: len(range(i, n, 2)) for k, n in sizes.items()}
    assert run["tap_cache"]["used"] and run["tap_cache"]["misses"] == len(sizes)
    assert run["final_train_loss"] == pytest.approx(one["final_train_loss"], rel=1e-5)
    for split, m in one["metrics"].items():
      assert run["metrics"][split]["rmse"] == pytest.approx(m["rmse"], rel=1e-5), split
  assert runs[0]["metrics"] == runs[1]["metrics"]
  # Each process wrote the tap-cache entries of its own rows.
  entries = list((workers["trainer"] / "tap_cache").rglob("*.npz"))
  assert len([p for p in entries if "rows" not in p.parts]) == 2 * len(sizes)
  # ... and added its rows' taps to the row store (a part per process and split).
  assert len([p for p in entries if "rows" in p.parts]) == 2 * len(sizes)


@pytest.mark.parametrize("grid,expected", [
    ([[0, 0], [1, 1]], [(0, 2), (1, 2)]),           # a process per data row
    ([[0, 1]], [(0, 1), (0, 1)]),                   # the model axis spans processes
    ([[0], [0], [1], [1]], [(0, 2), (1, 2)]),       # two data rows per process
    ([[0, 1], [2, 3]], [(0, 2), (0, 2), (1, 2), (1, 2)]),
])
def test_process_shard(grid, expected):
  grid = np.asarray(grid)
  got = [partitioning.shard_of(grid, p) for p in range(grid.max() + 1)]
  assert got == expected


def test_process_shard_rejects_interleaved_rows():
  with pytest.raises(ValueError, match="non-contiguous"):
    partitioning.shard_of(np.asarray([[0], [1], [0], [1]]), 0)


def test_single_process_batch_helpers():
  mesh = partitioning.make_mesh(partitioning.MeshConfig(1, 1), jax.devices()[:1])
  assert partitioning.process_shard(mesh) == (0, 1)
  assert partitioning.local_batch_size(12, mesh) == 12
  assert partitioning.process_batch_slice(12, mesh) == slice(0, 12)
  batch = partitioning.global_batch({"x": np.arange(6).reshape(3, 2)}, mesh)
  assert batch["x"].shape == (3, 2) and batch["x"].sharding == partitioning.batch_sharding(mesh)
  with pytest.raises(ValueError, match="4x1"):
    partitioning.make_mesh(partitioning.MeshConfig(4, 1), jax.devices()[:1])
