"""Pretrained weights for the backbones: T5X checkpoints and Hugging Face folders.

Each loader reads only what the backbone needs, maps it to our parameter tree
and merges it into the model's (abstract) init with `merge_params`, failing
with a `CheckpointMismatchError` that lists every difference.
"""

from levi_jax.checkpoints.common import (CheckpointMismatchError, abstract_params,
                                         flatten, merge_params, unflatten)
from levi_jax.checkpoints.t5x import find_checkpoint, load_t5x, read_t5x, save_t5x
