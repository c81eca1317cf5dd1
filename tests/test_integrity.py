"""A checkpoint is adopted only by the training it belongs to: a new study never resumes
another run's folds (another data set, protocol, storage, or the same name after its
database was deleted), and what it sets aside is kept, with one warning line."""

import subprocess

import pytest
import torch

import lambda_search as ls
from lambda_search.cli import main

from conftest import SCRIPT


def _stopped(config, steps=5):
    """Run ``config`` until ``steps`` training steps are done: a fold in flight, checkpointed."""
    calls = []
    _, status = ls.run_search(config, log=lambda s: None, should_stop=lambda: calls.append(1) or len(calls) > steps)
    assert not status.finished
    return status


def _resumed_from(status) -> list:
    return [r["resumed_from_iteration"] for p in status.points for r in p.folds.values()]


def _fold_results(status) -> dict:
    return {(p.point.key, n): (r["val_accuracy"], r["val_loss"]) for p in status.points for n, r in p.folds.items()}


@pytest.mark.parametrize("change", [["data.options.noise=5.0"], ["train.lr=0.02"], []],
                         ids=["other data", "other protocol", "same config, database deleted"])
def test_a_new_study_never_adopts_an_old_runs_checkpoints(tiny_config, tmp_path, change):
    path = tiny_config(ckpt_seconds=0.0)
    old = ls.load_config(path)
    _stopped(old)
    folder = tmp_path / "tiny.ckpt" / "lambda-0.0001-r0"
    assert (folder / "r0f0.pt").exists()
    (tmp_path / "tiny.db").unlink()  # the study is gone, its checkpoints are not
    lines = []
    _, status = ls.run_search(ls.load_config(path, change), log=lines.append)
    assert status.finished and not any(_resumed_from(status))
    warnings = [ln for ln in lines if "warning" in ln]
    assert warnings == [f"warning: set aside checkpoint folder {folder} as lambda-0.0001-r0.stale-1: another run's "
                        "(not written by this study), never adopted"]
    assert (folder.parent / "lambda-0.0001-r0.stale-1" / "r0f0.pt").exists()  # kept
    clean_folder = tmp_path / "clean"
    clean_folder.mkdir()
    _, clean = ls.run_search(ls.load_config(tiny_config(clean_folder, ckpt_seconds=0.0), change), log=lambda s: None)
    assert _fold_results(status) == _fold_results(clean)


def test_the_same_study_resumes_its_own_checkpoints(tiny_config):
    config = ls.load_config(tiny_config(ckpt_seconds=0.0))
    _stopped(config)
    lines = []
    _, status = ls.run_search(config, log=lines.append)
    assert status.finished and any(_resumed_from(status)) and not [ln for ln in lines if "warning" in ln]


def test_two_storages_in_one_folder_keep_apart(tiny_config, tmp_path, capsys):
    path = tiny_config(lambdas="[1e-3]")
    other = f"sqlite:///{tmp_path / 'other.db'}"
    assert main(["search", str(path)]) == 0
    assert main(["search", str(path), "--storage", other]) == 0
    out = capsys.readouterr().out
    tag = ls.load_config(path, [f"study.storage={other!r}"])["study"]["checkpoint_dir"].rsplit("-", 1)[1]
    assert tag == f"{ls._config.storage_tag(other)}.ckpt"
    assert f"Figure 4: {tmp_path / 'tiny.png'}" in out and f"Figure 4: {tmp_path / f'tiny-{tag[:-5]}.png'}" in out
    # the same storage with a password gives the same folder: the password is not part of it
    assert ls._config.storage_tag("postgresql://u:secret@h/db") == ls._config.storage_tag("postgresql://u:other@h/db")


def test_a_fold_checkpoint_of_another_run_is_one_warning_line(tiny_config, tmp_path, cli_env):
    path = tiny_config(ckpt_seconds=0.0)
    _stopped(ls.load_config(path))
    ckpt = next((tmp_path / "tiny.ckpt").rglob("r0f0.pt"))
    payload = torch.load(ckpt, weights_only=True)
    payload["key"]["seed"] += 1  # another run's fold checkpoint in this study's own folder
    torch.save(payload, ckpt)
    result = subprocess.run([str(SCRIPT), "search", str(path)], env=cli_env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"lambda-search: warning: set aside checkpoint {ckpt} as r0f0.pt.stale-1: another run's (it differs in "
        "seed), never adopted"]
