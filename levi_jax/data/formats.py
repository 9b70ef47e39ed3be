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
numbers, unknown user/item ids, invalid JSON or UTF-8, missing required fields)
are counted per file (`levi_jax.data.report`); blank lines are not rows.
"""

from __future__ import annotations

import calendar
import gzip
import html
import json
import os
import re
import time
import zlib
from typing import Any, Callable, Iterator

from levi_jax.data.report import (FileReport, LoadReport, MalformedDataError,
                                  missing_files_error)
from levi_jax.data.table import RatingsTable, build_table

# TFDS's label set for MovieLens genres (`movielens.py`).
GENRES = ("Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "IMAX", "Musical", "Mystery", "Romance",
          "Sci-Fi", "Thriller", "Unknown", "War", "Western", "(no genres listed)")
# u.item's 19 genre flags, in file order ("Children's" as TFDS spells it: "Children").
ML100K_GENRE_FLAGS = ("Unknown", "Action", "Adventure", "Animation", "Children", "Comedy",
                      "Crime", "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror",
                      "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
# TFDS's occupation labels, consistent across 100K and 1M.
OCCUPATION_LABELS = (
    "academic/educator", "artist", "clerical/admin", "customer service", "doctor/health care",
    "entertainment", "executive/managerial", "farmer", "homemaker", "lawyer", "librarian",
    "other/not specified", "programmer", "retired", "sales/marketing", "scientist",
    "self-employed", "student", "technician/engineer", "tradesman/craftsman", "unemployed",
    "writer")
ML100K_OCCUPATIONS = {
    "administrator": "clerical/admin", "artist": "artist", "doctor": "doctor/health care",
    "educator": "academic/educator", "engineer": "technician/engineer",
    "entertainment": "entertainment", "executive": "executive/managerial",
    "healthcare": "doctor/health care", "homemaker": "homemaker", "lawyer": "lawyer",
    "librarian": "librarian", "marketing": "sales/marketing", "none": "other/not specified",
    "other": "other/not specified", "programmer": "programmer", "retired": "retired",
    "salesman": "sales/marketing", "scientist": "scientist", "student": "student",
    "technician": "technician/engineer", "writer": "writer"}
ML1M_OCCUPATIONS = (
    "other/not specified", "academic/educator", "artist", "clerical/admin",
    "college/grad student", "customer service", "doctor/health care", "executive/managerial",
    "farmer", "homemaker", "K-12 student", "lawyer", "programmer", "retired", "sales/marketing",
    "scientist", "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed",
    "writer")
AGE_BUCKETS = (1, 18, 25, 35, 45, 50, 56)

ML_USER_COLUMNS = {"user_gender": "bool", "bucketized_user_age": "float32",
                   "user_occupation_label": "str", "user_occupation_text": "str",
                   "user_zip_code": "str"}
ML100K_USER_COLUMNS = {**ML_USER_COLUMNS, "raw_user_age": "float32"}
ML_ITEM_COLUMNS = {"movie_title": "str", "movie_genres": "bag"}
AMAZON_ITEM_COLUMNS = {"item_title": "str", "item_category": "str", "item_subcategories": "bag",
                       "item_brand": "str", "item_price": "float64"}
AMAZON_US_ITEM_COLUMNS = {"item_title": "str", "item_category": "str"}

ML100K_FILES = ("u.data", "u.user", "u.item")
ML1M_FILES = ("ratings.dat", "users.dat", "movies.dat")
# Category names are capitalized in the published files ("Books", "AMAZON_FASHION").
AMAZON_REVIEWS_RE = re.compile(
    r"^(?!meta_)(?:reviews_)?(?P<cat>[A-Z][\w,&-]*?)(?:_5)?\.json(?:\.gz)?$")
AMAZON_META_RE = re.compile(r"^meta_(?P<cat>.+?)\.json(?:\.gz)?$")
AMAZON_TSV_RE = re.compile(r"^amazon_reviews_(?:us_)?(?P<cat>.+?)(?:_v\d+_\d+)?\.tsv(?:\.gz)?$")
AMAZON_TSV_REQUIRED = ("customer_id", "product_id", "star_rating", "review_date")


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


def _rows(path: str, rep: FileReport, encoding: str, skip: int = 0,
          strip: bool = True) -> Iterator[tuple[int, str]]:
  """Non-blank decoded lines of `path` (after `skip` header lines), counted in `rep`."""
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
    yield n, text


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
                  out: dict[str, list]) -> None:
  def row(text: str) -> None:
    u, i, r, t = _fields(text, sep, 4, "rating")
    if u not in users:
      raise _BadRow(f"unknown user id {u!r}")
    if i not in items:
      raise _BadRow(f"unknown movie id {i!r}")
    rating, ts = _rating(r), _int(t, "timestamp")
    out["user_ids"].append(u)
    out["item_ids"].append(i)
    out["ratings"].append(rating)
    out["timestamps"].append(ts)
  _parse_file(path, report, "latin-1", row)


def _empty_lists() -> dict[str, list]:
  return {"user_ids": [], "item_ids": [], "ratings": [], "timestamps": []}


def bucketize_age(age: int) -> int:
  """TFDS's 100K age bucketing: the largest bucket start <= age (1 below 18)."""
  bucket = 1
  for b in AGE_BUCKETS[1:]:
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
                         subdir: str = "ml-100k") -> RatingsTable:
  """Parses MovieLens 100K files (`u.data`, `u.user`, `u.item`) into a table."""
  d = find_dir(dataset, data_dir, subdir, ML100K_FILES,
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
    if occ not in ML100K_OCCUPATIONS:
      raise _BadRow(f"unknown occupation {occ!r}")
    users[uid] = {"user_gender": gender == "M", "bucketized_user_age": bucketize_age(age_i),
                  "raw_user_age": age_i, "user_occupation_label": ML100K_OCCUPATIONS[occ],
                  "user_occupation_text": occ, "user_zip_code": zip_code}

  def item_row(text: str) -> None:
    parts = _fields(text, "|", 5 + len(ML100K_GENRE_FLAGS), "u.item")
    flags = parts[5:]
    if any(f not in ("0", "1") for f in flags):
      raise _BadRow("genre flags must be 0 or 1")
    items[parts[0]] = {"movie_title": parts[1],
                       "movie_genres": [g for g, f in zip(ML100K_GENRE_FLAGS, flags) if f == "1"]}

  _parse_file(os.path.join(d, "u.user"), report, "latin-1", user_row)
  _parse_file(os.path.join(d, "u.item"), report, "latin-1", item_row)
  out = _empty_lists()
  _ratings_file(os.path.join(d, "u.data"), report, "\t", users, items, out)
  return build_table(dataset, d, **out, user_attrs=users, item_attrs=items,
                     user_columns=ML100K_USER_COLUMNS, item_columns=ML_ITEM_COLUMNS,
                     report=report)


def parse_movielens_1m(data_dir: str, dataset: str = "movielens_1m",
                       subdir: str = "ml-1m") -> RatingsTable:
  """Parses MovieLens 1M files (`ratings.dat`, `users.dat`, `movies.dat`) into a table."""
  d = find_dir(dataset, data_dir, subdir, ML1M_FILES,
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
    if age_i not in AGE_BUCKETS:
      raise _BadRow(f"age {age_i} is not one of the 1M age codes {AGE_BUCKETS}")
    occ_i = _int(occ, "occupation")
    if not 0 <= occ_i < len(ML1M_OCCUPATIONS):
      raise _BadRow(f"occupation code {occ_i} outside [0, {len(ML1M_OCCUPATIONS)})")
    text_occ = ML1M_OCCUPATIONS[occ_i]
    label = "student" if text_occ in ("K-12 student", "college/grad student") else text_occ
    users[uid] = {"user_gender": gender == "M", "bucketized_user_age": age_i,
                  "user_occupation_label": label, "user_occupation_text": text_occ,
                  "user_zip_code": zip_code}

  def item_row(text: str) -> None:
    mid, title, genres = _fields(text, "::", 3, "movies.dat")
    names = ["Children" if g == "Children's" else g for g in genres.split("|")]
    unknown = [g for g in names if g not in GENRES]
    if unknown:
      raise _BadRow(f"unknown genres {unknown}")
    items[mid] = {"movie_title": title, "movie_genres": names}

  _parse_file(os.path.join(d, "users.dat"), report, "latin-1", user_row)
  _parse_file(os.path.join(d, "movies.dat"), report, "latin-1", item_row)
  out = _empty_lists()
  _ratings_file(os.path.join(d, "ratings.dat"), report, "::", users, items, out)
  return build_table(dataset, d, **out, user_attrs=users, item_attrs=items,
                     user_columns=ML_USER_COLUMNS, item_columns=ML_ITEM_COLUMNS, report=report)


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
    m = AMAZON_META_RE.match(name)
    if m:
      metas[m.group("cat")] = path
      continue
    m = AMAZON_REVIEWS_RE.match(name)
    if m:
      cat = m.group("cat")
      if cat in reviews:
        raise ValueError(f"amazon_2018: two review files for category {cat!r} in {d}: "
                         f"{os.path.basename(reviews[cat])} and {name}; keep one")
      reviews[cat] = path
  return reviews, metas


def parse_amazon_2018(data_dir: str, dataset: str = "amazon_2018",
                      subdir: str = "amazon_2018") -> RatingsTable:
  """Parses Amazon Reviews 2018 per-category JSON-lines files into a table."""
  candidates = [os.path.join(data_dir, subdir), data_dir]
  d = next((c for c in candidates if os.path.isdir(c) and _amazon_files(c)[0]), None)
  if d is None:
    raise missing_files_error(
        dataset, candidates, ["<Category>.json[.gz] or <Category>_5.json[.gz] (reviews)",
                              "meta_<Category>.json[.gz] (optional metadata)"],
        "Amazon Reviews 2018 (Ni et al. 2019) per-category JSON lines.")
  reviews, metas = _amazon_files(d)
  report = LoadReport()
  items: dict[str, dict] = {}
  for path in sorted(metas.values()):
    rep = report.new_file(path)
    duplicates = 0
    for n, text in _rows(path, rep, "utf-8"):
      try:
        rec = json.loads(text)
        if not isinstance(rec, dict):
          raise _BadRow("not a JSON object")
        asin = rec.get("asin")
        if not isinstance(asin, str) or not asin:
          raise _BadRow("no asin")
      except (json.JSONDecodeError, _BadRow) as e:
        rep.add_bad(n, f"invalid metadata: {e}", text)
        continue
      if asin in items:
        duplicates += 1
        continue
      path_cats = rec.get("category") if isinstance(rec.get("category"), list) else []
      items[asin] = {"item_title": _clean(rec.get("title")),
                     "item_subcategories": [_clean(c) for c in path_cats[1:5] if _clean(c)],
                     "item_brand": _clean(rec.get("brand")),
                     "item_price": parse_price(rec.get("price"))}
    if duplicates:
      rep.notes.append(f"{duplicates} repeated asins; the first metadata line of each is used")
  out = _empty_lists()
  item_category: dict[str, str] = {}
  for cat, path in sorted(reviews.items()):
    rep = report.new_file(path)
    conflicts = 0
    for n, text in _rows(path, rep, "utf-8"):
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
        if "overall" not in rec:
          raise _BadRow("no overall rating")
        rating = _rating(rec["overall"], "overall")
        ts = _review_time(rec)
      except _BadRow as e:
        rep.add_bad(n, str(e), text)
        continue
      if item_category.setdefault(asin, cat) != cat:
        conflicts += 1
      out["user_ids"].append(user)
      out["item_ids"].append(asin)
      out["ratings"].append(rating)
      out["timestamps"].append(ts)
    if conflicts:
      rep.notes.append(f"{conflicts} reviews of items first seen in another category file; "
                       "those items keep their first category")
  for asin, cat in item_category.items():
    items.setdefault(asin, {})["item_category"] = cat
  return build_table(dataset, d, **out, user_attrs={}, item_attrs=items, user_columns={},
                     item_columns=AMAZON_ITEM_COLUMNS, report=report)


def parse_amazon_us(data_dir: str, dataset: str = "amazon_us",
                    subdir: str = "amazon_us") -> RatingsTable:
  """Parses the `amazon_reviews_us_*.tsv[.gz]` files behind TFDS's `amazon_us_reviews`."""
  candidates = [os.path.join(data_dir, subdir), data_dir]

  def tsv_files(c: str) -> list[str]:
    if not os.path.isdir(c):
      return []
    return [os.path.join(c, f) for f in sorted(os.listdir(c)) if AMAZON_TSV_RE.match(f)]

  d = next((c for c in candidates if tsv_files(c)), None)
  if d is None:
    raise missing_files_error(dataset, candidates,
                              ["amazon_reviews_us_<Category>_v1_00.tsv[.gz]"],
                              "Tab separated with a header row (customer_id, product_id, "
                              "product_title, product_category, star_rating, review_date, ...).")
  report = LoadReport()
  items: dict[str, dict] = {}
  out = _empty_lists()
  for path in tsv_files(d):
    rep = report.new_file(path)
    file_cat = AMAZON_TSV_RE.match(os.path.basename(path)).group("cat")
    header: list[str] | None = None
    for n, raw in read_lines(path):
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        rep.rows += 1
        rep.add_bad(n, f"not valid utf-8 ({e.reason})", raw.decode("latin-1"))
        continue
      if header is None:
        header = text.split("\t")
        missing = [c for c in AMAZON_TSV_REQUIRED if c not in header]
        if missing:
          raise missing_files_error(dataset, [d], [f"{os.path.basename(path)} with header "
                                                   f"columns {list(AMAZON_TSV_REQUIRED)}"],
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
        rating = _rating(parts[col["star_rating"]], "star_rating")
        try:
          ts = calendar.timegm(time.strptime(parts[col["review_date"]].strip(), "%Y-%m-%d"))
        except ValueError:
          raise _BadRow(f"review_date {parts[col['review_date']]!r} is not YYYY-MM-DD") from None
      except _BadRow as e:
        rep.add_bad(n, str(e), text)
        continue
      if item not in items:
        category = parts[col["product_category"]].strip() if "product_category" in col else ""
        title = parts[col["product_title"]] if "product_title" in col else ""
        items[item] = {"item_title": _clean(title), "item_category": category or file_cat}
      out["user_ids"].append(user)
      out["item_ids"].append(item)
      out["ratings"].append(rating)
      out["timestamps"].append(ts)
  return build_table(dataset, d, **out, user_attrs={}, item_attrs=items, user_columns={},
                     item_columns=AMAZON_US_ITEM_COLUMNS, report=report)
