"""LEVI under T5X's own trainer: `python -m t5x.train` / `t5x.eval` with levi_jax's gin files.

Importable only where t5x is (it is on no package registry: install it from its
repository, see README "Run under T5X"); everything else in levi_jax works
without it.

* `levi_jax.t5x.models.LeviT5XModel`: a `t5x.models.BaseModel` for every
  method whose training is one T5X run (levi, levi_ft, levi_lora, ft, lp,
  lora, scratch, ensemble), reading the seqio Tasks of `levi_jax.data.tasks`.
* `levi_jax.t5x.export_backbone`: writes a levi_jax backbone (e.g. the demo's)
  as a T5X checkpoint that carries its vocabulary, for `INITIAL_CHECKPOINT_PATH`.
* gin files: `gin/t5x/` (shipped with the package; `levi_jax.t5x.GIN_DIR`).
"""

from levi_jax.data import paths as _paths

try:
  import t5x as _t5x  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised where t5x is missing
  raise ImportError(
      "levi_jax.t5x needs t5x, which is on no package registry: clone "
      "https://github.com/google-research/t5x, put it on PYTHONPATH (with airio and "
      "jestimator) and `pip install 'levi_jax[t5x]'` for its PyPI dependencies "
      f"(README, 'Run under T5X'). Import failed with: {e}") from e

# The folder to pass to T5X's --gin_search_paths: it holds t5x/*.gin.
GIN_DIR = _paths.shipped_dir("gin")
