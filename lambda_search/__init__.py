"""lambda_search: choose SimAM's lambda by cross-validation, and trust the answer."""

from ._config import ConfigError, config_diff, load_config, parse_override, resolve_config
from ._augment import center_crop, normalize, random_crop_flip, random_resized_crop
from ._data import DATASETS, Augmentation, ImageData, dataset_fingerprint, load_dataset
from ._folds import Fold, derive_seed, folds_fingerprint, make_folds
from ._checkpoint import load_official_checkpoint, map_official_state_dict
from ._models import MODEL_NAMES, BasicBlock, ResNet, build_model
from ._simam import SimAM, check_e_lambda, set_e_lambda, simam, simam_batch_norm, simam_reference
from ._train import Engine, EpochMetrics, FoldResult, TrainConfig, train_fold
from ._pack import Pack, train_pack
from ._objective import Plan, Point, PointOutcome, format_lambda, grid_points, make_plan, run_point, summarize
from ._measure import Engines, Projection, project, quick_projection
from ._storage import DiskFull, StorageError, StorageFailure, StorageLost, Store, open_store, redact
from ._status import (STORAGE_ENV, PointStatus, StudyError, StudyStatus, baseline_study_name, list_studies,
                      load_study_config, study_status)
from ._worker import run_worker
from ._study import create_or_resume, resume_config, run_search
from ._report import export_csv, export_tables, folds_frame, format_studies, results_frame, status_table, table_text
from ._select import LambdaStats, corrected_t_test, format_selection, lambda_stats, nothing_selected, select
from ._plot import default_plot_path, draw_figure4, figure4_data, plot_figure4, plot_title

__version__ = "0.1.0"

_BENCH = ("Bench", "format_bench", "paper_figure4_config", "run_bench")


def __getattr__(name: str):
    """``bench``'s names, imported when first asked for: a worker never loads the reference
    pipeline (PIL transforms, a DataLoader) that only ``bench`` times."""
    if name in _BENCH:
        from . import _bench

        return getattr(_bench, name)
    raise AttributeError(f"module 'lambda_search' has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "config_diff",
    "load_config",
    "parse_override",
    "resolve_config",
    "Plan",
    "Point",
    "format_lambda",
    "PointOutcome",
    "grid_points",
    "make_plan",
    "run_point",
    "summarize",
    "Bench",
    "Projection",
    "Engines",
    "format_bench",
    "paper_figure4_config",
    "project",
    "quick_projection",
    "run_bench",
    "StorageError",
    "StorageFailure",
    "DiskFull",
    "StorageLost",
    "Store",
    "open_store",
    "redact",
    "STORAGE_ENV",
    "PointStatus",
    "StudyError",
    "StudyStatus",
    "baseline_study_name",
    "create_or_resume",
    "load_study_config",
    "resume_config",
    "run_search",
    "run_worker",
    "study_status",
    "export_csv",
    "export_tables",
    "table_text",
    "format_studies",
    "list_studies",
    "nothing_selected",
    "folds_frame",
    "results_frame",
    "status_table",
    "LambdaStats",
    "corrected_t_test",
    "format_selection",
    "lambda_stats",
    "select",
    "default_plot_path",
    "draw_figure4",
    "figure4_data",
    "plot_figure4",
    "plot_title",
    "DATASETS",
    "Augmentation",
    "Engine",
    "EpochMetrics",
    "Fold",
    "FoldResult",
    "ImageData",
    "TrainConfig",
    "center_crop",
    "dataset_fingerprint",
    "derive_seed",
    "folds_fingerprint",
    "load_dataset",
    "make_folds",
    "normalize",
    "random_crop_flip",
    "random_resized_crop",
    "train_fold",
    "Pack",
    "train_pack",
    "MODEL_NAMES",
    "BasicBlock",
    "ResNet",
    "SimAM",
    "build_model",
    "check_e_lambda",
    "load_official_checkpoint",
    "map_official_state_dict",
    "set_e_lambda",
    "simam",
    "simam_reference",
    "simam_batch_norm",
    "__version__",
]
