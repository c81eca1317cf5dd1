"""The columns of a study's final evaluation (the paper's Table 2): the searched network on
the searched data, study ``NAME:final``; another network, or another data set, each (network,
data set) a companion study ``NAME:final:COLUMN`` of its own. ``COLUMN`` is the network (``:``
of a user's ``module:function`` made ``.``) and, for other data, ``@<data set>-<6 hex digits
of its images and test split>``: one name for one (network, data), never two alike, and no
user's study name (which holds no ':') can be one.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from ..config import Config, ConfigError, DataSection, ModelSection
from ..configfile import data_differences, parse_override, resolve_config
from ..data.datasets import dataset_fingerprint
from ..data.folds import folds_fingerprint
from ..nn.registry import network_spec
from ..store.status import CONFIG_ATTR, final_study_name
from ..store.storage import Store
from ..train.plan import Plan

__all__ = ["final_config", "held_checkpoints", "other_data", "data_tag", "searched_data", "FINAL_EVAL_EVERY"]

FINAL_EVAL_EVERY = 2**31 - 1  # train.eval_every of a final training: past any budget, so only its end is tested


def final_config(config: Config, e_lambda: float, seeds: int, network: str | None = None,
                 data: DataSection | None = None, tag: str | None = None) -> Config:
    """The config of one final evaluation of study ``config``: the same budget, schedule and
    optimiser; ``e_lambda`` alone (and the baseline where the search had one); ``seeds`` seeds;
    every training image against the test split. Of the searched network on the searched
    data (checkpoints in ``<checkpoint_dir>/final``), or of ``network`` and/or ``data`` (its
    ``tag``, :func:`data_tag`; checkpoints in ``<checkpoint_dir>/final-COLUMN``): inside the
    search's own folder, so that no other study's folder (``X-final.ckpt`` of a study named
    ``X-final``) can be one. Another network keeps the search's ResNet shortcut where it has
    that option."""
    target = config
    if network is not None and network != config.model.name:
        allowed = network_spec(network).options.get("shortcut", ())
        shortcut = config.model.shortcut if config.model.shortcut in allowed else ModelSection().shortcut
        target = target.replace("model", name=network, shortcut=shortcut)
    if data is not None:
        if not tag:
            raise ValueError("another data set's final evaluation needs its tag (data_tag)")
        target = target.replace("data", **{f.name: getattr(data, f.name) for f in fields(data)})
    network_part = target.model.name.replace(":", ".") if target.model != config.model else ""
    column = (network_part or config.model.name.replace(":", ".")) + f"@{tag}" if data is not None else network_part
    ckpt = config.study.checkpoint_dir
    if ckpt is not None:  # inside the search's folder, beside its points' folders (lambda-*, baseline-*)
        ckpt = str(Path(ckpt) / ("final" + (f"-{column}" if column else "")))
    return (target.replace("study", name=final_study_name(config.study.name, column or None), checkpoint_dir=ckpt)
            .replace("search", lambdas=(float(e_lambda),), repeats=seeds, strategy="grid")  # the chosen lambda only
            .replace("data", test=True).replace("train", eval_every=FINAL_EVAL_EVERY))


def held_checkpoints(store: Store, final: Config) -> Config:
    """``final`` with the checkpoint folder its study was made with, where it was made before
    (a study made by an earlier version checkpoints in ``<checkpoint_dir>-final``: resumable)."""
    held = store.study_attrs(final.study.name).get(CONFIG_ATTR)
    folder = (held or {}).get("study", {}).get("checkpoint_dir")
    return final.replace("study", checkpoint_dir=folder) if folder else final


def other_data(config: Config, overrides) -> DataSection | None:
    """The data set ``--set data.KEY=VALUE`` overrides name (None where they name none, or only
    where the searched data lie): the searched data with them, or, for another
    ``data.dataset``, that data set's defaults with them (the search's data.seed kept).
    data.test is evaluate's own; folds mean nothing here."""
    given = [parse_override(o) for o in overrides]
    data = {key: value for section, key, value in given if section == "data"}
    for key in ("test", "folds", "holdout"):
        if key in data:
            raise ConfigError(f"--set data.{key}: a final evaluation trains on every training image and tests on the "
                              f"test split; data.{key} means nothing to it (give the data set: data.dataset, "
                              "data.root, data.options...)")
    if not set(data) - {"root", "download"}:
        return None  # (where the searched data lie: a change of where it runs, as resume takes)
    base = config.to_dict()["data"]
    if data.get("dataset", config.data.dataset) != config.data.dataset:
        base = {"seed": config.data.seed}
    texts = [o for o, (section, _, _) in zip(overrides, given) if section == "data"]
    return resolve_config({**config.to_dict(), "data": base}, texts, origin="--set").data


def searched_data(config: Config, data: DataSection) -> bool:
    """Whether ``data`` is the searched data set, wherever it lies (``data.root`` and
    ``data.download`` aside, except for a data set that is its folder: an image folder)."""
    return not data_differences(config, config.replace("data", **{f.name: getattr(data, f.name) for f in fields(data)}))


def data_tag(plan: Plan) -> str:
    """``<data set>-<6 hex digits>`` of a final evaluation's plan: of its images, labels and
    augmentation and of its test split, whatever config keys named them."""
    return f"{plan.config.data.dataset}-{folds_fingerprint(plan.folds[:1], dataset_fingerprint(plan.data))[:6]}"
