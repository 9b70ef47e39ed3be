"""The one driver of the studies: a grid of runs declared as data, checked, trained, reported.

A study (`Study`: the Figure-1 sweep, the layer ablation) declares its grid
as data: a function of its settings and tasks returning `Cell`s (one run of
one task and seed: its name, method, bindings and table labels), the way
big_vision's `sweep(add)` configs do. The driver owns what every study
shares: the flags (`Settings`), the tasks (`tasks_for`, `validate_grid`),
the expansion of each cell over the learning-rate grid and OOV dropout, the
`--restrict`ion, the steps of `--epochs`, and the run loop with resume. The
whole grid is resolved and checked before the first run (`plan`): every
task's data found, every run's gin config parsed. A run is
`runs.train_run` in `RUNS_DIR/<task>/<run>/seed<k>-<key>/`, `<key>` hashing
its resolved gin config (`run_key`), so a finished run of the same
configuration is read back (a study resumes) and a changed `--gin.K=V` or
`--steps` trains anew. The study then turns each run's results into table
records and writes its report (`write_tables` and its own chart).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import time
from typing import Any, Callable, Mapping, Sequence

import gin

from experiments import runs
from levi_jax import cli

DEFAULT_DATASETS = ("movielens_100k", "amazon_2018")


@dataclasses.dataclass(frozen=True)
class Settings:
  """The flags every study takes (a study's own settings subclass this)."""

  out: str = cli.field(help="results folder")
  shifts: tuple[str, ...] = cli.field(("gender_m_to_f",),
                                      "comma-separated shift (or task) names, or 'all'")
  datasets: tuple[str, ...] = cli.field(DEFAULT_DATASETS, "datasets whose shifts --shifts names")
  seeds: tuple[int, ...] = cli.field((0, 1, 2), "comma-separated seeds")
  steps: int | None = cli.field(None, "TRAIN_STEPS (default: the gin's)")
  data_dir: str = cli.field("", "raw data folder ('' = the gin's DATA_DIR; demo: the "
                                "synthetic world)")
  backbone: str = runs.backbone_flag()
  gin_file: tuple[str, ...] = runs.gin_file_flag()
  gin_bindings: tuple[str, ...] = runs.gin_bindings_flag()
  no_tap_cache: bool = cli.field(False, "compute the backbone's taps in every run")
  oov_dropout: float = cli.field(0.0, "train the small model with this share of known feature "
                                      "ids set to OOV (runs.oov_dropout); its runs go to "
                                      "RUN+oov<rate>/")
  lr_grid: str = cli.field("", "per-method learning-rate grids, chosen on validation: "
                               "'ft,lora=1e-5,1e-4,3e-4;default=3e-4,1e-3,3e-3' ('' = the gin's)")
  epochs: float = cli.field(0.0, "train every run this many epochs of its shift's training "
                                 "split (overrides --steps)")
  evals_per_epoch: float = cli.field(2.0, "with --epochs: periodic evaluations per epoch")
  early_stopping: bool = cli.field(False, "report each run's best-validation evaluation, not "
                                          "its last")
  restrict: str = cli.field("", "run some runs on part of the grid only, e.g. 'ft=gender_m_to_f,"
                                "time_later@0;levi_aux=gender_m_to_f' (a run, as named in the "
                                "runs folder: shifts, then @seeds); for expensive methods on a "
                                "CPU")
  report_only: bool = cli.field(False, "train nothing: report the finished runs of the grid (an "
                                       "interim look at a study in progress; the header counts "
                                       "the runs left out)")
  keep_checkpoints: bool = cli.field(False, "keep each run's checkpoints")
  runs_dir: str = cli.field("", "where each run's MODEL_DIR and the tap cache go (default "
                                "OUT/runs); studies sharing it reuse each other's runs")
  multiprocess: bool = cli.field(False, "call jax.distributed.initialize() first (TPU pods, "
                                        "multi-host GPU)")

  def __post_init__(self):
    if not self.gin_file:
      object.__setattr__(self, "gin_file", runs.BASE_GIN)
    if not self.seeds:
      raise ValueError("--seeds names no seed")


@dataclasses.dataclass(frozen=True)
class Cell:
  """One run of a study's grid, as the study declares it.

  Attributes:
    task, seed: what it trains on, with which seed.
    run: its name: the folder under RUNS_DIR/<task>/ and what --restrict names.
    method: the `levi_jax.methods` method it trains.
    bindings: its own gin bindings (a variant's, a tap set's).
    labels: what the study's records and report read (table columns, tap set).
    tap_cache: whether it reads cached backbone taps (the trainer uses them only with a
      frozen backbone).
  """

  task: str
  seed: int
  run: str
  method: str
  bindings: tuple[str, ...] = ()
  labels: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  tap_cache: bool = True


@dataclasses.dataclass(frozen=True)
class Run:
  """A cell resolved for training: its learning rate, OOV rate, steps, bindings, MODEL_DIR."""

  cell: Cell
  learning_rate: float | None
  oov: float
  steps: int | None
  bindings: tuple[str, ...]
  model_dir: str

  def done(self) -> bool:
    """Whether the run has finished (its results.json is written)."""
    return os.path.isfile(os.path.join(self.model_dir, "results.json"))


@dataclasses.dataclass(frozen=True)
class Outcome:
  """What a study's report reads: the settings, tasks, planned runs, records and what
  `Study.prepare` computed."""

  settings: Settings
  tasks: Sequence[str]
  data_dir: str
  plan: Sequence[Run]
  records: list[dict[str, Any]]
  missing: list[Run]
  command: str
  prepared: Any = None


@dataclasses.dataclass(frozen=True)
class Study:
  """A study for the driver.

  Attributes:
    module: `experiments.<module>`, its command line.
    settings: its settings class (a `Settings` subclass; its fields are its flags).
    grid: (settings, tasks) -> its cells, in run order.
    records: (settings, run, results) -> the table records of one finished run.
    report: outcome -> {"markdown": ..., "files": [...], ...}, the outputs written.
    methods: the methods a --lr_grid may name.
    prepare: (settings, tasks, data_dir) -> what the report also reads, computed before
      the first run (the sweep's classical references), so that it fails early.
  """

  module: str
  settings: type
  grid: Callable[[Any, Sequence[str]], list[Cell]]
  records: Callable[[Any, Run, Mapping[str, Any]], list[dict[str, Any]]]
  report: Callable[[Outcome], dict[str, Any]]
  methods: Sequence[str]
  prepare: Callable[[Any, Sequence[str], str], Any] | None = None


def tasks_for(shifts: Sequence[str], datasets: Sequence[str]) -> list[str]:
  """Task names: `all` = every shift of `datasets`; a shift name is looked up in them."""
  from levi_jax import input_pipeline
  known = input_pipeline.task_names()
  if list(shifts) == ["all"]:
    return [t for d in datasets for t in known if t.startswith(d + ".")]
  out = []
  for s in shifts:
    matches = [s] if s in known else [f"{d}.{s}" for d in datasets if f"{d}.{s}" in known]
    if not matches:
      input_pipeline.lookup_task(f"{datasets[0]}.{s}")  # raises, naming close matches
    out += matches
  return out


def validate_grid(tasks: Sequence[str], data_dir: str, implicit: bool) -> list[str]:
  """The tasks whose data exist, checked before the first run.

  `implicit` (shift names given without their dataset): a dataset whose files
  are missing from `data_dir` is left out with a note, as long as another has
  them; an explicitly named task with missing data is an error, as is a grid
  left empty.
  """
  from levi_jax import input_pipeline
  kept, missing = [], {}
  for task in tasks:
    try:
      input_pipeline.prepare(task, data_dir or None)
      kept.append(task)
    except input_pipeline.MissingFilesError as e:
      missing[task] = e
  if missing and (not implicit or not kept):
    raise ValueError("the grid names tasks whose data are missing from "
                     f"{data_dir or 'the default data dir'}: " +
                     "; ".join(f"{t}: {e}" for t, e in missing.items()))
  for task in missing:
    print(f"note: {task} left out: its dataset's files are not in {data_dir}", flush=True)
  return kept


def parse_lr_grid(text: str, methods: Sequence[str], known: Sequence[str]
                  ) -> dict[str, list[float]]:
  """'ft=1e-5,1e-4;levi,lp=3e-4,1e-3' -> {method: [lr, ...]} for each of `methods`;
  `default=` covers the rest; a name must be one of `known` or `default`."""
  grid: dict[str, list[float]] = {}
  for part in text.split(";"):
    if not part.strip():
      continue
    names, _, values = part.partition("=")
    lrs = runs.parse_list(values, float)
    if not lrs:
      raise ValueError(f"--lr_grid {text!r}: no learning rates in {part!r}")
    for name in runs.parse_list(names):
      if name != "default" and name not in known:
        raise ValueError(f"--lr_grid: unknown method {name!r}; expected some of "
                         f"{sorted(set(known))} or 'default'")
      grid[name] = lrs
  return {m: grid.get(m, grid.get("default", [])) for m in methods}


def parse_restrict(text: str, run_names: Sequence[str]
                   ) -> dict[str, tuple[set[str], set[int] | None]]:
  """'ft=gender_m_to_f,time_later@0,1;levi_aux=time_later' -> {run: (shifts, seeds or None)}.

  Runs are named as in the runs folder: the method (`ft`), or a variant column's
  run (`levi_layerwise`, `levi_aux`). A shift is named without or with its
  dataset; runs not named run everywhere.
  """
  out: dict[str, tuple[set[str], set[int] | None]] = {}
  for part in text.split(";"):
    if not part.strip():
      continue
    name, eq, rest = part.partition("=")
    name = name.strip()
    if not eq:
      raise ValueError(f"--restrict {text!r}: expected RUN=SHIFT,...[@SEED,...]; got {part!r}")
    if name not in run_names:
      raise ValueError(f"--restrict: {name!r} is not a run of this sweep; expected one of "
                       f"{list(run_names)}")
    shifts, _, seeds = rest.partition("@")
    out[name] = (set(runs.parse_list(shifts)),
                 set(runs.parse_list(seeds, int)) if seeds.strip() else None)
    if not out[name][0]:
      raise ValueError(f"--restrict: no shifts for {name!r} in {part!r}")
  from levi_jax import input_pipeline
  known = input_pipeline.task_names()  # a restriction may name shifts another invocation runs
  for name, (shifts_of, _) in out.items():
    unknown = {x for x in shifts_of if x not in known and not any(
        t.split(".", 1)[1] == x for t in known)}
    if unknown:
      raise ValueError(f"--restrict: {name} names unknown shifts: {sorted(unknown)}")
  return out


def restricted_out(restrict: Mapping[str, tuple[set[str], set[int] | None]], run_name: str,
                   task: str, seed: int) -> bool:
  """Whether `--restrict` leaves (run, task, seed) out of the grid."""
  if run_name not in restrict:
    return False
  shifts, seeds = restrict[run_name]
  return (task not in shifts and task.split(".", 1)[1] not in shifts) or (
      seeds is not None and seed not in seeds)


def epochs_to_steps(task: str, data_dir: str, epochs: float, batch_size: int) -> int:
  """Training steps for `epochs` passes over the task's training split."""
  from levi_jax import input_pipeline
  rows = len(input_pipeline.prepare(task, data_dir or None).rows("train"))
  return max(1, int(round(epochs * rows / batch_size)))


def run_key(gin_files: Sequence[str], bindings: Sequence[str], oov: float) -> str:
  """A short hash of what a run is: its resolved gin config (gin files, the files they
  include, bindings; not its MODEL_DIR) and its OOV-dropout rate.

  Finished runs are reused only under the same key, so a study with other
  `--gin.K=V`/`--steps` settings, or after an edit of an included gin file, in
  the same --runs_dir trains anew.
  """
  runs.parse_base(gin_files, [b for b in bindings if not b.startswith("MODEL_DIR")])
  config = gin.config_str()
  gin.clear_config()
  return hashlib.sha256(f"{config}\noov={oov:g}".encode()).hexdigest()[:10]


def gin_value(settings: Settings, name: str, bindings: Sequence[str] = ()) -> Any:
  """What the base gin files and --gin bindings bind `name` (a macro: `%NAME`) to."""
  runs.parse_base(settings.gin_file, [*settings.gin_bindings, *bindings])
  value = gin.query_parameter(name)
  gin.clear_config()
  return value


def data_dir_of(settings: Settings) -> str:
  """--data_dir, or the base gin files' DATA_DIR ('' there: the synthetic world)."""
  return settings.data_dir or gin_value(settings, "%DATA_DIR") or ""


def schedule_of(settings: Settings, task: str, data_dir: str, batch_size: int | None
                ) -> tuple[int | None, list[str]]:
  """A task's training steps (None: the gin's) and evaluation-schedule bindings: --steps,
  or with --epochs that many passes over its training split, evaluated --evals_per_epoch
  times per epoch."""
  if not settings.epochs:
    return settings.steps, []
  steps = epochs_to_steps(task, data_dir, settings.epochs, batch_size)
  evals = max(1, round(settings.epochs * settings.evals_per_epoch))
  return steps, [f"trainer.LoopConfig.eval_every = {max(1, steps // evals)}"]


def plan(study: Study, settings: Settings, tasks: Sequence[str], data_dir: str) -> list[Run]:
  """The study's grid resolved into runs, in run order, all checked before the first trains:
  the cells over the learning-rate grid, less what --restrict leaves out, each with its steps,
  OOV rate, bindings and MODEL_DIR (its gin config parsed for its key)."""
  cells = study.grid(settings, tasks)
  methods = list(dict.fromkeys(c.method for c in cells))
  lrs = parse_lr_grid(settings.lr_grid, methods, study.methods)
  restrict = parse_restrict(settings.restrict, list(dict.fromkeys(c.run for c in cells)))
  runs_dir = os.path.abspath(settings.runs_dir or os.path.join(settings.out, "runs"))
  cache = "" if settings.no_tap_cache else os.path.join(runs_dir, "tap_cache")
  batch_size = int(gin_value(settings, "%BATCH_SIZE")) if settings.epochs else None
  schedules: dict[str, tuple[int | None, list[str]]] = {}
  out = []
  for cell in cells:
    if restricted_out(restrict, cell.run, cell.task, cell.seed):
      continue
    if cell.task not in schedules:
      schedules[cell.task] = schedule_of(settings, cell.task, data_dir, batch_size)
    steps, schedule = schedules[cell.task]
    for lr in lrs[cell.method] or [None]:
      oov = settings.oov_dropout if cell.method in runs.FEATURE_METHODS else 0.0
      bindings = runs.run_bindings(
          "", cell.method, cell.task, cell.seed, backbone=settings.backbone,
          data_dir=settings.data_dir, steps=steps, tap_cache_dir=cache if cell.tap_cache else "",
          extra=[*schedule, *([f"LEARNING_RATE = {lr!r}"] if lr is not None else []),
                 *cell.bindings, *settings.gin_bindings])
      key = run_key(settings.gin_file, bindings, oov)
      name = f"{cell.run}+oov{oov:g}" if oov else cell.run
      model_dir = os.path.join(runs_dir, cell.task, name, f"seed{cell.seed}-{key}")
      bindings[0] = f"MODEL_DIR = '{model_dir}'"
      out.append(Run(cell, lr, oov, steps, tuple(bindings), model_dir))
  return out


def train_grid(study: Study, settings: Settings, planned: Sequence[Run]
               ) -> tuple[list[dict[str, Any]], list[Run]]:
  """Trains (or reads back) each planned run; returns the study's records and, with
  --report_only, the runs left out because they have not finished."""
  records, missing = [], []
  for k, r in enumerate(planned, 1):
    if settings.report_only and not r.done():
      missing.append(r)
      continue
    t = time.time()
    results = runs.train_run(r.model_dir, r.bindings, settings.gin_file,
                             settings.keep_checkpoints, r.oov, r.cell.seed)
    m = results["metrics"]
    print(f"[{k}/{len(planned)}] {r.cell.task} {r.cell.run} seed {r.cell.seed}"
          + (f" lr {r.learning_rate:g}" if r.learning_rate is not None else "")
          + f": ID {m['id_test']['rmse']:.4f} OOD {m['ood_test']['rmse']:.4f} "
            f"({time.time() - t:.0f}s)", flush=True)
    records += study.records(settings, r, results)
  return records, missing


# --report_only as absl spells it: -report_only, --report_only, --report_only=<true|1|...>.
_REPORT_ONLY = re.compile(r"--?report_only(=\S*)?")


def run(study: Study, settings: Settings, command: str = "") -> dict[str, Any]:
  """Runs the study: its tasks and grid checked, every run trained or read back, the
  report written into --out; returns the report's result."""
  data_dir = data_dir_of(settings)
  tasks = validate_grid(tasks_for(settings.shifts, settings.datasets), data_dir,
                        implicit=not all("." in s for s in settings.shifts))
  prepared = study.prepare(settings, tasks, data_dir) if study.prepare else None
  planned = plan(study, settings, tasks, data_dir)
  records, missing = train_grid(study, settings, planned)
  if settings.report_only and not missing:
    # Every run had finished: the report is the full study's, made by its command.
    command = " ".join(w for w in command.split(" ") if not _REPORT_ONLY.fullmatch(w))
  return study.report(Outcome(settings, tasks, data_dir, planned, records, missing, command,
                              prepared))


def protocol_text(s: Settings, learning_rates: str = "", restricted: str = "") -> str:
  """The '; '-led settings of a study's results page that its runs share (steps, bindings,
  OOV dropout, the study's own learning-rate and restriction phrases, epochs, early stopping)."""
  return ((f"; steps {s.steps}" if s.steps else "")
          + (f"; bindings {list(s.gin_bindings)}" if s.gin_bindings else "")
          + (f"; small-model OOV dropout {s.oov_dropout:g}" if s.oov_dropout else "")
          + (f"; {learning_rates}" if learning_rates else "")
          + (f"; {restricted}" if restricted else "")
          + (f"; {s.epochs:g} epochs per run, evaluated {s.evals_per_epoch:g}x per epoch"
             if s.epochs else "")
          + ("; numbers from each run's best-validation evaluation (early stopping)"
             if s.early_stopping else ""))


def metrics_of(results: Mapping[str, Any], early_stopping: bool) -> tuple[dict, dict]:
  """A run's reported metrics and their extra record fields: its last evaluation's, or
  with `early_stopping` the one with the lowest validation RMSE (and its step)."""
  if early_stopping and "best_validation" in results:
    best = results["best_validation"]
    return best["metrics"], {"best_step": best["step"]}
  return results["metrics"], {}


def write_tables(out: str, markdown: str, records: Sequence[Mapping[str, Any]],
                 summary: Sequence[Mapping[str, Any]]):
  """Writes a study's `results.md`, `runs.csv` (one row per record) and `summary.csv`."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(markdown)
  runs.write_csv(os.path.join(out, "runs.csv"), records)
  runs.write_csv(os.path.join(out, "summary.csv"), summary)


def main(study: Study):
  """A study's command line: `python -m experiments.<module> --out=... [flags]`."""

  def _run(settings: Settings, command: str):
    runs.initialize_multiprocess(settings.multiprocess)
    runs.progress_logging()
    result = run(study, settings, command)
    print(result["markdown"])
    print(f"wrote {settings.out}/{', '.join(result['files'])}")

  cli.main(study.settings, _run, f"experiments.{study.module}")
