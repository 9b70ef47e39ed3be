"""The small synthetic world of the data tests: sizes that keep every shift's splits non-empty."""

from levi_jax.data import synthetic

SMALL_WORLD = dict(num_users=150, num_items=90, ratings_per_user=14, pretrain_num_users=40,
                   pretrain_num_items=30, amazon_num_users=150, amazon_num_items=80,
                   amazon_ratings_per_user=8, vocab_size=300)


def write_small_world(path: str, seed: int = 1) -> str:
  """Writes the small world (every raw format) to `path`; returns `path`."""
  synthetic.write_world(path, seed=seed, **SMALL_WORLD)
  return path
