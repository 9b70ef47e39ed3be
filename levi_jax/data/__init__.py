"""Recommendation data for LEVI: MovieLens and Amazon Reviews under distribution shift.

Examples are read through `levi_jax.input_pipeline`, whose docstring draws the
path from raw files to batches. The modules, each documenting its part:

* `paths`: data and cache directories (a leaf: imports nothing from levi_jax).
* `schema`: the raw formats' file names, columns and value sets (a leaf).
* `formats`: parsers of the publishers' raw files; `tfds_source`: MovieLens via TFDS;
  `load_report`: malformed-row accounting and the errors a load raises.
* `table`: the relational `RatingsTable` every source is parsed into.
* `datasets`: the dataset specs (files, text serialization, categorical features).
* `shifts`: the shifts, declared as data, and the splits they induce.
* `prepare`: task names, and a task's splits, feature ids and texts.
* `tokens`: the token ids of `inputs`; `spm`: SentencePiece vocabularies;
  `wordpiece`: BERT WordPiece vocabularies (imports TensorFlow).
* `synthetic`, `synthetic_scale`: synthetic worlds written in the raw formats.
* `tasks`: the seqio Tasks and feature converter (imports TensorFlow).
* `inspect`: `python -m levi_jax.data.inspect --list | --task NAME`.

`import levi_jax.data` imports no submodule.
"""
