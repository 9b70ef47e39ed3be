"""Merging pretrained weights into a model's parameter tree, with readable diffs.

Every loader in this package reads a flat `{"a/b/c": array}` dict from its
source, maps the names to our parameter tree, and calls `merge_params`, which
checks names, shapes and dtypes against the model's (abstract or concrete)
parameters and fails with one message listing every difference (the role of
big_vision's `models/common.py:merge_params`).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

Flat = dict[str, Any]


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model; `str(e)` lists every difference.

  Attributes:
    missing: names the model needs that the checkpoint lacks.
    unexpected: names the checkpoint has that the model does not use.
    shapes: `(name, checkpoint_shape, model_shape)` for mis-shaped arrays.
    dtypes: `(name, checkpoint_dtype, model_dtype)` for non-float arrays
      where the model wants floats (floats of any width are cast).
  """

  def __init__(self, source: str, missing: Sequence[str] = (),
               unexpected: Sequence[str] = (),
               shapes: Sequence[tuple[str, tuple, tuple]] = (),
               dtypes: Sequence[tuple[str, str, str]] = (), hint: str = ""):
    self.source = source
    self.missing = sorted(missing)
    self.unexpected = sorted(unexpected)
    self.shapes = sorted(shapes)
    self.dtypes = sorted(dtypes)
    lines = [f"checkpoint {source} does not match the model:"]
    if self.missing:
      lines.append(f"  missing in the checkpoint ({len(self.missing)}):")
      lines += [f"    {n}" for n in _clip(self.missing)]
    if self.unexpected:
      lines.append(f"  unexpected in the checkpoint ({len(self.unexpected)}):")
      lines += [f"    {n}" for n in _clip(self.unexpected)]
    if self.shapes:
      lines.append(f"  wrong shape ({len(self.shapes)}), checkpoint vs model:")
      lines += [f"    {n}: {tuple(a)} vs {tuple(b)}" for n, a, b in _clip(self.shapes)]
    if self.dtypes:
      lines.append(f"  wrong dtype ({len(self.dtypes)}), checkpoint vs model:")
      lines += [f"    {n}: {a} vs {b}" for n, a, b in _clip(self.dtypes)]
    if hint:
      lines.append(f"  hint: {hint}")
    super().__init__("\n".join(lines))


def _clip(items: list, n: int = 40) -> list:
  return items if len(items) <= n else items[:n] + [f"... and {len(items) - n} more"]


def abstract_params(module: nn.Module, *inputs: Any) -> dict:
  """The module's parameter shapes/dtypes without computing anything (unboxed)."""
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))
  return nn.meta.unbox(variables["params"])


def _is_float(dtype) -> bool:
  return bool(jnp.issubdtype(dtype, jnp.floating))


def merge_params(init_params: Mapping[str, Any], loaded: Mapping[str, Any], *,
                 source: str, dont_load: Sequence[str] = (),
                 ignore_unexpected: Callable[[str], bool] = lambda name: False,
                 hint: str = "") -> dict:
  """Returns `init_params` with every leaf replaced by its `loaded` value.

  Args:
    init_params: the model's parameters, concrete or abstract (from
      `jax.eval_shape`), boxed or not.
    loaded: flat `{"a/b/c": array}` from the checkpoint, already renamed and
      reshaped to our layout.
    source: names the checkpoint in error messages.
    dont_load: regexes of parameter names to keep from `init_params` (which
      must then be concrete there).
    ignore_unexpected: names in `loaded` that the model may lack silently.
    hint: appended to the error message.

  Returns:
    A nested dict of numpy arrays in the model's dtypes (host memory).

  Raises:
    CheckpointMismatchError: names missing or unexpected, shapes differ, or a
      non-float array where the model wants a float one.
  """
  want = traverse_util.flatten_dict(nn.meta.unbox(init_params), sep="/")
  keep = [re.compile(p) for p in dont_load]
  kept = {n for n in want if any(p.fullmatch(n) for p in keep)}
  missing = [n for n in want if n not in loaded and n not in kept]
  unexpected = [n for n in loaded if n not in want and not ignore_unexpected(n)]
  shapes, dtypes, out = [], [], {}
  for name, ref in want.items():
    if name in kept:
      if isinstance(ref, jax.ShapeDtypeStruct):
        raise ValueError(f"dont_load keeps {name}, but init_params holds no value for it")
      out[name] = np.asarray(ref)
      continue
    if name not in loaded:
      continue
    arr = loaded[name]
    if tuple(arr.shape) != tuple(ref.shape):
      shapes.append((name, tuple(arr.shape), tuple(ref.shape)))
    elif _is_float(ref.dtype) and not _is_float(arr.dtype):
      dtypes.append((name, str(np.dtype(arr.dtype)), str(np.dtype(ref.dtype))))
    else:
      out[name] = np.asarray(arr).astype(ref.dtype, copy=False)
  if missing or unexpected or shapes or dtypes:
    raise CheckpointMismatchError(source, missing, unexpected, shapes, dtypes, hint)
  return traverse_util.unflatten_dict(out, sep="/")
