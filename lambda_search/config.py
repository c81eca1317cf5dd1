"""Layer 1 of 9 (with ``configfile`` and ``points``): a study's config, typed and frozen.
One dataclass per TOML section ([study], [search], [data], [model], [train]); each key is a
field whose default and rule are stated once, in the field, and checked whenever a section is
built, from a file (``configfile``) or in code (``TrainConfig(epochs=2)``). Every module
below receives typed fields. What a value means beyond its type (a model name, a data set's
folder, a device that exists) is checked where it is used, before anything is stored. No
torch here.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field, fields

__all__ = ["ConfigError", "Config", "StudySection", "SearchSection", "DataSection", "ModelSection", "TrainConfig",
           "SECTIONS", "study_name_ok", "final_parts", "check_lambda", "E_LAMBDA_MIN", "E_LAMBDA_MAX",
           "FINAL_SUFFIX", "ROOT_IS_DATA"]

# The smallest lambda: the smallest normal float32, float(torch.finfo(torch.float32).tiny)
# (written out: this module imports no torch). SimAM computes in float32; below it lambda is
# a subnormal or 0 there, and 4 * (v + lambda) loses it (0/0 for a constant channel).
E_LAMBDA_MIN = 1.1754943508222875e-38
# The largest: the largest float32, float(torch.finfo(torch.float32).max); above it lambda is
# inf in float32 (SimAM's result there stays finite: x * sigmoid(0.5), as any huge lambda gives).
E_LAMBDA_MAX = 3.4028234663852886e38


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key, the value and the rule."""


def _real(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _fmt(v) -> str:
    return repr(v) if not isinstance(v, bool) else str(v).lower()


def check_lambda(value, label: str = "e_lambda", got: str | None = None) -> float:
    """``value`` as a float, or a ConfigError (a ValueError) naming ``label`` (and the value as
    ``got`` says, ``label=value`` by default): the one rule for a lambda, wherever one is given
    (a config, ``evaluate --lambda``, ``SimAM``)."""
    got = got or f"{label}={_fmt(value)}"
    if _real(value) and math.isfinite(value) and value > 0:
        if value < E_LAMBDA_MIN:
            raise ConfigError(f"{label} must be >= {E_LAMBDA_MIN!r} (the smallest normal float32: SimAM computes in "
                              f"float32), got {got}")
        if value > E_LAMBDA_MAX:
            raise ConfigError(f"{label} must be <= {E_LAMBDA_MAX!r} (the largest float32: SimAM computes in "
                              f"float32), got {got}")
        return float(value)
    raise ConfigError(f"{label} must be a finite number > 0, got {got}")


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
FINAL_SUFFIX = ":final"  # the companion study of a final evaluation: NAME:final
# a final evaluation of another network or data set: NAME:final:<network>[@<data set>-<hash>]
_COLUMN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}(@[A-Za-z0-9_.\-]{1,60})?$")


def final_parts(name) -> tuple[str, str | None] | None:
    """(search, column) of a final evaluation's study name (``NAME:final`` -> (NAME, None),
    ``NAME:final:COLUMN`` -> (NAME, COLUMN)); None for any other name. A user's study name
    holds no ':', so these names are reserved to ``lambda-search evaluate``."""
    if not isinstance(name, str) or FINAL_SUFFIX not in name:
        return None
    search, _, rest = name.partition(FINAL_SUFFIX)
    if rest and not (rest.startswith(":") and _COLUMN.match(rest[1:])):
        return None
    return (search, rest[1:] or None) if _NAME.match(search) else None


def study_name_ok(name) -> bool:
    """A user's study name, or a final evaluation's (``final_parts``)."""
    return isinstance(name, str) and (bool(_NAME.match(name)) or final_parts(name) is not None)


# ---------------------------------------------------------------- the sections: each key's default and rule


def key(default, check, allowed: str, convert=None, toml: bool = True, factory=None):
    """A config key: its default, its rule (``check(value) -> bool``, said as ``allowed``) and the
    form it is kept in (``convert``). None as a value means "not set" (TOML has no null: a key
    that is not set is absent from the file) and is never checked. ``toml=False``: a field
    of the dataclass that no config file sets."""
    meta = {"check": check, "allowed": allowed, "convert": convert, "toml": toml}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _positive_int(v):
    return _int(v) and v >= 1


def _finite(low, strict):
    return lambda v: _real(v) and math.isfinite(v) and (v > low if strict else v >= low)


def _bool(v):
    return isinstance(v, bool)


def _text(v):
    return isinstance(v, str) and v != ""


def _fractions(v):
    return (isinstance(v, (list, tuple)) and all(_real(x) and 0 < x < 1 for x in v)
            and list(v) == sorted(set(v)))


_INT, _BOOL = "an integer >= 1", "true or false"
# a torch device as torch.device reads one (written out: no torch here); which of them train here is
# checked where a plan is made (lambda_search.train.plan.check_device: the CPU and the GPUs there are)
# (the CPU is one device: cpu, or torch's cpu:0; cpu:1 names none)
_DEVICE = re.compile(r"cpu(:0)?|(cuda|mps|xpu|meta|hpu|mtia|xla|lazy|hip|ipu|ve|fpga|maia|privateuseone)(:\d+)?")


class _Section:
    """A config section: every field checked against its rule and kept in its form at
    construction, so a section built in code (``TrainConfig(epochs=0)``) is refused as a file is."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and f.metadata.get("check") is not None:
                object.__setattr__(self, f.name, _checked(f, value, f.name))
        self._rules()

    def _rules(self) -> None:
        """Rules across the keys of a section."""

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.metadata.get("toml", True)]


def _checked(f, value, label: str):
    if not f.metadata["check"](value):
        raise ConfigError(f"{label} must be {f.metadata['allowed']}, got {label}={_fmt(value)}")
    convert = f.metadata["convert"]
    return convert(value) if convert is not None else value


@dataclass(frozen=True)
class StudySection(_Section):
    name: str | None = key(None, study_name_ok, "a name of letters, digits, '_', '.', '-' (at most 100)")
    storage: str | None = key(None, _text, "a storage URL string")
    checkpoint_dir: str | None = key(None, _text, "a folder path string")


def _lambdas(v):
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(_real(x) for x in v)


def _lambda_tuple(v) -> tuple[float, ...]:
    return tuple(check_lambda(x, "every lambda", f"search.lambdas entry {_fmt(x)}") for x in v)


@dataclass(frozen=True)
class SearchSection(_Section):
    lambdas: tuple[float, ...] | None = key(None, _lambdas, "a non-empty list of numbers > 0", _lambda_tuple)
    repeats: int = key(1, _positive_int, _INT)
    baseline: bool = key(False, _bool, _BOOL)
    workers: int | str = key("auto", lambda v: v == "auto" or _positive_int(v),
                             "'auto' (CPU cores / train.threads, or one per GPU) or an integer >= 1")
    # what the study trains (lambda_search.strategy): the paper's grid, or one of your own
    strategy: str = key("grid", lambda v: v == "grid" or (isinstance(v, str) and v.count(":") == 1 and all(
        v.split(":"))), "'grid' or a strategy of your own as 'module:attribute'")

    def _rules(self) -> None:
        if self.lambdas is not None and len(set(self.lambdas)) != len(self.lambdas):
            dup = next(v for v in self.lambdas if self.lambdas.count(v) > 1)
            raise ConfigError(f"search.lambdas must not repeat a value, got {dup!r} twice")


# data sets without a test split of their own hold out this fraction for the final test
DEFAULT_TEST_FRACTION = 0.2
HELD_OUT_TEST = ("digits", "synthetic")
OWN_TEST = ("cifar10", "cifar100", "imagefolder")  # (an unknown name is refused where the data set is loaded)
ROOT_IS_DATA = ("imagefolder",)  # data sets whose data.root says which images, not only where they lie
# where each data set's test split comes from: its own files, or held out (data.test_fraction)
TEST_SPLITS = {"cifar10": "the official test batch (test_batch)", "cifar100": "the official test batch (test)",
               "imagefolder": "the val/ folder beside train/ (else test/)", "digits": None, "synthetic": None}


class FrozenTable(dict):
    """A read-only table (data.options): a dict that refuses changes, its tables frozen too and
    its lists kept as tuples; copied, pickled and hashed as a value."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("a config's tables are read-only: make a new config (Config.replace)")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _refuse

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.items(), key=lambda kv: kv[0])))

    def __reduce__(self):
        return FrozenTable, (dict(self),)

    def __copy__(self) -> FrozenTable:
        return self

    def __deepcopy__(self, memo) -> FrozenTable:
        return self


def _frozen(v):
    if isinstance(v, dict):
        return FrozenTable({k: _frozen(x) for k, x in v.items()})
    if isinstance(v, (list, tuple)):
        return tuple(_frozen(x) for x in v)
    return v


@dataclass(frozen=True)
class DataSection(_Section):
    dataset: str | None = key(None, lambda v: isinstance(v, str), "a data set name string")
    root: str | None = key(None, _text, "a folder path string")
    folds: int = key(5, lambda v: _int(v) and v >= 2, "an integer >= 2")
    holdout: float | None = key(None, lambda v: _real(v) and 0 < v < 1, "a validation fraction in (0, 1)", float)
    test_fraction: float | None = key(None, lambda v: _real(v) and 0 <= v < 1,
                                      "a fraction in [0, 1) held out for the final test (digits and synthetic; "
                                      "default 0.2)", float)
    test: bool = key(False, _bool, "true or false (set by `lambda-search evaluate` only)")
    seed: int = key(0, lambda v: _int(v) and 0 <= v < 2**31, "an integer in [0, 2**31)")
    download: bool = key(False, _bool, _BOOL)
    options: FrozenTable = key(None, lambda v: isinstance(v, dict), "a table of data set options", _frozen,
                               factory=FrozenTable)

    def _rules(self) -> None:
        """data.test_fraction: the default (0.2) for a data set without a test split of its own,
        refused for one that has it (CIFAR's test batch, an image folder's val/)."""
        if self.dataset in HELD_OUT_TEST and self.test_fraction is None:
            object.__setattr__(self, "test_fraction", DEFAULT_TEST_FRACTION)
        elif self.test_fraction is not None and self.dataset in OWN_TEST:
            raise ConfigError(f"data.test_fraction applies to data sets without a test split of their own (digits, "
                              f"synthetic); {self.dataset!r} has one, got "
                              f"data.test_fraction={_fmt(self.test_fraction)}")


@dataclass(frozen=True)
class ModelSection(_Section):
    name: str = key("resnet20", lambda v: isinstance(v, str), "a model name string")  # (nn.registry.DEFAULT_NETWORK)
    shortcut: str = key("B", lambda v: v in ("A", "B"), "'A' or 'B'")


@dataclass(frozen=True)
class TrainConfig(_Section):
    """The [train] section: the optimisation protocol and how a training runs. Defaults are the
    paper's CIFAR protocol: SGD, momentum 0.9, weight decay 5e-4, lr 0.1, batch 128, lr divided
    by 10 at 50 % and 75 % of the budget (32k and 48k of 64k iterations). Give the budget as
    ``iterations`` or ``epochs``."""

    iterations: int | None = key(None, _positive_int, _INT)
    epochs: int | None = key(None, _positive_int, _INT)
    batch_size: int = key(128, _positive_int, _INT)
    lr: float = key(0.1, _finite(0, True), "a finite number > 0", float)
    momentum: float = key(0.9, _finite(0, False), "a finite number >= 0", float)
    weight_decay: float = key(5e-4, _finite(0, False), "a finite number >= 0", float)
    nesterov: bool = key(False, _bool, _BOOL)
    schedule: str = key("step", lambda v: v in ("step", "cosine"), "'step' or 'cosine'")
    milestones: tuple[float, ...] = key((0.5, 0.75), _fractions, "increasing fractions of the budget in (0, 1)",
                                        lambda v: tuple(float(x) for x in v))  # of the step schedule
    gamma: float = key(0.1, _finite(0, True), "a finite number > 0", float)
    device: str = key("cpu", lambda v: isinstance(v, str) and bool(_DEVICE.fullmatch(v)),
                      "a torch device such as 'cpu', 'cuda' or 'cuda:1' (the CPU is one: 'cpu' or 'cpu:0')")
    amp: bool | None = key(None, _bool, "true or false (not set: on for CUDA)")  # bfloat16 autocast
    channels_last: bool | None = key(None, _bool, "true or false (not set: on)")
    compile: bool | None = key(None, _bool, "true or false (not set: on for CUDA)")  # torch.compile
    # a packed step replayed as one CUDA graph
    cuda_graphs: bool | None = key(None, _bool, "true or false (not set: on for CUDA)")
    # epochs between validation passes; the final model is always evaluated
    eval_every: int = key(1, _positive_int, _INT)
    eval_batch_size: int = key(1024, _positive_int, _INT, toml=False)
    checkpoint_every_epochs: int = key(1, _positive_int, _INT)
    checkpoint_every_seconds: float | None = key(120.0, _finite(0, False), "a finite number of seconds >= 0", float)
    # larger data sets stay on the host, batches are copied
    max_device_bytes: int = key(8 << 30, _positive_int, _INT, toml=False)
    # folds of a point trained at once (lambda_search.train.pack.train_pack); "auto": measured on a GPU
    pack: int | str = key("auto", lambda v: v == "auto" or _positive_int(v),
                          "'auto' or an integer >= 1 (folds trained at once as one packed network)")
    # CPU threads of a training on the CPU: PyTorch's kernels round differently with each count
    threads: int = key(1, _positive_int, "an integer >= 1 (CPU threads per training)")

    def _rules(self) -> None:
        if (self.iterations is None) == (self.epochs is None):
            raise ConfigError(f"give exactly one budget, train.iterations or train.epochs; got "
                              f"iterations={_fmt(self.iterations)}, epochs={_fmt(self.epochs)}")

    def total_iterations(self, n_train: int) -> int:
        return self.iterations if self.iterations is not None else self.epochs * (n_train // self.batch_size)

    def lr_at(self, iteration: int, total: int) -> float:
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1 + math.cos(math.pi * iteration / total))
        drops = sum(iteration >= round(m * total) for m in self.milestones)
        return self.lr * self.gamma**drops


SECTIONS = {"study": StudySection, "search": SearchSection, "data": DataSection, "model": ModelSection,
            "train": TrainConfig}


@dataclass(frozen=True)
class Config:
    """A study's whole config, checked: one typed section per TOML table."""

    study: StudySection
    search: SearchSection
    data: DataSection
    model: ModelSection
    train: TrainConfig

    def to_dict(self) -> dict:
        """The config as TOML tables of plain values (lists, dicts), as a study stores it."""
        out = {}
        for section in SECTIONS:
            values = getattr(self, section)
            out[section] = {k: _plain(getattr(values, k)) for k in values.keys()}
        return out

    def replace(self, section: str, **changes) -> Config:
        """A copy with ``changes`` made to ``section`` (checked as the section's fields are)."""
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})


def _plain(v):
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return copy.deepcopy(v)
