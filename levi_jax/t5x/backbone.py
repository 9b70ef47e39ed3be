"""Backbone checkpoints for T5X runs: restoring T5 1.1 into LEVI, and exporting ours.

* `backbone_assignment_map(prefix)`: the `utils.RestoreCheckpointConfig`
  assignment map that restores a T5X T5 checkpoint (encoder-decoder, as T5X's
  public T5 1.1 checkpoints, or encoder only) into the backbone of a levi_jax
  method: `target/<prefix>/{token_embedder,encoder}/...` <- `target/
  {token_embedder,encoder}/...`; every other parameter of the method and the
  optimizer state come from `fallback_to_scratch`; the decoder is not read.
* `export(checkpoint, out)`: writes a levi_jax backbone tree (e.g. the demo's
  `synthetic_t5_small`) as a T5X checkpoint `out/checkpoint_0` that carries
  its vocabulary (`vocabulary.json` + the SentencePiece model, as
  `levi_jax.pretrained.checkpoint_vocabulary` reads), so a T5X run can use it
  as `INITIAL_CHECKPOINT_PATH`:

    python -m levi_jax.t5x.backbone --checkpoint=experiments/checkpoints/synthetic_t5_small \\
        --out=/tmp/synthetic_t5_small_t5x
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys

from levi_jax import checkpointing, cli, pretrained
from levi_jax.checkpoints import t5x as t5x_ckpt
from levi_jax.data import paths


def backbone_assignment_map(prefix: str = "backbone") -> tuple[tuple[str, str | None], ...]:
  """T5X assignment map: a T5 checkpoint's encoder into the method's backbone at `prefix`.

  Args:
    prefix: the backbone's '/'-joined path in the method's params ("backbone";
      "members_0/backbone" for the LP member of the ensemble).
  """
  if not re.fullmatch(r"[A-Za-z0-9_]+(/[A-Za-z0-9_]+)*", prefix):
    raise ValueError(f"backbone prefix {prefix!r}: expected a '/'-joined parameter path such "
                     "as 'backbone' or 'members_0/backbone'")
  return ((rf"target/{prefix}/(token_embedder|encoder)/(.*)", r"target/\1/\2"),
          (r"target/.*", None),              # the method's own parameters: fresh
          (r"state/param_states/.*", None))  # optimizer state: fresh


def export(checkpoint: str, out: str) -> str:
  """Writes the backbone tree at `checkpoint` as T5X checkpoint `out/checkpoint_0`.

  The vocabulary the tree carries goes with it (hash checked on read).

  Returns:
    The step directory written.

  Raises:
    ValueError: `checkpoint` holds no T5 encoder, or carries no vocabulary.
    FileExistsError: `out/checkpoint_0` exists (nothing is overwritten).
  """
  checkpoint = paths.shipped_path(checkpoint)
  vocab = pretrained.checkpoint_vocabulary(checkpoint)
  if vocab is None:
    raise ValueError(f"{checkpoint} carries no vocabulary (vocabulary.json); a T5X run needs "
                     "the one the backbone was trained with")
  tree = checkpointing.restore_tree(checkpoint)
  if "backbone" in tree and "token_embedder" not in tree:
    tree = tree["backbone"]
  if not {"token_embedder", "encoder"} <= set(tree):
    raise ValueError(f"{checkpoint} holds {sorted(tree)}, not a T5 encoder "
                     "(token_embedder, encoder)")
  target = os.path.join(os.path.abspath(out), "checkpoint_0")
  if os.path.exists(target):
    raise FileExistsError(f"{target} already exists; give another --out")
  step_dir = t5x_ckpt.save_t5x(tree, out, step=0)
  pretrained.attach_vocabulary(step_dir, vocab.path)
  return step_dir


@dataclasses.dataclass(frozen=True)
class Settings:
  """The flags of `python -m levi_jax.t5x.backbone`."""
  checkpoint: str = cli.field(help="a levi_jax backbone tree checkpoint")
  out: str = cli.field(help="the T5X model dir to write checkpoint_0 into")


def _export(settings: Settings) -> int:
  print(export(settings.checkpoint, settings.out))
  return 0


def main(argv: list[str] | None = None) -> int:
  """The command line; `argv` (arguments without the program name) for a call from Python."""
  if argv is not None:
    return _export(cli.parse(Settings, argv))
  cli.main(Settings, lambda settings, _: _export(settings), "levi_jax.t5x.backbone")
  return 0


if __name__ == "__main__":
  sys.exit(main())
