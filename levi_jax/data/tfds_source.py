"""MovieLens from TensorFlow Datasets (`movielens/100k-ratings`, `movielens/1m-ratings`).

Reads a prepared TFDS dataset (preparing it first where the machine can
download it) into the same `RatingsTable` the raw-file parsers build: class
labels are turned back into TFDS's label names, so both paths give equal tables.
"""

from __future__ import annotations

import numpy as np

from levi_jax.data import schema
from levi_jax.data.load_report import LoadReport, MissingFilesError
from levi_jax.data.table import RatingsTable, build_table

_MAX_GENRES = len(schema.GENRES)


def load_movielens(dataset: str, tfds_name: str, tfds_data_dir: str | None) -> RatingsTable:
  """Loads `tfds_name` (e.g. 'movielens/100k-ratings') from `tfds_data_dir` into a table.

  Raises:
    MissingFilesError: if the dataset is neither prepared nor downloadable.
  """
  from levi_jax import quiet  # pylint: disable=g-import-not-at-top
  quiet.import_tensorflow()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = tfds.builder(tfds_name, data_dir=tfds_data_dir)
  try:
    builder.download_and_prepare()
  except Exception as e:  # Offline machines fail here in many ways; say what to do.
    raise MissingFilesError(
        f"{dataset}: TFDS dataset {tfds_name} is not prepared in {builder.data_dir} and could "
        f"not be downloaded ({type(e).__name__}: {e}). Prepare it on a machine with network "
        "access and copy the TFDS data dir, or pass the raw files' directory as data_dir."
    ) from e
  info = builder.info
  genre_names = info.features["movie_genres"].feature.names
  occ_names = info.features["user_occupation_label"].names
  has_raw_age = "raw_user_age" in info.features

  def pad_genres(ex):
    g = ex["movie_genres"]
    ex["movie_genres"] = tf.pad(g, [[0, _MAX_GENRES - tf.shape(g)[0]]], constant_values=-1)
    return ex

  ds = builder.as_dataset(split="train", shuffle_files=False).map(pad_genres).batch(8192)
  cols: dict[str, list] = {}
  for batch in tfds.as_numpy(ds):
    for k, v in batch.items():
      cols.setdefault(k, []).append(v)
  data = {k: np.concatenate(v) for k, v in cols.items()}
  n = len(data["user_rating"]) if data else 0
  dec = lambda a: [x.decode("utf-8") for x in a]
  user_ids, item_ids = dec(data.get("user_id", [])), dec(data.get("movie_id", []))
  users: dict[str, dict] = {}
  items: dict[str, dict] = {}
  titles, occ_text, zips = (dec(data.get(k, [])) for k in
                            ("movie_title", "user_occupation_text", "user_zip_code"))
  for r in range(n):
    if user_ids[r] not in users:
      users[user_ids[r]] = {
          "user_gender": bool(data["user_gender"][r]),
          "bucketized_user_age": float(data["bucketized_user_age"][r]),
          "user_occupation_label": occ_names[int(data["user_occupation_label"][r])],
          "user_occupation_text": occ_text[r], "user_zip_code": zips[r],
          **({"raw_user_age": float(data["raw_user_age"][r])} if has_raw_age else {})}
    if item_ids[r] not in items:
      items[item_ids[r]] = {"movie_title": titles[r],
                            "movie_genres": [genre_names[g] for g in data["movie_genres"][r]
                                             if g >= 0]}
  report = LoadReport()
  report.new_file(f"tfds:{tfds_name}").rows = n
  return build_table(
      dataset, f"tfds:{tfds_name} ({builder.data_dir})", user_ids=user_ids, item_ids=item_ids,
      ratings=data.get("user_rating", np.zeros(0)), timestamps=data.get("timestamp", np.zeros(0)),
      user_attrs=users, item_attrs=items,
      user_columns=schema.ML100K_USER_COLUMNS if has_raw_age else schema.ML_USER_COLUMNS,
      item_columns=schema.ML_ITEM_COLUMNS, report=report)
