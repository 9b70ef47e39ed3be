"""Accounting for bad input: malformed rows per file, and the errors a load raises.

Every parser counts the rows it reads and the rows it cannot use, per file, with
the line number, the reason and the line itself. A file whose malformed fraction
exceeds `max_bad_fraction` fails the load with the first offending lines quoted;
below it, the rows are reported (logged and kept on the table) but never
dropped silently.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Sequence

_MAX_QUOTED = 5


class MalformedDataError(ValueError):
  """Too many malformed rows in a file."""


class MissingFilesError(FileNotFoundError):
  """A data directory lacks the files a dataset needs."""


@dataclasses.dataclass
class FileReport:
  """Rows read from one file and the malformed ones among them.

  Attributes:
    path: the file.
    rows: data rows read (header and blank lines excluded).
    bad: malformed rows.
    examples: the first malformed rows as (line number, reason, line text).
    notes: other things worth knowing (duplicates kept once, conflicts).
  """

  path: str
  rows: int = 0
  bad: int = 0
  examples: list[tuple[int, str, str]] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)

  def add_bad(self, line_no: int, reason: str, text: str) -> None:
    """Records malformed row `line_no` (1-based)."""
    self.bad += 1
    if len(self.examples) < _MAX_QUOTED:
      self.examples.append((line_no, reason, text[:200]))

  @property
  def bad_fraction(self) -> float:
    return self.bad / max(self.rows, 1)

  def describe(self) -> str:
    """One paragraph: counts and the first offending lines."""
    head = (f"{self.path}: {self.bad} malformed of {self.rows} rows "
            f"({100 * self.bad_fraction:.2f}%)")
    lines = [head] + [f"  line {n}: {reason}: {text!r}" for n, reason, text in self.examples]
    return "\n".join(lines)


@dataclasses.dataclass
class LoadReport:
  """The per-file reports of one load."""

  files: list[FileReport] = dataclasses.field(default_factory=list)

  def new_file(self, path: str) -> FileReport:
    """Starts the report of one file."""
    rep = FileReport(os.fspath(path))
    self.files.append(rep)
    return rep

  @property
  def bad(self) -> int:
    return sum(f.bad for f in self.files)

  @property
  def rows(self) -> int:
    return sum(f.rows for f in self.files)

  def summary(self) -> str:
    """A short text: per file with problems, the counts and first offending lines."""
    parts = [f.describe() for f in self.files if f.bad]
    parts += [f"{f.path}: {note}" for f in self.files for note in f.notes]
    return "\n".join(parts) if parts else "no malformed rows"

  def check(self, max_bad_fraction: float) -> None:
    """Logs files with malformed rows; raises if any exceeds `max_bad_fraction`.

    Raises:
      MalformedDataError: quoting the first offending lines of each failing file.
    """
    failing = [f for f in self.files if f.bad and f.bad_fraction > max_bad_fraction]
    for f in self.files:
      if f.bad and f not in failing:
        logging.warning("kept going past malformed rows (max_bad_fraction=%g):\n%s",
                        max_bad_fraction, f.describe())
    if failing:
      raise MalformedDataError(
          f"malformed rows above max_bad_fraction={max_bad_fraction:g}:\n"
          + "\n".join(f.describe() for f in failing))


def missing_files_error(dataset: str, searched: Sequence[str], expected: Sequence[str],
                        hint: str = "") -> MissingFilesError:
  """A `MissingFilesError` naming the directories searched and the files expected."""
  found = []
  for d in searched:
    if os.path.isdir(d):
      found.append(f"{d}: {sorted(os.listdir(d))[:20]}")
    else:
      found.append(f"{d}: (no such directory)")
  msg = (f"{dataset}: expected files not found. Expected in one of {list(searched)}: "
         f"{', '.join(expected)}.\nFound:\n  " + "\n  ".join(found))
  if hint:
    msg += "\n" + hint
  return MissingFilesError(msg)
