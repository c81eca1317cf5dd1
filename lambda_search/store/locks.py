"""The locks that make every grid point of a study run exactly once.

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
workers on many machines share one study.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import zlib
from pathlib import Path

from .failures import StorageError

__all__ = ["FileLocks", "PgLocks"]

_PG_NAMESPACE = 0x51AA << 32  # advisory lock keys of lambda_search: namespace | trial id
_PG_CLAIM_KEY = _PG_NAMESPACE | 0xFFFFFFFF
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
        except FileNotFoundError:  # no folder, no database: no lease (any other error is raised, never "dead")
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
        """Whether a live session holds the lease of ``trial_id``, read from ``pg_locks``: it
        never takes the lock, so it cannot stand in the way of the worker that does. (A
        bigint advisory key is listed as classid = its high half, objid = its low half,
        objsubid = 1.)"""
        key = _PG_NAMESPACE | trial_id
        query = ("SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted "
                 "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
                 "AND classid = :hi AND objid = :lo AND objsubid = 1)")
        with self._connect() as conn:
            return bool(conn.execute(self._sa.text(query), {"hi": key >> 32, "lo": key & 0xFFFFFFFF}).scalar())
