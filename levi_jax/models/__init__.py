"""Flax linen models: the T5 encoder backbone, the small task networks, LEVI and baselines.

Importable without TensorFlow or seqio.
"""
