"""Deleting a study, whole: the study, its companions (``NAME:baseline``, its final evaluations
and theirs), its checkpoint folders (the ``.stale-N`` folders set aside in them included) and
the plots a search and an evaluation leave. What would go is planned first (a reading), shown,
and only then deleted; nothing outside what the study made is touched."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..config import final_parts
from ..report.evaluation_plot import evaluation_plot_path
from ..report.plot import default_plot_path
from ..store.status import CONFIG_ATTR, RUN_ATTR, StudyError, completed_config, study_status
from ..store.storage import Store
from ..train.plan import OWNER_FILE

__all__ = ["DeletePlan", "plan_delete", "carry_out"]


@dataclass
class DeletePlan:
    study: str
    studies: list[str] = field(default_factory=list)  # the study and its companions
    folders: list[Path] = field(default_factory=list)  # checkpoint folders (or those of their entries) it made
    files: list[Path] = field(default_factory=list)  # plots that exist

    def describe(self) -> str:
        lines = [f"delete study {self.study!r}:"] + [f"  study {n!r}" for n in self.studies]
        lines += [f"  folder {p}" for p in self.folders] + [f"  file {p}" for p in self.files]
        return "\n".join(lines)


def plan_delete(store: Store, name: str) -> DeletePlan:
    """What deleting study ``name`` removes (reads only): a study of lambda_search's, given by
    its own name (a companion goes with its study)."""
    parts = final_parts(name)
    if parts is not None or name.endswith(":baseline"):
        owner = parts[0] if parts else name[: -len(":baseline")]
        raise StudyError(f"study {name!r} is a companion of study {owner!r}: delete it with --study {owner}")
    status = study_status(store, name)  # refuses an unknown study, or one lambda_search did not make
    studies = [n for n in store.study_names() if n == name or n.startswith(name + ":")]
    runs = {store.study_attrs(n).get(RUN_ATTR) for n in studies} - {None}
    folders = []
    for study in studies:
        stored = store.study_attrs(study).get(CONFIG_ATTR)
        folder = stored and completed_config(stored).study.checkpoint_dir
        if folder and Path(folder).exists() and not any(Path(folder).is_relative_to(f) for f in folders):
            folders += _removable(Path(folder), runs)
    files = []
    if status.config.study.checkpoint_dir:
        plot = default_plot_path(status)
        files = [p for p in (plot, evaluation_plot_path(plot)) if p.exists()]
    return DeletePlan(name, studies, folders, files)


def _removable(folder: Path, runs: set) -> list[Path]:
    """What of a checkpoint folder the study made: ``folder`` itself where all in it is the
    study's (its points' folders, marked with its runs; folders set aside in it, ``.stale-N``;
    its final evaluations' folders), else those of its entries; another study's (one that
    shares the folder) stay."""
    owner = folder / OWNER_FILE
    if owner.exists():
        return [folder] if owner.read_text().strip() in runs else []
    if ".stale-" in folder.name:
        return [folder]
    entries = [e for e in folder.iterdir() if e.is_dir()]
    parts = [p for e in entries for p in _removable(e, runs)]
    loose = [e for e in folder.iterdir() if not e.is_dir()]
    return [folder] if not loose and len(parts) == len(entries) and parts == entries else parts


def carry_out(store: Store, plan: DeletePlan) -> None:
    """Delete what ``plan`` lists: the companions first and the study last, so that an
    interrupted delete leaves the study listed (and a second delete finishes it)."""
    for folder in plan.folders:
        shutil.rmtree(folder, ignore_errors=True)
    for path in plan.files:
        path.unlink(missing_ok=True)
    for name in sorted(plan.studies, key=lambda n: n == plan.study):
        store.delete_study(name)
