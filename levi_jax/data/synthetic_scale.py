"""A synthetic Amazon Reviews 2018 world of any size, written streaming to disk.

`write_scale_world(out_dir, num_ratings)` writes

    out_dir/amazon_2018/<Cat>.json.gz        reviews (overall, reviewerID, asin, unixReviewTime, ...)
    out_dir/amazon_2018/meta_<Cat>.json.gz   metadata (asin, title, brand, category, price, ...)
    out_dir/synthetic_scale.json             the configuration and the write's report

in the format `levi_jax.data.formats.parse_amazon_2018` reads, for paper-scale
runs (1M, 20M ratings) that the embedded world (`levi_jax.data.synthetic`, a few
thousand ratings held in memory) cannot stand in for. Memory is bounded by the
chunk size, whatever the number of ratings: rows are drawn and written (gzip,
level 1) a chunk at a time, and every user's and item's attributes are a hash of
its index, so neither ratings nor entity tables are ever held.

Generative model (row r, 0-based, in time order):
  * users and items join over time: row r draws from the first
    U(r) = 1000 + r // 20 users and I(r) = 500 + r // 50 items (so a world of N
    ratings has about N/20 users and N/50 items), Zipf-like: index
    floor(U(r) * v^2) for v ~ U(0, 1) (early, low indices most active/popular);
  * rating = clip(rint(4.0 + b_u + b_i + p_u . q_i + eps), 1, 5) with
    b ~ N(0, 0.35^2), p, q ~ N(0, 0.45^2 I_4) per entity (hashed from the
    index and the seed) and eps ~ N(0, 0.6^2) per row;
  * timestamps strictly increase with r (so no (user, item, timestamp) row
    repeats), from 1997-01-01 at a rate growing with r (about 1M ratings by
    mid-2001, 20M by 2007), all within the dataset's first year and now;
  * each item's category, brand, title words, subcategory and price come from
    hashes of its index, so metadata is written streaming too (2% of items have
    no metadata line, as in the real files; titles and brands hold non-ASCII
    UTF-8).

Row r depends on the seed, the chunk size and r only, not on the number of
ratings: a larger world starts with the rows of a smaller one.

Command line:
    python -m levi_jax.data.synthetic_scale --out DIR --ratings N [--seed=S] [--categories=A,B]
"""

from __future__ import annotations

import calendar
import contextlib
import dataclasses
import gzip
import io
import json
import math
import os
import time
from typing import Sequence

import numpy as np

from levi_jax import cli
from levi_jax.data import schema
from levi_jax.data.synthetic import AMAZON_CATEGORIES

SUBDIR = "amazon_2018"
MANIFEST = "synthetic_scale.json"
DEFAULT_CATEGORIES = tuple(c[0] for c in AMAZON_CATEGORIES)
DEFAULT_CHUNK_ROWS = 1 << 14

# Pools: row r draws among the first USERS_0 + r // ROWS_PER_USER users (likewise items).
USERS_0, ROWS_PER_USER = 1000, 20
ITEMS_0, ROWS_PER_ITEM = 500, 50
USER_ZIPF, ITEM_ZIPF = 2.0, 2.5  # index = floor(pool * v ** exponent)
MEAN_RATING, BIAS_SCALE, FACTOR_SCALE, NOISE_SCALE, RANK = 4.0, 0.35, 0.45, 0.6, 4
# Time of row r: T0 + GAP0 * R0 * log1p(r / R0) seconds (GAP0 s between the first rows,
# shrinking as the site grows) until the gap reaches MIN_GAP, then MIN_GAP per row. Gaps
# of at least 2 s keep floor()ed timestamps distinct.
T0 = calendar.timegm((1997, 1, 1, 0, 0, 0))
GAP0, R0, MIN_GAP = 600.0, 1e5, 2.0
_R1 = R0 * (GAP0 / MIN_GAP - 1)  # where the gap reaches MIN_GAP
META_MISSING = 0.02

_BRANDS = ("Acme", "Northwind", "Bluebird", "Kestrel", "Orion", "Maple & Co", "Zephyr", "Lumen",
           "Müller & Söhne", "Café Noël", "Señora", "Åkerlund")
_ADJECTIVES = ("Silent", "Crimson", "Hidden", "Classic", "Wild", "Compact", "Deluxe", "Frozen",
               "Midnight", "Electric", "Gentle", "Velvet", "Portable", "Smart", "Vintage",
               "Premium")
_NOUNS = ("Edition", "Collection", "Set", "Kit", "Series", "Pack", "Bundle", "Box", "Guide",
          "Façade", "Château", "Piñata")
_SUBCATS = ("Bestsellers", "New Releases", "Accessories", "Gifts")


@dataclasses.dataclass(frozen=True)
class ScaleReport:
  """What `write_scale_world` wrote.

  Attributes:
    rows: rating rows written.
    users, items: the user and item pools (not all of them rated).
    meta_rows: metadata lines written.
    files: file name (under `out_dir/amazon_2018`) -> bytes on disk.
    bytes: bytes on disk, all files.
    seconds: wall time of the write.
    rows_per_s: rows / seconds.
  """

  rows: int
  users: int
  items: int
  meta_rows: int
  files: dict[str, int]
  bytes: int
  seconds: float
  rows_per_s: float


# --- Hashes: entity attributes as functions of (seed, index, salt) ----------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64's finalizer (uint64 arithmetic wraps)."""
  x = x ^ (x >> np.uint64(30))
  x = x * np.uint64(0xBF58476D1CE4E5B9)
  x = x ^ (x >> np.uint64(27))
  x = x * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def _uniform(seed: int, ids: np.ndarray, salt: int) -> np.ndarray:
  """A uniform in [0, 1) per id, fixed by (seed, id, salt)."""
  with np.errstate(over="ignore"):  # scalars warn on the wrap arrays do silently
    key = _mix(np.uint64((seed * 1_000_003 + salt) & 0xFFFFFFFFFFFFFFFF))
  return (_mix(ids.astype(np.uint64) * _GOLDEN + key) >> np.uint64(11)) * (1.0 / (1 << 53))


def _normal(seed: int, ids: np.ndarray, salt: int) -> np.ndarray:
  """A standard normal per id (Box-Muller on two hashed uniforms)."""
  u1, u2 = _uniform(seed, ids, 2 * salt), _uniform(seed, ids, 2 * salt + 1)
  return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2 * np.pi * u2)


_USER, _ITEM = 1 << 20, 2 << 20  # salt ranges


def _user_latents(seed: int, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(bias, factors [n, RANK]) of users `u`."""
  bias = BIAS_SCALE * _normal(seed, u, _USER)
  factors = np.stack([FACTOR_SCALE * _normal(seed, u, _USER + 1 + k) for k in range(RANK)], -1)
  return bias, factors


def _item_latents(seed: int, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  bias = BIAS_SCALE * _normal(seed, i, _ITEM)
  factors = np.stack([FACTOR_SCALE * _normal(seed, i, _ITEM + 1 + k) for k in range(RANK)], -1)
  return bias, factors


def _item_category(seed: int, i: np.ndarray, num_categories: int) -> np.ndarray:
  """Category index of items `i`: category c with weight proportional to 1 / (c + 2)."""
  w = 1.0 / (np.arange(num_categories) + 2.0)
  cdf = np.cumsum(w) / w.sum()
  return np.minimum(np.searchsorted(cdf, _uniform(seed, i, _ITEM + 100), side="right"),
                    num_categories - 1)


def _pick(seed: int, i: np.ndarray, salt: int, n: int) -> np.ndarray:
  return (_uniform(seed, i, salt) * n).astype(np.int64)


def _item_noun(seed: int, i: np.ndarray) -> np.ndarray:
  return _pick(seed, i, _ITEM + 103, len(_NOUNS))


# --- Rows -------------------------------------------------------------------------------------

def row_timestamps(r: np.ndarray) -> np.ndarray:
  """unixReviewTime of rows `r`: strictly increasing in r (see the module docstring)."""
  r = r.astype(np.float64)
  early = GAP0 * R0 * np.log1p(np.minimum(r, _R1) / R0)
  return T0 + np.floor(early + MIN_GAP * np.maximum(r - _R1, 0.0)).astype(np.int64)


def pools(rows: int) -> tuple[int, int]:
  """(users, items) a world of `rows` ratings draws from."""
  last = max(rows - 1, 0)
  return USERS_0 + last // ROWS_PER_USER, ITEMS_0 + last // ROWS_PER_ITEM


def draw_chunk(seed: int, chunk: int, chunk_rows: int,
               num_rows: int) -> dict[str, np.ndarray]:
  """Rows [chunk * chunk_rows, min(next chunk, num_rows)): user, item, rating, timestamp."""
  lo, hi = chunk * chunk_rows, min((chunk + 1) * chunk_rows, num_rows)
  rng = np.random.default_rng([seed, chunk_rows, chunk])
  r = np.arange(lo, hi, dtype=np.int64)
  n = len(r)
  # Full-chunk draws, cut to n: a last, partial chunk holds the same rows as a full one.
  v_user, v_item = rng.random(chunk_rows)[:n], rng.random(chunk_rows)[:n]
  noise = rng.normal(0, NOISE_SCALE, chunk_rows)[:n]
  u = ((USERS_0 + r // ROWS_PER_USER) * v_user ** USER_ZIPF).astype(np.int64)
  i = ((ITEMS_0 + r // ROWS_PER_ITEM) * v_item ** ITEM_ZIPF).astype(np.int64)
  bu, pu = _user_latents(seed, u)
  bi, qi = _item_latents(seed, i)
  score = MEAN_RATING + bu + bi + (pu * qi).sum(-1) + noise
  return {"user": u, "item": i, "rating": np.clip(np.rint(score), 1, 5).astype(np.int64),
          "timestamp": row_timestamps(r)}


_REVIEW = ('{"overall": %d.0, "verified": true, "reviewTime": "%s", "reviewerID": "A%012X", '
           '"asin": "B%09d", "reviewerName": "Reader %d", "reviewText": "%s %s.", '
           '"summary": "%d stars", "unixReviewTime": %d}\n')
_REVIEWER_MUL = 0x5DEECE66D  # odd: u -> u * _REVIEWER_MUL mod 2^48 is a bijection


def _review_lines(seed: int, rows: dict[str, np.ndarray]) -> list[str]:
  """The JSON lines of `rows`, one per row, in order."""
  days, day_index = np.unique(rows["timestamp"] // 86400, return_inverse=True)
  day_text = [time.strftime("%m %d, %Y", time.gmtime(int(d) * 86400)) for d in days]
  code = (rows["user"].astype(np.uint64) * np.uint64(_REVIEWER_MUL)) & np.uint64((1 << 48) - 1)
  nouns = [w.lower() for w in _NOUNS]
  return [_REVIEW % (r, day_text[d], c, i + 1, u + 1, "Good" if r >= 4 else "Poor", nouns[w],
                     r, t)
          for r, d, c, i, u, w, t in zip(rows["rating"].tolist(), day_index.tolist(),
                                         code.tolist(), rows["item"].tolist(),
                                         rows["user"].tolist(),
                                         _item_noun(seed, rows["item"]).tolist(),
                                         rows["timestamp"].tolist())]


def _display(category: str) -> str:
  known = {c[0]: c[2] for c in AMAZON_CATEGORIES}
  return known.get(category) or category.replace("_and_", " & ").replace("_", " ")


def _meta_lines(seed: int, items: np.ndarray, categories: Sequence[str],
                cats: np.ndarray) -> list[str]:
  """Metadata JSON lines of `items` (those hashed to have metadata), in order."""
  has = _uniform(seed, items, _ITEM + 104) >= META_MISSING
  brand = _pick(seed, items, _ITEM + 101, len(_BRANDS) + 2)  # the last two: no brand
  adj = _pick(seed, items, _ITEM + 102, len(_ADJECTIVES))
  noun = _item_noun(seed, items)
  sub = _pick(seed, items, _ITEM + 105, len(_SUBCATS))
  price = np.exp(np.log(20.0) + 0.9 * _normal(seed, items, _ITEM + 106))
  price_kind = _uniform(seed, items, _ITEM + 108)  # < 0.87 a price, < 0.97 none, else a range
  out = []
  for i, h, b, a, w, s, p, k, c in zip(items.tolist(), has.tolist(), brand.tolist(), adj.tolist(),
                                       noun.tolist(), sub.tolist(), price.tolist(),
                                       price_kind.tolist(), cats.tolist()):
    if not h:
      continue
    display = _display(categories[c])
    rec = {"asin": f"B{i + 1:09d}",
           "title": f"{_BRANDS[b] if b < len(_BRANDS) else 'Generic'} {_ADJECTIVES[a]} {_NOUNS[w]}",
           "category": [display, _SUBCATS[s]], "main_cat": display}
    if b < len(_BRANDS):
      rec["brand"] = _BRANDS[b]
    if k < 0.87:
      rec["price"] = f"${p:.2f}"
    elif k >= 0.97:
      rec["price"] = f"${p:.2f} - ${2 * p:.2f}"
    out.append(json.dumps(rec, ensure_ascii=False) + "\n")
  return out


def _check_categories(categories: Sequence[str]) -> None:
  if not categories:
    raise ValueError("at least one category")
  if len(set(categories)) != len(categories):
    raise ValueError(f"repeated categories in {list(categories)}")
  for c in categories:
    if not schema.AMAZON_REVIEWS_RE.match(f"{c}.json.gz") or c.startswith("meta_"):
      raise ValueError(f"category {c!r}: file {c}.json.gz would not be read as Amazon 2018 "
                       "reviews (a capitalized name of letters, digits, _ , & -)")


def _open_gz(stack: contextlib.ExitStack, path: str) -> io.TextIOWrapper:
  """`path`.tmp as UTF-8 text into gzip level 1, its header naming `path` with mtime 0
  (so the bytes depend on the content only); closed with `stack`."""
  raw = stack.enter_context(open(path + ".tmp", "wb"))
  gz = stack.enter_context(
      gzip.GzipFile(os.path.basename(path), "wb", compresslevel=1, fileobj=raw, mtime=0))
  return stack.enter_context(io.TextIOWrapper(gz, encoding="utf-8", newline=""))


def write_scale_world(out_dir: str, num_ratings: int, seed: int = 0,
                      categories: Sequence[str] = DEFAULT_CATEGORIES,
                      chunk_rows: int = DEFAULT_CHUNK_ROWS) -> ScaleReport:
  """Writes an Amazon 2018 world of `num_ratings` ratings under `out_dir/amazon_2018`.

  Files are written as `<name>.tmp` (which the reader ignores) and renamed into
  place when complete; existing files of the same names are replaced.

  Args:
    out_dir: the data dir (`load_table("amazon_2018", out_dir)` reads it).
    num_ratings: rating rows to write.
    seed: fixes every draw; with `chunk_rows`, the output bytes.
    categories: Amazon 2018 category file names (`Books` -> Books.json.gz).
    chunk_rows: rows drawn and written at a time; memory is proportional to it.

  Returns:
    The report (also written to `out_dir/synthetic_scale.json`).

  Raises:
    ValueError: a bad category name, or more ratings than fit before now.
  """
  _check_categories(categories)
  if num_ratings < 1 or chunk_rows < 1:
    raise ValueError(f"num_ratings and chunk_rows must be positive, got {num_ratings}, "
                     f"{chunk_rows}")
  last = int(row_timestamps(np.array([num_ratings - 1]))[0])
  if last > time.time():
    raise ValueError(f"{num_ratings} ratings reach {time.strftime('%Y-%m-%d', time.gmtime(last))}"
                     ", past today")
  start = time.perf_counter()
  d = os.path.join(out_dir, SUBDIR)
  os.makedirs(d, exist_ok=True)
  names = [f"{c}.json.gz" for c in categories] + [f"meta_{c}.json.gz" for c in categories]
  num_c = len(categories)
  with contextlib.ExitStack() as stack:
    handles = [_open_gz(stack, os.path.join(d, n)) for n in names]
    for chunk in range(math.ceil(num_ratings / chunk_rows)):
      rows = draw_chunk(seed, chunk, chunk_rows, num_ratings)
      cats = _item_category(seed, rows["item"], num_c)
      order = np.argsort(cats, kind="stable")
      lines = _review_lines(seed, {k: v[order] for k, v in rows.items()})
      ends = np.cumsum(np.bincount(cats, minlength=num_c)).tolist()
      for c, (a, b) in enumerate(zip([0] + ends[:-1], ends)):
        if b > a:
          handles[c].write("".join(lines[a:b]))
    num_users, num_items = pools(num_ratings)
    meta_rows = 0
    for lo in range(0, num_items, chunk_rows):
      items = np.arange(lo, min(lo + chunk_rows, num_items), dtype=np.int64)
      cats = _item_category(seed, items, num_c)
      for c in range(num_c):
        lines = _meta_lines(seed, items[cats == c], categories, cats[cats == c])
        meta_rows += len(lines)
        handles[num_c + c].write("".join(lines))
  files = {}
  for n in names:
    os.replace(os.path.join(d, n + ".tmp"), os.path.join(d, n))
    files[n] = os.path.getsize(os.path.join(d, n))
  seconds = time.perf_counter() - start
  report = ScaleReport(num_ratings, num_users, num_items, meta_rows, files, sum(files.values()),
                       seconds, num_ratings / seconds)
  with open(os.path.join(out_dir, MANIFEST), "w") as f:
    json.dump({"config": {"num_ratings": num_ratings, "seed": seed,
                          "categories": list(categories), "chunk_rows": chunk_rows},
               "report": dataclasses.asdict(report)}, f, indent=1, sort_keys=True)
  return report


@dataclasses.dataclass(frozen=True)
class Settings:
  """The flags of `python -m levi_jax.data.synthetic_scale`."""
  out: str = cli.field(help="data dir; files go to OUT/amazon_2018/")
  ratings: int = cli.field(help="rating rows to write")
  seed: int = cli.field(0, "the world's seed")
  categories: tuple[str, ...] = cli.field(tuple(DEFAULT_CATEGORIES),
                                          "comma-separated Amazon categories")
  chunk_rows: int = cli.field(DEFAULT_CHUNK_ROWS, "rows generated and written at a time")


def write(settings: Settings) -> ScaleReport:
  """Writes the world `settings` describe; prints and returns the report."""
  rep = write_scale_world(settings.out, settings.ratings, settings.seed,
                          list(settings.categories), settings.chunk_rows)
  print(f"{rep.rows} ratings ({rep.users} users, {rep.items} items, {rep.meta_rows} metadata "
        f"lines) in {rep.seconds:.1f} s: {rep.rows_per_s:,.0f} rows/s, "
        f"{rep.bytes / 1e6:.1f} MB on disk in {os.path.join(settings.out, SUBDIR)}")
  return rep


def main(argv: Sequence[str] | None = None) -> ScaleReport | None:
  """The command line; `argv` (arguments without the program name) for a call from Python."""
  if argv is not None:
    return write(cli.parse(Settings, argv))
  cli.main(Settings, lambda settings, _: write(settings), "levi_jax.data.synthetic_scale")
  return None


if __name__ == "__main__":
  main()
