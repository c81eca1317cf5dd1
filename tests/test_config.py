"""Study configs: the shipped ones load, --set overrides, errors name the key and the rule."""

from pathlib import Path

import pytest

import lambda_search as ls

STUDIES = Path(__file__).resolve().parents[1] / "studies"


def test_shipped_configs_load_with_the_papers_protocol():
    fig4 = ls.load_config(STUDIES / "figure4_cifar100_resnet20.toml")
    assert fig4["study"]["name"] == "figure4_cifar100_resnet20"
    assert fig4["search"]["lambdas"] == [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    assert fig4["data"]["dataset"] == "cifar100" and fig4["data"]["folds"] == 5
    assert fig4["model"] == {"name": "resnet20", "shortcut": "B"}
    train = fig4["train"]
    assert (train["iterations"], train["batch_size"], train["lr"], train["momentum"], train["weight_decay"]) == (
        64000, 128, 0.1, 0.9, 5e-4)
    assert train["milestones"] == [0.5, 0.75] and train["schedule"] == "step"

    imagenet = ls.load_config(STUDIES / "imagenet_resnet18_half.toml")
    t = imagenet["train"]
    assert imagenet["model"]["name"] == "resnet18" and imagenet["search"]["repeats"] == 3
    assert t["epochs"] == 50 and [round(m * 50) for m in t["milestones"]] == [15, 30, 45]
    assert imagenet["data"]["options"]["resolution"] == 112

    quick = ls.load_config(STUDIES / "quickstart.toml")
    assert quick["data"]["dataset"] == "digits" and 4 <= len(quick["search"]["lambdas"]) <= 6
    assert quick["study"]["storage"].endswith("studies/quickstart.db")


def test_defaults_name_storage_and_checkpoints_after_the_file(tiny_config, tmp_path):
    path = tiny_config(name="abc")
    path.write_text(path.read_text().replace('name = "abc"\n', "", 1))
    config = ls.load_config(path)
    assert config["study"]["name"] == "abc"
    assert config["study"]["storage"] == f"sqlite:///{tmp_path.as_posix()}/abc.db"
    assert config["study"]["checkpoint_dir"] == f"{tmp_path.as_posix()}/abc.ckpt"
    assert config["search"]["repeats"] == 1 and config["train"]["momentum"] == 0.9


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
    assert ls.parse_override(text) == expected


def test_overrides_are_validated_like_the_file(tiny_config):
    config = ls.load_config(tiny_config(), ["train.epochs=3", "search.lambdas=[1e-3]", "data.options.num_samples=30"])
    assert config["train"]["epochs"] == 3 and config["search"]["lambdas"] == [1e-3]
    assert config["data"]["options"] == {"num_samples": 30, "num_classes": 3, "image_size": 8, "noise": 60.0}
    with pytest.raises(ls.ConfigError, match=r"train.epochs must be an integer >= 1, got train.epochs=0"):
        ls.load_config(tiny_config(), ["train.epochs=0"])


@pytest.mark.parametrize("override, message", [
    ("search.lambdas=[]", "search.lambdas must be a non-empty list of numbers > 0"),
    ("search.lambdas=[0.0]", "every lambda must be a finite number > 0, got search.lambdas entry 0.0"),
    ("search.lambdas=[-1e-4]", "got search.lambdas entry -0.0001"),
    ("search.lambdas=[nan]", "got search.lambdas entry nan"),
    ("search.lambdas=[inf]", "got search.lambdas entry inf"),
    ("search.lambdas=[1e-4, 1e-4]", "must not repeat a value, got 0.0001 twice"),
    ("search.lambdas=1e-4", "search.lambdas must be a non-empty list"),
    ("search.lambdas=[\"a\"]", "search.lambdas must be a non-empty list of numbers > 0"),
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
    ("train.cuda_graphs=on", "train.cuda_graphs must be true or false (not set: on for CUDA), got train.cuda_graphs='on'"),
    ("epochs=3", "--set takes section.key=value"),
])
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
    assert ls.config_diff(a, b) == []
    c = ls.load_config(tiny_config(), ["train.epochs=5", "search.lambdas=[1e-4]"])
    assert [k for k, _, _ in ls.config_diff(a, c)] == ["search.lambdas", "train.epochs"]
    # what changes the rounding of a training is part of what a study computes
    d = ls.load_config(tiny_config(), ["train.threads=2", "train.pack=2", "train.compile=false"])
    assert [k for k, _, _ in ls.config_diff(a, d)] == ["train.compile", "train.pack", "train.threads"]
