"""Command lines: absl flags declared by a settings dataclass, one style for every command.

Each command (`python -m levi_jax.<name>`, `python -m experiments.<name>`)
takes one frozen dataclass; every field is a flag of the same name, default
and help (`field`), so the settings and the flags cannot drift. Gin files and bindings are given as to
`levi_jax.train`: `--gin_file=F` (repeatable) and `--gin.NAME=VALUE`
(`gin_utils.rewrite_gin_args`; a field named `gin_bindings`). Modules define
no flags at import: `main` defines those of the command that runs (as T5X's
`train.py` does under `__main__`), so the modules import each other freely.
Only absl is imported here: `experiments/benchmark.py` runs where gin is not
installed. (`levi_jax.train`/`eval` bind gin configurables, not a dataclass,
and define their flags in `gin_utils.define_flags`.)
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
import typing
from typing import Any, Callable, Sequence

from absl import app, flags
from absl import logging as absl_logging


def field(default: Any = dataclasses.MISSING,
          help: str = "", *,  # pylint: disable=redefined-builtin
          multi: bool = False, choices: Sequence[str] = (), positional: bool = False) -> Any:
  """A settings field and its flag: no `default` makes the flag required; `multi`: a
  repeatable flag (`--gin_file=a --gin_file=b`), otherwise a tuple is comma-separated;
  `positional`: a tuple field that takes the arguments after the flags, not a flag."""
  return dataclasses.field(default=default,
                           metadata={"help": help, "multi": multi, "choices": tuple(choices),
                                     "positional": positional})


def _positional(cls: type) -> str | None:
  """The name of `cls`'s positional field, if it has one."""
  return next((f.name for f in dataclasses.fields(cls) if f.metadata.get("positional")), None)


def _kind(hint: Any) -> tuple[str, type]:
  """('bool' | 'int' | 'float' | 'str' | 'tuple', element type) of a field's type hint."""
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  if typing.get_origin(hint) is tuple:
    return "tuple", args[0]
  if args:  # `T | None`
    hint = args[0]
  return {bool: "bool", int: "int", float: "float", str: "str"}[hint], hint


def define(cls: type, flag_values: flags.FlagValues = flags.FLAGS,
           module_name: str | None = None):
  """Defines one flag per field of the settings dataclass `cls` (as flags of
  `module_name`, so that `--help` lists them for the script that runs)."""
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    if f.metadata.get("positional"):
      continue
    kind, _ = _kind(hints[f.name])
    meta = f.metadata
    required = f.default is dataclasses.MISSING
    default = None if required else f.default
    kw = {"flag_values": flag_values, "module_name": module_name}
    help_text = meta.get("help", "")
    if meta.get("choices"):
      flags.DEFINE_enum(f.name, default, meta["choices"], help_text, **kw)
    elif kind == "tuple":
      define_seq = flags.DEFINE_multi_string if meta.get("multi") else flags.DEFINE_list
      define_seq(f.name, None if default is None else [str(v) for v in default], help_text,
                 **kw)
    else:
      {"bool": flags.DEFINE_bool, "int": flags.DEFINE_integer, "float": flags.DEFINE_float,
       "str": flags.DEFINE_string}[kind](f.name, default, help_text, **kw)
    if required:
      flags.mark_flag_as_required(f.name, flag_values=flag_values)


def from_flags(cls: type, flag_values: flags.FlagValues = flags.FLAGS,
               rest: Sequence[str] = ()):
  """The settings the parsed flags (and the arguments after them, `rest`) give (`cls`
  validates them)."""
  hints = typing.get_type_hints(cls)
  positional = _positional(cls)
  if rest and positional is None:
    raise ValueError(f"unexpected arguments: {list(rest)}")
  values = {}
  for f in dataclasses.fields(cls):
    kind, element = _kind(hints[f.name])
    if f.name == positional:
      if not rest and f.default is dataclasses.MISSING:
        raise ValueError(f"give {f.name}: {f.metadata.get('help', '')}")
      values[f.name] = tuple(element(v) for v in rest) if rest else f.default
      continue
    value = flag_values[f.name].value
    values[f.name] = tuple(element(v) for v in value or ()) if kind == "tuple" else value
  return cls(**values)


def _rewrite(argv: Sequence[str]) -> list[str]:
  if not any(a.startswith("--gin.") for a in argv):
    return list(argv)
  from levi_jax import gin_utils
  return gin_utils.rewrite_gin_args(argv)


def parse(cls: type, argv: Sequence[str]):
  """The settings of command-line arguments `argv` (without the program name)."""
  flag_values = flags.FlagValues()
  define(cls, flag_values)
  rest = flag_values(["prog", *_rewrite(argv)])[1:]
  return from_flags(cls, flag_values, rest)


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
  """The command that ran `python -m <module>` with `argv` (default: this process's)."""
  return f"python -m {module} " + " ".join(
      shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))


def main(cls: type, run: Callable[[Any, str], Any], module: str):
  """The entry of `python -m <module>`: defines `cls`'s flags, parses sys.argv (absl
  `app.run`: --help, --flagfile) and calls `run(settings, command_line)`."""
  define(cls, module_name=sys.argv[0])
  command = command_line(module)

  def _main(argv):
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax/jax chatter
    try:
      settings = from_flags(cls, rest=argv[1:])
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    status = run(settings, command)
    return status if isinstance(status, int) else None  # app.run exits with it

  app.run(_main, argv=_rewrite(sys.argv))
