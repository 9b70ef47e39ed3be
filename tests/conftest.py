"""Test configuration: CPU only, quiet TensorFlow, deterministic XLA, a fresh cache.

`LEVI_CACHE_DIR` points at a new temporary folder for the whole session (and
every subprocess a test starts), so the suite never reads a world, vocabulary
or tap cache that an earlier run or another version of the code left behind.
"""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
_CACHE = tempfile.mkdtemp(prefix="levi_test_cache_")
os.environ["LEVI_CACHE_DIR"] = _CACHE
os.environ.pop("LEVI_DATA_DIR", None)
os.environ.pop("LEVI_VOCAB_PATH", None)


def pytest_sessionfinish(session, exitstatus):  # pylint: disable=unused-argument
  shutil.rmtree(_CACHE, ignore_errors=True)
