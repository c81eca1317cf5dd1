"""Reading a config, once, at the edge: a TOML file with its relative paths, ``--set
section.key=value`` overrides (TOML values, or plain strings when they are not one), a
study's stored tables; and comparing two configs by what they compute. Every error is a
ConfigError naming the file, the key, the value and the rule."""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import fields
from pathlib import Path

import tomllib

from .config import (
    FINAL_SUFFIX,
    ROOT_IS_DATA,
    SECTIONS,
    Config,
    ConfigError,
    DataSection,
    _checked,
    _fmt,
    final_parts,
    study_name_ok,
)

__all__ = ["load_config", "resolve_config", "parse_override", "config_diff", "data_differences", "storage_tag",
           "IDENTITY_EXEMPT"]

# Keys that say where and how fast a study runs, not what it computes: they may differ when
# a study is resumed or joined by a worker on another machine. What changes the rounding of
# a training (train.threads, train.pack, train.compile, train.amp, train.channels_last) is
# not among them: a study keeps it (see lambda_search.train.numerics).
IDENTITY_EXEMPT = frozenset({
    "study.storage", "study.checkpoint_dir", "search.workers", "data.root", "data.download",
    "train.device", "train.cuda_graphs", "train.checkpoint_every_epochs", "train.checkpoint_every_seconds",
})


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


def _parse(raw, origin: str) -> Config:
    """Check the shape of ``raw`` (known sections and keys, each value by its key's rule) and
    build the typed config, defaults filled in; every error names ``origin``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: a config is a TOML table")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{origin}: unknown section [{unknown[0]}]; valid sections: "
                          + ", ".join(f"[{s}]" for s in SECTIONS))
    sections = {}
    try:
        for section, cls in SECTIONS.items():
            sections[section] = _parse_section(raw.get(section, {}), section, cls)
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    if sections["search"].lambdas is None:
        raise ConfigError(f"{origin}: search.lambdas is required (a non-empty list of numbers > 0)")
    if sections["data"].dataset is None:
        raise ConfigError(f"{origin}: data.dataset is required (e.g. 'cifar100', 'digits')")
    name = sections["study"].name
    if name is not None and (final_parts(name) is not None) != sections["data"].test:
        raise ConfigError(f"{origin}: study.name ending in {FINAL_SUFFIX!r} is a final evaluation's (made by "
                          f"`lambda-search evaluate`, with data.test), got study.name={name!r}")
    return Config(**sections)


def _parse_section(given, section: str, cls):
    if not isinstance(given, dict):
        raise ConfigError(f"{section} must be a table [{section}], got {_fmt(given)}")
    valid = cls.keys()
    bad = sorted(set(given) - set(valid))
    if bad:
        raise ConfigError(f"unknown key {section}.{bad[0]}; valid keys in [{section}]: " + ", ".join(valid))
    values = {f.name: _checked(f, given[f.name], f"{section}.{f.name}") for f in fields(cls)
              if given.get(f.name) is not None}  # None: not set (a stored config says so)
    return cls(**values)


def _merge(base: dict, section: str, key: str, value) -> None:
    target = base.setdefault(section, {})
    if not isinstance(target, dict):
        raise ConfigError(f"--set {section}.{key}: {section} is not a table")
    if isinstance(value, dict) and isinstance(target.get(key), dict):
        for k, v in value.items():
            _merge(target, key, k, v)
    else:
        target[key] = value


def resolve_config(raw, overrides=(), origin: str = "config", name: str | None = None) -> Config:
    """Apply ``overrides`` (``section.key=value`` strings) to ``raw`` (TOML tables, or a
    Config), check it and fill in defaults; ``name`` is the study name when the config does
    not give one."""
    raw = raw.to_dict() if isinstance(raw, Config) else copy.deepcopy(raw)
    for text in overrides:
        section, key_, value = parse_override(text)
        _merge(raw, section, key_, value)
    config = _parse(raw, origin)
    if config.study.name is None:
        if name is None or not study_name_ok(name):
            raise ConfigError(f"{origin}: study.name is required, got none")
        config = config.replace("study", name=name)
    return config


def load_config(path, overrides=()) -> Config:
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
    _one_split(raw, overrides, str(p), config.data)
    study = config.study
    default_storage = f"sqlite:///{(p.parent / (study.name + '.db')).as_posix()}"
    storage = default_storage if study.storage is None else study.storage
    checkpoint_dir = study.checkpoint_dir
    if checkpoint_dir is None:  # one folder per storage: two studies of one name never share it
        tag = "" if storage == default_storage else f"-{storage_tag(storage)}"
        checkpoint_dir = (p.parent / f"{study.name}{tag}.ckpt").as_posix()
    return config.replace("study", storage=storage, checkpoint_dir=checkpoint_dir)


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


def _one_split(raw: dict, overrides, origin: str, data: DataSection) -> None:
    """Refuse data.folds and data.holdout given together (in the file, by --set, or one each)."""
    data_table = raw.get("data")
    given = {key: "the file" for key in ("folds", "holdout")
             if isinstance(data_table, dict) and key in data_table}
    for text in overrides:
        section, key, _ = parse_override(text)
        if section == "data" and key in ("folds", "holdout"):
            given[key] = "--set"
    if len(given) == 2:
        raise ConfigError(f"{origin}: data.folds and data.holdout are exclusive: data.holdout={_fmt(data.holdout)} "
                          f"is one train/validation split, data.folds={_fmt(data.folds)} is {data.folds}-fold "
                          f"cross-validation; give one (data.folds from {given['folds']}, data.holdout from "
                          f"{given['holdout']})")


def storage_tag(url: str) -> str:
    """Eight hex digits that tell storages apart in a folder name (the password left out)."""
    return hashlib.sha256(re.sub(r"(://[^:/@]*):[^@/]*@", r"\1@", url).encode()).hexdigest()[:8]


def _flatten(config: dict, prefix="") -> dict:
    out = {}
    for k, v in config.items():
        if isinstance(v, dict) and (prefix or k in SECTIONS) and not (prefix and k == "options"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(stored, given, exempt=IDENTITY_EXEMPT) -> list[tuple[str, object, object]]:
    """(key, stored value, given value) for every key that differs, except ``exempt`` ones
    (``stored``, ``given``: Configs, or their TOML tables)."""
    a, b = (_flatten(c.to_dict() if isinstance(c, Config) else c) for c in (stored, given))
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k not in exempt and a.get(k) != b.get(k)]


def data_differences(stored, given: Config) -> list[tuple[str, object, object]]:
    """The ``data.*`` keys (as :func:`config_diff` gives them) in which ``given`` names other
    images than ``stored``: where they lie aside (data.root, data.download), except for a data
    set that is its folder (an image folder), and data.test (the final evaluation's own)."""
    exempt = IDENTITY_EXEMPT | {"data.test"}
    if given.data.dataset in ROOT_IS_DATA:
        exempt = exempt - {"data.root"}
    return [d for d in config_diff(stored, given, exempt) if d[0].startswith("data.")]
