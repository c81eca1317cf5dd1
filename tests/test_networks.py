"""A network is one registry entry: a user's own, named by an import path, is searched like
the paper's networks (two workers, exactly once), and its rules are its spec's."""

import os
from pathlib import Path

import pytest
import torch

import lambda_search as ls
from lambda_search.nn.registry import NETWORKS, network_spec
from lambda_search.train import plan as _plan

TESTS = str(Path(__file__).resolve().parent)


def test_the_registry_is_a_dict_of_specs_and_build_model_reads_it():
    assert list(NETWORKS) == list(ls.MODEL_NAMES) and NETWORKS["resnet18"].min_input == 33
    packed = {name for name, spec in NETWORKS.items() if spec.packs}  # the BasicBlock ResNets
    assert packed == {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet18"}
    assert all(NETWORKS[name].label.startswith("ResNet-") for name in packed)
    counts = {name: sum(p.numel() for p in ls.build_model(name, 100).parameters()) for name in ("resnet20",)}
    assert counts == {"resnet20": 278_324}  # type B, 100 classes: as before the registry
    toy = ls.build_model("toy_networks:build", 5, e_lambda=1e-3)
    assert isinstance(toy[3], ls.SimAM) and float(toy[3].e_lambda) == 1e-3
    assert toy(torch.randn(2, 3, 8, 8)).shape == (2, 5)
    assert isinstance(ls.build_model("toy_networks:build", 5, attention="none")[3], torch.nn.Identity)
    spec = network_spec("toy_networks:BIG_ONLY")
    assert spec.name == "toy_networks:BIG_ONLY" and spec.min_input == 16 and not spec.packs


@pytest.mark.parametrize("name, message", [
    ("toy_networks:nope", "cannot import 'nope' from module 'toy_networks'"),
    ("no_such_module_xyz:build", "cannot import 'build' from module 'no_such_module_xyz'"),
    ("toy_networks:TESTS_NOT_THERE", "cannot import"),
    ("resnet19", "unknown model name='resnet19'"),
])
def test_a_network_that_cannot_be_found_is_named(name, message):
    with pytest.raises(ValueError, match=message):
        network_spec(name)


def _config(tiny_config, *overrides):
    return ls.load_config(tiny_config(), ["model.name='toy_networks:build'", *overrides])


def test_a_networks_own_rules_are_checked_before_anything_is_stored(tiny_config):
    config = _config(tiny_config)
    assert _plan.make_plan(config).train.pack == 1  # a network that does not pack trains one fold at a time
    for overrides, message in (
        (["model.name='toy_networks:BIG_ONLY'"], "model.name='toy_networks:BIG_ONLY' needs images of at least 16 px, "
                                                 "the data set has 8 px"),
        (["train.pack=2"], "does not pack (its NetworkSpec says so): train.pack must be 'auto' or 1, got train.pack=2"),
        (["model.shortcut='A'"], "model: shortcut='A' is not an option of toy_networks:build, which has none"),
        (["model.name='toy_networks:missing'"], "cannot import 'missing' from module 'toy_networks'"),
    ):
        with pytest.raises(ls.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            _plan.make_plan(_config(tiny_config, *overrides))
        assert not Path(config.study.storage.removeprefix("sqlite:///")).exists()


@pytest.mark.slow
def test_a_users_network_is_searched_end_to_end_by_two_workers(tiny_config, monkeypatch):
    """Named by its import path and stored with the study: two worker processes import the
    same network and run every point exactly once."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")])))
    config = _config(tiny_config, "search.baseline=true")
    how, status = ls.run_search(config, workers=2, log=lambda s: None)
    assert how == "created" and status.finished and status.complete == status.total == 3
    store = ls.open_store(config.study.storage)
    assert ls.study_status(store, "tiny").config.model.name == "toy_networks:build"
    trials = [t for name in ("tiny", "tiny:baseline")
              for t in store.storage.get_all_trials(store.storage.get_study_id_from_name(name))]
    assert len(trials) == 3 and all(t.state.name == "COMPLETE" for t in trials)  # each point once
    assert all(0 <= p.mean <= 1 for p in status.points)
