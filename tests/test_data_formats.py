"""Raw-format parsers, TFDS parity, and bad input handling."""

import gzip
import json
import logging
import os
import re
from unittest import mock

import numpy as np
import pytest

from levi_jax import input_pipeline
from levi_jax.data import datasets, formats, schema
from levi_jax.data.load_report import MalformedDataError, MissingFilesError

ML_NAMES = {"item_id": "movie_id", "rating": "user_rating"}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("LEVI_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.delenv("LEVI_DATA_DIR", raising=False)


def _flags(*genres):
  return "|".join("1" if g in genres else "0" for g in schema.ML100K_GENRE_FLAGS)


def write_ml100k(d, extra_ratings=(), ratings=None):
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, "u.user"), "wb") as f:
    f.write("1|24|M|technician|85711\n2|53|F|other|94043\n3|17|M|student|T8H1N\n"
            "4|45|F|none|15213\n".encode("latin-1"))
  with open(os.path.join(d, "u.item"), "wb") as f:
    f.write((f"1|Toy Story (1995)|01-Jan-1995||http://x|"
             f"{_flags('Animation', 'Children', 'Comedy')}\n"
             f"2|Crème brûlée à la Française (1996)|01-Jan-1996||http://x|{_flags('Drama')}\n"
             f"3|Mystery Film|||http://x|{_flags('Unknown')}\n").encode("latin-1"))
  rows = ratings if ratings is not None else [
      "1\t1\t4\t881250949", "2\t1\t3\t891717742", "1\t2\t5\t881250950", "3\t3\t1\t881250951",
      "4\t2\t2\t881250952"]
  with open(os.path.join(d, "u.data"), "wb") as f:
    f.write(("\n".join(list(rows) + list(extra_ratings)) + "\n").encode("latin-1"))
  return d


def write_ml1m(d):
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, "users.dat"), "wb") as f:
    f.write("1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::4::55117\n".encode("latin-1"))
  with open(os.path.join(d, "movies.dat"), "wb") as f:
    f.write("1::Toy Story (1995)::Animation|Children's|Comedy\n"
            "2::Amélie (2001)::Comedy|Romance\n".encode("latin-1"))
  with open(os.path.join(d, "ratings.dat"), "wb") as f:
    f.write(b"1::1::5::978300760\n2::2::3::978302109\n3::1::4::978301968\n1::2::2::978300275\n")
  return d


def _normalize(ex):
  """A TFDS-parser example with the types TFDS would store."""
  out = dict(ex)
  out["user_rating"] = float(out["user_rating"])
  out["timestamp"] = int(out["timestamp"])
  out["bucketized_user_age"] = float(out["bucketized_user_age"])
  if "raw_user_age" in out:
    out["raw_user_age"] = float(out["raw_user_age"])
  out["movie_genres"] = tuple(out["movie_genres"])
  return tuple(sorted(out.items()))


def _ours(table):
  out = []
  for ex in table.records(ML_NAMES):
    ex = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in ex.items()}
    out.append(tuple(sorted(ex.items())))
  return out


def test_movielens_100k_matches_tfds_parser(tmp_path):
  from tensorflow_datasets.structured import movielens_parsing

  d = write_ml100k(str(tmp_path / "ml-100k"))
  table = formats.parse_movielens_100k(str(tmp_path))
  theirs = sorted(_normalize(ex) for _, ex in movielens_parsing.parse_100k_ratings_data(d))
  assert sorted(_ours(table)) == theirs
  titles = set(table.items["movie_title"])
  assert "Crème brûlée à la Française (1996)" in titles
  assert table.report.bad == 0 and table.num_rows == 5
  # Canonical order: by timestamp.
  assert np.all(np.diff(table.rows["timestamp"]) >= 0)
  users = dict(zip(table.users["user_id"], table.users["bucketized_user_age"]))
  assert users == {"1": 18.0, "2": 50.0, "3": 1.0, "4": 45.0}
  assert list(table.users["user_zip_region"]) == ["8", "9", "T", "1"]
  years = dict(zip(table.items["item_id"], table.items["movie_year"]))
  assert years["2"] == 1996 and np.isnan(years["3"])


def test_movielens_1m_matches_tfds_parser(tmp_path):
  from tensorflow_datasets.structured import movielens_parsing

  d = write_ml1m(str(tmp_path))
  table = formats.parse_movielens_1m(d)
  theirs = sorted(_normalize(ex) for _, ex in movielens_parsing.parse_1m_ratings_data(d))
  assert sorted(_ours(table)) == theirs
  genres = dict(zip(table.items["item_id"], table.items["movie_genres"]))
  assert genres["1"] == ("Animation", "Children", "Comedy")
  occ = dict(zip(table.users["user_id"], table.users["user_occupation_label"]))
  assert occ == {"1": "student", "2": "self-employed", "3": "student"}
  assert "Amélie (2001)" in set(table.items["movie_title"])


def test_raw_order_does_not_matter(tmp_path):
  a = write_ml100k(str(tmp_path / "a"))
  rows = open(os.path.join(a, "u.data")).read().split("\n")[:-1]
  b = write_ml100k(str(tmp_path / "b"), ratings=rows[::-1])
  ta, tb = formats.parse_movielens_100k(a), formats.parse_movielens_100k(b)
  for side in ("rows", "users", "items"):
    for k, v in getattr(ta, side).items():
      w = getattr(tb, side)[k]
      assert v.dtype == w.dtype and (np.array_equal(v, w, equal_nan=True) if v.dtype != object
                                     else list(v) == list(w)), (side, k)


@pytest.mark.slow
def test_tfds_source_equals_raw_files(tmp_path):
  import tensorflow_datasets as tfds

  write_ml100k(str(tmp_path / "src" / "ml-100k"))
  builder = tfds.builder("movielens/100k-ratings", data_dir=str(tmp_path / "tfds"))
  with mock.patch.object(tfds.download.DownloadManager, "download_and_extract",
                         return_value=str(tmp_path / "src")):
    builder.download_and_prepare()
  from_tfds = datasets.load_table("movielens_100k", f"tfds:{tmp_path / 'tfds'}")
  from_raw = datasets.load_table("movielens_100k", str(tmp_path / "src"))
  assert from_tfds.source.startswith("tfds:movielens/100k-ratings")
  for side in ("rows", "users", "items"):
    a, b = getattr(from_tfds, side), getattr(from_raw, side)
    assert list(a) == list(b)
    for k in a:
      assert a[k].dtype == b[k].dtype, (side, k)
      if a[k].dtype == object:
        assert list(a[k]) == list(b[k]), (side, k)
      else:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{side}.{k}")


def test_tfds_source_not_available_offline(tmp_path):
  import tensorflow_datasets as tfds

  with mock.patch.object(tfds.download.DownloadManager, "download_and_extract",
                         side_effect=OSError("no network")):
    with pytest.raises(MissingFilesError, match="not prepared"):
      datasets.load_table("movielens_1m", f"tfds:{tmp_path}")
  with pytest.raises(ValueError, match="not in TFDS"):
    datasets.load_table("amazon_2018", "tfds")


def _gz(path, text):
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write(text)


def write_amazon_2018(d):
  os.makedirs(d, exist_ok=True)
  reviews = [
      {"overall": 5.0, "reviewerID": "A1", "asin": "B01", "unixReviewTime": 1400000000,
       "reviewText": "Great", "summary": "Five"},
      {"overall": 2.0, "reviewerID": "A2", "asin": "B01", "unixReviewTime": 1400086400},
      {"overall": 4.0, "reviewerID": "A1", "asin": "B02", "reviewTime": "09 13, 2009"},
      {"overall": 3.0, "reviewerID": "A3", "asin": "B09", "unixReviewTime": 1400172800,
       "verified": True, "vote": "2"},
  ]
  _gz(os.path.join(d, "Electronics.json.gz"), "".join(json.dumps(r) + "\n" for r in reviews))
  meta = [
      {"asin": "B01", "title": "Tom &amp; Jerry Café Crème Headphones",
       "category": ["Electronics", "Headphones", "Over-Ear"], "brand": "Sony",
       "price": "$1,299.50"},
      {"asin": "B02", "title": "Cable", "price": "$5.99 - $9.99"},
      {"asin": "B01", "title": "A repeated line"},
  ]
  _gz(os.path.join(d, "meta_Electronics.json.gz"),
      "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in meta))
  with open(os.path.join(d, "Books_5.json"), "w", encoding="utf-8") as f:
    f.write(json.dumps({"overall": 1, "reviewerID": "A2", "asin": "0123456789",
                        "unixReviewTime": 1300000000}) + "\n")
  return d


def test_amazon_2018_json_gzip_and_missing_fields(tmp_path):
  write_amazon_2018(str(tmp_path / "amazon_2018"))
  t = datasets.load_table("amazon_2018", str(tmp_path))
  assert t.num_rows == 5 and t.report.bad == 0
  items = {k: {c: t.items[c][n] for c in t.items} for n, k in enumerate(t.items["item_id"])}
  assert items["B01"]["item_title"] == "Tom & Jerry Café Crème Headphones"
  assert items["B01"]["item_price"] == 1299.5 and items["B01"]["item_brand"] == "Sony"
  assert items["B01"]["item_subcategories"] == ("Headphones", "Over-Ear")
  assert np.isnan(items["B02"]["item_price"]) and items["B02"]["item_brand"] == ""
  assert items["B09"]["item_title"] == "" and items["B09"]["item_category"] == "Electronics"
  assert items["0123456789"]["item_category"] == "Books"
  assert "1 repeated asins" in t.report.summary()
  ts = {(t.users["user_id"][u], t.items["item_id"][i]): s for u, i, s in
        zip(t.rows["user_index"], t.rows["item_index"], t.rows["timestamp"])}
  assert ts[("A1", "B02")] == 1252800000  # reviewTime "09 13, 2009", UTC.
  user_text, item_text = datasets.side_texts(t)
  assert set(user_text) == {""}
  b01 = list(t.items["item_id"]).index("B01")
  assert item_text[b01] == ("product: Tom & Jerry Café Crème Headphones. category: Electronics > "
                            "Headphones > Over-Ear. brand: Sony. price: $1299.50.")


def test_damaged_gzip_names_the_file(tmp_path):
  from levi_jax.data.load_report import MalformedDataError
  write_amazon_2018(str(tmp_path / "amazon_2018"))
  gz = sorted((tmp_path / "amazon_2018").glob("*.json.gz"))[0]
  data = gz.read_bytes()
  gz.write_bytes(data[: len(data) // 2])  # a download cut short
  with pytest.raises(MalformedDataError, match=rf"{re.escape(str(gz))}: the gzip stream is "
                     "damaged after line \\d+ \\((EOFError|BadGzipFile|error)"):
    datasets.load_table("amazon_2018", str(tmp_path))


def test_amazon_us_tsv(tmp_path):
  d = tmp_path / "amazon_us"
  d.mkdir()
  header = ("marketplace\tcustomer_id\treview_id\tproduct_id\tproduct_parent\tproduct_title\t"
            "product_category\tstar_rating\thelpful_votes\ttotal_votes\tvine\tverified_purchase\t"
            "review_headline\treview_body\treview_date")
  rows = ["US\t111\tR1\tP1\t9\tCafé Mug\tKitchen\t5\t0\t0\tN\tY\tnice\tgood mug\t2015-08-31",
          "US\t222\tR2\tP1\t9\tCafé Mug\tKitchen\t2\t1\t1\tN\tN\tmeh\tchipped\t2014-01-02"]
  _gz(str(d / "amazon_reviews_us_Kitchen_v1_00.tsv.gz"), "\n".join([header] + rows) + "\n")
  t = datasets.load_table("amazon_us", str(tmp_path))
  assert t.num_rows == 2 and list(t.items["item_title"]) == ["Café Mug"]
  assert list(t.items["item_category"]) == ["Kitchen"]
  assert sorted(t.rows["rating"].tolist()) == [2.0, 5.0]
  assert t.rows["timestamp"].tolist() == [1388620800, 1440979200]


def test_malformed_rows_are_counted_reported_and_limited(tmp_path, caplog):
  good = [f"{1 + k % 4}\t{1 + k % 3}\t{1 + k % 5}\t{881250000 + k}" for k in range(99)]
  bad = "2\t1\tfive\t881259999"
  d = write_ml100k(str(tmp_path / "a"), ratings=good[:50] + [bad] + good[50:])
  with caplog.at_level(logging.WARNING):
    t = datasets.load_table("movielens_100k", d, max_bad_fraction=0.05)
  assert t.num_rows == 99
  (rep,) = [f for f in t.report.files if f.bad]
  assert rep.path.endswith("u.data") and rep.rows == 100 and rep.bad == 1
  assert rep.examples == [(51, "rating 'five' is not a number", bad)]
  assert "u.data: 1 malformed of 100 rows" in caplog.text and "line 51" in caplog.text
  with pytest.raises(MalformedDataError) as err:
    datasets.load_table("movielens_100k", d, max_bad_fraction=0.001)
  msg = str(err.value)
  assert "u.data" in msg and "line 51" in msg and repr(bad) in msg


def test_malformed_reasons_in_each_format(tmp_path):
  d = write_ml100k(str(tmp_path / "ml"), extra_ratings=["9\t1\t3\t881250999", "1\t1\t7\t88125",
                                                        "1\t1\t3"])
  t = formats.parse_movielens_100k(d)
  reasons = [r for f in t.report.files for _, r, _ in f.examples]
  assert reasons == ["unknown user id '9'", "rating 7.0 outside [1, 5]",
                     "expected 4 rating fields separated by '\\t', got 3"]
  a = write_amazon_2018(str(tmp_path / "amazon"))
  with open(os.path.join(a, "Books_5.json"), "a", encoding="utf-8") as f:
    f.write('{"overall": 4.0, "asin": "X"}\n{not json\n')
  with open(os.path.join(a, "Books_5.json"), "ab") as f:
    f.write(b'{"overall": 4.0, "reviewerID": "\xff", "asin": "X", "unixReviewTime": 1}\n')
  t = formats.parse_amazon_2018(a)
  (books,) = [f for f in t.report.files if f.path.endswith("Books_5.json")]
  assert books.rows == 4 and books.bad == 3
  assert [n for n, _, _ in books.examples] == [2, 3, 4]
  assert "no reviewerID" in books.examples[0][1] and "invalid JSON" in books.examples[1][1]
  assert "not valid utf-8" in books.examples[2][1]
  with pytest.raises(MalformedDataError, match="Books_5.json"):
    t.report.check(0.5)


def test_missing_files_list_what_is_expected(tmp_path):
  (tmp_path / "ml-100k").mkdir()
  (tmp_path / "ml-100k" / "u.data").write_text("1\t1\t1\t1\n")
  with pytest.raises(MissingFilesError) as err:
    datasets.load_table("movielens_100k", str(tmp_path))
  msg = str(err.value)
  for name in ("u.data", "u.user", "u.item", str(tmp_path / "ml-100k")):
    assert name in msg
  with pytest.raises(MissingFilesError, match="ratings.dat, users.dat, movies.dat"):
    datasets.load_table("movielens_1m", str(tmp_path))
  with pytest.raises(MissingFilesError, match=r"meta_<Category>\.json"):
    datasets.load_table("amazon_2018", str(tmp_path))
  with pytest.raises(MissingFilesError, match="amazon_reviews_us_<Category>"):
    datasets.load_table("amazon_us", str(tmp_path))


def test_unknown_task_lists_close_matches():
  with pytest.raises(input_pipeline.UnknownTaskError) as err:
    input_pipeline.lookup_task("movielens_100k.gender_m_to_g")
  assert "movielens_100k.gender_m_to_f" in str(err.value)
  with pytest.raises(input_pipeline.UnknownTaskError, match="--list"):
    input_pipeline.lookup_task("nothing_like_it")
