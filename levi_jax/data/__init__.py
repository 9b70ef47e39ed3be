"""Recommendation data for LEVI: MovieLens and Amazon Reviews under distribution shift.

Layout (each module documents its part):

* `formats`: parsers of the publishers' raw files; `tfds_source`: MovieLens via TFDS.
* `table`: the relational `RatingsTable` every source is parsed into.
* `datasets`: the dataset specs (files, text serialization, categorical features).
* `shifts`: the shifts, declared as data, and the splits they induce.
* `pipeline`: task names, feature vocabularies and numpy arrays of whole splits.
* `spm`: SentencePiece vocabularies; `paths`: data and cache directories.
* `synthetic`: the synthetic world with planted spurious features.
* `tasks`: the seqio Tasks and feature converter (imports TensorFlow).
* `inspect`: `python -m levi_jax.data.inspect --list | --task NAME`.

Names below are imported lazily, so `import levi_jax.data` is cheap and only
`tasks` (or the TFDS source) brings in TensorFlow.
"""

import importlib
from typing import Any

_EXPORTS = {
    "DATASETS": "datasets", "DatasetSpec": "datasets", "FeatureDef": "datasets",
    "load_table": "datasets",
    "SHIFTS": "shifts", "SPLITS": "shifts", "Shift": "shifts", "Clause": "shifts",
    "split_rows": "shifts",
    "task_names": "pipeline", "lookup_task": "pipeline", "prepare": "pipeline",
    "feature_specs": "pipeline", "load_split_arrays": "pipeline",
    "vocabulary_path": "pipeline", "vocabulary_size": "pipeline",
    "UnknownTaskError": "pipeline",
    "MalformedDataError": "report", "MissingFilesError": "report",
    "RatingsTable": "table",
    "WorldConfig": "synthetic", "write_world": "synthetic",
    "ensure_default_world": "synthetic",
    "register_tasks": "tasks", "RatingFeatureConverter": "tasks", "get_dataset": "tasks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(list(globals()) + __all__)
