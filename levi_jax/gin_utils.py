"""T5X-style gin command lines: `--gin_file=F ... --gin.NAME=VALUE ...`.

The core library is plain Python; gin binds the top-level `train(...)` and
the config dataclasses passed to it, with dynamic registration (gin files
`import levi_jax.trainer`): no levi_jax module uses `@gin.configurable`, so
importing one registers nothing with gin; a name becomes configurable when a
gin file imports its module. The gin files ship with the package
(`GIN_SEARCH_PATHS`). Parsing is gin's `parse_config_files_and_bindings`
(as T5X's `gin_utils.parse_gin_flags`), with errors that name the bad file
or binding and a check for misspelled macros.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Sequence

import gin
from absl import flags

from levi_jax.data import paths

# The gin files shipped with the package (the top-level gin/ of the source tree).
GIN_SEARCH_PATHS = (paths.shipped_dir("gin"),)


def define_flags():
  """Defines T5X's gin flags: --gin_file, --gin_bindings, --gin_search_paths."""
  flags.DEFINE_multi_string("gin_file", [], "Gin config files (searched in ./ and gin/).")
  flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, also as --gin.NAME=VALUE.")
  flags.DEFINE_multi_string("gin_search_paths", list(GIN_SEARCH_PATHS),
                            "Folders searched for --gin_file and gin includes.")


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
  """Turns `--gin.NAME=VALUE` into `--gin_bindings=NAME=VALUE` (as T5X does)."""
  out = []
  for arg in argv:
    if arg.startswith("--gin."):
      name, sep, value = arg[len("--gin."):].partition("=")
      if not sep:
        raise ValueError(f"gin flag {arg!r} has no value; write --gin.{name}=VALUE")
      out.append(f"--gin_bindings={name}={value}")
    else:
      out.append(arg)
  return out


def resolve_gin_file(name: str, search_paths: Sequence[str]) -> str:
  """The absolute path of a gin file given as is, or relative to ./ or a search path."""
  for base in ("", *search_paths):
    path = os.path.join(base, name)
    if os.path.isfile(path):
      return os.path.abspath(path)
  raise FileNotFoundError(f"gin file {name!r} not found (searched ./ and "
                          f"{', '.join(search_paths)})")


def parse(files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str]):
  """Parses gin files then bindings (`gin.parse_config_files_and_bindings`), checks, finalizes.

  Errors name the offending file (a missing file, or gin's "In file" location)
  or binding; a macro bound but read by nothing is an error (`unused_macros`).
  """
  for p in search_paths:
    gin.add_config_file_search_path(p)
  if not files:
    raise ValueError("no --gin_file given; e.g. --gin_file=runs/train.gin")
  resolved = [resolve_gin_file(f, search_paths) for f in files]
  # gin logs an error for each include (in a file or a binding) it first looks
  # for as a Python package resource before finding it on the search path; that
  # is noise. Real failures raise.
  root = logging.getLogger()
  level = root.level
  root.setLevel(logging.CRITICAL)
  try:
    try:
      gin.parse_config_files_and_bindings(resolved, bindings, finalize_config=False)
    except Exception:
      _raise_naming_bad_binding(resolved, bindings)
      raise
  finally:
    root.setLevel(level)
  unused = unused_macros()
  if unused:
    raise ValueError("gin macros bound but read by nothing (misspelled?): " + "; ".join(
        f"{m}" + (f" (did you mean {', '.join(c)}?)" if c else "") for m, c in unused.items()))
  gin.finalize()


def _raise_naming_bad_binding(files: Sequence[str], bindings: Sequence[str]):
  """After a failed parse: replays it one binding at a time to raise naming the bad one.

  gin's own message for the joined bindings gives a line number, and none at
  all for a tokenizer error (an unclosed bracket). A failure in the files
  raises from the replay as gin words it. Returns if the replay succeeds.
  """
  gin.clear_config()
  gin.parse_config_files_and_bindings(files, [], finalize_config=False)
  for b in bindings:
    try:
      gin.parse_config(b)
    except Exception as e:
      raise ValueError(f"bad gin binding {b!r}: {e}") from e


# Macros our Python reads with `gin.query_parameter` (not only gin bindings).
MACROS_READ_BY_CODE = frozenset({"MODEL_DIR", "CHECKPOINT_PATH", "INITIAL_CHECKPOINT_PATH",
                                 "DATA_DIR", "BATCH_SIZE", "TRAIN_STEPS"})


def _macro_refs(value, out: set[str]):
  if isinstance(value, gin.config.ConfigurableReference):
    if value.selector == "gin.macro":
      out.add(repr(value).lstrip("%"))
  elif isinstance(value, (list, tuple, set)):
    for v in value:
      _macro_refs(v, out)
  elif isinstance(value, dict):
    for v in value.values():
      _macro_refs(v, out)


def unused_macros(read_by_code=MACROS_READ_BY_CODE) -> dict[str, list[str]]:
  """Macros bound in the parsed config that nothing reads: {name: close matches}.

  A macro is read when a binding refers to it (`%NAME`, also from another
  macro) or the code queries it (`read_by_code`). A misspelled macro
  (`--gin.TRAIN_STEP=5`) is otherwise silently ignored.
  """
  import difflib
  bound, refs = set(), set()
  for (scope, selector), params in gin.config._CONFIG.items():  # pylint: disable=protected-access
    if selector == "gin.macro":
      bound.add(scope)
    for v in params.values():
      _macro_refs(v, refs)
  known = refs | set(read_by_code)
  return {m: difflib.get_close_matches(m, sorted(known), n=3)
          for m in sorted(bound - known)}


def call(fn: Callable, **kwargs):
  """Calls the gin-configured version of `fn`; names missing required bindings."""
  try:
    return gin.get_configurable(fn)(**kwargs)
  except RuntimeError as e:
    if "Required bindings" in str(e):
      raise ValueError(f"missing required gin binding: {e}") from None
    raise


def model_dir() -> str:
  """The MODEL_DIR macro every run config defines."""
  try:
    value = gin.query_parameter("%MODEL_DIR")
  except ValueError:
    raise ValueError("the gin config defines no MODEL_DIR macro; include runs/train.gin "
                     "or bind --gin.MODEL_DIR=\"'/path'\"") from None
  if not isinstance(value, str) or not value:
    raise ValueError(f"MODEL_DIR must be a non-empty string, got {value!r}; bind it with "
                     "--gin.MODEL_DIR=\"'/path/to/dir'\"")
  return value


def write_operative_config(model_dir: str, name: str = "config.gin", operative: bool = False):
  """Writes the gin config into MODEL_DIR (all bindings, or only the ones used)."""
  os.makedirs(model_dir, exist_ok=True)
  with open(os.path.join(model_dir, name), "w") as f:
    f.write(gin.operative_config_str() if operative else gin.config_str())
