"""Deleting a study, whole: the study, its companions (``NAME:baseline``, its final evaluations
and theirs), the checkpoint folders of its points (and those set aside in its folder,
``.stale-N``) and the plots a search and an evaluation leave. What would go is planned first
(a reading), shown, and only then deleted; nothing the study did not make is touched: only
the point folders its runs marked, never a link followed, another study's or a user's file
kept, and checkpoint folders only beside the database the study was made in (a copy's are
the original's)."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..report.evaluation_plot import evaluation_plot_path
from ..report.plot import default_plot_path
from ..store.failures import StorageError
from ..store.status import CONFIG_ATTR, RUN_ATTR, StudyError, completed_config, is_companion, study_status
from ..store.storage import Store, storage_file
from ..train.plan import OWNER_FILE

__all__ = ["DeletePlan", "plan_delete", "carry_out"]

# what a study makes in its checkpoint folder: a point's folder, one set aside (or being deleted), a final evaluation's
_POINT = re.compile(r"^(lambda-.+|baseline)-r\d+(\.stale-\w+)?$")
_FINAL = re.compile(r"^final(-.+)?$")


@dataclass
class DeletePlan:
    study: str
    studies: list[str] = field(default_factory=list)  # the study and its companions
    folders: list[Path] = field(default_factory=list)  # point folders it made
    containers: list[Path] = field(default_factory=list)  # its checkpoint folders: removed where left empty
    files: list[Path] = field(default_factory=list)  # plots that exist
    kept: list[str] = field(default_factory=list)  # what is not deleted, and why

    def describe(self) -> str:
        lines = [f"delete study {self.study!r}:"] + [f"  study {n!r}" for n in self.studies]
        lines += [f"  folder {p}" for p in self.folders] + [f"  file {p}" for p in self.files]
        return "\n".join(lines + [f"  kept: {k}" for k in self.kept])


def plan_delete(store: Store, name: str) -> DeletePlan:
    """What deleting study ``name`` removes (reads only): a study of lambda_search's, given by
    its own name (a companion goes with its study), none of whose points is running."""
    owner = next((n for n in store.study_names() if n != name and is_companion(name, n)), None)
    if owner is not None or ":" in name:
        raise StudyError(f"study {name!r} is a companion of study {owner or name.split(':')[0]!r}: delete it with "
                         f"--study {owner or name.split(':')[0]}")
    status = study_status(store, name)  # refuses an unknown study, or one lambda_search did not make
    studies = [name] + [n for n in store.study_names() if is_companion(n, name)]
    plan = DeletePlan(name, studies)
    runs = {store.study_attrs(n).get(RUN_ATTR) for n in studies} - {None}
    for study in studies:
        stored = store.study_attrs(study).get(CONFIG_ATTR)
        if not stored:
            continue
        if any(p.state == "running" for p in study_status(store, study).points):
            raise StudyError(f"study {study!r} has points running (a worker holds them): stop its workers first")
        _plan_folder(plan, store, Path(completed_config(stored).study.checkpoint_dir or ""), runs)
    if status.config.study.checkpoint_dir or storage_file(store.url):
        plot = default_plot_path(status)
        plan.files = [p for p in (plot, evaluation_plot_path(plot)) if p.is_file() and not p.is_symlink()]
    return plan


def _plan_folder(plan: DeletePlan, store: Store, folder: Path, runs: set) -> None:
    if not str(folder) or str(folder) == "." or not folder.is_dir() or folder.is_symlink() or folder in plan.containers:
        return
    file = storage_file(store.url)
    if file is not None and file.resolve().parent not in (folder.resolve().parent, *folder.resolve().parents):
        plan.kept.append(f"{folder}: not beside this database (a copied database's folder is the original's); "
                         "delete it by hand where it is this study's")
        return
    plan.containers.append(folder)
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        path = Path(entry.path)
        if not entry.is_dir(follow_symlinks=False):
            continue
        if _FINAL.match(entry.name):
            _plan_folder(plan, store, path, runs)
        elif _POINT.match(entry.name) and (".stale-" in entry.name or _owner(path) in runs):
            plan.folders.append(path)


def _owner(folder: Path) -> str | None:
    try:
        return (folder / OWNER_FILE).read_text().strip()
    except OSError:
        return None


def carry_out(store: Store, plan: DeletePlan) -> None:
    """Delete what ``plan`` lists: the files first (each point folder renamed aside before it is
    removed, so that an interrupted delete leaves what a second one finds), then the
    companions, the study last (an interrupted delete leaves it listed)."""
    for folder in plan.folders:
        aside = folder if ".stale-" in folder.name else folder.with_name(folder.name + ".stale-deleting")
        try:
            if aside != folder:
                os.replace(folder, aside)
            shutil.rmtree(aside)
        except OSError as exc:
            raise StorageError(f"cannot delete {str(folder)!r} ({exc.strerror}): nothing of study {plan.study!r} "
                               "in the storage was deleted; run delete again when it can be") from None
    for folder in reversed(plan.containers):
        try:
            folder.rmdir()  # only where it is left empty
        except OSError:
            pass
    for path in plan.files:
        path.unlink(missing_ok=True)
    for name in sorted(plan.studies, key=lambda n: n == plan.study):
        store.delete_study(name)
