"""Where data comes from: the data dir convention and the cache dir.

A data dir is one of:

* a directory of raw files: either the dataset's own folder (`u.data`, ...) or
  a root holding one folder per dataset under its canonical name (`ml-100k/`,
  `ml-1m/`, `amazon_2018/`, `amazon_us/`, `pretrain/ml-100k/`), as
  `levi_jax.data.synthetic.write_world` lays out;
* `tfds` or `tfds:<TFDS data dir>`: MovieLens through TensorFlow Datasets;
* None: the `LEVI_DATA_DIR` environment variable if set, else the embedded
  default, a synthetic world generated on first use under the cache dir
  (`levi_jax.data.prepare.resolve_data_dir`).

The cache dir (trained vocabularies, the default world) is `LEVI_CACHE_DIR`,
else `~/.cache/levi_jax`. Every cache entry is keyed by what its content
depends on, the code that makes it included (`code_digest`), so an entry
written by other code is never read.

A leaf module: it imports nothing from levi_jax.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import os

# Files that ship inside the installed package (setup.py's SHIPPED), by the
# path the source tree and the gin files give them -> their folder in levi_jax/.
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_ROOT = os.path.dirname(PACKAGE_DIR)
SHIPPED = {"gin": "gin", "experiments/checkpoints/synthetic_t5_small": "demo_checkpoint"}


def shipped_dir(name: str) -> str:
  """The folder of a shipped file tree (`SHIPPED`) in this installation: inside
  the package (a `pip install .`), else in the source checkout (editable)."""
  inside = os.path.join(PACKAGE_DIR, SHIPPED[name])
  return inside if os.path.isdir(inside) else os.path.join(SOURCE_ROOT, name)


def shipped_path(path: str | None) -> str | None:
  """A path as gin files write it (relative to the source tree), found from any directory.

  As given if it exists from here or is absolute; else, if it is (inside) a
  shipped tree, that tree's copy in this installation (`shipped_dir`); else
  under the source checkout levi_jax was imported from; else unchanged (the
  reader's error then names it).
  """
  if not path or os.path.isabs(path) or os.path.exists(path) or "://" in path:
    return path
  norm = os.path.normpath(path)
  for name in SHIPPED:
    if norm == name or norm.startswith(name + os.sep):
      candidate = os.path.join(shipped_dir(name), os.path.relpath(norm, name))
      if os.path.exists(candidate):
        return os.path.normpath(candidate)
  candidate = os.path.join(SOURCE_ROOT, norm)
  return candidate if os.path.exists(candidate) else path


DATA_DIR_ENV = "LEVI_DATA_DIR"
CACHE_DIR_ENV = "LEVI_CACHE_DIR"
TFDS_PREFIX = "tfds"


def cache_dir() -> str:
  """The cache directory (created on demand by its users)."""
  return os.environ.get(CACHE_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache",
                                                       "levi_jax")


def explicit_data_dir(data_dir: str | None) -> str | None:
  """The data dir the argument or else `LEVI_DATA_DIR` names, absolute; None if neither does.

  None leaves the choice of the default (the synthetic world) to the caller.
  """
  data_dir = data_dir or os.environ.get(DATA_DIR_ENV)
  if not data_dir:
    return None
  return data_dir if is_tfds(data_dir) else os.path.abspath(os.path.expanduser(data_dir))


def is_tfds(data_dir: str) -> bool:
  return data_dir == TFDS_PREFIX or data_dir.startswith(TFDS_PREFIX + ":")


def tfds_data_dir(data_dir: str) -> str | None:
  """The TFDS data dir named by a `tfds[:DIR]` data dir (None: TFDS's default)."""
  rest = data_dir[len(TFDS_PREFIX) + 1:]
  return rest or None


def file_sha256(path: str) -> str:
  """sha256 of a file's bytes (read in chunks)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


@functools.lru_cache(maxsize=None)
def code_digest(modules: tuple[str, ...], packages: tuple[str, ...] = ()) -> str:
  """A digest of the source files of `modules` and the versions of `packages`.

  Part of every cache key: an entry made by other code (an edited generator, a
  new numpy) gets another key instead of being read back.
  """
  h = hashlib.sha256()
  for name in modules:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin:
      raise ValueError(f"code_digest: no source for module {name!r}")
    with open(spec.origin, "rb") as f:
      h.update(name.encode() + b"\0" + f.read() + b"\0")
  for name in packages:
    h.update(f"{name}=={importlib.metadata.version(name)}\0".encode())
  return h.hexdigest()[:16]
