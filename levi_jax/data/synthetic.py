"""A synthetic world in the publishers' raw formats, with planted spurious features.

`write_world(out_dir, ...)` writes, from one seed:

    out_dir/ml-100k/{u.data,u.user,u.item}          fine-tuning world, MovieLens 100K format
    out_dir/ml-1m/{ratings.dat,users.dat,movies.dat} the same world, MovieLens 1M format
    out_dir/amazon_2018/<Cat>.json.gz, meta_<Cat>.json.gz   a product world, Amazon 2018 format
    out_dir/amazon_us/amazon_reviews_us_<Cat>_v1_00.tsv.gz  the same products, amazon_us TSVs
    out_dir/pretrain/ml-100k/...                    the pre-training corpus, MovieLens 100K format
    out_dir/spm.model                               SentencePiece model on all of their text
    out_dir/truth.npz                               latent variables (biases, z, s, p, tastes)
    out_dir/world.json                              the configuration and each file's sha256

The same configuration gives byte-identical files.

## Generative model (MovieLens worlds)

Transferable structure, shared by the fine-tuning world and the pre-training
corpus and holding in every population:
  * 18 genres; each user has a taste vector t_u = W_gender[g_u] + W_age[a_u] +
    W_occ[o_u] + e_u, with W_* ~ N(0, taste_scale^2) fixed by the seed and
    e_u ~ N(0, (taste_scale/2)^2): demographics (visible in the text and the
    side features) predict taste, so it transfers to unseen users.
  * user bias b_u ~ N(0, user_bias_scale^2), item bias b_i ~ N(0, item_bias_scale^2).
  * items have 1-3 genres G_i (popular genres more often), a release year, a
    title and a popularity weight w_i ~ LogNormal(0, 1).
  * each user rates n_u ~ LogNormal items (at least 5), drawn without replacement
    with probability proportional to w_i, at times after a uniformly drawn join time;
  * rating = clip(round(mean_rating + b_u + b_i + mean_{g in G_i} t_u[g] + eps), 1, 5),
    eps ~ N(0, noise_scale^2).

Non-transferable structure, with z_u = [b_u > 0] and z_i = [b_i > 0]:
  (a) fine-tuning spurious feature: the first digit of the user's zip code is
      5-9 ("high region", s_u = 1) or 0-4. Within the ID population (the users
      in the training population of `spurious_shift`, by default men), exactly
      round(n (1 + spurious_strength) / 2) of the n users have s_u = z_u, the
      others s_u = 1 - z_u; so P(s_u = z_u) = (1 + strength) / 2 and, z being
      balanced, corr(s_u, z_u) ~= spurious_strength. Among the other users the
      same holds with `spurious_ood_strength` (0: independent). The region
      therefore predicts a user's rating level in the ID population only.
  (b) pre-training spurious feature: a "prestige" word (Golden, Royal, Grand,
      Legendary) in the title. In the pre-training corpus (its own users and
      items, same W) P(p_i = z_i) = (1 + pretrain_strength) / 2 exactly as in (a),
      so a backbone pre-trained to predict its ratings learns that prestige
      titles rate higher. In the fine-tuning world the same construction with
      strength 0 makes prestige independent of z_i (agreement exactly 1/2).

## Amazon world

Products in six categories (three media, three goods, named as in the Amazon
2018 files and, for the TSVs, as in amazon_us_reviews), with brands, prices
(some missing or given as ranges) and category paths; users have a taste per
category and a bias; rating = clip(round(4.1 + b_u + b_i + taste + eps), 1, 5).
Some optional JSON fields are left out, as in the real files.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import shutil
import time
import zlib
from typing import Any

import numpy as np

from levi_jax.data import datasets, paths, schema, shifts, spm

# Bump on any change of the generated content. The cache key also covers the
# generator's source and the numpy/sentencepiece versions (`paths.code_digest`):
# version 1's cache key did not, and a world cached by an earlier draft of the
# generator outlived the change that gave the fine-tuning world's prestige titles
# their exact independence.
GENERATOR_VERSION = 2
GENERATOR_MODULES = ("levi_jax.data.synthetic", "levi_jax.data.schema", "levi_jax.data.formats",
                     "levi_jax.data.datasets", "levi_jax.data.table", "levi_jax.data.spm",
                     "levi_jax.data.shifts")
GENERATOR_PACKAGES = ("numpy", "sentencepiece")
FORMATS = ("ml-100k", "ml-1m", "amazon_2018", "amazon_us")
WORLD_GENRES = schema.ML100K_GENRE_FLAGS[1:]  # 18 genres, "Unknown" left out.
_GENRE_WEIGHTS = np.array([6, 4, 1.5, 2, 9, 3, 1, 12, 1, 0.8, 2.5, 1.5, 1.8, 5, 2.5, 5, 1.5, 1])
OCCUPATIONS = ("academic/educator", "artist", "clerical/admin", "doctor/health care",
               "executive/managerial", "homemaker", "lawyer", "other/not specified",
               "programmer", "retired", "sales/marketing", "scientist", "student",
               "technician/engineer", "writer")
_OCC_100K = {"academic/educator": "educator", "artist": "artist", "clerical/admin": "administrator",
             "doctor/health care": "doctor", "executive/managerial": "executive",
             "homemaker": "homemaker", "lawyer": "lawyer", "other/not specified": "other",
             "programmer": "programmer", "retired": "retired", "sales/marketing": "marketing",
             "scientist": "scientist", "student": "student", "technician/engineer": "engineer",
             "writer": "writer"}
_AGE_PROBS = np.array([0.04, 0.18, 0.35, 0.2, 0.09, 0.08, 0.06])
_AGE_RANGES = {1: (10, 17), 18: (18, 24), 25: (25, 34), 35: (35, 44), 45: (45, 49), 50: (50, 55),
               56: (56, 73)}
PRESTIGE_WORDS = ("Golden", "Royal", "Grand", "Legendary")
_ADJECTIVES = ("Silent", "Crimson", "Hidden", "Last", "Broken", "Lonely", "Wild", "Secret",
               "Distant", "Frozen", "Midnight", "Burning", "Quiet", "Electric", "Lost", "Savage",
               "Gentle", "Restless", "Velvet", "Hollow")
_NOUNS = ("Harbor", "River", "Empire", "Garden", "Witness", "Journey", "Promise", "Storm",
          "Mirror", "Frontier", "Kingdom", "Station", "Summer", "Letter", "Horizon", "Café",
          "Señor", "Noël", "Façade", "Château", "Fiancée", "Piñata", "Müller", "Déjà Vu")
# (Amazon 2018 file name, amazon_us TSV category, display name, media?)
AMAZON_CATEGORIES = (("Books", "Books", "Books", True),
                     ("Movies_and_TV", "Video_DVD", "Movies & TV", True),
                     ("CDs_and_Vinyl", "Music", "CDs & Vinyl", True),
                     ("Electronics", "Electronics", "Electronics", False),
                     ("Home_and_Kitchen", "Kitchen", "Home & Kitchen", False),
                     ("Toys_and_Games", "Toys", "Toys & Games", False))
_BRANDS = ("Acme", "Northwind", "Bluebird", "Kestrel", "Orion", "Maple & Co", "Zephyr", "Lumen")
_SUBCATS = {"Books": ("Literature & Fiction", "History", "Science"),
            "Movies_and_TV": ("Drama", "Comedy", "Documentary"),
            "CDs_and_Vinyl": ("Rock", "Jazz", "Classical"),
            "Electronics": ("Headphones", "Cables", "Cameras"),
            "Home_and_Kitchen": ("Cookware", "Bedding", "Storage"),
            "Toys_and_Games": ("Puzzles", "Board Games", "Dolls")}
_PRODUCT_NOUNS = ("Edition", "Collection", "Set", "Kit", "Classic", "Deluxe", "Series", "Pack")
_TSV_HEADER = ("marketplace", "customer_id", "review_id", "product_id", "product_parent",
               "product_title", "product_category", "star_rating", "helpful_votes",
               "total_votes", "vine", "verified_purchase", "review_headline", "review_body",
               "review_date")


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  """Parameters of a synthetic world (see the module docstring).

  Attributes:
    seed: everything is drawn from streams derived from it.
    num_users, num_items, ratings_per_user: the fine-tuning MovieLens world.
    spurious_strength: (a) in the ID population, 2 P(s_u = z_u) - 1.
    spurious_ood_strength: (a) among the other users.
    spurious_shift: the MovieLens shift whose training population is the ID
      population of (a); its training clauses must use user attributes only.
    pretrain_strength: (b) in the pre-training corpus, 2 P(p_i = z_i) - 1.
    pretrain_num_users, pretrain_num_items: size of the pre-training corpus.
    amazon_num_users, amazon_num_items, amazon_ratings_per_user: the Amazon world.
    mean_rating, user_bias_scale, item_bias_scale, taste_scale, noise_scale: the
      rating model.
    vocab_size: SentencePiece vocabulary size (an upper bound on small corpora).
    formats: which of `FORMATS` to write (the pre-training corpus is always written).
  """

  seed: int = 0
  num_users: int = 600
  num_items: int = 400
  ratings_per_user: float = 30.0
  spurious_strength: float = 0.8
  spurious_ood_strength: float = 0.0
  spurious_shift: str = "gender_m_to_f"
  pretrain_strength: float = 0.8
  pretrain_num_users: int = 600
  pretrain_num_items: int = 400
  amazon_num_users: int = 500
  amazon_num_items: int = 300
  amazon_ratings_per_user: float = 12.0
  mean_rating: float = 3.5
  user_bias_scale: float = 0.4
  item_bias_scale: float = 0.4
  taste_scale: float = 0.35
  noise_scale: float = 0.5
  vocab_size: int = spm.DEFAULT_VOCAB_SIZE
  formats: tuple[str, ...] = FORMATS

  def __post_init__(self):
    for name in ("spurious_strength", "spurious_ood_strength", "pretrain_strength"):
      if not -1.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"{name} must lie in [-1, 1], got {getattr(self, name)}")
    for name in ("num_users", "num_items", "pretrain_num_users", "pretrain_num_items",
                 "amazon_num_users", "amazon_num_items"):
      if getattr(self, name) < 10:
        raise ValueError(f"{name} must be >= 10, got {getattr(self, name)}")
    if self.ratings_per_user < 5 or self.amazon_ratings_per_user < 2:
      raise ValueError("ratings_per_user must be >= 5 and amazon_ratings_per_user >= 2")
    unknown = set(self.formats) - set(FORMATS)
    if unknown:
      raise ValueError(f"unknown formats {sorted(unknown)}; choose from {FORMATS}")
    _spurious_shift(self.spurious_shift)


def _spurious_shift(name: str) -> shifts.Shift:
  static = {"user_gender", "bucketized_user_age", "user_occupation_label"}
  for s in shifts.SHIFTS:
    if s.family == "movielens" and s.name == name:
      if not {c.column for c in s.train} <= static:
        raise ValueError(f"spurious_shift {name!r}: its training population must be defined "
                         f"on {sorted(static)} only")
      return s
  raise ValueError(f"spurious_shift {name!r} is not a MovieLens shift")


def _rng(config: WorldConfig, stream: str) -> np.random.Generator:
  return np.random.default_rng([config.seed, zlib.crc32(stream.encode())])


def _tie(z: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
  """A binary feature agreeing with `z` on exactly round(n (1 + strength) / 2) entries."""
  n = len(z)
  agree = np.zeros(n, bool)
  agree[rng.permutation(n)[:int(round(n * (1 + strength) / 2))]] = True
  return np.where(agree, z, ~z)


@dataclasses.dataclass
class _MovieWorld:
  users: dict[str, np.ndarray]
  items: dict[str, Any]
  ratings: np.ndarray  # [n, 4] user index, item index, rating, timestamp


def _structure(config: WorldConfig) -> dict[str, np.ndarray]:
  rng = _rng(config, "structure")
  g = len(WORLD_GENRES)
  s = config.taste_scale
  return {"gender": rng.normal(0, s, (2, g)),
          "age": rng.normal(0, s, (len(schema.AGE_BUCKETS), g)),
          "occupation": rng.normal(0, s, (len(OCCUPATIONS), g))}


def _movie_world(config: WorldConfig, prefix: str, n_users: int, n_items: int,
                 spurious: tuple[float, float] | None, prestige_strength: float | None,
                 start: int, end: int) -> _MovieWorld:
  """Users, items and ratings of one MovieLens-style world."""
  structure = _structure(config)
  rng = _rng(config, prefix + "/users")
  male = rng.random(n_users) < 0.71
  age_idx = rng.choice(len(schema.AGE_BUCKETS), n_users, p=_AGE_PROBS)
  bucket = np.asarray(schema.AGE_BUCKETS)[age_idx]
  raw_age = np.array([rng.integers(_AGE_RANGES[b][0], _AGE_RANGES[b][1] + 1) for b in bucket])
  student = OCCUPATIONS.index("student")
  others = [k for k in range(len(OCCUPATIONS)) if k != student]
  occ = np.where((raw_age < 23) & (rng.random(n_users) < 0.7), student,
                 rng.choice(others, n_users))
  bias_u = rng.normal(0, config.user_bias_scale, n_users)
  taste = (structure["gender"][male.astype(int)] + structure["age"][age_idx]
           + structure["occupation"][occ]
           + rng.normal(0, config.taste_scale / 2, (n_users, len(WORLD_GENRES))))
  occ_label = np.empty(n_users, dtype=object)
  occ_label[:] = [OCCUPATIONS[k] for k in occ]
  users = {"user_id": np.array([str(u + 1) for u in range(n_users)]), "user_gender": male,
           "bucketized_user_age": bucket.astype(np.float32), "raw_user_age": raw_age,
           "user_occupation_label": occ_label, "bias": bias_u, "z": bias_u > 0,
           "taste": taste}
  in_id = _spurious_shift(config.spurious_shift).population_mask(users, "train")
  srng = _rng(config, prefix + "/spurious")
  if spurious is None:
    zip_high = srng.permutation(np.arange(n_users) < n_users // 2)
  else:
    zip_high = np.zeros(n_users, bool)
    for mask, strength in ((in_id, spurious[0]), (~in_id, spurious[1])):
      zip_high[mask] = _tie(users["z"][mask], strength, srng)
  region = np.where(zip_high, srng.integers(5, 10, n_users), srng.integers(0, 5, n_users))
  users["user_zip_code"] = np.array([f"{d}{srng.integers(0, 10000):04d}" for d in region])
  users.update(in_id_population=in_id, zip_high=zip_high)

  rng = _rng(config, prefix + "/items")
  k = rng.choice([1, 2, 3], n_items, p=[0.5, 0.35, 0.15])
  p_genre = _GENRE_WEIGHTS / _GENRE_WEIGHTS.sum()
  genres = [np.sort(rng.choice(len(WORLD_GENRES), kk, replace=False, p=p_genre)) for kk in k]
  year = 1998 - np.minimum(np.floor(rng.exponential(10, n_items)), 68).astype(int)
  bias_i = rng.normal(0, config.item_bias_scale, n_items)
  z_i = bias_i > 0
  prng = _rng(config, prefix + "/prestige")
  prestige = _tie(z_i, prestige_strength or 0.0, prng)
  titles = []
  for i in range(n_items):
    first = (PRESTIGE_WORDS[rng.integers(len(PRESTIGE_WORDS))] if prestige[i]
             else _ADJECTIVES[rng.integers(len(_ADJECTIVES))])
    article = "The " if rng.random() < 0.5 else ""
    sequel = ": Part II" if rng.random() < 0.1 else ""
    titles.append(f"{article}{first} {_NOUNS[rng.integers(len(_NOUNS))]}{sequel} ({year[i]})")
  popularity = rng.lognormal(0, 1, n_items)
  items = {"item_id": np.array([str(i + 1) for i in range(n_items)]), "title": titles,
           "genres": genres, "year": year, "bias": bias_i, "z": z_i, "prestige": prestige}

  rng = _rng(config, prefix + "/ratings")
  p_item = popularity / popularity.sum()
  sigma = 0.6
  rows = []
  for u in range(n_users):
    n_u = int(np.clip(round(rng.lognormal(np.log(config.ratings_per_user) - sigma ** 2 / 2, sigma)),
                      5, n_items))
    chosen = rng.choice(n_items, n_u, replace=False, p=p_item)
    join = rng.uniform(start, end - 20 * 86400)
    times = np.minimum(join + np.cumsum(rng.exponential(86400, n_u)), end).astype(np.int64)
    taste_term = np.array([taste[u, genres[i]].mean() for i in chosen])
    score = (config.mean_rating + bias_u[u] + bias_i[chosen] + taste_term
             + rng.normal(0, config.noise_scale, n_u))
    rating = np.clip(np.rint(score), 1, 5).astype(np.int64)
    rows.append(np.stack([np.full(n_u, u), chosen, rating, times], axis=1))
  return _MovieWorld(users, items, np.concatenate(rows))


def _write(path: str, data: bytes, gz: bool = False) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if gz:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as f:
      f.write(data)
    data = buf.getvalue()
  with open(path, "wb") as f:
    f.write(data)


def _write_ml100k(world: _MovieWorld, d: str) -> None:
  u, it = world.users, world.items
  _write(os.path.join(d, "u.user"), "".join(
      f"{u['user_id'][k]}|{u['raw_user_age'][k]}|{'M' if u['user_gender'][k] else 'F'}|"
      f"{_OCC_100K[u['user_occupation_label'][k]]}|{u['user_zip_code'][k]}\n"
      for k in range(len(u["user_id"]))).encode("latin-1"))
  lines = []
  for i in range(len(it["item_id"])):
    flags = ["0"] * len(schema.ML100K_GENRE_FLAGS)
    for g in it["genres"][i]:
      flags[schema.ML100K_GENRE_FLAGS.index(WORLD_GENRES[g])] = "1"
    url = "http://us.imdb.com/M/title-exact?" + it["title"][i].replace(" ", "%20")
    lines.append(f"{it['item_id'][i]}|{it['title'][i]}|01-Jan-{it['year'][i]}||{url}|"
                 + "|".join(flags) + "\n")
  _write(os.path.join(d, "u.item"), "".join(lines).encode("latin-1"))
  _write(os.path.join(d, "u.data"), "".join(
      f"{u['user_id'][a]}\t{it['item_id'][b]}\t{r}\t{t}\n" for a, b, r, t in world.ratings
  ).encode("latin-1"))


def _write_ml1m(world: _MovieWorld, d: str) -> None:
  u, it = world.users, world.items
  lines = []
  for k in range(len(u["user_id"])):
    label = u["user_occupation_label"][k]
    if label == "student":
      label = "college/grad student" if u["raw_user_age"][k] >= 18 else "K-12 student"
    lines.append(f"{u['user_id'][k]}::{'M' if u['user_gender'][k] else 'F'}::"
                 f"{int(u['bucketized_user_age'][k])}::{schema.ML1M_OCCUPATIONS.index(label)}::"
                 f"{u['user_zip_code'][k]}\n")
  _write(os.path.join(d, "users.dat"), "".join(lines).encode("latin-1"))
  _write(os.path.join(d, "movies.dat"), "".join(
      f"{it['item_id'][i]}::{it['title'][i]}::"
      + "|".join("Children's" if WORLD_GENRES[g] == "Children" else WORLD_GENRES[g]
                 for g in it["genres"][i]) + "\n"
      for i in range(len(it["item_id"]))).encode("latin-1"))
  order = np.lexsort((world.ratings[:, 3], world.ratings[:, 0]))
  _write(os.path.join(d, "ratings.dat"), "".join(
      f"{u['user_id'][a]}::{it['item_id'][b]}::{r}::{t}\n" for a, b, r, t in world.ratings[order]
  ).encode("latin-1"))


def _write_amazon(config: WorldConfig, root: str) -> None:
  """Writes the Amazon world in the 2018 JSON and/or the amazon_us TSV format."""
  rng = _rng(config, "amazon")
  n_u, n_i = config.amazon_num_users, config.amazon_num_items
  cat = rng.choice(len(AMAZON_CATEGORIES), n_i, p=[0.25, 0.15, 0.1, 0.2, 0.15, 0.15])
  brand = [(_BRANDS[rng.integers(len(_BRANDS))] if rng.random() > 0.15 else "") for _ in range(n_i)]
  price = np.round(rng.lognormal(np.log(20), 0.9, n_i), 2)
  price_kind = rng.choice(3, n_i, p=[0.87, 0.1, 0.03])  # plain, missing, range
  bias_i = rng.normal(0, 0.35, n_i)
  popularity = rng.lognormal(0, 1, n_i)
  asins = [f"B{i + 1:09d}" for i in range(n_i)]
  titles = [f"{brand[i] or 'Generic'} {_ADJECTIVES[rng.integers(len(_ADJECTIVES))]} "
            f"{_PRODUCT_NOUNS[rng.integers(len(_PRODUCT_NOUNS))]}" for i in range(n_i)]
  subcat = [_SUBCATS[AMAZON_CATEGORIES[c][0]][rng.integers(3)] for c in cat]
  bias_u = rng.normal(0, 0.35, n_u)
  taste = rng.normal(0, 0.5, (n_u, len(AMAZON_CATEGORIES)))
  reviewer = [f"A{np.base_repr(7919 * u + 104729, 36):0>12}" for u in range(n_u)]
  start, end = 1325376000, 1440979200  # 2012-01-01 .. 2015-08-31
  reviews: dict[int, list[tuple]] = {c: [] for c in range(len(AMAZON_CATEGORIES))}
  sigma = 0.7
  p_item = popularity / popularity.sum()
  for u in range(n_u):
    n = int(np.clip(round(rng.lognormal(np.log(config.amazon_ratings_per_user) - sigma ** 2 / 2,
                                        sigma)), 2, n_i))
    chosen = rng.choice(n_i, n, replace=False, p=p_item)
    join = rng.uniform(start, end - 60 * 86400)
    times = np.minimum(join + np.cumsum(rng.exponential(7 * 86400, n)), end).astype(np.int64)
    times = times - times % 86400  # review dates are days
    score = 4.1 + bias_u[u] + bias_i[chosen] + taste[u, cat[chosen]] + rng.normal(0, 0.6, n)
    for i, t, r in zip(chosen, times, np.clip(np.rint(score), 1, 5).astype(int)):
      reviews[cat[i]].append((u, i, int(r), int(t), rng.random() < 0.05, rng.random() < 0.05))
  for c, (ni_name, us_name, display, _) in enumerate(AMAZON_CATEGORIES):
    items = [i for i in range(n_i) if cat[i] == c]
    if "amazon_2018" in config.formats:
      meta = []
      for i in items:
        if rng.random() < 0.02:
          continue  # Some reviewed items have no metadata line, as in the real files.
        rec: dict[str, Any] = {"asin": asins[i], "title": titles[i],
                               "category": [display, subcat[i]], "main_cat": display}
        if brand[i]:
          rec["brand"] = brand[i]
        if price_kind[i] == 0:
          rec["price"] = f"${price[i]:.2f}"
        elif price_kind[i] == 2:
          rec["price"] = f"${price[i]:.2f} - ${2 * price[i]:.2f}"
        meta.append(json.dumps(rec, ensure_ascii=False) + "\n")
      _write(os.path.join(root, "amazon_2018", f"meta_{ni_name}.json.gz"),
             "".join(meta).encode("utf-8"), gz=True)
      lines = []
      for u, i, r, t, no_text, no_summary in reviews[c]:
        rec = {"overall": float(r), "verified": True,
               "reviewTime": time.strftime("%m %d, %Y", time.gmtime(t)),
               "reviewerID": reviewer[u], "asin": asins[i], "reviewerName": f"Reader {u + 1}"}
        if not no_text:
          rec["reviewText"] = f"{'Good' if r >= 4 else 'Poor'} {titles[i].split()[-1].lower()}."
        if not no_summary:
          rec["summary"] = f"{r} stars"
        rec["unixReviewTime"] = t
        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
      _write(os.path.join(root, "amazon_2018", f"{ni_name}.json.gz"),
             "".join(lines).encode("utf-8"), gz=True)
    if "amazon_us" in config.formats:
      lines = ["\t".join(_TSV_HEADER) + "\n"]
      for k, (u, i, r, t, _, _) in enumerate(reviews[c]):
        lines.append("\t".join((
            "US", str(10_000_000 + 37 * u), f"R{c}{k:08d}", asins[i], str(500_000 + i),
            titles[i], us_name, str(r), "0", "0", "N", "Y", f"{r} stars",
            f"{'Good' if r >= 4 else 'Poor'} product.", time.strftime("%Y-%m-%d", time.gmtime(t))
        )) + "\n")
      _write(os.path.join(root, "amazon_us", f"amazon_reviews_us_{us_name}_v1_00.tsv.gz"),
             "".join(lines).encode("utf-8"), gz=True)


def write_world(out_dir: str, config: WorldConfig | None = None, **overrides: Any) -> WorldConfig:
  """Writes a synthetic world into `out_dir` (see the module docstring).

  Args:
    out_dir: directory to create or fill.
    config: the configuration (default `WorldConfig()`).
    **overrides: fields of `WorldConfig` to override, e.g. `seed=1, spurious_strength=0.5`.

  Returns:
    The configuration used.
  """
  config = dataclasses.replace(config or WorldConfig(), **overrides)
  os.makedirs(out_dir, exist_ok=True)
  ml_start, ml_end = 874724710, 893286638  # The time span of MovieLens 100K.
  ft = _movie_world(config, "finetune", config.num_users, config.num_items,
                    (config.spurious_strength, config.spurious_ood_strength), None,
                    ml_start, ml_end)
  pt = _movie_world(config, "pretrain", config.pretrain_num_users, config.pretrain_num_items,
                    None, config.pretrain_strength, ml_start, ml_end)
  if "ml-100k" in config.formats:
    _write_ml100k(ft, os.path.join(out_dir, "ml-100k"))
  if "ml-1m" in config.formats:
    _write_ml1m(ft, os.path.join(out_dir, "ml-1m"))
  _write_ml100k(pt, os.path.join(out_dir, "pretrain", "ml-100k"))
  if {"amazon_2018", "amazon_us"} & set(config.formats):
    _write_amazon(config, out_dir)
  np.savez(os.path.join(out_dir, "truth.npz"),
           user_id=ft.users["user_id"], user_bias=ft.users["bias"], user_z=ft.users["z"],
           user_zip_high=ft.users["zip_high"], user_in_id_population=ft.users["in_id_population"],
           user_taste=ft.users["taste"], genres=np.asarray(WORLD_GENRES),
           item_id=ft.items["item_id"], item_bias=ft.items["bias"], item_z=ft.items["z"],
           item_prestige=ft.items["prestige"], pretrain_item_id=pt.items["item_id"],
           pretrain_item_bias=pt.items["bias"], pretrain_item_z=pt.items["z"],
           pretrain_item_prestige=pt.items["prestige"])
  texts: list[str] = []
  names = {"ml-100k": "movielens_100k", "ml-1m": "movielens_1m", "amazon_2018": "amazon_2018",
           "amazon_us": "amazon_us"}
  for dataset in [names[f] for f in FORMATS if f in config.formats] + ["pretrain_corpus"]:
    table = datasets.DATASETS[dataset].parse(out_dir)
    user_text, item_text = datasets.side_texts(table)
    texts += [t for t in user_text if t] + list(item_text)
  spm.write_atomic(os.path.join(out_dir, spm.VOCAB_FILENAME),
                   spm.train_sentencepiece(sorted(set(texts)), config.vocab_size))
  files = sorted(os.path.relpath(os.path.join(d, f), out_dir)
                 for d, _, fs in os.walk(out_dir) for f in fs if f != "world.json")
  manifest = {"generator_version": GENERATOR_VERSION, "code": generator_digest(),
              "config": dataclasses.asdict(config),
              "files": {f: paths.file_sha256(os.path.join(out_dir, f)) for f in files}}
  with open(os.path.join(out_dir, "world.json"), "w") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
  return config


def generator_digest() -> str:
  """The generator's code (its modules' sources, numpy's and sentencepiece's versions)."""
  return paths.code_digest(GENERATOR_MODULES, GENERATOR_PACKAGES)


def default_world_dir(config: WorldConfig | None = None) -> str:
  """Where the world of `config` (default: `WorldConfig()`) is cached.

  Keyed by the generator version, its code (`generator_digest`) and the config.
  """
  config = config or WorldConfig()
  key = hashlib.sha256(json.dumps([GENERATOR_VERSION, generator_digest(),
                                   dataclasses.asdict(config)],
                                  sort_keys=True).encode()).hexdigest()[:16]
  return os.path.join(paths.cache_dir(), "worlds", f"world-{key}")


def ensure_default_world(config: WorldConfig | None = None) -> str:
  """The cached world of `config`, written first if absent (atomically)."""
  path = default_world_dir(config)
  if not os.path.exists(os.path.join(path, "world.json")):
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write_world(tmp, config)
    try:
      os.rename(tmp, path)
    except OSError:  # Written concurrently by another process; keep theirs.
      shutil.rmtree(tmp, ignore_errors=True)
  return path
