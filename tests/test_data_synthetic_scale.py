"""The streaming Amazon 2018 world (`levi_jax.data.synthetic_scale`): read by our real
reader without a malformed row, deterministic, prefix-stable, and bounded in memory."""

import calendar
import gzip
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from levi_jax.data import datasets, formats, synthetic_scale as ss

N = 20_000


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("scale"))
  return out, ss.write_scale_world(out, N, seed=3, chunk_rows=4096)


def _lines(path):
  with gzip.open(path, "rt", encoding="utf-8") as f:
    return f.read().splitlines()


def test_small_world_loads_through_the_amazon_2018_reader_with_no_malformed_row(world):
  out, rep = world
  table = datasets.load_table("amazon_2018", out, max_bad_fraction=0.0, duplicates="error")
  assert table.num_rows == N == rep.rows
  assert table.source == os.path.join(out, "amazon_2018")
  files = {os.path.basename(f.path): f for f in table.report.files}
  assert sorted(files) == sorted(rep.files) == sorted(
      [f"{c}.json.gz" for c in ss.DEFAULT_CATEGORIES] +
      [f"meta_{c}.json.gz" for c in ss.DEFAULT_CATEGORIES])
  assert all(f.bad == 0 and not f.notes for f in files.values())
  assert sum(files[f"{c}.json.gz"].rows for c in ss.DEFAULT_CATEGORIES) == N
  assert sum(files[f"meta_{c}.json.gz"].rows for c in ss.DEFAULT_CATEGORIES) == rep.meta_rows
  ts = table.rows["timestamp"]
  first = calendar.timegm((datasets.get_spec("amazon_2018").first_year, 1, 1, 0, 0, 0))
  assert first <= ts.min() and ts.max() <= time.time()
  assert len(np.unique(ts)) == N  # so no (user, item, timestamp) repeats
  assert set(np.unique(table.rows["rating"]).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
  # Users and items scale with N (pools of 1000 + N/20 and 500 + N/50, Zipf-like use).
  assert (rep.users, rep.items) == (1999, 899)
  assert 0.7 * rep.users < table.num_users <= rep.users
  assert 0.7 * rep.items < table.num_items <= rep.items
  counts = np.bincount(table.rows["item_index"])
  assert np.sort(counts)[-len(counts) // 10:].sum() > 0.3 * N  # the top tenth: over 30%
  # Every rated item's category is the file it was read from; nearly all have metadata.
  items = table.items
  assert set(items["item_category"]) <= set(ss.DEFAULT_CATEGORIES)
  titled = np.mean([bool(t) for t in items["item_title"]])
  assert 0.95 < titled < 1.0
  assert any(not t.isascii() for t in items["item_title"])  # UTF-8 read back as such


def test_ratings_follow_the_planted_biases(world):
  """The per-user mean rating tracks the hashed user bias: the structure is learnable."""
  out, _ = world
  table = datasets.load_table("amazon_2018", out)
  users = table.users["user_id"]
  # Invert reviewerID = 'A%012X' % (u * _REVIEWER_MUL mod 2^48).
  inv = pow(ss._REVIEWER_MUL, -1, 1 << 48)  # pylint: disable=protected-access
  u = np.array([(int(s[1:], 16) * inv) % (1 << 48) for s in users])
  bias, _ = ss._user_latents(3, u)  # pylint: disable=protected-access
  n = np.bincount(table.rows["user_index"], minlength=len(users))
  mean = np.bincount(table.rows["user_index"], table.rows["rating"], len(users)) / np.maximum(n, 1)
  busy = n >= 20
  assert busy.sum() > 100
  assert np.corrcoef(bias[busy], mean[busy])[0, 1] > 0.5


def test_same_seed_same_bytes_other_seed_other_rows_and_larger_worlds_extend_smaller(
    world, tmp_path):
  out, rep = world
  again = ss.write_scale_world(str(tmp_path / "again"), N, seed=3, chunk_rows=4096)
  for name in rep.files:
    with open(os.path.join(out, "amazon_2018", name), "rb") as a, open(
        tmp_path / "again" / "amazon_2018" / name, "rb") as b:
      assert a.read() == b.read(), name
  assert again.files == rep.files
  other = ss.write_scale_world(str(tmp_path / "other"), N, seed=4, chunk_rows=4096)
  assert _lines(tmp_path / "other/amazon_2018/Books.json.gz") != _lines(
      os.path.join(out, "amazon_2018/Books.json.gz"))
  assert other.rows == N
  # A larger world (not a whole number of chunks either) begins with the smaller one's rows.
  ss.write_scale_world(str(tmp_path / "big"), N + 5000 + 17, seed=3, chunk_rows=4096)
  for c in ss.DEFAULT_CATEGORIES:
    small = _lines(os.path.join(out, f"amazon_2018/{c}.json.gz"))
    big = _lines(tmp_path / f"big/amazon_2018/{c}.json.gz")
    assert len(big) > len(small) and big[:len(small)] == small, c
    assert json.loads(small[0])["overall"] in (1.0, 2.0, 3.0, 4.0, 5.0)


def test_bad_categories_and_worlds_past_today_are_refused(tmp_path):
  with pytest.raises(ValueError, match="would not be read"):
    ss.write_scale_world(str(tmp_path), 10, categories=["books"])
  with pytest.raises(ValueError, match="repeated"):
    ss.write_scale_world(str(tmp_path), 10, categories=["Books", "Books"])
  with pytest.raises(ValueError, match="past today"):
    ss.write_scale_world(str(tmp_path), 10 ** 10)
  assert not os.listdir(tmp_path)


def test_command_line_writes_the_named_categories(tmp_path):
  rep = ss.main(["--out", str(tmp_path), "--ratings", "3000", "--seed", "1",
                 "--categories=Books,Digital_Music"])
  assert sorted(os.listdir(tmp_path / "amazon_2018")) == [
      "Books.json.gz", "Digital_Music.json.gz", "meta_Books.json.gz", "meta_Digital_Music.json.gz"]
  table = formats.parse_amazon_2018(str(tmp_path), duplicates="error")
  assert table.num_rows == rep.rows == 3000
  assert table.report.files and all(f.bad == 0 for f in table.report.files)
  manifest = json.load(open(tmp_path / ss.MANIFEST))
  assert manifest["config"]["categories"] == ["Books", "Digital_Music"]
  assert manifest["report"]["rows"] == 3000 and manifest["report"]["bytes"] == rep.bytes > 0


_MEMORY_CHILD = """
import os, resource, sys
from levi_jax.data import synthetic_scale as ss
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
before = peak()
ss.write_scale_world(os.path.join(sys.argv[1], "small"), int(sys.argv[2]) // 10)
mid = peak()
rep = ss.write_scale_world(sys.argv[1], int(sys.argv[2]))
print(before, mid, peak(), rep.rows, rep.bytes)
"""


@pytest.mark.slow
def test_writing_2m_ratings_grows_peak_memory_by_a_chunk_not_by_n(tmp_path):
  """2M ratings are over 400 MB of JSON text (more as Python objects); writing them grows
  the peak RSS by far less (the chunk's worth), and no more than writing 200k does."""
  rows = 2_000_000
  out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(tmp_path), str(rows)],
                       check=True, capture_output=True, text=True, timeout=120).stdout
  before, mid, after, written, size = map(int, out.split())  # ru_maxrss: KiB
  assert written == rows
  text = sum(len(l) + 1 for l in _lines(tmp_path / "amazon_2018/Toys_and_Games.json.gz"))
  assert text > 20e6  # the smallest category file alone
  assert (after - before) * 1024 < 100e6, (before, mid, after)
  assert (after - mid) * 1024 < 10e6, (before, mid, after)
  assert size < 0.3 * 200 * rows
