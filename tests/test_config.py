"""Study configs: the shipped ones load, --set overrides, errors name the key and the rule."""

from pathlib import Path

import pytest

import lambda_search as ls
from lambda_search import config as _config
from lambda_search import configfile as _configfile
from lambda_search.config import ModelSection

STUDIES = Path(__file__).resolve().parents[1] / "studies"


def test_shipped_configs_load_with_the_papers_protocol():
    fig4 = ls.load_config(STUDIES / "figure4_cifar100_resnet20.toml")
    assert fig4.study.name == "figure4_cifar100_resnet20"
    assert fig4.search.lambdas == (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    assert fig4.data.dataset == "cifar100" and fig4.data.folds == 5
    assert fig4.model == ModelSection(name="resnet20", shortcut="B")
    train = fig4.train
    assert (train.iterations, train.batch_size, train.lr, train.momentum, train.weight_decay) == (
        64000, 128, 0.1, 0.9, 5e-4)
    assert train.milestones == (0.5, 0.75) and train.schedule == "step"

    imagenet = ls.load_config(STUDIES / "imagenet_resnet18_half.toml")
    t = imagenet.train
    assert imagenet.model.name == "resnet18" and imagenet.search.repeats == 3
    assert t.epochs == 50 and [round(m * 50) for m in t.milestones] == [15, 30, 45]
    assert imagenet.data.options["resolution"] == 112

    quick = ls.load_config(STUDIES / "quickstart.toml")
    assert quick.data.dataset == "digits" and 4 <= len(quick.search.lambdas) <= 6
    assert quick.study.storage.endswith("studies/quickstart.db")


def test_every_shipped_config_loads():
    paths = sorted(STUDIES.glob("*.toml"))
    assert len(paths) >= 5
    for path in paths:
        assert ls.load_config(path).study.name == path.stem


@pytest.mark.parametrize("dataset", ["cifar100", "cifar10"])
def test_table2_configs_hold_the_papers_protocol(dataset):
    config = ls.load_config(STUDIES / f"table2_{dataset}.toml")
    assert config.study.name == f"table2_{dataset}"
    assert config.search.lambdas == (1e-4,) and config.search.baseline is True and config.search.repeats == 1
    assert config.data.dataset == dataset and config.data.holdout == 0.1  # the paper's 45k/5k split
    assert Path(config.data.root).resolve() == STUDIES.parent / "data"
    assert config.model == ModelSection(name="resnet20", shortcut="B")
    train = config.train
    assert (train.iterations, train.batch_size, train.lr, train.momentum, train.weight_decay) == (
        64000, 128, 0.1, 0.9, 5e-4)
    assert train.milestones == (0.5, 0.75) and train.schedule == "step" and train.device == "cuda"


def test_defaults_name_storage_and_checkpoints_after_the_file(tiny_config, tmp_path):
    path = tiny_config(name="abc")
    path.write_text(path.read_text().replace('name = "abc"\n', "", 1))
    config = ls.load_config(path)
    assert config.study.name == "abc"
    assert config.study.storage == f"sqlite:///{tmp_path.as_posix()}/abc.db"
    assert config.study.checkpoint_dir == f"{tmp_path.as_posix()}/abc.ckpt"
    assert config.search.repeats == 1 and config.train.momentum == 0.9


@pytest.mark.parametrize("text, expected", [
    ("train.epochs=2", ("train", "epochs", 2)),
    ("search.lambdas=[1e-3, 1e-4]", ("search", "lambdas", [1e-3, 1e-4])),
    ("model.name=resnet56", ("model", "name", "resnet56")),
    ("train.lr = 0.2", ("train", "lr", 0.2)),
    ("search.baseline=true", ("search", "baseline", True)),
    ("data.root=/data/cifar", ("data", "root", "/data/cifar")),
    ("data.options.resolution=96", ("data", "options", {"resolution": 96})),
])
def test_set_reads_toml_values_or_plain_strings(text, expected):
    assert _configfile.parse_override(text) == expected


def test_overrides_are_validated_like_the_file(tiny_config):
    config = ls.load_config(tiny_config(), ["train.epochs=3", "search.lambdas=[1e-3]", "data.options.num_samples=30"])
    assert config.train.epochs == 3 and config.search.lambdas == (1e-3,)
    assert config.data.options == {"num_samples": 30, "num_classes": 3, "image_size": 8, "noise": 60.0}
    with pytest.raises(ls.ConfigError, match=r"train.epochs must be an integer >= 1, got train.epochs=0"):
        ls.load_config(tiny_config(), ["train.epochs=0"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("search.lambdas=[]", "search.lambdas must be a non-empty list of numbers > 0"),
        ("search.lambdas=[0.0]", "every lambda must be a finite number > 0, got search.lambdas entry 0.0"),
        ("search.lambdas=[-1e-4]", "got search.lambdas entry -0.0001"),
        ("search.lambdas=[nan]", "got search.lambdas entry nan"),
        ("search.lambdas=[inf]", "got search.lambdas entry inf"),
        ("search.lambdas=[1e-4, 1e-4]", "must not repeat a value, got 0.0001 twice"),
        ("search.lambdas=1e-4", "search.lambdas must be a non-empty list"),
        ('search.lambdas=["a"]', "search.lambdas must be a non-empty list of numbers > 0"),
        ("train.epoch=3", "unknown key train.epoch; valid keys in [train]: iterations, epochs"),
        ("trian.epochs=3", "unknown section [trian]; valid sections: [study], [search], [data], [model], [train]"),
        ("data.folds=1", "data.folds must be an integer >= 2, got data.folds=1"),
        ("data.holdout=1.5", "data.holdout must be a validation fraction in (0, 1), got data.holdout=1.5"),
        ("train.lr=fast", "train.lr must be a finite number > 0, got train.lr='fast'"),
        ("train.iterations=100", "give exactly one budget, train.iterations or train.epochs"),
        ("model.shortcut=C", "model.shortcut must be 'A' or 'B', got model.shortcut='C'"),
        ("study.name=a/b", "study.name must be a name of letters, digits"),
        ("train.milestones=[0.75, 0.5]", "train.milestones must be increasing fractions"),
        ("search.baseline=1", "search.baseline must be true or false, got search.baseline=1"),
        (
            "train.cuda_graphs=on",
            "train.cuda_graphs must be true or false (not set: on for CUDA), got train.cuda_graphs='on'",
        ),
        ("epochs=3", "--set takes section.key=value"),
    ],
)
def test_bad_values_name_the_key_and_the_rule(tiny_config, override, message):
    with pytest.raises(ls.ConfigError) as info:
        ls.load_config(tiny_config(), [override])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unreadable_configs(tmp_path):
    with pytest.raises(ls.ConfigError, match="does not exist"):
        ls.load_config(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[train\nepochs = 2\n")
    with pytest.raises(ls.ConfigError, match="is not valid TOML"):
        ls.load_config(tmp_path / "bad.toml")
    with pytest.raises(ls.ConfigError, match="is a folder"):
        ls.load_config(tmp_path)


def test_config_diff_ignores_where_and_how_fast(tiny_config):
    a = ls.load_config(tiny_config())
    b = ls.load_config(tiny_config(), ["train.device=cuda:1", "study.storage=sqlite:///x.db", "data.root=/x",
                                       "train.cuda_graphs=false", "search.workers=3"])
    assert _configfile.config_diff(a, b) == []
    c = ls.load_config(tiny_config(), ["train.epochs=5", "search.lambdas=[1e-4]"])
    assert [k for k, _, _ in _configfile.config_diff(a, c)] == ["search.lambdas", "train.epochs"]
    # what changes the rounding of a training is part of what a study computes
    d = ls.load_config(tiny_config(), ["train.threads=2", "train.pack=2", "train.compile=false"])
    assert [k for k, _, _ in _configfile.config_diff(a, d)] == ["train.compile", "train.pack", "train.threads"]


# ------------------------------------------------------------- issue 14: the lambda floor


def test_lambda_floor_is_the_smallest_normal_float32():
    import numpy as np
    import torch

    from lambda_search.nn import simam as _simam
    assert _config.E_LAMBDA_MIN == float(np.finfo(np.float32).tiny) == float(torch.finfo(torch.float32).tiny)
    assert _simam.E_LAMBDA_MIN is _config.E_LAMBDA_MIN  # one number, defined once
    assert np.float32(_config.E_LAMBDA_MIN) * 4 > 0 and np.float32(_config.E_LAMBDA_MIN / 2) < _config.E_LAMBDA_MIN


@pytest.mark.parametrize("lam, shown", [("1e-50", "1e-50"), ("1e-39", "1e-39"), ("5e-324", "5e-324"),
                                        ("1.1754943508222874e-38", "1.1754943508222874e-38")])
def test_lambdas_below_the_float32_floor_are_refused(tiny_config, lam, shown):
    with pytest.raises(ls.ConfigError) as info:
        ls.load_config(tiny_config(), [f"search.lambdas=[1e-4, {lam}]"])
    assert ("every lambda must be >= 1.1754943508222875e-38 (the smallest normal float32: SimAM computes in "
            f"float32), got search.lambdas entry {shown}") in str(info.value)
    assert "\n" not in str(info.value)
    config = ls.load_config(tiny_config(), ["search.lambdas=[1.1754943508222875e-38, 1e-4]"])
    assert config.search.lambdas == (1.1754943508222875e-38, 1e-4)


# ------------------------------------------------------------- issue 27: the lambda ceiling


def test_lambda_ceiling_is_the_largest_float32_wherever_a_lambda_is_given(tiny_config, tmp_path, capsys):
    import numpy as np
    import torch

    from lambda_search.cli import main
    assert _config.E_LAMBDA_MAX == float(np.finfo(np.float32).max) == float(torch.finfo(torch.float32).max)
    for lam in ("1e300", "3.5e38", "3.4028234663852889e38"):  # the last: the next double above float32's max
        with pytest.raises(ls.ConfigError, match=r"every lambda must be <= 3\.4028234663852886e\+38 \(the largest "
                                                 r"float32: SimAM computes in float32\), got search\.lambdas entry"):
            ls.load_config(tiny_config(), [f"search.lambdas=[1e-4, {lam}]"])
        with pytest.raises(ValueError, match="must be <= 3.4028234663852886e"):
            ls.SimAM(float(lam))
    top = ls.load_config(tiny_config(), ["search.lambdas=[3.4028234663852886e38]"]).search.lambdas[0]
    x = torch.randn(2, 3, 4, 4)  # the largest lambda trains: SimAM stays finite, x * sigmoid(0.5)
    assert torch.equal(ls.SimAM(top)(x), x * torch.sigmoid(torch.tensor(0.5)))
    path = tiny_config(name="over")
    capsys.readouterr()
    assert main(["search", str(path), "--set", "search.lambdas=[1e300]"]) == 2  # refused before anything is stored
    err = capsys.readouterr().err
    assert "must be <= 3.4028234663852886e+38" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "over.db").exists()


# -------------------------------------------------- issue 14: data.folds or data.holdout


def _without_folds(path):
    path.write_text(path.read_text().replace("folds = 2\n", "", 1))
    return path


@pytest.mark.parametrize("edit, overrides, where", [
    ("folds = 2\nholdout = 0.2\n", [], "data.folds from the file, data.holdout from the file"),
    ("folds = 2\n", ["data.holdout=0.2"], "data.folds from the file, data.holdout from --set"),
    ("", ["data.holdout=0.2", "data.folds=2"], "data.folds from --set, data.holdout from --set"),
    ("holdout = 0.2\n", ["data.folds=2"], "data.folds from --set, data.holdout from the file"),
])
def test_folds_and_holdout_together_are_refused(tiny_config, edit, overrides, where):
    path = tiny_config()
    path.write_text(path.read_text().replace("folds = 2\n", edit, 1))
    with pytest.raises(ls.ConfigError) as info:
        ls.load_config(path, overrides)
    message = str(info.value)
    assert ("data.folds and data.holdout are exclusive: data.holdout=0.2 is one train/validation split, "
            "data.folds=2 is 2-fold cross-validation; give one") in message
    assert where in message and "\n" not in message


def test_holdout_alone_loads_and_a_stored_config_still_resolves(tiny_config):
    path = _without_folds(tiny_config())
    config = ls.load_config(path, ["data.holdout=0.25"])
    assert config.data.holdout == 0.25 and config.data.folds == 5  # the default, filled in
    assert _configfile.resolve_config(config) == config  # a stored config has both, and stays usable
    assert ls.load_config(path).data.holdout is None
    # the paper's own splits, as figure4_cifar100_resnet20.toml's comment says
    fig4 = ls.load_config(STUDIES / "figure4_cifar100_resnet20.toml", ["data.holdout=0.1", "search.repeats=5"])
    assert fig4.data.holdout == 0.1 and fig4.search.repeats == 5


# --------------------------------------- issue 14: relative paths, one rule for file and defaults


def test_relative_paths_in_the_file_are_beside_it_and_on_the_command_line_here(tiny_config, tmp_path, monkeypatch):
    sub = tmp_path / "sub"
    sub.mkdir()
    path = tiny_config(sub)
    path.write_text(path.read_text().replace('[study]\nname = "tiny"\n', '[study]\nname = "tiny"\nstorage = '
                                             '"sqlite:///x.db"\ncheckpoint_dir = "ck"\n', 1)
                    .replace('dataset = "synthetic"\n', 'dataset = "synthetic"\nroot = "d"\n', 1))
    monkeypatch.chdir(tmp_path)
    for given in (path, "sub/tiny.toml"):  # an absolute and a relative config path
        folder = Path(given).parent.as_posix()
        study, data = (c := ls.load_config(given)).study, c.data
        assert study.storage == f"sqlite:///{folder}/x.db"
        assert study.checkpoint_dir == f"{folder}/ck" and data.root == f"{folder}/d"
        assert Path(study.checkpoint_dir).resolve() == sub / "ck"
    here = ls.load_config(path, ["study.checkpoint_dir=ck2", "study.storage=sqlite:///y.db", "data.root=d2"])
    assert here.study.checkpoint_dir == "ck2" and here.data.root == "d2"
    assert here.study.storage == "sqlite:///y.db"


@pytest.mark.parametrize("storage, expected", [
    ("sqlite:///x.db?timeout=5", "sqlite:///{sub}/x.db?timeout=5"),
    ("sqlite:////abs/x.db", "sqlite:////abs/x.db"),
    ("journal:runs/x.log", "journal:{sub}/runs/x.log"),
    ("journal:/abs/x.log", "journal:/abs/x.log"),
    ("postgresql://u:p@host/db", "postgresql://u:p@host/db"),
])
def test_only_relative_file_paths_move(tiny_config, tmp_path, storage, expected):
    path = tiny_config()
    path.write_text(path.read_text().replace('name = "tiny"\n', f'name = "tiny"\nstorage = "{storage}"\n'
                                             'checkpoint_dir = "~/ck"\n', 1)
                    .replace('dataset = "synthetic"\n', 'dataset = "synthetic"\nroot = "/abs/data"\n', 1))
    config = ls.load_config(path)
    assert config.study.storage == expected.format(sub=tmp_path.as_posix())
    assert config.study.checkpoint_dir == "~/ck" and config.data.root == "/abs/data"


def test_shipped_configs_name_the_data_folder_beside_studies():
    repo = STUDIES.parent
    fig4 = ls.load_config(STUDIES / "figure4_cifar100_resnet20.toml")
    assert Path(fig4.data.root).resolve() == repo / "data"
    imagenet = ls.load_config(STUDIES / "imagenet_resnet18_half.toml")
    assert Path(imagenet.data.root).resolve() == repo / "data" / "imagenet" / "train"


# A config as a study made by 81affd2 (before the typed config) stored it: JSON tables, no search.strategy.
STORED_81AFFD2 = {
    "study": {"name": "tiny", "storage": "sqlite:///tiny.db", "checkpoint_dir": "/somewhere/tiny.ckpt"},
    "search": {"lambdas": [0.0001, 0.1], "repeats": 1, "baseline": False, "workers": 1},
    "data": {"dataset": "synthetic", "root": None, "folds": 2, "holdout": None, "test_fraction": 0.2, "test": False,
             "seed": 0, "download": False,
             "options": {"num_samples": 48, "num_classes": 3, "image_size": 8, "noise": 60.0}},
    "model": {"name": "resnet20", "shortcut": "B"},
    "train": {"iterations": None, "epochs": 2, "batch_size": 8, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0005,
              "nesterov": False, "schedule": "step", "milestones": [0.5, 0.75], "gamma": 0.1, "device": "cpu",
              "amp": None, "channels_last": None, "compile": None, "cuda_graphs": None, "pack": "auto", "threads": 1,
              "eval_every": 1, "checkpoint_every_epochs": 1, "checkpoint_every_seconds": 120.0},
}


def test_a_config_stored_before_the_typed_config_reads_the_same(tiny_config):
    """A study made by 81affd2 loads (the keys added since take their defaults) and compares
    equal to the same config given today, so it resumes; stored again, it is the same tables."""
    from lambda_search.store.status import completed_config

    stored = completed_config(STORED_81AFFD2)
    assert stored.search.strategy == "grid" and stored.search.lambdas == (1e-4, 0.1)
    assert _configfile.config_diff(stored, ls.load_config(tiny_config())) == []
    again = stored.to_dict()
    assert again == {**STORED_81AFFD2, "search": {**STORED_81AFFD2["search"], "strategy": "grid"}}
