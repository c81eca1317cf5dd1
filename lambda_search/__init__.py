"""lambda_search: choose SimAM's lambda by cross-validation, and trust the answer.

The public names, by what a user does with them (everything else stays importable from its
module, e.g. ``lambda_search.train.plan.make_plan``, for tests and the curious). Each is
imported when first used: reading a study (status, select, tables, plots) never imports torch.

Run a search
    load_config(path, overrides)       a study config (TOML), checked, defaults filled in
    run_search(config, workers=...)    create or resume the study and run every point once
    run_worker(store, name)            one more worker on a running study
    open_store(url)                    an SQLite, PostgreSQL or journal storage
    study_status(store, name)          every point: state, folds, mean and std (StudyStatus)
    list_studies(store)                the studies of a storage
    run_evaluation(url, name)          train the choice and the baseline on the whole training set, test them
                                       (networks=[...] and --set data.*: other networks and data sets)
    read_evaluations(store, name)      those final evaluations as they stand, a column per (network, data
                                       set) as the paper's Table 2 (None where there is none);
                                       read_evaluation(store, name) the searched one alone;
                                       plot_evaluation(table, path) draws them

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
    load_dataset, make_folds, TrainConfig, train_fold (several folds at once: train.pack.train_pack)

Errors
    ConfigError, StorageError, StudyError (bad input: the CLI's exit code 2);
    StorageFailure (a full disk, a lost database: exit code 1)

``run_bench`` (and ``Bench``, ``format_bench``, ``paper_figure4_config``) measure speed; no
worker loads the reference pipeline they time.

The code is layered, each subpackage importing only those before it: ``config``,
``configfile``, ``points`` and ``strategy`` (no torch) -> ``data`` -> ``nn`` -> ``train`` ->
``store`` (no torch) -> ``bench`` -> ``report`` (no torch) -> ``search`` -> ``cli``. Each
subpackage's docstring says what it owns.
"""

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first use)
_WHERE = {
    "load_config": "configfile", "ConfigError": "config", "format_lambda": "points",
    "load_dataset": "data.datasets", "make_folds": "data.folds",
    "SimAM": "nn.simam", "simam": "nn.simam", "set_e_lambda": "nn.simam", "build_model": "nn.registry",
    "MODEL_NAMES": "nn.registry", "load_official_checkpoint": "nn.official",
    "TrainConfig": "config", "train_fold": "train.single",
    "open_store": "store.storage", "StorageError": "store.failures", "StorageFailure": "store.failures",
    "study_status": "store.status", "StudyStatus": "store.status", "list_studies": "store.status",
    "StudyError": "store.status",
    "select": "report.select", "format_selection": "report.select", "status_table": "report.tables",
    "cv_results": "report.tables", "results_frame": "report.tables", "folds_frame": "report.tables",
    "export_tables": "report.tables", "figure4_data": "report.plot", "draw_figure4": "report.plot",
    "plot_figure4": "report.plot", "read_evaluation": "report.evaluation",
    "read_evaluations": "report.evaluation", "plot_evaluation": "report.evaluation_plot",
    "run_search": "search.study", "run_worker": "search.worker", "run_evaluation": "search.evaluate",
    "run_bench": "bench.run", "Bench": "bench.run", "format_bench": "bench.run", "paper_figure4_config": "bench.run",
}

__all__ = [
    "load_config", "run_search", "run_worker", "run_evaluation", "read_evaluations", "open_store", "study_status",
    "list_studies", "StudyStatus",
    "select", "format_selection", "status_table", "cv_results", "results_frame", "folds_frame",
    "export_tables", "figure4_data", "draw_figure4", "plot_figure4", "format_lambda",
    "SimAM", "simam", "build_model", "set_e_lambda", "load_official_checkpoint", "MODEL_NAMES",
    "load_dataset", "make_folds", "TrainConfig", "train_fold",
    "ConfigError", "StorageError", "StudyError", "StorageFailure",
    "run_bench",
]


def __getattr__(name: str):
    """A public name, imported from its module when first asked for (PEP 562): ``import
    lambda_search`` loads neither torch nor Optuna, and a worker never loads ``bench``."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'lambda_search' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
