"""A checkpoint is adopted only by the training it belongs to: a new study never resumes
another run's folds (another data set, protocol, storage, or the same name after its
database was deleted), and what it sets aside is kept, with one warning line."""

import subprocess

import pytest
import torch

import lambda_search as ls
from lambda_search.cli import main
from lambda_search.configfile import storage_tag

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


@pytest.mark.slow
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


@pytest.mark.slow
def test_the_same_study_resumes_its_own_checkpoints(tiny_config):
    config = ls.load_config(tiny_config(ckpt_seconds=0.0))
    _stopped(config)
    lines = []
    _, status = ls.run_search(config, log=lines.append)
    assert status.finished and any(_resumed_from(status)) and not [ln for ln in lines if "warning" in ln]


@pytest.mark.slow
def test_two_storages_in_one_folder_keep_apart(tiny_config, tmp_path, capsys):
    """Checkpoints and plots of the same study in two storages never mix: a copied database
    resumed, above all, never writes over the original's plot."""
    path = tiny_config(lambdas="[1e-3]")
    other = f"sqlite:///{tmp_path / 'other.db'}"
    assert main(["search", str(path)]) == 0
    assert main(["search", str(path), "--storage", other]) == 0
    out = capsys.readouterr().out
    tag = ls.load_config(path, [f"study.storage={other!r}"]).study.checkpoint_dir.rsplit("-", 1)[1]
    assert tag == f"{storage_tag(other)}.ckpt"
    assert f"Figure 4: {tmp_path / 'tiny.png'}" in out and f"Figure 4: {tmp_path / 'other+tiny.png'}" in out
    # the same storage with a password gives the same folder: the password is not part of it
    assert storage_tag("postgresql://u:secret@h/db") == storage_tag("postgresql://u:other@h/db")


@pytest.mark.slow
def test_a_fold_checkpoint_of_another_run_is_one_warning_line(tiny_config, tmp_path, cli_env):
    path = tiny_config(ckpt_seconds=0.0)
    _stopped(ls.load_config(path), steps=3)  # fold r0f0 in flight (4 steps: 2 epochs of 2)
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


@pytest.mark.parametrize("directions", [["minimize"], ["maximize", "maximize"], "baseline minimize"])
def test_an_empty_foreign_study_is_adopted_only_if_it_maximizes(tiny_config, tmp_path, capsys, directions):
    import optuna

    url = f"sqlite:///{tmp_path / 'other.db'}"
    if directions == "baseline minimize":
        optuna.create_study(storage=url, study_name="empty", direction="maximize")
        optuna.create_study(storage=url, study_name="empty:baseline")
    else:
        optuna.create_study(storage=url, study_name="empty", directions=directions)
    before = (tmp_path / "other.db").read_bytes()
    assert main(["search", str(tiny_config(baseline="true")), "--storage", url, "--study", "empty"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "was not made by lambda_search and its direction is" in err[0], err
    assert "not maximize" in err[0]
    study = optuna.load_study(study_name="empty", storage=url)
    assert study.trials == [] and study.user_attrs == {}
    assert (tmp_path / "other.db").read_bytes() == before  # nothing stored changed


def test_an_empty_foreign_study_that_maximizes_is_adopted(tiny_config, tmp_path):
    import optuna

    url = f"sqlite:///{tmp_path / 'other.db'}"
    optuna.create_study(storage=url, study_name="empty", direction="maximize")
    assert main(["search", str(tiny_config(lambdas="[1e-3]")), "--storage", url, "--study", "empty"]) == 0
    study = optuna.load_study(study_name="empty", storage=url)
    assert study.best_params == {"e_lambda": 1e-3} and len(study.trials) == 1


@pytest.mark.slow
@pytest.mark.parametrize("cut", [2, 40, "the whole last line but one byte"])
def test_a_torn_journal_tail_is_set_aside_and_the_search_completes(tiny_config, tmp_path, cut):
    path = tiny_config(baseline="true")
    log = tmp_path / "tiny.log"
    url = f"journal:{log}"
    assert main(["search", str(path), "--storage", url]) == 0
    data = log.read_bytes()
    last = data[:-1].rfind(b"\n") + 1
    cut = len(data) - last - 1 if isinstance(cut, str) else cut
    log.write_bytes(data[:-cut])  # the tail a power loss leaves
    with pytest.warns(UserWarning, match=f"ended in a torn record \\({len(data) - cut - last} bytes"):
        assert main(["search", str(path), "--storage", url]) == 0
    assert log.read_bytes().startswith(data[:last])  # every whole record kept, the search appended after them
    assert (tmp_path / "tiny.log.torn").read_bytes() == data[last:-cut] + b"\n"
    status = ls.study_status(ls.open_store(url), "tiny")
    assert status.finished and status.complete == 3
    with_complete = {}
    for study in ("tiny", "tiny:baseline"):
        import optuna

        for t in optuna.load_study(study_name=study, storage=ls.open_store(url).storage).trials:
            if t.state == optuna.trial.TrialState.COMPLETE:
                key = t.system_attrs["lambda_search:point"]
                with_complete[key] = with_complete.get(key, 0) + 1
    assert sorted(with_complete.values()) == [1, 1, 1]  # each point complete exactly once


def test_a_journal_that_lost_only_its_last_newline_keeps_its_last_record(tiny_config, tmp_path):
    path = tiny_config()
    log = tmp_path / "tiny.log"
    url = f"journal:{log}"
    assert main(["search", str(path), "--storage", url]) == 0
    data = log.read_bytes()
    log.write_bytes(data[:-1])
    with pytest.warns(UserWarning, match="lacked the newline after its last record: added"):
        status = ls.study_status(ls.open_store(url, write=True), "tiny")  # (a writer repairs)
    assert log.read_bytes() == data and status.finished and not (tmp_path / "tiny.log.torn").exists()
