"""Bad input is named: strict decoding, implausible timestamps, duplicated ratings."""

import calendar
import json
import logging
import os
import re
import time

import pytest

from levi_jax.data import datasets, formats
from levi_jax.data.load_report import MalformedDataError
from test_data_formats import _flags, _gz, write_amazon_2018, write_ml100k, write_ml1m


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("LEVI_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.delenv("LEVI_DATA_DIR", raising=False)


def _write_items(d, titles, encoding):
  """A u.item of `titles` (ids 1..n) in `encoding`."""
  lines = [f"{k}|{t}|01-Jan-1995||http://x|{_flags('Drama')}\n" for k, t in enumerate(titles, 1)]
  with open(os.path.join(d, "u.item"), "wb") as f:
    f.write("".join(lines).encode(encoding))


def _reasons(table, name):
  (rep,) = [f for f in table.report.files if f.path.endswith(name)]
  return [(n, reason) for n, reason, _ in rep.examples]


def test_latin1_bytes_of_the_real_u_item_decode_as_before(tmp_path):
  d = write_ml100k(str(tmp_path / "ml-100k"))
  # Rows of the real MovieLens 100K u.item: Latin-1 bytes (0xE9, 0xC1, 0xF6) that are not UTF-8.
  titles = [b"Toy Story (1995)", b"Mis\xe9rables, Les (1995)",
            b"\xc1 k\xf6ldum klaka (Cold Fever) (1994)"]
  with open(os.path.join(d, "u.item"), "wb") as f:
    f.write(b"".join(b"%d|%s|01-Jan-1995||http://x|%s\n" % (k, t, _flags("Drama").encode())
                     for k, t in enumerate(titles, 1)))
  t = datasets.load_table("movielens_100k", str(tmp_path), max_bad_fraction=0.0)
  assert t.report.bad == 0 and t.num_rows == 5
  assert list(t.items["movie_title"]) == ["Toy Story (1995)", "Misérables, Les (1995)",
                                          "Á köldum klaka (Cold Fever) (1994)"]


def test_a_utf8_u_item_fails_naming_the_file(tmp_path):
  d = write_ml100k(str(tmp_path / "ml-100k"))
  # As in the real file: few non-ASCII rows (1 in 200, under the 1% tolerance), all UTF-8 here.
  _write_items(d, ["Toy Story (1995)", "Café au Lait (1993)"] + [f"Film {k}" for k in range(198)],
               "utf-8")
  path = os.path.join(d, "u.item")
  with pytest.raises(MalformedDataError) as err:
    datasets.load_table("movielens_100k", str(tmp_path))
  msg = str(err.value)
  assert msg.startswith(f"{path}: the file looks UTF-8-encoded: all 1 rows with non-ASCII")
  assert ("line 2: looks UTF-8-encoded ('CafÃ©' is 'Café' in UTF-8); the dataset declares "
          "latin-1" in msg)
  assert "iconv -f utf-8 -t latin-1" in msg


def test_a_mojibake_row_in_a_latin1_file_is_a_malformed_row(tmp_path):
  d = write_ml100k(str(tmp_path / "ml-100k"))
  with open(os.path.join(d, "u.item"), "wb") as f:
    f.write(f"1|Toy Story (1995)|01-Jan-1995||http://x|{_flags('Comedy')}\n"
            f"2|Crème brûlée (1996)|01-Jan-1996||http://x|{_flags('Drama')}\n".encode("latin-1"))
    f.write(f"3|Café (1993)|01-Jan-1993||http://x|{_flags('Drama')}\n".encode("utf-8"))
    f.write(b"4|Broken \xef\xbf\xbd (1994)|01-Jan-1994||http://x|" + _flags().encode() + b"\n")
  t = formats.parse_movielens_100k(d)
  assert _reasons(t, "u.item") == [
      (3, "looks UTF-8-encoded ('CafÃ©' is 'Café' in UTF-8); the dataset declares latin-1"),
      (4, "holds U+FFFD (the replacement character) UTF-8-encoded: the text was mis-decoded "
          "before it was written; the dataset declares latin-1")]
  assert set(t.items["movie_title"]) == {"Toy Story (1995)", "Crème brûlée (1996)"}
  with pytest.raises(MalformedDataError, match=re.escape(os.path.join(d, "u.item")) +
                     r": 2 malformed of 4 rows"):
    datasets.load_table("movielens_100k", d)


def test_replacement_character_in_kept_amazon_fields_is_malformed(tmp_path):
  a = write_amazon_2018(str(tmp_path / "amazon"))
  with open(os.path.join(a, "Books_5.json"), "a", encoding="utf-8") as f:
    f.write(json.dumps({"overall": 4.0, "reviewerID": "A\ufffd", "asin": "X",
                        "unixReviewTime": 1300000000}) + "\n")
    f.write(json.dumps({"overall": 4.0, "reviewerID": "A9", "asin": "X", "unixReviewTime":
                        1300000000, "reviewText": "unused text \ufffd"}, ensure_ascii=False) + "\n")
  _gz(os.path.join(a, "meta_Books.json.gz"),
      json.dumps({"asin": "X", "title": "Caf\ufffd Guide"}, ensure_ascii=False) + "\n")
  t = formats.parse_amazon_2018(a)
  assert _reasons(t, "Books_5.json") == [
      (2, "reviewerID 'A\ufffd' holds U+FFFD (the replacement character): the text was "
          "mis-decoded before it was written")]
  assert _reasons(t, "meta_Books.json.gz") == [
      (1, "invalid metadata: title 'Caf\ufffd Guide' holds U+FFFD (the replacement character): "
          "the text was mis-decoded before it was written")]
  assert t.num_rows == 6  # The review whose unused text holds U+FFFD is kept.

  u = tmp_path / "amazon_us"
  u.mkdir()
  header = "customer_id\tproduct_id\tproduct_title\tproduct_category\tstar_rating\treview_date"
  _gz(str(u / "amazon_reviews_us_Books_v1_00.tsv.gz"),
      f"{header}\n1\tP1\tGood\tBooks\t5\t2015-08-31\n2\tP2\tBad \ufffd\tBooks\t4\t2015-08-31\n")
  t = formats.parse_amazon_us(str(tmp_path))
  assert [r for _, r in _reasons(t, ".tsv.gz")] == [
      "product_title 'Bad \ufffd' holds U+FFFD (the replacement character): the text was "
      "mis-decoded before it was written"]


def test_implausible_timestamps_are_malformed_rows(tmp_path):
  future = int(time.time()) + 10 * 86400
  first_second = calendar.timegm((1997, 1, 1, 0, 0, 0))
  d = write_ml100k(str(tmp_path / "ml-100k"), extra_ratings=[
      "1\t3\t4\t88125", f"2\t3\t4\t{future}", f"4\t3\t4\t{first_second - 1}",
      f"3\t2\t4\t{first_second}"])
  t = formats.parse_movielens_100k(d)
  assert _reasons(t, "u.data") == [
      (6, "timestamp 88125 (1970-01-02) is before 1997, the dataset's first year; expected "
          "seconds since 1970 (a number cut short?)"),
      (7, f"timestamp {future} ({time.strftime('%Y-%m-%d', time.gmtime(future))}) is in the "
          "future; expected seconds since 1970 from 1997 on"),
      (8, f"timestamp {first_second - 1} (1996-12-31) is before 1997, the dataset's first year; "
          "expected seconds since 1970 (a number cut short?)")]
  assert t.num_rows == 6  # The 5 good rows and the one at 1997-01-01 00:00 UTC.
  with pytest.raises(MalformedDataError, match=re.escape(os.path.join(d, "u.data")) +
                     r": 3 malformed of 9 rows.*\n  line 6: timestamp 88125"):
    datasets.load_table("movielens_100k", str(tmp_path))

  m = write_ml1m(str(tmp_path / "ml-1m"))
  with open(os.path.join(m, "ratings.dat"), "ab") as f:
    f.write(b"1::1::5::97830076\n")
  assert _reasons(formats.parse_movielens_1m(m), "ratings.dat") == [
      (5, "timestamp 97830076 (1973-02-06) is before 1997, the dataset's first year; expected "
          "seconds since 1970 (a number cut short?)")]

  a = write_amazon_2018(str(tmp_path / "amazon"))
  with open(os.path.join(a, "Books_5.json"), "a", encoding="utf-8") as f:
    f.write(json.dumps({"overall": 4.0, "reviewerID": "A9", "asin": "X",
                        "reviewTime": "01 02, 1995"}) + "\n")
  assert [r for _, r in _reasons(formats.parse_amazon_2018(a), "Books_5.json")] == [
      "review time 789004800 (1995-01-02) is before 1996, the dataset's first year; expected "
      "seconds since 1970 (a number cut short?)"]

  u = tmp_path / "amazon_us"
  u.mkdir()
  _gz(str(u / "amazon_reviews_us_Books_v1_00.tsv.gz"),
      "customer_id\tproduct_id\tstar_rating\treview_date\n"
      "1\tP1\t5\t1994-12-31\n2\tP1\t5\t1995-01-01\n")
  t = formats.parse_amazon_us(str(tmp_path))
  assert t.num_rows == 1 and [r for _, r in _reasons(t, ".tsv.gz")] == [
      "review_date 788832000 (1994-12-31) is before 1995, the dataset's first year; expected "
      "seconds since 1970 (a number cut short?)"]


def test_first_years_are_declared_per_dataset():
  years = {name: spec.first_year for name, spec in datasets.DATASETS.items()}
  assert years == {"movielens_100k": 1997, "movielens_1m": 1997, "amazon_2018": 1996,
                   "amazon_us": 1995, "pretrain_corpus": 1997, "movielens_100k_history": 1997,
                   "movielens_1m_history": 1997}
  for spec in datasets.DATASETS.values():
    assert spec.parse.keywords["first_year"] == spec.first_year


_DUPLICATED = ["1\t1\t4\t881250949", "2\t1\t3\t891717742", "1\t2\t5\t881250950",
               "3\t3\t1\t881250951", "1\t1\t2\t881250949", "4\t2\t2\t881250952",
               "1\t1\t4\t881250949", "1\t1\t4\t881250999"]


def test_duplicated_ratings_kept_by_default_with_a_warning(tmp_path, caplog):
  d = write_ml100k(str(tmp_path / "ml-100k"), ratings=_DUPLICATED)
  with caplog.at_level(logging.WARNING):
    t = datasets.load_table("movielens_100k", str(tmp_path))
  assert t.num_rows == 8 and t.report.bad == 0
  (rep,) = [f for f in t.report.files if f.notes]
  assert rep.path == os.path.join(d, "u.data")
  note = ("2 duplicated (user, item, timestamp) rating rows (1 with another rating), e.g. line 5 "
          "(user '1', item '1', timestamp 881250949, rating 2) repeats line 1; all kept "
          "(duplicates='keep'; 'drop' keeps the first of each)")
  assert rep.notes == [note]
  assert f"{rep.path}: {note}" in caplog.text


def test_duplicated_ratings_dropped_keep_the_first(tmp_path):
  write_ml100k(str(tmp_path / "ml-100k"), ratings=_DUPLICATED)
  t = datasets.load_table("movielens_100k", str(tmp_path), duplicates="drop")
  assert t.num_rows == 6
  kept = [r for r, u, i, s in zip(t.rows["rating"], t.rows["user_index"], t.rows["item_index"],
                                  t.rows["timestamp"])
          if (t.users["user_id"][u], t.items["item_id"][i], s) == ("1", "1", 881250949)]
  assert kept == [4.0]  # Line 1's rating, not line 5's.
  assert "dropped, the first of each kept (duplicates='drop')" in t.report.summary()
  unique = formats.parse_movielens_100k(write_ml100k(str(tmp_path / "b"), ratings=[
      r for n, r in enumerate(_DUPLICATED) if n not in (4, 6)]))
  assert t.rows["rating"].tolist() == unique.rows["rating"].tolist()
  assert t.rows["timestamp"].tolist() == unique.rows["timestamp"].tolist()
  assert datasets.load_table("movielens_100k", str(tmp_path)).num_rows == 8  # Cached per policy.


def test_duplicated_ratings_error_names_file_count_and_row(tmp_path):
  d = write_ml100k(str(tmp_path / "ml-100k"), ratings=_DUPLICATED)
  with pytest.raises(MalformedDataError) as err:
    datasets.load_table("movielens_100k", str(tmp_path), duplicates="error")
  assert str(err.value) == (
      "duplicated rating rows (duplicates='error'; pass duplicates='keep' or 'drop' to load "
      f"them):\n{os.path.join(d, 'u.data')}: 2 duplicated (user, item, timestamp) rating rows "
      "(1 with another rating), e.g. line 5 (user '1', item '1', timestamp 881250949, rating 2) "
      "repeats line 1")
  with pytest.raises(ValueError, match=r"duplicates must be one of \('keep', 'drop', 'error'\), "
                     "got 'first'"):
    datasets.load_table("movielens_100k", str(tmp_path), duplicates="first")
  with pytest.raises(ValueError, match="applies to raw files; a TFDS source"):
    datasets.load_table("movielens_100k", "tfds", duplicates="drop")


def test_duplicated_reviews_across_amazon_files_name_both(tmp_path):
  a = write_amazon_2018(str(tmp_path / "amazon"))
  with open(os.path.join(a, "Books_5.json"), "a", encoding="utf-8") as f:
    f.write(json.dumps({"overall": 3.0, "reviewerID": "A1", "asin": "B01",
                        "unixReviewTime": 1400000000}) + "\n")
  with pytest.raises(MalformedDataError) as err:
    formats.parse_amazon_2018(a, duplicates="error")
  assert (f"{os.path.join(a, 'Electronics.json.gz')}: 1 duplicated (user, item, timestamp) "
          "rating rows (1 with another rating), e.g. line 1 (user 'A1', item 'B01', timestamp "
          f"1400000000, rating 5) repeats line 2 of {os.path.join(a, 'Books_5.json')}"
          in str(err.value))
  assert formats.parse_amazon_2018(a, duplicates="drop").num_rows == 5
  assert formats.parse_amazon_2018(a).num_rows == 6


def test_duplicates_policy_reaches_tasks_and_the_trainer_config(monkeypatch):
  """The policy goes from DataConfig / the seqio Tasks through `prepare` to load_table."""
  from levi_jax import trainer
  from levi_jax import input_pipeline
  from levi_jax.input_pipeline import load_task_data
  seen = []
  real = datasets.load_table

  def spy(dataset, data_dir=None, max_bad_fraction=datasets.DEFAULT_MAX_BAD_FRACTION,
          duplicates=datasets.DEFAULT_DUPLICATES):
    seen.append(duplicates)
    return real(dataset, data_dir, max_bad_fraction, duplicates)

  monkeypatch.setattr(datasets, "load_table", spy)
  task = "movielens_100k.gender_m_to_f"
  data = load_task_data(trainer.DataConfig(task=task, seq_length=16, duplicates="drop"))
  assert seen and set(seen) == {"drop"} and len(data.train["targets"]) > 0
  seen.clear()
  input_pipeline.load_split_arrays(task, "id_test", inputs_length=16, duplicates="error")
  assert set(seen) == {"error"}  # the synthetic world has no duplicates: nothing raised
  from levi_jax.data import tasks
  seen.clear()
  tasks.register_tasks(duplicates="drop")
  try:
    next(iter(tasks.get_dataset(task, "id_test", inputs_length=16)))
  finally:
    tasks.register_tasks()
  assert set(seen) == {"drop"}
  with pytest.raises(ValueError, match=r"DataConfig.duplicates must be one of"):
    trainer.DataConfig(duplicates="dedupe")
