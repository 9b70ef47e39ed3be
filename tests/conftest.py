"""Test configuration: CPU only, quiet TensorFlow, deterministic XLA, fresh caches.

`LEVI_CACHE_DIR` points at a new temporary folder for the whole session (and
every subprocess a test starts), so the suite never reads a world, vocabulary
or tap cache that an earlier run or another version of the code left behind.
"""

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
_CACHE = tempfile.mkdtemp(prefix="levi_test_cache_")
os.environ["LEVI_CACHE_DIR"] = _CACHE
# XLA's persistent compilation cache, fresh for the run and shared by its processes (the
# pytest-xdist workers inherit it from the process that starts them, as do the tests'
# subprocesses): the suite compiles the same small programs in many tests, and each is
# compiled once per run. Removed by the process that made it.
_XLA_CACHE_OWNER = "LEVI_TEST_XLA_CACHE" not in os.environ
if _XLA_CACHE_OWNER:
  os.environ["LEVI_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="levi_test_xla_")
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["LEVI_TEST_XLA_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
os.environ.pop("LEVI_DATA_DIR", None)
os.environ.pop("LEVI_VOCAB_PATH", None)


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
  """The data tests' small synthetic world (`world_fixtures.SMALL_WORLD`, seed 1), written once."""
  from world_fixtures import write_small_world  # pylint: disable=import-outside-toplevel

  return write_small_world(str(tmp_path_factory.mktemp("small_world")))


def pytest_sessionfinish(session, exitstatus):  # pylint: disable=unused-argument
  shutil.rmtree(_CACHE, ignore_errors=True)
  if _XLA_CACHE_OWNER:
    shutil.rmtree(os.environ["LEVI_TEST_XLA_CACHE"], ignore_errors=True)


# The longest files first, so that under `pytest -n 2 --dist loadfile` (make test)
# no long file starts last and runs alone at the end; a plain run is reordered the same way.
_LONGEST_FIRST = ("test_trainer.py", "test_experiments.py", "test_sharding.py",
                  "test_t5x_integration.py", "test_cli.py", "test_tap_cache.py", "test_models.py")


def pytest_collection_modifyitems(session, config, items):  # pylint: disable=unused-argument
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
