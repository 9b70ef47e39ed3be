"""The synthetic world: same seed same files, raw formats, planted structure at asked strengths."""

import json
import os
import re

import numpy as np
import pytest

from levi_jax.data import datasets, synthetic

SIZES = dict(num_users=500, num_items=240, ratings_per_user=20, pretrain_num_users=300,
             pretrain_num_items=400, amazon_num_users=60, amazon_num_items=40,
             amazon_ratings_per_user=4, vocab_size=300)
STRENGTHS = dict(spurious_strength=0.6, spurious_ood_strength=-0.4, pretrain_strength=0.5,
                 spurious_shift="age_young_to_old")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("world"))
  synthetic.write_world(d, seed=3, **SIZES, **STRENGTHS)
  return d


def _manifest(d):
  with open(os.path.join(d, "world.json")) as f:
    return json.load(f)


def test_same_seed_same_files_other_seed_other_files(tmp_path):
  small = dict(SIZES, num_users=40, num_items=30, pretrain_num_users=20, pretrain_num_items=20)
  a, b, c = (str(tmp_path / n) for n in "abc")
  synthetic.write_world(a, seed=5, **small)
  synthetic.write_world(b, seed=5, **small)
  synthetic.write_world(c, seed=6, **small)
  fa, fb, fc = (_manifest(d)["files"] for d in (a, b, c))
  assert fa == fb
  expected = {"ml-100k/u.data", "ml-100k/u.user", "ml-100k/u.item", "ml-1m/ratings.dat",
              "ml-1m/users.dat", "ml-1m/movies.dat", "pretrain/ml-100k/u.data", "spm.model",
              "truth.npz", "amazon_2018/Books.json.gz", "amazon_2018/meta_Books.json.gz",
              "amazon_us/amazon_reviews_us_Books_v1_00.tsv.gz"}
  assert expected <= set(fa)
  for f in fa:
    with open(os.path.join(a, f), "rb") as x, open(os.path.join(b, f), "rb") as y:
      assert x.read() == y.read(), f
  assert fa["ml-100k/u.data"] != fc["ml-100k/u.data"]
  assert _manifest(a)["config"]["seed"] == 5


def test_config_validation():
  with pytest.raises(ValueError, match="spurious_strength"):
    synthetic.WorldConfig(spurious_strength=1.5)
  with pytest.raises(ValueError, match="user attributes|training population must be defined"):
    synthetic.WorldConfig(spurious_shift="time_later")
  with pytest.raises(ValueError, match="not a MovieLens shift"):
    synthetic.WorldConfig(spurious_shift="category_media_to_goods")
  with pytest.raises(ValueError, match="unknown formats"):
    synthetic.WorldConfig(formats=("ml-20m",))


def test_files_are_in_the_publishers_formats(world):
  with open(os.path.join(world, "ml-100k", "u.item"), "rb") as f:
    first = f.readline().decode("latin-1").rstrip("\n").split("|")
  assert len(first) == 24 and set(first[5:]) <= {"0", "1"}
  with open(os.path.join(world, "ml-1m", "users.dat"), "rb") as f:
    assert len(f.readline().decode("latin-1").split("::")) == 5
  for name in ("movielens_100k", "movielens_1m", "amazon_2018", "amazon_us", "pretrain_corpus"):
    t = datasets.load_table(name, world, max_bad_fraction=0.0)
    assert t.num_rows > 0 and t.report.bad == 0, name
  titles = datasets.load_table("movielens_100k", world).items["movie_title"]
  assert any(not t.isascii() for t in titles), "Latin-1 titles are part of the world"
  amazon = datasets.load_table("amazon_2018", world)
  assert np.isnan(amazon.items["item_price"]).any() and (amazon.items["item_brand"] == "").any()


def _agreement(s, z):
  return 2 * np.mean(s == z) - 1


def _align(truth_ids, ids):
  """Positions in the truth arrays of the table's ids (tables hold rated items only)."""
  pos = {k: n for n, k in enumerate(truth_ids)}
  return np.array([pos[k] for k in ids])


def test_fine_tuning_spurious_feature_at_asked_strength(world):
  truth = np.load(os.path.join(world, "truth.npz"))
  t = datasets.load_table("movielens_100k", world)
  order = _align(truth["user_id"], t.users["user_id"])
  assert len(order) == len(truth["user_id"])
  # Observed from the written files: zip region 5-9 is the planted feature.
  s = np.array([int(z[0]) >= 5 for z in t.users["user_zip_code"]])
  z = truth["user_z"][order]
  in_id = truth["user_in_id_population"][order]
  assert np.array_equal(in_id, t.users["bucketized_user_age"] < 35)
  n_id, n_ood = in_id.sum(), (~in_id).sum()
  assert abs(_agreement(s[in_id], z[in_id]) - 0.6) <= 1.0 / n_id
  assert abs(_agreement(s[~in_id], z[~in_id]) + 0.4) <= 1.0 / n_ood
  # And it shows in the ratings: high-region users rate higher in the ID population only.
  mean = np.bincount(t.rows["user_index"], t.rows["rating"]) / t.users["user_activity"]
  gap = lambda m: mean[m & s].mean() - mean[m & ~s].mean()
  assert gap(in_id) > 0.25
  assert gap(~in_id) < -0.1


def test_pretraining_spurious_feature_at_asked_strength(world):
  truth = np.load(os.path.join(world, "truth.npz"))
  prestige_re = re.compile(r"\b(" + "|".join(synthetic.PRESTIGE_WORDS) + r")\b")
  results = {}
  for name, subdir, prefix, strength in (("pretrain_corpus", "pretrain/ml-100k", "pretrain_", 0.5),
                                         ("movielens_100k", "ml-100k", "", 0.0)):
    # Every item written (rated or not), its prestige read back from its title.
    with open(os.path.join(world, subdir, "u.item"), encoding="latin-1") as f:
      titles = dict(line.split("|")[:2] for line in f)
    ids = truth[f"{prefix}item_id"]
    prestige = np.array([bool(prestige_re.search(titles[i])) for i in ids])
    assert np.array_equal(prestige, truth[f"{prefix}item_prestige"])
    assert abs(_agreement(prestige, truth[f"{prefix}item_z"]) - strength) <= 1.0 / len(ids)
    t = datasets.load_table(name, world)
    p = prestige[_align(ids, t.items["item_id"])]
    pop = t.items["item_popularity"] > 0
    mean = np.bincount(t.rows["item_index"], t.rows["rating"], len(p))[pop] / (
        t.items["item_popularity"][pop])
    results[name] = mean[p[pop]].mean() - mean[~p[pop]].mean()
  # Expected gaps: 0.5 * E|b_i - b_j| (~0.45) * 0.5 = 0.23 in the corpus, 0 in the world
  # (item means vary with sd ~0.07 at this size).
  assert results["pretrain_corpus"] > 0.15, results
  assert abs(results["movielens_100k"]) < 0.2, results
  assert results["pretrain_corpus"] - results["movielens_100k"] > 0.2, results


def test_transferable_structure_holds_everywhere(world):
  """Ratings follow taste x genre with the same strength in and out of the ID population."""
  truth = np.load(os.path.join(world, "truth.npz"))
  t = datasets.load_table("movielens_100k", world)
  taste = truth["user_taste"][_align(truth["user_id"], t.users["user_id"])]
  genre_index = {g: k for k, g in enumerate(truth["genres"])}
  term = np.array([taste[u, [genre_index[g] for g in t.items["movie_genres"][i]]].mean()
                   for u, i in zip(t.rows["user_index"], t.rows["item_index"])])
  in_id = truth["user_in_id_population"][_align(truth["user_id"], t.users["user_id"])]
  row_id = in_id[t.rows["user_index"]]
  corr = [np.corrcoef(term[m], t.rows["rating"][m])[0, 1] for m in (row_id, ~row_id)]
  assert min(corr) > 0.2 and abs(corr[0] - corr[1]) < 0.1, corr
