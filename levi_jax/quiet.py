"""TensorFlow without its start-up notes: our commands print our output only.

TensorFlow is used for data (seqio, TFDS, tensorflow-text) and TensorBoard
summaries, never for compute. Importing it prints C++ log lines on every
machine without a GPU ("oneDNN custom operations are on", "Could not find cuda
drivers", "failed call to cuInit", ...), which `TF_CPP_MIN_LOG_LEVEL` no longer
silences. `import_tensorflow` imports it with those lines dropped (anything
else it writes is passed through) and hides GPUs from it, as T5X does, so it
never claims accelerator memory that JAX needs. Modules that need TensorFlow
call it before their first `import seqio` / `import tensorflow`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Iterator, Sequence

NOISE = ("All log messages before absl::InitializeLog() is called",
         "oneDNN custom operations are on",
         "Could not find cuda drivers",
         "failed call to cuInit",
         "cpu_feature_guard.cc",
         "To enable the following instructions:",
         "Unable to register cu",
         "TF-TRT Warning")


@contextlib.contextmanager
def filtered_stderr(noise: Sequence[str] = NOISE) -> Iterator[None]:
  """Drops the lines matching `noise` that the block writes to file descriptor 2.

  C++ libraries write to the descriptor directly, so it is pointed at a
  temporary file for the block; on exit (also on an error) the lines that are
  not noise are written to the real stderr.
  """
  sys.stderr.flush()
  try:
    saved = os.dup(2)
  except OSError:  # no descriptor 2 (embedded interpreters): nothing to filter
    yield
    return
  with tempfile.TemporaryFile() as tmp:
    os.dup2(tmp.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      tmp.seek(0)
      text = tmp.read().decode("utf-8", errors="replace")
      kept = [line for line in text.splitlines(keepends=True)
              if not any(n in line for n in noise)]
      if kept:
        sys.stderr.write("".join(kept))
        sys.stderr.flush()


_READY = False


def import_tensorflow():
  """`tensorflow`, imported quietly and with GPUs hidden from it (once)."""
  global _READY
  if not _READY:
    with filtered_stderr():
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      try:
        tf.config.set_visible_devices([], "GPU")
      except RuntimeError:  # TensorFlow already ran something: too late, and harmless
        pass
    _READY = True
  return sys.modules["tensorflow"]
