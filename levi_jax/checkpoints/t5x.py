"""Read and write T5X checkpoints: the encoder half, without the rest.

T5X writes two formats, both read here:

* Legacy (`t5x.checkpoints.Checkpointer`): `checkpoint_{step}/checkpoint` is a
  msgpack file `{"version": 3, "optimizer": {"target": ..., "state": ...}}`.
  Each leaf is either an inline array (flax's msgpack encoding; T5X inlines
  unpartitioned leaves) or a tensorstore spec (a dict with `driver`, `kvstore`,
  `metadata`) pointing at a zarr array in a sibling directory named by the
  dotted path, e.g. `target.encoder.layers_0.mlp.wo.kernel/`. Arrays may be
  bfloat16 (`save_dtype`) and chunked by partition.
* Orbax (`t5x.checkpoints.OrbaxCheckpointManagerInterface`):
  `checkpoint_{step}/state/` is an orbax PyTree checkpoint (OCDBT) of the same
  state dict.

Only `target/token_embedder` and `target/encoder` are read. The msgpack file is
walked as a stream: other subtrees' inline values are skipped without being
decoded, and their tensorstore arrays are never opened, so the decoder and the
optimizer state cost no memory (orbax is asked for the encoder arrays only).

`save_t5x` writes a backbone in the legacy format, which T5X's `Checkpointer`,
`load_t5x_checkpoint` and `OrbaxCheckpointManagerInterface` all read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from typing import Any, Mapping, Sequence

import flax.linen as nn
from flax import traverse_util
import jax.numpy as jnp
import msgpack
import numpy as np
import tensorstore as ts

from levi_jax.checkpoints import msgpack_stream
from levi_jax.checkpoints.common import CheckpointMismatchError, Flat, merge_params
from levi_jax.checkpoints.msgpack_stream import is_ts_spec

# The subtrees of T5X's `target` that `T5Encoder` holds.
ENCODER_PREFIXES = ("target/token_embedder/", "target/encoder/")
_MSGPACK_FILE = "checkpoint"
_ORBAX_METADATA = "_METADATA"
_T5X_VERSION = 3


def find_checkpoint(path: str, step: int | None = None) -> tuple[str, str]:
  """Locates a T5X checkpoint and tells its format.

  Args:
    path: a model dir holding `checkpoint_{step}` dirs, one such step dir, or
      the legacy msgpack `checkpoint` file itself.
    step: which step, for a model dir (default: the latest).

  Returns:
    `("legacy", msgpack_file)` or `("orbax", state_dir)`.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.isfile(path):
    return "legacy", path
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no T5X checkpoint at {path}")
  steps = sorted(int(m.group(1)) for d in os.listdir(path)
                 if (m := re.fullmatch(r"checkpoint_(\d+)", d)))
  if steps and not _looks_like_step_dir(path):
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise FileNotFoundError(f"no checkpoint_{step} in {path}; steps there: {steps}")
    path = os.path.join(path, f"checkpoint_{step}")
  for d in (os.path.join(path, "state"), path):
    if os.path.isfile(os.path.join(d, _ORBAX_METADATA)):
      return "orbax", d
    if os.path.isfile(os.path.join(d, _MSGPACK_FILE)):
      return "legacy", os.path.join(d, _MSGPACK_FILE)
  raise FileNotFoundError(
      f"{path} is not a T5X checkpoint: expected a `checkpoint` msgpack file "
      f"or an orbax `state/{_ORBAX_METADATA}`, or checkpoint_<step> dirs")


def _looks_like_step_dir(path: str) -> bool:
  return any(os.path.exists(os.path.join(path, f))
             for f in (_MSGPACK_FILE, "state", _ORBAX_METADATA))


def read_t5x(path: str, step: int | None = None,
             prefixes: Sequence[str] = ENCODER_PREFIXES) -> tuple[Flat, list[str]]:
  """Reads the arrays under `prefixes` from a T5X checkpoint.

  Args:
    path: see `find_checkpoint`.
    step: see `find_checkpoint`.
    prefixes: '/'-joined name prefixes to read, relative to T5X's state dict
      (`target/...` for parameters, `state/...` for optimizer state).

  Returns:
    `(arrays, names)`: `{name: np.ndarray}` for the names under `prefixes` (in
    the checkpoint's dtype, e.g. bfloat16), and every name in the checkpoint.
  """
  fmt, where = find_checkpoint(path, step)
  if fmt == "orbax":
    return _read_orbax(where, prefixes)
  return _read_legacy(where, prefixes)


def _strip_optimizer(flat: Flat, names: list[str]) -> tuple[Flat, list[str]]:
  """Drops the top-level `optimizer/` of version >= 1 files (T5X's layout)."""
  if any(n.startswith("optimizer/") for n in names):
    cut = lambda n: n[len("optimizer/"):]
    return ({cut(k): v for k, v in flat.items() if k.startswith("optimizer/")},
            [cut(n) for n in names if n.startswith("optimizer/")])
  return flat, [n for n in names if n != "version"]


def _read_legacy(file: str, prefixes: Sequence[str]) -> tuple[Flat, list[str]]:
  """Reads a legacy T5X checkpoint's arrays under `prefixes`."""
  wanted, names = msgpack_stream.read(file, ["optimizer/" + p for p in prefixes]
                                      + list(prefixes))
  wanted, names = _strip_optimizer(wanted, names)
  wanted = {k: v for k, v in wanted.items() if msgpack_stream.wanted(k, prefixes)}
  ckpt_dir = os.path.dirname(file)
  specs = {k: _absolute_spec(v, ckpt_dir) for k, v in wanted.items() if is_ts_spec(v)}
  opened = {k: ts.open(s, open=True, read=True) for k, s in specs.items()}
  reads = {k: f.result().read() for k, f in opened.items()}
  out = {k: np.asarray(v) for k, v in wanted.items() if k not in specs}
  out.update({k: np.asarray(f.result()) for k, f in reads.items()})
  return out, names


def _absolute_spec(spec: Mapping[str, Any], ckpt_dir: str) -> dict:
  """A T5X spec (relative path; file, gfile or gcs driver) -> a local file spec."""
  spec = json.loads(json.dumps(spec))
  # Let the zarr metadata on disk decide chunking and compression (as T5X).
  for k in ("chunks", "compressor"):
    spec.get("metadata", {}).pop(k, None)
  kv = spec["kvstore"]
  if isinstance(kv, str):
    kv = {"driver": "file", "path": kv}
  rel = kv.get("path", spec.pop("path", None))
  if rel is None:
    raise ValueError(f"tensorstore spec without a path in {ckpt_dir}: {spec}")
  spec["kvstore"] = {"driver": "file", "path": os.path.join(ckpt_dir, rel)}
  return spec


def _read_orbax(state_dir: str, prefixes: Sequence[str]) -> tuple[Flat, list[str]]:
  """Reads an orbax PyTree checkpoint's arrays under `prefixes` (only those)."""
  import orbax.checkpoint as ocp  # Heavy import, only needed for this format.

  with open(os.path.join(state_dir, _ORBAX_METADATA)) as f:
    meta = json.load(f)
  names = ["/".join(str(k["key"]) for k in e["key_metadata"])
           for e in meta["tree_metadata"].values()]
  wanted = [n for n in names if msgpack_stream.wanted(n, prefixes)]
  if not wanted:
    return {}, names
  # Placeholder leaves: orbax reads the stored shape and dtype.
  item = traverse_util.unflatten_dict({n: 0 for n in wanted}, sep="/")
  restore_args = traverse_util.unflatten_dict(
      {n: ocp.RestoreArgs(restore_type=np.ndarray) for n in wanted}, sep="/")
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
    restored = ckptr.restore(os.path.abspath(state_dir), args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
  return {k: np.asarray(v)
          for k, v in traverse_util.flatten_dict(restored, sep="/").items()}, names


def _describe(names: Sequence[str]) -> str:
  """A hint about what a checkpoint holds, for mismatch messages."""
  tops = sorted({"/".join(n.split("/")[:2]) for n in names if n.startswith("target/")})
  layers = {m.group(1) for n in names
            if (m := re.match(r"target/encoder/(layers_\d+)/", n))}
  return (f"the checkpoint's target holds {tops or 'nothing'}"
          + (f", {len(layers)} encoder layers" if layers else ""))


def load_t5x(init_params: Mapping[str, Any], path: str, *, step: int | None = None,
             dont_load: Sequence[str] = ()) -> dict:
  """Restores a T5X checkpoint's encoder into `T5Encoder` parameters.

  Args:
    init_params: `T5Encoder` params, concrete or abstract
      (`common.abstract_params(T5Encoder(cfg), tokens)`); they fix the expected
      names, shapes and dtypes (bfloat16 checkpoints are cast to these).
    path: a T5X model dir, step dir or `checkpoint` file, either format.
    step: the step for a model dir (default: latest).
    dont_load: regexes of our parameter names to keep from `init_params`.

  Returns:
    `{"token_embedder": ..., "encoder": ...}` of numpy arrays.

  Raises:
    CheckpointMismatchError: listing missing, unexpected, mis-shaped and
      wrongly typed arrays (also for a decoder-only checkpoint).
  """
  arrays, names = read_t5x(path, step)
  source = f"T5X checkpoint {path}"
  if not arrays:
    hint = _describe(names)
    if any(n.startswith("target/decoder/") for n in names):
      hint = "a decoder-only checkpoint has no encoder to restore; " + hint
    want = traverse_util.flatten_dict(nn.meta.unbox(init_params), sep="/")
    raise CheckpointMismatchError(source, missing=["target/" + n for n in want], hint=hint)
  loaded = {k[len("target/"):]: v for k, v in arrays.items()}
  return merge_params(init_params, loaded, source=source, dont_load=dont_load,
                      hint=_describe(names))


def _chunk_shape(shape: Sequence[int], itemsize: int,
                 target_bytes: int = 64 * 2**20) -> list[int]:
  """T5X's `_choose_chunk_shape`: halve the largest divisor until under 64 MiB."""
  factors = [[i for i in range(1, s + 1) if s % i == 0] for s in shape]
  while np.prod([f[-1] for f in factors]) * itemsize > target_bytes:
    i = int(np.argmax([f[-1] for f in factors]))
    factors[i].pop()
  return [f[-1] for f in factors]


def save_t5x(params: Mapping[str, Any], model_dir: str, step: int = 0, *,
             dtype: Any = jnp.float32) -> str:
  """Writes `T5Encoder` params as a legacy T5X checkpoint `checkpoint_{step}`.

  The file holds `target/{token_embedder,encoder}` and `state/step` (no
  optimizer state); T5X restores it with `load_t5x_checkpoint`, or with a
  `Checkpointer` given a `fallback_state` for the decoder and optimizer.

  Args:
    params: `{"token_embedder": ..., "encoder": ...}` (boxed or plain arrays).
    model_dir: where `checkpoint_{step}` goes (created; must not exist yet).
    step: the step number in the directory name and in `state/step`.
    dtype: the stored dtype of the arrays (T5X's `save_dtype`).

  Returns:
    The step directory.
  """
  flat = traverse_util.flatten_dict(nn.meta.unbox(params), sep="/")
  if not any(k.startswith(("encoder/", "token_embedder/")) for k in flat):
    raise ValueError(f"save_t5x expects T5Encoder params, got names {sorted(flat)[:5]}")
  final = os.path.join(os.path.abspath(model_dir), f"checkpoint_{step}")
  if os.path.exists(final):
    raise FileExistsError(f"{final} already exists")
  tmp = f"{final}.tmp-{int(time.time())}"
  os.makedirs(tmp)
  dtype = jnp.dtype(dtype)
  target: Flat = {}
  writes = []
  for name, value in sorted(flat.items()):
    arr = np.asarray(value).astype(dtype)
    rel = f"target.{name.replace('/', '.')}"
    spec = {"driver": "zarr", "dtype": dtype.name,
            "kvstore": {"driver": "file", "path": rel},
            "metadata": {"compressor": {"id": "gzip"}, "shape": list(arr.shape),
                         "chunks": _chunk_shape(arr.shape, dtype.itemsize)}}
    local = dict(spec, kvstore={"driver": "file", "path": os.path.join(tmp, rel)})
    store = ts.open(local, create=True, open=True).result()
    writes.append(store.write(arr))
    target[name] = spec
  for w in writes:
    w.result()
  contents = {"version": _T5X_VERSION,
              "optimizer": {"target": traverse_util.unflatten_dict(target, sep="/"),
                            "state": {"step": np.int32(step)}}}
  with open(os.path.join(tmp, _MSGPACK_FILE), "wb") as f:
    f.write(msgpack.packb(contents, default=msgpack_stream.ext_pack, strict_types=True))
  if os.path.exists(final):
    shutil.rmtree(tmp)
    raise FileExistsError(f"{final} appeared while writing")
  os.rename(tmp, final)
  return final
