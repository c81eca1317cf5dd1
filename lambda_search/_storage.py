"""Where a study lives: an Optuna storage, plus the locks that make every grid point run
exactly once.

Optuna's own ways of handing out work (GridSampler, enqueue_trial, heartbeats) are not safe
with several workers on SQLite, so lambda_search serialises the handing out itself:

- a storage-wide *claim lock*, held while a worker looks at the trials and creates its
  trial (and while a study is created): no two workers can take the same point;
- a *lease* per RUNNING trial, held by the worker that runs it for as long as it lives. The
  operating system (a file lock) or the database server (a PostgreSQL advisory lock) drops
  a lease the moment its process dies, however it dies, so a dead worker's trial is known
  dead at once, with no clocks and no grace period, and its point is run again.

SQLite and journal files use locks on the database's folder (one machine, or a file system
with working locks; no lock file beside the database); PostgreSQL uses advisory locks, so
workers on many machines share one study. A storage password is never shown: every
message uses ``redact(url)``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import sqlite3
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import optuna

__all__ = ["StorageError", "StorageFailure", "DiskFull", "StorageLost", "Store", "open_store", "redact", "failures"]

SQLITE_TIMEOUT_S = 600  # SQLite's own lock timeout: generous, writers queue instead of failing
_PG_NAMESPACE = 0x51AA << 32  # advisory lock keys of lambda_search: namespace | trial id
_PG_CLAIM_KEY = _PG_NAMESPACE | 0xFFFFFFFF


class StorageError(ValueError):
    """A storage that cannot be used; the message shows the URL without its password."""


class StorageFailure(RuntimeError):
    """A storage that failed under a running command (a full disk, a database server gone):
    what was stored is kept, and the same command, run again once it is back, goes on."""


class DiskFull(StorageFailure):
    """No space left for a checkpoint or for the study database."""


class StorageLost(StorageFailure):
    """The study database stopped answering (a server stopped, a connection dropped)."""


def _in_chain(exc: BaseException | None, test) -> BaseException | None:
    """The first exception in ``exc``'s cause/context chain that passes ``test``."""
    for _ in range(10):
        if exc is None:
            return None
        if test(exc):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _failure(exc: BaseException) -> StorageFailure | None:
    """``exc`` as a StorageFailure, or None where it is none."""
    full = _in_chain(exc, lambda e: isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
    if full is not None:
        where = f" writing {full.filename}" if full.filename else ""
        return DiskFull(f"no space left on the device{where}; free some and run the same command again (finished "
                        "folds and the last good checkpoints are kept)")
    if _in_chain(exc, lambda e: "database or disk is full" in str(e)):  # SQLite's SQLITE_FULL
        return DiskFull("the study database is full (no space left on its device); free some and run the same "
                        "command again (what was stored is kept)")
    lost = _in_chain(exc, lambda e: type(e).__name__ in ("OperationalError", "InterfaceError")
                     and type(e).__module__.startswith(("sqlalchemy", "psycopg")))
    if lost is not None:
        reason = redact(str(lost).strip().splitlines()[0] if str(lost).strip() else type(lost).__name__)
        return StorageLost(f"lost the study database ({reason[:200]}); when it is back, run the same command again "
                           "or `lambda-search resume` (finished folds and checkpoints are kept)")
    return None


@contextlib.contextmanager
def failures():
    """Within the block, a full disk or a lost database is raised as a StorageFailure
    (DiskFull, StorageLost) with a message that says what to do; anything else as it is."""
    try:
        yield
    except StorageFailure:
        raise
    except Exception as exc:
        failure = _failure(exc)
        if failure is None:
            raise
        raise failure from exc


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    return re.sub(r"(://[^/@:]*:)[^@/]*@", r"\1***@", str(url))


def _scrub(text: str, url: str) -> str:
    """Remove ``url``'s password from ``text`` (a driver's message may quote the URL)."""
    text = str(text).replace(url, redact(url))
    m = re.search(r"://[^/@:]*:([^@/]*)@", url)
    if m and m.group(1):
        text = text.replace(m.group(1), "***")
    return redact(text).splitlines()[0] if text else text


# ---------------------------------------------------------------- locks


_FLOCK = struct.Struct("hhqqi4x")  # struct flock on Linux: type, whence, start, len, pid


class _FileLease:
    def __init__(self, fd: int):
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock
            self.fd = None


class FileLocks:
    """Locks on the folder of the database (or journal) file: the claim lock an ``flock`` of
    the folder, a lease a Linux open-file-description lock on one byte of the folder (one
    byte per trial of this file). The kernel drops them when their process dies. They lock
    neither the database file (closing a descriptor of it would drop SQLite's own POSIX
    locks) nor a lock file beside it (which a user could clean up while a search runs); a
    folder opened for reading takes them, so a read-only copy is read as any other."""

    def __init__(self, path: Path):
        self.path = Path(path).resolve()  # one folder for every worker, whatever symlink it opened the file by
        # this file's bytes: 2**30 trials from its own offset (a CRC of its name, so that
        # databases in one folder keep apart)
        self._base = zlib.crc32(self.path.name.encode()) << 30

    def _folder(self) -> int:
        return os.open(self.path.parent if str(self.path.parent) else ".", os.O_RDONLY | os.O_DIRECTORY)

    def _lock(self, fd: int, cmd: str, kind: int, trial_id: int) -> int:
        if not hasattr(fcntl, cmd):
            raise StorageError(f"storage {str(self.path)!r}: searching a file storage needs Linux's open-file-"
                               "description locks; use PostgreSQL here (reading it works)")
        answer = fcntl.fcntl(fd, getattr(fcntl, cmd), _FLOCK.pack(kind, os.SEEK_SET, self._base + trial_id, 1, 0))
        return _FLOCK.unpack(answer)[0]

    @contextlib.contextmanager
    def exclusive(self):
        fd = self._folder()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def lease(self, trial_id: int) -> _FileLease:
        fd = self._folder()
        try:  # a shared lock (a folder opens for reading only); taken under the claim lock, one holder
            self._lock(fd, "F_OFD_SETLK", fcntl.F_RDLCK, trial_id)
        except OSError:
            os.close(fd)
            raise RuntimeError(f"the lease of trial {trial_id} is held by another process") from None
        return _FileLease(fd)

    def alive(self, trial_id: int) -> bool:
        """Whether a live process holds the lease of ``trial_id``; writes nothing. (Off Linux,
        where no worker can run on a file storage, none does.)"""
        if not hasattr(fcntl, "F_OFD_GETLK"):
            return False
        try:
            fd = self._folder()
        except OSError:  # the folder cannot be opened: no lease can be seen
            return False
        try:
            return self._lock(fd, "F_OFD_GETLK", fcntl.F_WRLCK, trial_id) != fcntl.F_UNLCK
        finally:
            os.close(fd)


class _PgLease:
    def __init__(self, conn):
        self.conn = conn

    def release(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()  # ends the session, which drops its advisory locks
            self.conn = None


class PgLocks:
    """PostgreSQL session advisory locks; the server drops them when a connection dies.
    Each lease has its own connection (advisory locks are re-entrant within a session)."""

    def __init__(self, url: str):
        import sqlalchemy

        self._sa = sqlalchemy
        self.engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool,
                                               isolation_level="AUTOCOMMIT")

    def _connect(self):
        return self.engine.connect()

    def _call(self, conn, fn: str, key: int):
        return conn.execute(self._sa.text(f"SELECT {fn}(:k)"), {"k": key}).scalar()

    @contextlib.contextmanager
    def exclusive(self):
        conn = self._connect()
        try:
            self._call(conn, "pg_advisory_lock", _PG_CLAIM_KEY)
            yield
        finally:
            with contextlib.suppress(Exception):
                self._call(conn, "pg_advisory_unlock", _PG_CLAIM_KEY)
            conn.close()

    def lease(self, trial_id: int) -> _PgLease:
        conn = self._connect()
        if not self._call(conn, "pg_try_advisory_lock", _PG_NAMESPACE | trial_id):
            conn.close()
            raise RuntimeError(f"the lease of trial {trial_id} is held by another process")
        return _PgLease(conn)

    def alive(self, trial_id: int) -> bool:
        with self._connect() as conn:
            if self._call(conn, "pg_try_advisory_lock", _PG_NAMESPACE | trial_id):
                self._call(conn, "pg_advisory_unlock", _PG_NAMESPACE | trial_id)
                return False
            return True


# ---------------------------------------------------------------- storages


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

    def study_names(self) -> list[str]:
        return sorted(s.study_name for s in self.storage.get_all_studies())


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
        raise StorageError(f"cannot open storage {redact(url)!r}: {_scrub(exc, url)}") from None


def _whole_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


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


def _check_writable(path: Path, url: str) -> None:
    """A search writes the file and, beside it, SQLite's rollback journal or Optuna's journal
    lock: both must be writable, checked before anything else is done."""
    for what, p in (("file", path), ("folder", path.parent)):
        if p.exists() and not os.access(p, os.W_OK):
            raise StorageError(f"storage {redact(url)!r} is read-only here: its {what} {str(p)!r} cannot be written "
                               "(status, select, plot and export read it; to search, copy it somewhere writable)")


def open_store(url: str, create: bool = False, write: bool = False) -> Store:
    """Open the storage at ``url`` (``sqlite:///FILE``, ``postgresql://...``, or
    ``journal:FILE`` for Optuna's journal file). Unless ``create``, the database must exist;
    with ``write`` (implied by ``create``), a file storage that cannot be written is refused
    at once. Nothing is written to a storage that is refused."""
    if not isinstance(url, str) or not url:
        raise StorageError("a storage URL is required, such as sqlite:///studies/quickstart.db")
    if url.startswith("sqlite:///"):
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
            return Store(
                url, "sqlite", _rdb(url, False, connect_args={"timeout": SQLITE_TIMEOUT_S}), FileLocks(path), path
            )
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
    if re.match(r"^postgres(ql)?(\+\w+)?://", url):
        sa_url = re.sub(r"^postgres(ql)?://", "postgresql+psycopg://", url)
        if sa_url.startswith("postgresql+psycopg://"):
            try:
                import psycopg  # noqa: F401
            except ImportError:
                raise StorageError(
                    "PostgreSQL storage needs the psycopg driver: pip install 'lambda-search[postgres]'"
                ) from None
        try:
            locks = PgLocks(sa_url)
            locks.alive(0)  # a round trip: the server answers advisory locks
        except Exception as exc:
            raise StorageError(f"cannot open storage {redact(url)!r}: {_scrub(exc, sa_url)}") from None
        if create:
            with locks.exclusive():  # several processes creating Optuna's tables at once
                storage = _rdb(sa_url, True, pool_pre_ping=True)
        else:
            storage = _rdb(sa_url, False, pool_pre_ping=True)
        return Store(url, "postgresql", storage, locks)
    if url.startswith("journal:"):
        path = Path(url[len("journal:"):].removeprefix("//"))
        if not str(path) or str(path) == ".":
            raise StorageError(f"storage URL {url!r} has no file path; use journal:path/to/study.log")
        if path.exists() and not path.is_file():
            raise StorageError(f"storage {url!r}: {str(path)!r} is not a file")
        if not path.exists():
            if not create:
                raise StorageError(
                    f"storage {url!r}: no journal file {str(path)!r}; `lambda-search search CONFIG` creates one"
                )
            if not path.parent.is_dir():
                raise StorageError(f"storage {url!r}: folder {str(path.parent)!r} does not exist")
        if create or write:
            _check_writable(path, url)
        if path.exists() and os.access(path, os.W_OK) and os.access(path.parent, os.W_OK):
            _repair_journal_tail(path)
        backend = optuna.storages.journal.JournalFileBackend(str(path))
        try:
            storage = optuna.storages.JournalStorage(backend)
        except Exception as exc:
            raise StorageError(
                f"storage {url!r}: {str(path)!r} is not an Optuna journal ({exc.__class__.__name__})"
            ) from None
        return Store(url, "journal", storage, FileLocks(path), path)
    scheme = url.split(":", 1)[0] if ":" in url else url
    raise StorageError(f"unsupported storage URL scheme {scheme!r} in {redact(url)!r}; use sqlite:///FILE, "
                       "postgresql://USER:PASSWORD@HOST/DB or journal:FILE")
