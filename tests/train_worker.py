"""Runs a short training on the in-memory task (for the kill-and-resume test).

LEVI_STEP_DELAY seconds are spent fetching each batch, so the test can kill
the process mid-run.
"""

import os
import sys
import time

from trainer_fixtures import task_data

from levi_jax import input_pipeline, trainer  # noqa: E402
from levi_jax.checkpointing import CheckpointConfig  # noqa: E402
from levi_jax.optim import OptimizerConfig  # noqa: E402


def main(model_dir: str):
  delay = float(os.environ.get("LEVI_STEP_DELAY", "0"))
  indices = input_pipeline.batch_indices

  def slow_indices(*args, **kwargs):
    time.sleep(delay)
    return indices(*args, **kwargs)

  input_pipeline.batch_indices = slow_indices  # shard_batch_indices calls it by this name
  trainer.train(model_dir,
                model=trainer.ModelConfig(method="levi", adapter_dim=16, fusion_hidden=(16,),
                                          task_hidden=(16,), aux_heads=False),
                data=trainer.DataConfig(batch_size=16, eval_batch_size=32),
                optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=5),
                loop=trainer.LoopConfig(num_steps=30, log_every=5, eval_every=10),
                checkpoint=CheckpointConfig(every_steps=5, keep=2, async_save=True),
                task_data=task_data())


if __name__ == "__main__":
  main(sys.argv[1])
