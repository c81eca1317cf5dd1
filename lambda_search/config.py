"""Layer 1 of 9 (with ``points``). Study configs: TOML with sections [study], [search], [data], [model], [train].

This module checks the shape of a config (known sections and keys, value types) and fills
defaults; what a value means (a model name, a data set, a learning rate) is checked where it
is used, by the study layer, before anything is stored. ``--set section.key=value``
overrides are read as TOML values, or as plain strings when they are not one.
"""

from __future__ import annotations

import copy
import hashlib
import math
import numbers
import re
from pathlib import Path

import tomllib

__all__ = ["ConfigError", "load_config", "resolve_config", "parse_override", "config_diff",
           "IDENTITY_EXEMPT", "study_name_ok", "E_LAMBDA_MIN"]

# The smallest lambda: the smallest normal float32, float(torch.finfo(torch.float32).tiny)
# (written out: this module imports no torch). SimAM computes in float32; below it lambda is
# a subnormal or 0 there, and 4 * (v + lambda) loses it (0/0 for a constant channel).
# lambda_search.nn.simam takes it from here.
E_LAMBDA_MIN = 1.1754943508222875e-38


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key, the value and the rule."""


def _real(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")


FINAL_SUFFIX = ":final"  # the companion study of a final evaluation: NAME:final


def study_name_ok(name) -> bool:
    if isinstance(name, str) and name.endswith(FINAL_SUFFIX):
        name = name[: -len(FINAL_SUFFIX)]
    return isinstance(name, str) and bool(_NAME.match(name))


# key -> (default, check, what is allowed); check(value) -> bool. None as a default means
# "not set"; TOML has no null, so a key that is not set is simply absent from the file.
SCHEMA: dict[str, dict[str, tuple]] = {
    "study": {
        "name": (None, study_name_ok, "a name of letters, digits, '_', '.', '-' (at most 100)"),
        "storage": (None, lambda v: isinstance(v, str) and v != "", "a storage URL string"),
        "checkpoint_dir": (None, lambda v: isinstance(v, str) and v != "", "a folder path string"),
    },
    "search": {
        "lambdas": (None, lambda v: isinstance(v, list) and len(v) > 0 and all(_real(x) for x in v),
                    "a non-empty list of numbers > 0"),
        "repeats": (1, lambda v: _int(v) and v >= 1, "an integer >= 1"),
        "baseline": (False, lambda v: isinstance(v, bool), "true or false"),
        "workers": ("auto", lambda v: v == "auto" or (_int(v) and v >= 1),
                    "'auto' (CPU cores / train.threads, or one per GPU) or an integer >= 1"),
    },
    "data": {
        "dataset": (None, lambda v: isinstance(v, str), "a data set name string"),
        "root": (None, lambda v: isinstance(v, str) and v != "", "a folder path string"),
        "folds": (5, lambda v: _int(v) and v >= 2, "an integer >= 2"),
        "holdout": (None, lambda v: _real(v) and 0 < v < 1, "a validation fraction in (0, 1)"),
        "test_fraction": (None, lambda v: _real(v) and 0 <= v < 1,
                          "a fraction in [0, 1) held out for the final test (digits and synthetic; default 0.2)"),
        "test": (False, lambda v: isinstance(v, bool), "true or false (set by `lambda-search evaluate` only)"),
        "seed": (0, lambda v: _int(v) and 0 <= v < 2**31, "an integer in [0, 2**31)"),
        "download": (False, lambda v: isinstance(v, bool), "true or false"),
        "options": ({}, lambda v: isinstance(v, dict), "a table of data set options"),
    },
    "model": {
        "name": ("resnet20", lambda v: isinstance(v, str), "a model name string"),
        "shortcut": ("B", lambda v: v in ("A", "B"), "'A' or 'B'"),
    },
    "train": {
        "iterations": (None, lambda v: _int(v) and v >= 1, "an integer >= 1"),
        "epochs": (None, lambda v: _int(v) and v >= 1, "an integer >= 1"),
        "batch_size": (128, lambda v: _int(v) and v >= 1, "an integer >= 1"),
        "lr": (0.1, lambda v: _real(v) and math.isfinite(v) and v > 0, "a finite number > 0"),
        "momentum": (0.9, lambda v: _real(v) and math.isfinite(v) and v >= 0, "a finite number >= 0"),
        "weight_decay": (5e-4, lambda v: _real(v) and math.isfinite(v) and v >= 0, "a finite number >= 0"),
        "nesterov": (False, lambda v: isinstance(v, bool), "true or false"),
        "schedule": ("step", lambda v: v in ("step", "cosine"), "'step' or 'cosine'"),
        "milestones": ([0.5, 0.75], lambda v: isinstance(v, list) and all(_real(x) and 0 < x < 1 for x in v)
                       and v == sorted(set(v)), "increasing fractions of the budget in (0, 1)"),
        "gamma": (0.1, lambda v: _real(v) and math.isfinite(v) and v > 0, "a finite number > 0"),
        "device": ("cpu", lambda v: isinstance(v, str) and v != "", "a torch device such as 'cpu' or 'cuda'"),
        "amp": (None, lambda v: isinstance(v, bool), "true or false (not set: on for CUDA)"),
        "channels_last": (None, lambda v: isinstance(v, bool), "true or false (not set: on)"),
        "compile": (None, lambda v: isinstance(v, bool), "true or false (not set: on for CUDA)"),
        "cuda_graphs": (None, lambda v: isinstance(v, bool), "true or false (not set: on for CUDA)"),
        "pack": ("auto", lambda v: v == "auto" or (_int(v) and v >= 1),
                 "'auto' or an integer >= 1 (folds trained at once as one packed network)"),
        "threads": (1, lambda v: _int(v) and v >= 1, "an integer >= 1 (CPU threads per training)"),
        "eval_every": (1, lambda v: _int(v) and v >= 1, "an integer >= 1"),
        "checkpoint_every_epochs": (1, lambda v: _int(v) and v >= 1, "an integer >= 1"),
        "checkpoint_every_seconds": (120.0, lambda v: _real(v) and math.isfinite(v) and v >= 0,
                                     "a finite number of seconds >= 0"),
    },
}

# Keys that say where and how fast a study runs, not what it computes: they may differ when
# a study is resumed or joined by a worker on another machine. What changes the rounding of
# a training (train.threads, train.pack, train.compile, train.amp, train.channels_last) is
# not among them: a study keeps it (see lambda_search.train.numerics).
IDENTITY_EXEMPT = frozenset({
    "study.storage", "study.checkpoint_dir", "search.workers", "data.root", "data.download",
    "train.device", "train.cuda_graphs", "train.checkpoint_every_epochs", "train.checkpoint_every_seconds",
})


def _fmt(v) -> str:
    return repr(v) if not isinstance(v, bool) else str(v).lower()


def parse_override(text: str) -> tuple[str, str, object]:
    """``section.key=value`` -> (section, key, value); value as TOML, else a plain string."""
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"--set takes section.key=value, got {text!r}")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set takes section.key=value (e.g. train.epochs=2), got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    if len(parts) > 2:  # a nested table such as data.options.num_samples
        for key in reversed(parts[2:]):
            value = {key: value}
    return parts[0], parts[1], value


def _check(config: dict, origin: str) -> dict:
    if not isinstance(config, dict):
        raise ConfigError(f"{origin}: a config is a TOML table")
    unknown = sorted(set(config) - set(SCHEMA))
    if unknown:
        raise ConfigError(f"{origin}: unknown section [{unknown[0]}]; valid sections: "
                          + ", ".join(f"[{s}]" for s in SCHEMA))
    out = {}
    for section, keys in SCHEMA.items():
        given = config.get(section, {})
        if not isinstance(given, dict):
            raise ConfigError(f"{origin}: {section} must be a table [{section}], got {_fmt(given)}")
        bad = sorted(set(given) - set(keys))
        if bad:
            raise ConfigError(f"{origin}: unknown key {section}.{bad[0]}; valid keys in [{section}]: "
                              + ", ".join(keys))
        out[section] = {}
        for key, (default, ok, allowed) in keys.items():
            if given.get(key) is not None:  # None: not set (a stored config says so)
                value = given[key]
                if not ok(value):
                    raise ConfigError(f"{origin}: {section}.{key} must be {allowed}, got {section}.{key}={_fmt(value)}")
                out[section][key] = copy.deepcopy(value)
            else:
                out[section][key] = copy.deepcopy(default)
    return out


def _semantic(config: dict, origin: str) -> dict:
    lambdas = config["search"]["lambdas"]
    if lambdas is None:
        raise ConfigError(f"{origin}: search.lambdas is required (a non-empty list of numbers > 0)")
    for v in lambdas:
        if not math.isfinite(v) or v <= 0:
            raise ConfigError(f"{origin}: every lambda must be a finite number > 0, got search.lambdas "
                              f"entry {_fmt(v)}")
        if v < E_LAMBDA_MIN:
            raise ConfigError(f"{origin}: every lambda must be >= {E_LAMBDA_MIN!r} (the smallest normal float32: "
                              f"SimAM computes in float32), got search.lambdas entry {_fmt(v)}")
    floats = [float(v) for v in lambdas]
    if len(set(floats)) != len(floats):
        dup = next(v for v in floats if floats.count(v) > 1)
        raise ConfigError(f"{origin}: search.lambdas must not repeat a value, got {dup!r} twice")
    config["search"]["lambdas"] = floats
    if config["data"]["dataset"] is None:
        raise ConfigError(f"{origin}: data.dataset is required (e.g. 'cifar100', 'digits')")
    train = config["train"]
    if (train["iterations"] is None) == (train["epochs"] is None):
        raise ConfigError(f"{origin}: give exactly one budget, train.iterations or train.epochs; got "
                          f"iterations={_fmt(train['iterations'])}, epochs={_fmt(train['epochs'])}")
    train["milestones"] = [float(m) for m in train["milestones"]]
    for key in ("lr", "momentum", "weight_decay", "gamma", "checkpoint_every_seconds"):
        train[key] = float(train[key])
    if config["data"]["holdout"] is not None:
        config["data"]["holdout"] = float(config["data"]["holdout"])
    _test_fraction(config["data"], origin)
    name = config["study"]["name"]
    if name is not None and name.endswith(FINAL_SUFFIX) != config["data"]["test"]:
        raise ConfigError(f"{origin}: study.name ending in {FINAL_SUFFIX!r} is a final evaluation's (made by "
                          f"`lambda-search evaluate`, with data.test), got study.name={name!r}")
    return config


# data sets without a test split of their own hold out this fraction for the final test
DEFAULT_TEST_FRACTION = 0.2
HELD_OUT_TEST = ("digits", "synthetic")
OWN_TEST = ("cifar10", "cifar100", "imagefolder")  # (an unknown name is refused where the data set is loaded)
# where each data set's test split comes from: its own files, or held out (data.test_fraction)
TEST_SPLITS = {"cifar10": "the official test batch (test_batch)", "cifar100": "the official test batch (test)",
               "imagefolder": "the val/ folder beside train/ (else test/)", "digits": None, "synthetic": None}


def _test_fraction(data: dict, origin: str) -> None:
    """data.test_fraction: the default (0.2) for a data set without a test split of its own,
    refused for one that has it (CIFAR's test batch, an image folder's val/)."""
    if data["dataset"] in HELD_OUT_TEST:
        fraction = DEFAULT_TEST_FRACTION if data["test_fraction"] is None else data["test_fraction"]
        data["test_fraction"] = float(fraction)
    elif data["test_fraction"] is not None and data["dataset"] in OWN_TEST:
        raise ConfigError(f"{origin}: data.test_fraction applies to data sets without a test split of their own "
                          f"(digits, synthetic); {data['dataset']!r} has one, got data.test_fraction="
                          f"{_fmt(data['test_fraction'])}")


def _merge(base: dict, section: str, key: str, value) -> None:
    target = base.setdefault(section, {})
    if not isinstance(target, dict):
        raise ConfigError(f"--set {section}.{key}: {section} is not a table")
    if isinstance(value, dict) and isinstance(target.get(key), dict):
        for k, v in value.items():
            _merge(target, key, k, v)
    else:
        target[key] = value


def resolve_config(raw: dict, overrides=(), origin: str = "config", name: str | None = None) -> dict:
    """Apply ``overrides`` (``section.key=value`` strings) to ``raw``, check it and fill in
    defaults; ``name`` is the study name when the config does not give one."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        section, key, value = parse_override(text)
        _merge(raw, section, key, value)
    config = _semantic(_check(raw, origin), origin)
    if config["study"]["name"] is None:
        if name is None or not study_name_ok(name):
            raise ConfigError(f"{origin}: study.name is required, got none")
        config["study"]["name"] = name
    return config


def load_config(path, overrides=()) -> dict:
    """Read, override, check and complete a study config file. A relative path written in
    the file (study.storage as ``sqlite:///PATH`` or ``journal:PATH``, study.checkpoint_dir,
    data.root) is relative to the file's folder; one given in ``overrides`` (``--set``,
    ``--storage``) is relative to the current folder. Defaults: the study is named after the
    file; it is stored in SQLite beside the file (``<name>.db``) with checkpoints in
    ``<name>.ckpt`` (``<name>-<storage tag>.ckpt`` for another storage, and its plot beside it).
    data.folds and data.holdout are exclusive: giving both is refused."""
    p = Path(path)
    raw = _read_toml(p)
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    if "test" in data or any(parse_override(o)[:2] == ("data", "test") for o in overrides):
        raise ConfigError(f"{p}: data.test is set by `lambda-search evaluate` only (it trains on every training "
                          "image and tests on the test split); a search cross-validates")
    stem = p.stem if study_name_ok(p.stem) else None
    config = resolve_config(_beside(raw, p.parent), overrides, origin=str(p), name=stem)
    _one_split(raw, overrides, str(p), config["data"])
    study = config["study"]
    default_storage = f"sqlite:///{(p.parent / (study['name'] + '.db')).as_posix()}"
    if study["storage"] is None:
        study["storage"] = default_storage
    if study["checkpoint_dir"] is None:  # one folder per storage: two studies of one name never share it
        tag = "" if study["storage"] == default_storage else f"-{storage_tag(study['storage'])}"
        study["checkpoint_dir"] = (p.parent / f"{study['name']}{tag}.ckpt").as_posix()
    return config


def _read_toml(p: Path) -> dict:
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(p)!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config {str(p)!r} is a folder; give a .toml file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(p)!r} cannot be read ({exc.__class__.__name__})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}") from None


def _rebase(path: str, folder: Path) -> str:
    """``path`` relative to ``folder`` when it is relative; absolute and ``~`` paths as they are."""
    if path.startswith("~") or Path(path).is_absolute():
        return path
    return (folder / path).as_posix()


def _rebase_storage(url: str, folder: Path) -> str:
    """A ``sqlite:///PATH`` or ``journal:PATH`` URL with a relative PATH, relative to ``folder``;
    any other URL (``sqlite:////abs``, ``sqlite:///:memory:``, ``postgresql://...``) as it is."""
    if url.startswith("sqlite:///"):
        rest = url[len("sqlite:///"):]
        if rest and not rest.startswith(("?", ":memory:")):
            return "sqlite:///" + _rebase(rest, folder)
    elif url.startswith("journal:"):
        rest = url[len("journal:"):]
        lead = "//" if rest.startswith("//") else ""  # journal://PATH reads as journal:PATH
        if rest[len(lead):]:
            return "journal:" + lead + _rebase(rest[len(lead):], folder)
    return url


def _beside(raw: dict, folder: Path) -> dict:
    """``raw`` (a config file's table) with its relative paths made relative to ``folder``."""
    raw = copy.deepcopy(raw)
    for section, key in (("study", "storage"), ("study", "checkpoint_dir"), ("data", "root")):
        table = raw.get(section)
        if isinstance(table, dict) and isinstance(table.get(key), str) and table[key]:
            rebase = _rebase_storage if key == "storage" else _rebase
            table[key] = rebase(table[key], folder)
    return raw


def _one_split(raw: dict, overrides, origin: str, data: dict) -> None:
    """Refuse data.folds and data.holdout given together (in the file, by --set, or one each)."""
    data_table = raw.get("data")
    given = {key: "the file" for key in ("folds", "holdout")
             if isinstance(data_table, dict) and key in data_table}
    for text in overrides:
        section, key, _ = parse_override(text)
        if section == "data" and key in ("folds", "holdout"):
            given[key] = "--set"
    if len(given) == 2:
        raise ConfigError(f"{origin}: data.folds and data.holdout are exclusive: data.holdout={_fmt(data['holdout'])} "
                          f"is one train/validation split, data.folds={_fmt(data['folds'])} is {data['folds']}-fold "
                          f"cross-validation; give one (data.folds from {given['folds']}, data.holdout from "
                          f"{given['holdout']})")


def storage_tag(url: str) -> str:
    """Eight hex digits that tell storages apart in a folder name (the password left out)."""
    return hashlib.sha256(re.sub(r"(://[^:/@]*):[^@/]*@", r"\1@", url).encode()).hexdigest()[:8]


def _flatten(config: dict, prefix="") -> dict:
    out = {}
    for k, v in config.items():
        if isinstance(v, dict) and (prefix or k in SCHEMA) and not (prefix and k == "options"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(stored: dict, given: dict, exempt=IDENTITY_EXEMPT) -> list[tuple[str, object, object]]:
    """(key, stored value, given value) for every key that differs, except ``exempt`` ones."""
    a, b = _flatten(stored), _flatten(given)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k not in exempt and a.get(k) != b.get(k)]
