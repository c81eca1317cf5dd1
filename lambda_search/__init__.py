"""lambda_search: choose SimAM's lambda by cross-validation, and trust the answer.

The public names, by what a user does with them (everything else stays importable from its
module, e.g. ``lambda_search._objective.make_plan``, for tests and the curious):

Run a search
    load_config(path, overrides)       a study config (TOML), checked, defaults filled in
    run_search(config, workers=...)    create or resume the study and run every point once
    run_worker(store, name)            one more worker on a running study
    open_store(url)                    an SQLite, PostgreSQL or journal storage
    study_status(store, name)          every point: state, folds, mean and std (StudyStatus)
    list_studies(store)                the studies of a storage
    run_evaluation(url, name)          train the choice and the baseline on the whole training set, test them
    read_evaluation(store, name)       that final evaluation as it stands (None where there is none)

Read the answer
    select(status, prefer)             best mean, one-standard-error choice, corrected t-tests
    format_selection(selection)        the selection as text
    status_table(status)               the points as text
    cv_results(status)                 scikit-learn's GridSearchCV.cv_results_, one entry per lambda
    results_frame(status)              pd.DataFrame(cv_results) and a row for the baseline
    folds_frame(status)                one row per fold
    export_tables(status, path)        both tables as CSV or JSON
    figure4_data(status)               what Figure 4 shows (a pure function)
    draw_figure4(data, path)           draw it; plot_figure4(status, path) does both
    format_lambda(value)               a lambda's shortest exact label

Models and one training
    SimAM, simam, build_model, set_e_lambda, load_official_checkpoint, MODEL_NAMES
    load_dataset, make_folds, TrainConfig, train_fold (several folds at once: _pack.train_pack)

Errors
    ConfigError, StorageError, StudyError (bad input: the CLI's exit code 2);
    StorageFailure (a full disk, a lost database: exit code 1)

``run_bench`` (and ``Bench``, ``format_bench``, ``paper_figure4_config``) measure speed;
they are loaded when first asked for, so that no worker loads the reference pipeline.
"""

from ._checkpoint import load_official_checkpoint
from ._config import ConfigError, load_config
from ._data import load_dataset
from ._engine import TrainConfig
from ._evaluate import read_evaluation, run_evaluation
from ._failures import StorageError, StorageFailure
from ._folds import make_folds
from ._models import MODEL_NAMES, build_model
from ._objective import format_lambda
from ._plot import draw_figure4, figure4_data, plot_figure4
from ._report import cv_results, export_tables, folds_frame, results_frame, status_table
from ._select import format_selection, select
from ._simam import SimAM, set_e_lambda, simam
from ._status import StudyError, StudyStatus, list_studies, study_status
from ._storage import open_store
from ._study import run_search
from ._train import train_fold
from ._worker import run_worker

__version__ = "0.1.0"

_BENCH = ("Bench", "format_bench", "paper_figure4_config", "run_bench")

__all__ = [
    "load_config", "run_search", "run_worker", "run_evaluation", "read_evaluation", "open_store", "study_status",
    "list_studies", "StudyStatus",
    "select", "format_selection", "status_table", "cv_results", "results_frame", "folds_frame",
    "export_tables", "figure4_data", "draw_figure4", "plot_figure4", "format_lambda",
    "SimAM", "simam", "build_model", "set_e_lambda", "load_official_checkpoint", "MODEL_NAMES",
    "load_dataset", "make_folds", "TrainConfig", "train_fold",
    "ConfigError", "StorageError", "StudyError", "StorageFailure",
    "run_bench",
]


def __getattr__(name: str):
    """``bench``'s names, imported when first asked for: a worker never loads the reference
    pipeline (PIL transforms, a DataLoader) that only ``bench`` times."""
    if name in _BENCH:
        from . import _bench

        return getattr(_bench, name)
    raise AttributeError(f"module 'lambda_search' has no attribute {name!r}")
