"""Parsers for the publishers' raw formats, into `RatingsTable`s.

* MovieLens 100K (`u.data` tab separated; `u.user`, `u.item` pipe separated; Latin-1).
* MovieLens 1M (`ratings.dat`, `users.dat`, `movies.dat`; `::` separated; Latin-1).
* Amazon Reviews 2018 (Ni et al. 2019): per-category JSON lines, optionally
  gzipped: reviews `<Category>.json[.gz]` (or the 5-core `<Category>_5.json[.gz]`)
  with `overall`, `reviewerID`, `asin`, `unixReviewTime` (or `reviewTime`),
  and metadata `meta_<Category>.json[.gz]` with `asin`, `title`, `category`,
  `brand`, `price`. Missing optional fields are normal.
* The tab-separated files behind TFDS's `amazon_us_reviews`
  (`amazon_reviews_us_<Category>_v1_00.tsv[.gz]`, with a header row).

MovieLens columns and values follow TFDS's `movielens/{100k,1m}-ratings`
(`user_gender` True for male, `bucketized_user_age`, `raw_user_age` (100K),
`user_occupation_label` with TFDS's labels shared by both versions,
`user_occupation_text`, `user_zip_code`, `movie_title`, `movie_genres` with
"Children's" read as "Children"), so raw files and TFDS give equal tables.
Amazon items carry `item_title`, `item_category` (the file's category for the
2018 data, `product_category` for the TSV), and for the 2018 data
`item_subcategories` (the metadata's category path below the top level, at
most four levels),
`item_brand` and `item_price`. A review's own text is not kept: it describes
the rating being predicted.

Rows that cannot be used (wrong field count, unparseable or out-of-range
numbers, unknown user/item ids, invalid JSON, missing required fields, a
timestamp before the dataset's first year or in the future) are counted per
file (`levi_jax.data.load_report`); blank lines are not rows.

Each format declares its encoding (MovieLens Latin-1, Amazon UTF-8) and rows
are decoded strictly by it. A row that does not decode is malformed, and so is
a kept text field holding U+FFFD (the replacement character: the text was
mis-decoded before it was written). Latin-1 decodes any byte, so in a Latin-1
file a row whose non-ASCII bytes are valid multi-byte UTF-8 (mojibake: "Café"
in UTF-8 reads "CafÃ©") is malformed too, and a file whose non-ASCII rows are
all UTF-8 is UTF-8-encoded as a whole: `MalformedDataError`, whatever the
tolerance. The real MovieLens 100K `u.item` has 9 non-ASCII rows (Latin-1
bytes such as 0xE9) in 1682, so re-encoded as UTF-8 it would fall within a
per-row tolerance of 1%.

File names, columns and value sets are declared in `levi_jax.data.schema`.

Rating rows repeating an earlier row's (user, item, timestamp) are counted per
file; `duplicates` says what to do with them: 'keep' (the default; a
warning), 'drop' (the first of each is kept) or 'error'.
"""

from __future__ import annotations

import array
import calendar
import gzip
import html
import json
import logging
import os
import re
import time
import zlib
from typing import Any, Callable, Iterator

import numpy as np

from levi_jax.data import schema
from levi_jax.data.load_report import (FileReport, LoadReport, MalformedDataError,
                                       missing_files_error)
from levi_jax.data.table import Interned, RatingsTable, build_table

# The year of each dataset's first rating; earlier timestamps are malformed rows.
# MovieLens began in 1997 (100K: Sep 1997 - Apr 1998). The 1M ratings were made
# from 2000 on, but the synthetic world writes its 1M-format files over the 100K
# span, so 1M is held to MovieLens's first year too. Amazon Reviews 2018 starts
# in 1996; the amazon_us TSVs in 1995, Amazon's first year.
ML100K_FIRST_YEAR = 1997
ML1M_FIRST_YEAR = 1997
AMAZON_2018_FIRST_YEAR = 1996
AMAZON_US_FIRST_YEAR = 1995
# Timestamps up to a day past the clock are accepted (dates given in a zone ahead of UTC).
_CLOCK_SLACK_S = 86400
DUPLICATE_POLICIES = ("keep", "drop", "error")


class _BadRow(Exception):
  """A row that cannot be used; the message is the reason."""


def read_lines(path: str) -> Iterator[tuple[int, bytes]]:
  """Yields (1-based line number, raw line without newline); gunzips by magic bytes."""
  with open(path, "rb") as f:
    gz = f.read(2) == b"\x1f\x8b"
  opener: Callable[..., Any] = gzip.open if gz else open
  n = 0
  try:
    with opener(path, "rb") as f:
      for n, line in enumerate(f, 1):
        yield n, line.rstrip(b"\r\n")
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    raise MalformedDataError(
        f"{path}: the gzip stream is damaged after line {n} ({type(e).__name__}: {e}); "
        "download the file again") from None


def _utf8_in_latin1(raw: bytes) -> str | None:
  """Why non-ASCII Latin-1 row `raw` looks UTF-8-encoded, or None if it does not."""
  try:
    as_utf8 = raw.decode("utf-8")
  except UnicodeDecodeError:
    return None  # Non-ASCII bytes that are not UTF-8: Latin-1 as declared.
  if "\ufffd" in as_utf8:
    return ("holds U+FFFD (the replacement character) UTF-8-encoded: the text was mis-decoded "
            "before it was written; the dataset declares latin-1")
  # Split at ASCII only, so each word is whole UTF-8.
  word = next(w for w in re.split(rb"[\s|:]+", raw) if not w.isascii())
  return (f"looks UTF-8-encoded ({word.decode('latin-1')[:40]!r} is "
          f"{word.decode('utf-8')[:40]!r} in UTF-8); the dataset declares latin-1")


def _rows(path: str, rep: FileReport, encoding: str, skip: int = 0,
          strip: bool = True) -> Iterator[tuple[int, str]]:
  """Non-blank lines of `path` (after `skip` header lines) decoded strictly, counted in `rep`.

  Rows that do not decode by `encoding`, and in a Latin-1 file rows that look
  UTF-8-encoded, are malformed (recorded in `rep`, not yielded).

  Raises:
    MalformedDataError: a Latin-1 file whose non-ASCII rows all look UTF-8-encoded.
  """
  latin1_rows = 0
  utf8_rows: list[tuple[int, str]] = []
  for n, raw in read_lines(path):
    if n <= skip:
      continue
    try:
      text = raw.decode(encoding)
    except UnicodeDecodeError as e:
      rep.rows += 1
      rep.add_bad(n, f"not valid {encoding} ({e.reason})", raw.decode("latin-1"))
      continue
    if strip:
      text = text.strip()
    if not text.strip():
      continue
    rep.rows += 1
    if encoding == "latin-1" and not raw.isascii():
      reason = _utf8_in_latin1(raw)
      if reason:
        utf8_rows.append((n, reason))
        rep.add_bad(n, reason, text)
        continue
      latin1_rows += 1
    yield n, text
  if utf8_rows and not latin1_rows:
    n, reason = utf8_rows[0]
    raise MalformedDataError(
        f"{path}: the file looks UTF-8-encoded: all {len(utf8_rows)} rows with non-ASCII bytes "
        f"are valid UTF-8 and none is {encoding} (line {n}: {reason}). Use the publisher's "
        f"file, or re-encode it: iconv -f utf-8 -t {encoding}")


def _no_replacement_char(**fields: Any) -> None:
  """Raises `_BadRow` if a kept text field holds U+FFFD, the replacement character."""
  for name, value in fields.items():
    if isinstance(value, str) and "\ufffd" in value:
      raise _BadRow(f"{name} {value[:60]!r} holds U+FFFD (the replacement character): the text "
                    "was mis-decoded before it was written")


def _date(ts: int) -> str:
  try:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))
  except (OverflowError, OSError, ValueError):
    return "out of range"


class _Ratings:
  """Rating rows as parsed, each with the file and line it came from.

  Checks timestamps against the dataset's first year and the clock, and applies
  the duplicates policy (`columns`).
  """

  def __init__(self, first_year: int, duplicates: str):
    if duplicates not in DUPLICATE_POLICIES:
      raise ValueError(f"duplicates must be one of {DUPLICATE_POLICIES}, got {duplicates!r}")
    self.first_year = first_year
    self.duplicates = duplicates
    self._earliest = calendar.timegm((first_year, 1, 1, 0, 0, 0))
    self._latest = int(time.time()) + _CLOCK_SLACK_S
    # One entry per row, held compactly (a few bytes a row, each id string once).
    self.user_ids, self.item_ids = Interned(), Interned()
    self.ratings, self.timestamps = array.array("d"), array.array("q")
    self._reports: list[FileReport] = []
    self._file, self._lines = array.array("i"), array.array("q")

  def add(self, rep: FileReport, line_no: int, user: str, item: str, rating: float, ts: int,
          what: str = "timestamp") -> None:
    """Appends a rating row read from line `line_no` of `rep`'s file.

    Raises:
      _BadRow: `ts` (seconds since 1970) before the first year or in the future.
    """
    if ts < self._earliest:
      raise _BadRow(f"{what} {ts} ({_date(ts)}) is before {self.first_year}, the dataset's "
                    "first year; expected seconds since 1970 (a number cut short?)")
    if ts > self._latest:
      raise _BadRow(f"{what} {ts} ({_date(ts)}) is in the future; expected seconds since 1970 "
                    f"from {self.first_year} on")
    if not self._reports or self._reports[-1] is not rep:
      self._reports.append(rep)
    self.user_ids.append(user)
    self.item_ids.append(item)
    self.ratings.append(rating)
    self.timestamps.append(ts)
    self._file.append(len(self._reports) - 1)
    self._lines.append(line_no)

  def _report(self, row: int) -> FileReport:
    return self._reports[self._file[row]]

  def _duplicates(self) -> tuple[np.ndarray, np.ndarray]:
    """Positions of rows repeating an earlier row's (user, item, timestamp), and of that row."""
    n = len(self.timestamps)
    if n < 2:
      return np.zeros(0, np.int64), np.zeros(0, np.int64)
    u, i = self.user_ids.code_array(), self.item_ids.code_array()  # equal ids, equal codes
    t = np.asarray(self.timestamps, np.int64)
    order = np.lexsort((t, i, u))  # Stable: equal keys stay in reading order.
    su, si, st = u[order], i[order], t[order]
    same = (su[1:] == su[:-1]) & (si[1:] == si[:-1]) & (st[1:] == st[:-1])
    new_key = np.concatenate([[True], ~same])
    first = order[np.flatnonzero(new_key)[np.cumsum(new_key) - 1]]
    return order[1:][same], first[1:][same]

  def columns(self) -> dict[str, Any]:
    """The rows for `build_table`, after counting duplicates and applying the policy.

    Raises:
      MalformedDataError: duplicates with policy 'error', naming each file, its
        count and an example.
    """
    dup, first = self._duplicates()
    cols = {"user_ids": self.user_ids, "item_ids": self.item_ids, "ratings": self.ratings,
            "timestamps": self.timestamps}
    if not len(dup):
      return cols
    by_file: dict[str, list[tuple[int, int]]] = {}
    for d, f in sorted(zip(dup.tolist(), first.tolist())):
      by_file.setdefault(self._report(d).path, []).append((d, f))
    problems = []
    for pairs in by_file.values():
      d, f = pairs[0]
      rep = self._report(d)
      where = (f"line {self._lines[f]}" if self._report(f) is rep
               else f"line {self._lines[f]} of {self._report(f).path}")
      differ = sum(self.ratings[a] != self.ratings[b] for a, b in pairs)
      text = (f"{len(pairs)} duplicated (user, item, timestamp) rating rows"
              f"{f' ({differ} with another rating)' if differ else ''}, e.g. line "
              f"{self._lines[d]} (user {self.user_ids[d]!r}, item {self.item_ids[d]!r}, "
              f"timestamp {self.timestamps[d]}, rating {self.ratings[d]:g}) repeats {where}")
      if self.duplicates == "keep":
        rep.notes.append(f"{text}; all kept (duplicates='keep'; 'drop' keeps the first of each)")
        logging.warning("%s: %s", rep.path, rep.notes[-1])
      elif self.duplicates == "drop":
        rep.notes.append(f"{text}; dropped, the first of each kept (duplicates='drop')")
        logging.info("%s: %s", rep.path, rep.notes[-1])
      problems.append(f"{rep.path}: {text}")
    if self.duplicates == "error":
      raise MalformedDataError(
          "duplicated rating rows (duplicates='error'; pass duplicates='keep' or 'drop' to "
          "load them):\n" + "\n".join(problems))
    if self.duplicates == "drop":
      keep = np.ones(len(self.timestamps), bool)
      keep[dup] = False
      kept = np.flatnonzero(keep)
      cols = {name: col.select(kept) if isinstance(col, Interned) else np.asarray(col)[kept]
              for name, col in cols.items()}
    return cols


def _int(s: str, what: str) -> int:
  try:
    return int(s)
  except ValueError:
    raise _BadRow(f"{what} {s!r} is not an integer") from None


def _rating(s: str | float, what: str = "rating") -> float:
  try:
    r = float(s)
  except (TypeError, ValueError):
    raise _BadRow(f"{what} {s!r} is not a number") from None
  if not 1.0 <= r <= 5.0:
    raise _BadRow(f"{what} {r} outside [1, 5]")
  return r


def _fields(text: str, sep: str, n: int, what: str) -> list[str]:
  parts = text.split(sep)
  if len(parts) != n:
    raise _BadRow(f"expected {n} {what} fields separated by {sep!r}, got {len(parts)}")
  return parts


def _parse_file(path: str, report: LoadReport, encoding: str,
                fn: Callable[[str], None], skip: int = 0) -> None:
  rep = report.new_file(path)
  for n, text in _rows(path, rep, encoding, skip):
    try:
      fn(text)
    except _BadRow as e:
      rep.add_bad(n, str(e), text)


def _ratings_file(path: str, report: LoadReport, sep: str, users: dict, items: dict,
                  out: _Ratings) -> None:
  rep = report.new_file(path)
  for n, text in _rows(path, rep, schema.MOVIELENS_ENCODING):
    try:
      u, i, r, t = _fields(text, sep, 4, "rating")
      if u not in users:
        raise _BadRow(f"unknown user id {u!r}")
      if i not in items:
        raise _BadRow(f"unknown movie id {i!r}")
      out.add(rep, n, u, i, _rating(r), _int(t, "timestamp"))
    except _BadRow as e:
      rep.add_bad(n, str(e), text)


def bucketize_age(age: int) -> int:
  """TFDS's 100K age bucketing: the largest bucket start <= age (1 below 18)."""
  bucket = 1
  for b in schema.AGE_BUCKETS[1:]:
    if age >= b:
      bucket = b
  return bucket


def find_dir(dataset: str, data_dir: str, subdir: str, required: tuple[str, ...],
             hint: str = "") -> str:
  """The directory holding `required` files: `data_dir/subdir` if present, else `data_dir`."""
  candidates = [os.path.join(data_dir, subdir), data_dir]
  for d in candidates:
    if all(os.path.isfile(os.path.join(d, f)) for f in required):
      return d
  raise missing_files_error(dataset, candidates, required, hint)


def parse_movielens_100k(data_dir: str, dataset: str = "movielens_100k",
                         subdir: str = "ml-100k", first_year: int = ML100K_FIRST_YEAR,
                         duplicates: str = "keep") -> RatingsTable:
  """Parses MovieLens 100K files (`u.data`, `u.user`, `u.item`) into a table.

  Args:
    data_dir: the folder holding `subdir` (or the files themselves).
    dataset: the table's dataset name.
    subdir: the canonical folder under `data_dir`.
    first_year: earlier rating timestamps are malformed rows.
    duplicates: 'keep', 'drop' or 'error' for repeated (user, item, timestamp) rows.
  """
  d = find_dir(dataset, data_dir, subdir, schema.ML100K_FILES,
               "MovieLens 100K: u.data (user\\titem\\trating\\ttimestamp), u.user "
               "(id|age|gender|occupation|zip), u.item (id|title|release|video release|url|"
               "19 genre flags), Latin-1.")
  report = LoadReport()
  users: dict[str, dict] = {}
  items: dict[str, dict] = {}

  def user_row(text: str) -> None:
    uid, age, gender, occ, zip_code = _fields(text, "|", 5, "u.user")
    age_i = _int(age, "age")
    if gender not in ("M", "F"):
      raise _BadRow(f"gender {gender!r} is not M or F")
    if occ not in schema.ML100K_OCCUPATIONS:
      raise _BadRow(f"unknown occupation {occ!r}")
    users[uid] = {"user_gender": gender == "M", "bucketized_user_age": bucketize_age(age_i),
                  "raw_user_age": age_i, "user_occupation_label": schema.ML100K_OCCUPATIONS[occ],
                  "user_occupation_text": occ, "user_zip_code": zip_code}

  def item_row(text: str) -> None:
    parts = _fields(text, "|", 5 + len(schema.ML100K_GENRE_FLAGS), "u.item")
    flags = parts[5:]
    if any(f not in ("0", "1") for f in flags):
      raise _BadRow("genre flags must be 0 or 1")
    items[parts[0]] = {"movie_title": parts[1],
                       "movie_genres": [g for g, f in zip(schema.ML100K_GENRE_FLAGS, flags)
                                        if f == "1"]}

  out = _Ratings(first_year, duplicates)
  _parse_file(os.path.join(d, "u.user"), report, schema.MOVIELENS_ENCODING, user_row)
  _parse_file(os.path.join(d, "u.item"), report, schema.MOVIELENS_ENCODING, item_row)
  _ratings_file(os.path.join(d, "u.data"), report, "\t", users, items, out)
  return build_table(dataset, d, **out.columns(), user_attrs=users, item_attrs=items,
                     user_columns=schema.ML100K_USER_COLUMNS, item_columns=schema.ML_ITEM_COLUMNS,
                     report=report)


def parse_movielens_1m(data_dir: str, dataset: str = "movielens_1m",
                       subdir: str = "ml-1m", first_year: int = ML1M_FIRST_YEAR,
                       duplicates: str = "keep") -> RatingsTable:
  """Parses MovieLens 1M files (`ratings.dat`, `users.dat`, `movies.dat`) into a table.

  Args are those of `parse_movielens_100k`.
  """
  d = find_dir(dataset, data_dir, subdir, schema.ML1M_FILES,
               "MovieLens 1M: ratings.dat (UserID::MovieID::Rating::Timestamp), users.dat "
               "(UserID::Gender::Age::Occupation::Zip-code), movies.dat "
               "(MovieID::Title::Genres), Latin-1.")
  report = LoadReport()
  users: dict[str, dict] = {}
  items: dict[str, dict] = {}

  def user_row(text: str) -> None:
    uid, gender, age, occ, zip_code = _fields(text, "::", 5, "users.dat")
    if gender not in ("M", "F"):
      raise _BadRow(f"gender {gender!r} is not M or F")
    age_i = _int(age, "age")
    if age_i not in schema.AGE_BUCKETS:
      raise _BadRow(f"age {age_i} is not one of the 1M age codes {schema.AGE_BUCKETS}")
    occ_i = _int(occ, "occupation")
    if not 0 <= occ_i < len(schema.ML1M_OCCUPATIONS):
      raise _BadRow(f"occupation code {occ_i} outside [0, {len(schema.ML1M_OCCUPATIONS)})")
    text_occ = schema.ML1M_OCCUPATIONS[occ_i]
    label = "student" if text_occ in ("K-12 student", "college/grad student") else text_occ
    users[uid] = {"user_gender": gender == "M", "bucketized_user_age": age_i,
                  "user_occupation_label": label, "user_occupation_text": text_occ,
                  "user_zip_code": zip_code}

  def item_row(text: str) -> None:
    mid, title, genres = _fields(text, "::", 3, "movies.dat")
    names = ["Children" if g == "Children's" else g for g in genres.split("|")]
    unknown = [g for g in names if g not in schema.GENRES]
    if unknown:
      raise _BadRow(f"unknown genres {unknown}")
    items[mid] = {"movie_title": title, "movie_genres": names}

  out = _Ratings(first_year, duplicates)
  _parse_file(os.path.join(d, "users.dat"), report, schema.MOVIELENS_ENCODING, user_row)
  _parse_file(os.path.join(d, "movies.dat"), report, schema.MOVIELENS_ENCODING, item_row)
  _ratings_file(os.path.join(d, "ratings.dat"), report, "::", users, items, out)
  return build_table(dataset, d, **out.columns(), user_attrs=users, item_attrs=items,
                     user_columns=schema.ML_USER_COLUMNS, item_columns=schema.ML_ITEM_COLUMNS,
                     report=report)


def parse_price(value: Any) -> float | None:
  """'$1,234.50' -> 1234.5; ranges, blanks and other text -> None (unknown)."""
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  if not isinstance(value, str):
    return None
  m = re.fullmatch(r"\s*\$?\s*([0-9][0-9,]*(?:\.[0-9]+)?)\s*", value)
  return float(m.group(1).replace(",", "")) if m else None


def _clean(s: Any) -> str:
  return " ".join(html.unescape(s).split()) if isinstance(s, str) else ""


def _review_time(rec: dict) -> int:
  t = rec.get("unixReviewTime")
  if isinstance(t, (int, float)) and not isinstance(t, bool):
    return int(t)
  if isinstance(t, str) and t.strip().isdigit():
    return int(t)
  rt = rec.get("reviewTime")
  if isinstance(rt, str):
    try:
      return calendar.timegm(time.strptime(rt.strip(), "%m %d, %Y"))
    except ValueError:
      pass
  raise _BadRow("no usable unixReviewTime or reviewTime")


def _amazon_files(d: str) -> tuple[dict[str, str], dict[str, str]]:
  reviews: dict[str, str] = {}
  metas: dict[str, str] = {}
  for name in sorted(os.listdir(d)):
    path = os.path.join(d, name)
    if not os.path.isfile(path):
      continue
    m = schema.AMAZON_META_RE.match(name)
    if m:
      metas[m.group("cat")] = path
      continue
    m = schema.AMAZON_REVIEWS_RE.match(name)
    if m:
      cat = m.group("cat")
      if cat in reviews:
        raise ValueError(f"amazon_2018: two review files for category {cat!r} in {d}: "
                         f"{os.path.basename(reviews[cat])} and {name}; keep one")
      reviews[cat] = path
  return reviews, metas


def parse_amazon_2018(data_dir: str, dataset: str = "amazon_2018",
                      subdir: str = "amazon_2018", first_year: int = AMAZON_2018_FIRST_YEAR,
                      duplicates: str = "keep") -> RatingsTable:
  """Parses Amazon Reviews 2018 per-category JSON-lines files into a table.

  Args are those of `parse_movielens_100k`. Only the fields kept are checked
  for U+FFFD (not a review's text, summary or reviewer name).
  """
  candidates = [os.path.join(data_dir, subdir), data_dir]
  d = next((c for c in candidates if os.path.isdir(c) and _amazon_files(c)[0]), None)
  if d is None:
    raise missing_files_error(
        dataset, candidates, ["<Category>.json[.gz] or <Category>_5.json[.gz] (reviews)",
                              "meta_<Category>.json[.gz] (optional metadata)"],
        "Amazon Reviews 2018 (Ni et al. 2019) per-category JSON lines.")
  reviews, metas = _amazon_files(d)
  report = LoadReport()
  out = _Ratings(first_year, duplicates)
  items: dict[str, dict] = {}
  for path in sorted(metas.values()):
    rep = report.new_file(path)
    repeated = 0
    for n, text in _rows(path, rep, schema.AMAZON_ENCODING):
      try:
        rec = json.loads(text)
        if not isinstance(rec, dict):
          raise _BadRow("not a JSON object")
        asin = rec.get("asin")
        if not isinstance(asin, str) or not asin:
          raise _BadRow("no asin")
        path_cats = rec.get("category") if isinstance(rec.get("category"), list) else []
        _no_replacement_char(asin=asin, title=rec.get("title"), brand=rec.get("brand"),
                             **{f"category[{k}]": c for k, c in enumerate(path_cats[:5])})
      except (json.JSONDecodeError, _BadRow) as e:
        rep.add_bad(n, f"invalid metadata: {e}", text)
        continue
      if asin in items:
        repeated += 1
        continue
      items[asin] = {"item_title": _clean(rec.get("title")),
                     "item_subcategories": [_clean(c) for c in path_cats[1:5] if _clean(c)],
                     "item_brand": _clean(rec.get("brand")),
                     "item_price": parse_price(rec.get("price"))}
    if repeated:
      rep.notes.append(f"{repeated} repeated asins; the first metadata line of each is used")
  item_category: dict[str, str] = {}
  for cat, path in sorted(reviews.items()):
    rep = report.new_file(path)
    conflicts = 0
    for n, text in _rows(path, rep, schema.AMAZON_ENCODING):
      try:
        try:
          rec = json.loads(text)
        except json.JSONDecodeError as e:
          raise _BadRow(f"invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
          raise _BadRow("not a JSON object")
        user, asin = rec.get("reviewerID"), rec.get("asin")
        if not isinstance(user, str) or not user:
          raise _BadRow("no reviewerID")
        if not isinstance(asin, str) or not asin:
          raise _BadRow("no asin")
        _no_replacement_char(reviewerID=user, asin=asin)
        if "overall" not in rec:
          raise _BadRow("no overall rating")
        out.add(rep, n, user, asin, _rating(rec["overall"], "overall"), _review_time(rec),
                "review time")
      except _BadRow as e:
        rep.add_bad(n, str(e), text)
        continue
      if item_category.setdefault(asin, cat) != cat:
        conflicts += 1
    if conflicts:
      rep.notes.append(f"{conflicts} reviews of items first seen in another category file; "
                       "those items keep their first category")
  for asin, cat in item_category.items():
    items.setdefault(asin, {})["item_category"] = cat
  return build_table(dataset, d, **out.columns(), user_attrs={}, item_attrs=items,
                     user_columns={}, item_columns=schema.AMAZON_ITEM_COLUMNS, report=report)


def parse_amazon_us(data_dir: str, dataset: str = "amazon_us",
                    subdir: str = "amazon_us", first_year: int = AMAZON_US_FIRST_YEAR,
                    duplicates: str = "keep") -> RatingsTable:
  """Parses the `amazon_reviews_us_*.tsv[.gz]` files behind TFDS's `amazon_us_reviews`.

  Args are those of `parse_movielens_100k`. Only the fields kept are checked
  for U+FFFD (not a review's headline or body).
  """
  candidates = [os.path.join(data_dir, subdir), data_dir]

  def tsv_files(c: str) -> list[str]:
    if not os.path.isdir(c):
      return []
    return [os.path.join(c, f) for f in sorted(os.listdir(c)) if schema.AMAZON_TSV_RE.match(f)]

  d = next((c for c in candidates if tsv_files(c)), None)
  if d is None:
    raise missing_files_error(dataset, candidates,
                              ["amazon_reviews_us_<Category>_v1_00.tsv[.gz]"],
                              "Tab separated with a header row (customer_id, product_id, "
                              "product_title, product_category, star_rating, review_date, ...).")
  report = LoadReport()
  items: dict[str, dict] = {}
  out = _Ratings(first_year, duplicates)
  for path in tsv_files(d):
    rep = report.new_file(path)
    file_cat = schema.AMAZON_TSV_RE.match(os.path.basename(path)).group("cat")
    header: list[str] | None = None
    for n, raw in read_lines(path):
      try:
        text = raw.decode(schema.AMAZON_ENCODING)
      except UnicodeDecodeError as e:
        rep.rows += 1
        rep.add_bad(n, f"not valid {schema.AMAZON_ENCODING} ({e.reason})", raw.decode("latin-1"))
        continue
      if header is None:
        header = text.split("\t")
        missing = [c for c in schema.AMAZON_TSV_REQUIRED if c not in header]
        if missing:
          raise missing_files_error(dataset, [d], [f"{os.path.basename(path)} with header "
                                                   f"columns {list(schema.AMAZON_TSV_REQUIRED)}"],
                                    f"the header lacks {missing}: {header}")
        col = {c: k for k, c in enumerate(header)}
        continue
      if not text.strip():
        continue
      rep.rows += 1
      try:
        parts = text.split("\t")
        if len(parts) != len(header):
          raise _BadRow(f"expected {len(header)} tab-separated fields, got {len(parts)}")
        user, item = parts[col["customer_id"]].strip(), parts[col["product_id"]].strip()
        if not user or not item:
          raise _BadRow("empty customer_id or product_id")
        category = parts[col["product_category"]].strip() if "product_category" in col else ""
        title = parts[col["product_title"]] if "product_title" in col else ""
        _no_replacement_char(customer_id=user, product_id=item, product_title=title,
                             product_category=category)
        rating = _rating(parts[col["star_rating"]], "star_rating")
        try:
          ts = calendar.timegm(time.strptime(parts[col["review_date"]].strip(), "%Y-%m-%d"))
        except ValueError:
          raise _BadRow(f"review_date {parts[col['review_date']]!r} is not YYYY-MM-DD") from None
        out.add(rep, n, user, item, rating, ts, "review_date")
      except _BadRow as e:
        rep.add_bad(n, str(e), text)
        continue
      if item not in items:
        items[item] = {"item_title": _clean(title), "item_category": category or file_cat}
  return build_table(dataset, d, **out.columns(), user_attrs={}, item_attrs=items,
                     user_columns={}, item_columns=schema.AMAZON_US_ITEM_COLUMNS, report=report)
