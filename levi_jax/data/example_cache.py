"""Examples on disk: a task parsed and tokenized once, then read a batch at a time.

`levi_jax.input_pipeline.load_task_data` holds every split in memory as numpy
arrays, built by parsing the raw files and tokenizing every row in each new
process. With an examples cache (`DataConfig.example_cache_dir`, or this
module's command), the first run writes each split's examples to disk and
every later run reads them from there:

    <cache_dir>/<task>/<digest>/manifest.json   the key, the features, the vocabulary size,
                                                every split's rows and per-field sha256
    <cache_dir>/<task>/<digest>/<split>.npz     `examples`: one record per row (`inputs`
                                                int32 [length], each feature, `targets`)

A split is written a chunk of rows at a time as it is tokenized
(`disk_array.write_npz`), and the entry (the folder) is renamed into place only
when every split is written, so an interrupted run leaves no entry. A run then
opens each split as a `DiskArray` of records: a batch reads its rows (one
`os.pread` per run of consecutive rows), a process's input shards are a view of
the split's rows (`disk_array.RowMap`), and nothing is parsed or tokenized, so
a run starts in seconds and its host memory does not grow with the data.

The key (`cache_key`, hashed into `<digest>`) holds everything the examples
depend on: the task, the data dir and its files' names, sizes and modification
times, the vocabulary file's sha256 (or "the task's own", which the data and
code determine), the `inputs` length, the duplicates policy and malformed-row
tolerance, the format and the source of the code that makes examples
(`paths.code_digest`). Another key is another entry: a stale one is never read.
The rows and their order are those of the in-memory arrays
(tests/test_example_cache.py checks batches, evaluation and resume against them).

Preprocess ahead of a run (e.g. once, on a shared mount, before a pod's hosts start):

    python -m levi_jax.data.example_cache --task=amazon_2018.time_later \\
        --data_dir=/data --cache_dir=/data/examples [--seq_length=64] [--vocabulary_path=F]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import resource
import shutil
import sys
import time
import zipfile
from typing import Any, Sequence

import numpy as np

from levi_jax import cli
from levi_jax.data import datasets, paths, prepare as prepare_lib, spm
from levi_jax.data.tokens import DEFAULT_INPUTS_LENGTH, tokenize, vocabulary_size
from levi_jax.disk_array import DiskArray, all_processes_have, read_npz_array, write_npz
from levi_jax.models.task_net import CategoricalFeature

log = logging.getLogger("levi_jax")

FORMAT = 1
MANIFEST = "manifest.json"
MEMBER = "examples"
CHUNK_ROWS = 1 << 15  # rows tokenized and written at a time
CODE_MODULES = (
    "levi_jax.data.datasets", "levi_jax.data.example_cache", "levi_jax.data.formats",
    "levi_jax.data.load_report", "levi_jax.data.prepare", "levi_jax.data.schema",
    "levi_jax.data.shifts", "levi_jax.data.spm", "levi_jax.data.synthetic",
    "levi_jax.data.table", "levi_jax.data.tokens", "levi_jax.data.wordpiece",
    "levi_jax.disk_array", "levi_jax.models.task_net")
CODE_PACKAGES = ("numpy", "sentencepiece")


@dataclasses.dataclass(frozen=True)
class Entry:
  """An entry on disk: its folder, manifest and each split's records (`DiskArray`)."""

  path: str
  manifest: dict[str, Any]
  splits: dict[str, DiskArray]

  @property
  def features(self) -> tuple[CategoricalFeature, ...]:
    return tuple(CategoricalFeature(**f) for f in self.manifest["features"])

  @property
  def vocab_size(self) -> int:
    return int(self.manifest["vocab_size"])

  @property
  def fields(self) -> list[str]:
    """The examples' feature names, in the in-memory arrays' order."""
    return list(self.manifest["fields"])


def cache_key(task: str, data_dir: str | None = None, vocabulary_file: str | None = None,
              inputs_length: int = DEFAULT_INPUTS_LENGTH,
              duplicates: str = datasets.DEFAULT_DUPLICATES,
              max_bad_fraction: float = datasets.DEFAULT_MAX_BAD_FRACTION) -> dict[str, Any]:
  """What the examples of `task` depend on (nothing is parsed to compute it).

  Raises:
    prepare.UnknownTaskError: no such task.
    FileNotFoundError: `vocabulary_file` does not exist.
  """
  spec, _ = prepare_lib.lookup_task(task)
  resolved = prepare_lib.resolve_data_dir(data_dir)
  explicit = vocabulary_file or os.environ.get(spm.VOCAB_ENV) or None
  if explicit and not os.path.isfile(explicit):
    raise FileNotFoundError(f"examples of {task}: vocabulary file {explicit} does not exist")
  return {
      "format": FORMAT, "task": task, "data_dir": resolved,
      "data_files": [list(f) for f in datasets.fingerprint(spec.name, resolved)],
      "vocabulary_sha256": paths.file_sha256(explicit) if explicit else "the task's own",
      "inputs_length": int(inputs_length), "duplicates": duplicates,
      "max_bad_fraction": float(max_bad_fraction),
      "code": paths.code_digest(CODE_MODULES, CODE_PACKAGES),
  }


def entry_path(cache_dir: str, key: dict[str, Any]) -> str:
  """The folder of `key`'s entry."""
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
  return os.path.join(cache_dir, key["task"].replace("/", "_"), digest)


def _records_dtype(fields: dict[str, np.ndarray]) -> np.dtype:
  return np.dtype([(k, v.dtype, v.shape[1:]) for k, v in fields.items()])


def _split_chunks(task: prepare_lib.PreparedTask, split: str, vocab: str, inputs_length: int,
                  dtype: np.dtype, digests: dict[str, Any], chunk_rows: int):
  """The split's records, `chunk_rows` at a time; feeds each field's bytes to `digests`."""
  n = len(task.rows(split))
  for start in range(0, n, chunk_rows):
    src = task.source_arrays(split, np.arange(start, min(start + chunk_rows, n)))
    fields = {"inputs": tokenize(src.pop("inputs"), vocab, inputs_length), **src}
    out = np.empty((len(fields["targets"]),), dtype)
    for k, v in fields.items():
      out[k] = v
    _hash_fields(digests, out)
    yield out


def _hash_fields(digests: dict[str, Any], records: np.ndarray) -> None:
  """Feeds each field of a chunk of records, row-major, to its digest (as written, as verified)."""
  for k, d in digests.items():
    d.update(np.ascontiguousarray(records[k]).reshape(-1).view(np.uint8))


def write(cache_dir: str, key: dict[str, Any], vocabulary_file: str | None = None,
          chunk_rows: int = CHUNK_ROWS) -> str:
  """Parses, splits and tokenizes the task of `key` into its entry; returns its folder.

  The table is parsed in memory (`prepare.prepare`); the tokens never are
  whole: each split is tokenized and written `chunk_rows` rows at a time.
  """
  t0 = time.time()
  path = entry_path(cache_dir, key)
  task = prepare_lib.prepare(key["task"], key["data_dir"], key["max_bad_fraction"],
                             key["duplicates"])
  vocab = prepare_lib.vocabulary_path(key["task"], task.data_dir, vocabulary_file,
                                      key["max_bad_fraction"])
  parsed_s = time.time() - t0
  probe = task.source_arrays("train", np.arange(min(1, len(task.rows("train")))))
  probe = {"inputs": np.zeros((1, key["inputs_length"]), np.int32), **{
      k: v for k, v in probe.items() if k != "inputs"}}
  dtype = _records_dtype(probe)
  tmp = f"{path}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  splits = {}
  try:
    for split in task.splits:
      digests = {k: hashlib.sha256() for k in dtype.names}
      n = len(task.rows(split))
      write_npz(os.path.join(tmp, f"{split}.npz"), {}, MEMBER, (n,), dtype,
                _split_chunks(task, split, vocab, key["inputs_length"], dtype, digests,
                              chunk_rows))
      splits[split] = {"rows": n, "sha256": {k: d.hexdigest() for k, d in digests.items()}}
    rows = sum(s["rows"] for s in splits.values())
    manifest = {
        "key": key, "fields": list(dtype.names), "splits": splits,
        "features": [dataclasses.asdict(f) for f in task.feature_specs],
        "vocab_size": vocabulary_size(vocab), "vocabulary_file": vocab,
        "record_bytes": dtype.itemsize,
        "written": {"seconds": round(time.time() - t0, 3), "parse_seconds": round(parsed_s, 3),
                    "rows": rows, "rows_per_second": round(rows / max(time.time() - t0, 1e-9)),
                    "peak_rss_mb": round(_peak_rss_mb(), 1)},
    }
    with open(os.path.join(tmp, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=1, sort_keys=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
      os.rename(tmp, path)
    except OSError:  # another writer got there first: theirs stands, it holds the same key
      if not os.path.isfile(os.path.join(path, MANIFEST)):
        raise
      shutil.rmtree(tmp, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  log.info("examples of %s: %d rows written to %s in %.1fs", key["task"],
           manifest["written"]["rows"], path, manifest["written"]["seconds"])
  return path


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def open_entry(path: str, key: dict[str, Any] | None = None) -> Entry | None:
  """The entry at `path`, or None if there is none (or it holds another key).

  Raises:
    ValueError: a split file is missing or not the size its manifest says.
  """
  try:
    with open(os.path.join(path, MANIFEST)) as f:
      manifest = json.load(f)
  except FileNotFoundError:
    return None
  if key is not None and manifest["key"] != key:
    log.warning("examples entry %s holds another key; rewriting it", path)
    return None
  splits = {}
  for split, info in manifest["splits"].items():
    file = os.path.join(path, f"{split}.npz")
    if not os.path.isfile(file):
      raise ValueError(f"examples entry {path}: {split}.npz is missing (delete the folder to "
                       "rewrite it)")
    try:
      records = read_npz_array(file, MEMBER)
    except (zipfile.BadZipFile, KeyError, ValueError) as e:
      raise ValueError(f"examples entry {path}: {split}.npz is damaged or truncated ({e}); "
                       "delete the folder to rewrite it") from None
    if len(records) != info["rows"] or records.dtype.itemsize != manifest["record_bytes"]:
      raise ValueError(f"examples entry {path}: {split}.npz holds {len(records)} records of "
                       f"{records.dtype.itemsize} bytes, its manifest says {info['rows']} of "
                       f"{manifest['record_bytes']} (delete the folder to rewrite it)")
    if os.path.getsize(file) < records.offset + records.nbytes:
      raise ValueError(f"examples entry {path}: {split}.npz is damaged or truncated (shorter "
                       "than its records); delete the folder to rewrite it")
    splits[split] = records
  return Entry(path, manifest, splits)


def verify(entry: Entry) -> None:
  """Re-hashes every field of every split against the manifest (reads every row).

  Raises:
    ValueError: naming the split and field whose bytes changed.
  """
  for split, records in entry.splits.items():
    digests = {k: hashlib.sha256() for k in entry.fields}
    for start in range(0, len(records), CHUNK_ROWS):
      _hash_fields(digests, records[start:start + CHUNK_ROWS])
    for k, d in digests.items():
      want = entry.manifest["splits"][split]["sha256"][k]
      if d.hexdigest() != want:
        raise ValueError(f"examples entry {entry.path}: split {split!r} field {k!r} has "
                         f"sha256 {d.hexdigest()}, its manifest says {want}")


def load(cache_dir: str, task: str, data_dir: str | None = None,
         vocabulary_file: str | None = None, inputs_length: int = DEFAULT_INPUTS_LENGTH,
         duplicates: str = datasets.DEFAULT_DUPLICATES,
         max_bad_fraction: float = datasets.DEFAULT_MAX_BAD_FRACTION) -> tuple[Entry, bool]:
  """The entry of the task's examples, written first when missing; (entry, hit).

  With several JAX processes, process 0 writes and the others wait for it
  (the cache folder must be visible to every process).
  """
  if inputs_length < 2:
    raise ValueError(f"inputs_length must be >= 2 (text plus EOS), got {inputs_length}")
  key = cache_key(task, data_dir, vocabulary_file, inputs_length, duplicates, max_bad_fraction)
  path = entry_path(cache_dir, key)
  if all_processes_have(os.path.join(path, MANIFEST)):
    entry = open_entry(path, key)
    if entry is not None:
      return entry, True
  jax = sys.modules.get("jax")
  multi = jax is not None and jax.process_count() > 1
  if not multi or jax.process_index() == 0:
    if os.path.isdir(path):
      shutil.rmtree(path)  # holds another key (a digest collision) or no manifest
    write(cache_dir, key, vocabulary_file)
    release_parsed()
  if multi:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"examples {task}")
  entry = open_entry(path, key)
  if entry is None:
    raise RuntimeError(f"examples entry {path} was not written")
  return entry, False


def release_parsed() -> None:
  """Drops the parsed tables this process holds (they were needed only to write)."""
  datasets.clear_cache()
  prepare_lib.clear_cache()


# --- Command line --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
  """Writes (or checks) the examples cache of a task."""

  task: str = cli.field(help="a registered task, e.g. amazon_2018.time_later")
  cache_dir: str = cli.field(help="the examples cache folder (DataConfig.example_cache_dir)")
  data_dir: str = cli.field("", "raw data folder ('' = LEVI_DATA_DIR, else the synthetic world)")
  seq_length: int = cli.field(DEFAULT_INPUTS_LENGTH, "`inputs` length in tokens")
  vocabulary_path: str = cli.field("", "vocabulary file ('' = the task's own)")
  duplicates: str = cli.field(datasets.DEFAULT_DUPLICATES, "keep, drop or error",
                              choices=("keep", "drop", "error"))
  verify: bool = cli.field(False, "re-hash every field of an existing entry")


def run(settings: Settings) -> Entry:
  entry, hit = load(settings.cache_dir, settings.task, settings.data_dir or None,
                    settings.vocabulary_path or None, settings.seq_length, settings.duplicates)
  if hit and settings.verify:
    verify(entry)
  m = entry.manifest
  rows = {k: v["rows"] for k, v in m["splits"].items()}
  size = sum(os.path.getsize(os.path.join(entry.path, f)) for f in os.listdir(entry.path))
  print(f"{settings.task}: {'found' if hit else 'written'} {entry.path}\n"
        f"  rows {rows}, {m['record_bytes']} bytes a record, {size / 1e6:.1f} MB on disk"
        + ("" if hit else f"\n  written in {m['written']['seconds']:.1f}s "
                          f"({m['written']['rows_per_second']:,} rows/s, parse "
                          f"{m['written']['parse_seconds']:.1f}s), peak RSS "
                          f"{m['written']['peak_rss_mb']:.0f} MB"))
  return entry


def main(argv: Sequence[str] | None = None) -> Entry | None:
  """The command line; `argv` (arguments without the program name) for a call from Python."""
  if argv is not None:
    return run(cli.parse(Settings, argv))
  cli.main(Settings, lambda settings, _: run(settings), "levi_jax.data.example_cache")
  return None


if __name__ == "__main__":
  main()
