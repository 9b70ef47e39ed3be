"""A tiny in-memory rating task for trainer tests (no files, no TensorFlow)."""

import numpy as np

from levi_jax.models.task_net import CategoricalFeature
from levi_jax.input_pipeline import TaskData

VOCAB = 40
# The T5 backbone of the trainer tests: t5_1_1_tiny's layout at toy width.
TINY_BACKBONE = {"emb_dim": 16, "num_heads": 2, "head_dim": 8, "mlp_dim": 32, "num_layers": 2}
FEATURES = (CategoricalFeature("user_id", 30), CategoricalFeature("item_id", 20),
            CategoricalFeature("genres", 8, bag_size=3))


def rows(n: int, seed: int, shift: float = 0.0) -> dict:
  rs = np.random.RandomState(seed)
  user = rs.randint(2, 30, n).astype(np.int32)
  item = rs.randint(2, 20, n).astype(np.int32)
  genres = rs.randint(0, 8, (n, 3)).astype(np.int32)
  tokens = np.zeros((n, 10), np.int32)
  tokens[:, 0] = 2 + user % 10
  tokens[:, 1] = 12 + item % 10
  tokens[:, 2:5] = 22 + genres
  target = 3.0 + 0.8 * np.sin(user) + 0.6 * np.cos(item) + shift + 0.1 * rs.randn(n)
  return {"inputs": tokens, "user_id": user, "item_id": item, "genres": genres,
          "targets": target.astype(np.float32)}


def task_data(n: int = 256) -> TaskData:
  return TaskData(train=rows(n, 0), evals={"id_test": rows(64, 1),
                                           "ood_test": rows(64, 2, shift=0.5)},
                  features=FEATURES, vocab_size=VOCAB)
