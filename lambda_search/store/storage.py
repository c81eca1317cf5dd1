"""Where a study lives: an Optuna storage (SQLite, PostgreSQL or Optuna's journal file), opened
with the checks that keep a wrong or foreign file from being used or changed, and the locks
of ``_locks`` that make every grid point run exactly once."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from .failures import StorageError, redact, scrub
from .locks import FileLocks, PgLocks

__all__ = ["Store", "open_store", "storage_file"]

SQLITE_TIMEOUT_S = 600  # SQLite's own lock timeout: generous, writers queue instead of failing
METRIC_NAME = "val_accuracy"  # what a trial's value is, named for Optuna's tools (the dashboard, trials_dataframe)
REASON_ATTR = "lambda_search:fail_reason"  # a FAILED trial's reason (a system attribute)


@dataclass
class Store:
    url: str  # as given (may hold a password: never print it, print ``shown``)
    kind: str  # "sqlite", "postgresql" or "journal"
    storage: optuna.storages.BaseStorage
    locks: FileLocks | PgLocks
    path: Path | None = None  # the database or journal file

    @property
    def shown(self) -> str:
        return redact(self.url)

    # ------------------------------------------------------------ studies and trials: the one way in
    # (no other module calls Optuna's storage: what lambda_search reads and writes is here)

    def study_names(self) -> list[str]:
        return sorted(s.study_name for s in self.storage.get_all_studies())

    def study_id(self, name: str) -> int | None:
        try:
            return self.storage.get_study_id_from_name(name)
        except KeyError:
            return None

    def study_attrs(self, name: str) -> dict:
        """Study ``name``'s attributes ({} where there is no such study)."""
        sid = self.study_id(name)
        return {} if sid is None else self.storage.get_study_user_attrs(sid)

    def set_study_attr(self, name: str, key: str, value) -> None:
        self.storage.set_study_user_attr(self.storage.get_study_id_from_name(name), key, value)

    def delete_study(self, name: str) -> None:
        """Delete study ``name`` and its trials (where it exists)."""
        sid = self.study_id(name)
        if sid is not None:
            self.storage.delete_study(sid)

    def create_study(self, name: str) -> None:
        """A new study that maximizes one value, named METRIC_NAME for Optuna's tools."""
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], name)
        self.name_metric(name)

    def name_metric(self, name: str) -> None:
        """Name study ``name``'s objective METRIC_NAME, as Optuna's ``set_metric_names`` does."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.load_study(study_name=name, storage=self.storage).set_metric_names([METRIC_NAME])

    def metric_named(self, name: str) -> bool:
        return "study:metric_names" in self.storage.get_study_system_attrs(self.storage.get_study_id_from_name(name))

    def maximizes(self, name: str) -> bool:
        """Whether study ``name`` maximizes one value (as lambda_search's accuracies need)."""
        directions = self.storage.get_study_directions(self.storage.get_study_id_from_name(name))
        return directions == [optuna.study.StudyDirection.MAXIMIZE]

    def directions(self, name: str) -> list[str]:
        return [d.name.lower() for d in self.storage.get_study_directions(self.storage.get_study_id_from_name(name))]

    def trials(self, name: str) -> list[FrozenTrial]:
        """Study ``name``'s trials ([] where there is no such study)."""
        sid = self.study_id(name)
        return [] if sid is None else self.storage.get_all_trials(sid, deepcopy=False)

    def add_trial(self, name: str, template: FrozenTrial) -> int:
        return self.storage.create_new_trial(self.storage.get_study_id_from_name(name), template)

    def trial(self, trial_id: int) -> FrozenTrial:
        return self.storage.get_trial(trial_id)

    def set_trial_attr(self, trial_id: int, key: str, value) -> None:
        self.storage.set_trial_user_attr(trial_id, key, value)

    def complete_trial(self, trial_id: int, value: float) -> None:
        self.storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [value])

    def fail_trial(self, trial_id: int, reason: str) -> None:
        """FAILED, with ``reason`` (at most 500 characters); a trial finished meanwhile is left as it is."""
        try:
            self.storage.set_trial_system_attr(trial_id, REASON_ATTR, reason[:500])
            self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
            pass


def storage_file(url: str) -> Path | None:
    """The file of a file storage URL (``sqlite:///PATH``, ``journal:PATH``); None for a server
    (PostgreSQL) or an in-memory database."""
    if url.startswith("sqlite:///") and ":memory:" not in url:
        return Path(url[len("sqlite:///"):].split("?", 1)[0]) if url[len("sqlite:///"):] else None
    if url.startswith("journal:"):
        rest = url[len("journal:"):].removeprefix("//")
        return Path(rest) if rest else None
    return None


_SQLITE_HEADER = b"SQLite format 3\x00"


def _sqlite_path(url: str) -> Path:
    rest = url[len("sqlite:///"):]
    if not rest or rest.startswith("?"):
        raise StorageError(f"storage URL {redact(url)!r} has no file path; use sqlite:///path/to/study.db")
    return Path(rest.split("?", 1)[0])


def _check_optuna_sqlite(path: Path, url: str, tables: bool = True) -> None:
    """Refuse a file that is not an Optuna SQLite database, without writing to it."""
    try:
        with open(path, "rb") as f:
            header = f.read(len(_SQLITE_HEADER))
    except OSError as exc:
        raise StorageError(f"storage {redact(url)!r}: cannot read {str(path)!r} ({exc.strerror})") from None
    if header != _SQLITE_HEADER:
        raise StorageError(f"storage {redact(url)!r}: {str(path)!r} is not an SQLite database")
    if not tables:
        return
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=SQLITE_TIMEOUT_S)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        raise StorageError(
            f"storage {redact(url)!r}: {str(path)!r} is not a readable SQLite database ({exc})"
        ) from None
    if not {"studies", "trials", "alembic_version"} <= tables:
        raise StorageError(f"storage {redact(url)!r}: {str(path)!r} is an SQLite database but not an Optuna storage")


def _rdb(url: str, create: bool, **engine_kwargs) -> optuna.storages.RDBStorage:
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs or None, skip_table_creation=not create)
    except Exception as exc:  # connection refused, bad credentials, an old schema...
        raise StorageError(f"cannot open storage {redact(url)!r}: {scrub(exc, url)}") from None


def _whole_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _check_journal(path: Path, url: str) -> None:
    """Refuse a non-empty file whose first line is not an Optuna journal record (Optuna would
    skip it and read the file as an empty storage), without writing to it."""
    try:
        with open(path, "rb") as f:
            first = f.readline(1 << 20)
    except OSError as exc:
        raise StorageError(f"storage {url!r}: cannot read {str(path)!r} ({exc.strerror})") from None
    # (a torn first record, with no newline, is the tail repair's to set aside)
    if first.endswith(b"\n") and not _whole_record(first):
        raise StorageError(f"storage {url!r}: {str(path)!r} is not an Optuna journal (its first line is not a record)")


def _repair_journal_tail(path: Path) -> None:
    """A journal whose last record was torn (a power loss or a full disk mid-write) ends
    without a newline; Optuna would append after it and make the file unreadable from there
    on. Under Optuna's own journal lock, move the torn bytes to ``<file>.torn`` (kept) and
    cut the journal after its last whole record, with one warning."""
    if not path.stat().st_size:
        return
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
    lock = optuna.storages.journal.JournalFileSymlinkLock(str(path))
    while not lock.acquire():
        pass
    try:
        data = path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep == len(data):  # repaired meanwhile
            return
        if _whole_record(data[keep:]):  # only its newline was lost
            with open(path, "ab") as f:
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
            warnings.warn(f"journal {str(path)!r} lacked the newline after its last record: added", stacklevel=3)
            return
        torn = path.with_name(path.name + ".torn")
        with open(torn, "ab") as f:
            f.write(data[keep:] + b"\n")
            f.flush()
            os.fsync(f.fileno())
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    finally:
        lock.release()
    warnings.warn(f"journal {str(path)!r} ended in a torn record ({len(data) - keep} bytes, as a power loss or a "
                  f"full disk leaves it): moved to {torn.name}; every whole record is kept", stacklevel=3)


def _report_journal_tail(path: Path) -> None:
    """A reader's look at a journal's tail: a torn last record is left as it is (a writer sets
    it aside when it opens the journal), with one warning."""
    size = path.stat().st_size
    if not size:
        return
    with open(path, "rb") as f:
        f.seek(max(0, size - (1 << 20)))
        tail = f.read()
    if tail.endswith(b"\n"):
        return
    last = tail[tail.rfind(b"\n") + 1:]
    if _whole_record(last):
        what = "lacks the newline after its last record: read without that record until"
    else:
        what = (f"ends in a torn record ({len(last)} bytes or more, as a power loss or a full disk leaves it): read "
                "without it; it is set aside when")
    warnings.warn(f"journal {str(path)!r} {what} the next search, resume or worker opens it (a reading command "
                  "never writes)", stacklevel=3)


def _check_writable(path: Path, url: str) -> None:
    """A search writes the file and, beside it, SQLite's rollback journal or Optuna's journal
    lock: both must be writable, checked before anything else is done."""
    for what, p in (("file", path), ("folder", path.parent)):
        if p.exists() and not os.access(p, os.W_OK):
            raise StorageError(f"storage {redact(url)!r} is read-only here: its {what} {str(p)!r} cannot be written "
                               "(status, select, plot and export read it; to search, copy it somewhere writable)")


def _open_sqlite(url: str, create: bool, write: bool) -> Store:
    path = _sqlite_path(url)
    if path.exists() and not path.is_file():
        raise StorageError(f"storage {redact(url)!r}: {str(path)!r} is not a file")
    if not create:
        if not path.exists():
            raise StorageError(f"storage {redact(url)!r}: no database file {str(path)!r}; "
                               "`lambda-search search CONFIG` creates one")
        _check_optuna_sqlite(path, url)
        if write:
            _check_writable(path, url)
        return Store(url, "sqlite", _rdb(url, False, connect_args={"timeout": SQLITE_TIMEOUT_S}), FileLocks(path), path)
    if path.exists() and path.stat().st_size:
        _check_optuna_sqlite(path, url, tables=False)  # refuse a foreign file before making anything beside it
    elif not path.parent.is_dir():
        raise StorageError(f"storage {redact(url)!r}: folder {str(path.parent)!r} does not exist")
    _check_writable(path, url)
    locks = FileLocks(path)
    with locks.exclusive():  # several processes creating one new file at once
        if path.exists() and path.stat().st_size:
            _check_optuna_sqlite(path, url)
        storage = _rdb(url, True, connect_args={"timeout": SQLITE_TIMEOUT_S})
    return Store(url, "sqlite", storage, locks, path)


def _open_postgres(url: str, create: bool) -> Store:
    sa_url = re.sub(r"^postgres(ql)?://", "postgresql+psycopg://", url)
    if sa_url.startswith("postgresql+psycopg://"):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise StorageError("PostgreSQL storage needs the psycopg driver: pip install 'lambda-search[postgres]'")\
                from None
    try:
        locks = PgLocks(sa_url)
        locks.alive(0)  # a round trip: the server answers
    except Exception as exc:
        raise StorageError(f"cannot open storage {redact(url)!r}: {scrub(exc, sa_url)}") from None
    if create:
        with locks.exclusive():  # several processes creating Optuna's tables at once
            return Store(url, "postgresql", _rdb(sa_url, True, pool_pre_ping=True), locks)
    return Store(url, "postgresql", _rdb(sa_url, False, pool_pre_ping=True), locks)


def _open_journal(url: str, create: bool, write: bool) -> Store:
    path = Path(url[len("journal:"):].removeprefix("//"))
    if not str(path) or str(path) == ".":
        raise StorageError(f"storage URL {url!r} has no file path; use journal:path/to/study.log")
    if path.exists() and not path.is_file():
        raise StorageError(f"storage {url!r}: {str(path)!r} is not a file")
    if not path.exists():
        if not create:
            raise StorageError(f"storage {url!r}: no journal file {str(path)!r}; "
                               "`lambda-search search CONFIG` creates one")
        if not path.parent.is_dir():
            raise StorageError(f"storage {url!r}: folder {str(path.parent)!r} does not exist")
    if create or write:
        _check_writable(path, url)
    if path.exists():
        _check_journal(path, url)
    if path.exists() and (create or write):  # a reader never writes: it reads the whole records, and says so
        _repair_journal_tail(path)
    elif path.exists():
        _report_journal_tail(path)
    backend = optuna.storages.journal.JournalFileBackend(str(path))
    try:
        storage = optuna.storages.JournalStorage(backend)
    except Exception as exc:
        raise StorageError(
            f"storage {url!r}: {str(path)!r} is not an Optuna journal ({exc.__class__.__name__})"
        ) from None
    return Store(url, "journal", storage, FileLocks(path), path)


def open_store(url: str, create: bool = False, write: bool = False) -> Store:
    """Open the storage at ``url`` (``sqlite:///FILE``, ``postgresql://...``, or
    ``journal:FILE`` for Optuna's journal file). Unless ``create``, the database must exist;
    with ``write`` (implied by ``create``), a file storage that cannot be written is refused
    at once. Nothing is written to a storage that is refused."""
    if not isinstance(url, str) or not url:
        raise StorageError("a storage URL is required, such as sqlite:///studies/quickstart.db")
    if url.startswith("sqlite:///"):
        return _open_sqlite(url, create, write)
    if re.match(r"^postgres(ql)?(\+\w+)?://", url):
        return _open_postgres(url, create)
    if url.startswith("journal:"):
        return _open_journal(url, create, write)
    scheme = url.split(":", 1)[0] if ":" in url else url
    raise StorageError(f"unsupported storage URL scheme {scheme!r} in {redact(url)!r}; use sqlite:///FILE, "
                       "postgresql://USER:PASSWORD@HOST/DB or journal:FILE")
