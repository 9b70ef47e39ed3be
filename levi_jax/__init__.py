"""levi_jax: LEVI, a layer-wise ensemble of a frozen T5X encoder and a small task model."""

__version__ = "0.1.0"
