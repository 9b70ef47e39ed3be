"""`make demo`: a short end-to-end LEVI forward/backward on random tokens.

Prints what it did. Superseded by the full main job once the trainer runs it.
"""

import time

import flax.linen as nn
import jax
import numpy as np

from levi_jax import methods, step
from levi_jax.models import t5_encoder as t5
from levi_jax.models.task_net import CategoricalFeature, FeatureTower
from levi_jax.optim import OptimizerConfig, make_optimizer


def main():
  rs = np.random.RandomState(0)
  feats = (CategoricalFeature("user_id", 100), CategoricalFeature("item_id", 200))
  batch = {"inputs": rs.randint(1, 512, (32, 32)).astype(np.int32),
           "user_id": rs.randint(2, 100, 32).astype(np.int32),
           "item_id": rs.randint(2, 200, 32).astype(np.int32),
           "targets": rs.uniform(1, 5, 32).astype(np.float32)}
  cfg = t5.preset("t5_1_1_small", vocab_size=512, num_layers=4)
  method = methods.make_method("levi", backbone=t5.T5Encoder(cfg), task_net=FeatureTower(feats))
  params = nn.meta.unbox(method.init(jax.random.PRNGKey(0), batch))
  opt = make_optimizer(OptimizerConfig(learning_rate=3e-3), 20)
  trainable, frozen = methods.partition(params, method.stages[0].frozen)
  state = step.TrainState.create(trainable, frozen, opt)
  train_step = jax.jit(step.make_train_step(method, opt, step.LossConfig()))
  print(f"LEVI around a randomly initialised T5 1.1 small-width backbone ({cfg.num_layers} layers), "
        f"{sum(x.size for x in jax.tree.leaves(trainable)):,} trainable / "
        f"{sum(x.size for x in jax.tree.leaves(params)):,} total params")
  t0 = time.time()
  for i in range(20):
    state, metrics = train_step(state, batch, jax.random.PRNGKey(1))
    if i % 5 == 0 or i == 19:
      print(f"step {i + 1:2d}  loss {float(metrics['loss']):.4f}")
  print(f"20 steps in {time.time() - t0:.1f}s (compile included)")


if __name__ == "__main__":
  main()
