"""What can go wrong with a storage, said in one line: ``StorageError`` for a storage that
cannot be used (bad input, exit 2), ``StorageFailure`` (``DiskFull``, ``StorageLost``) for
one that failed under a running command (exit 1; what was stored is kept). A storage
password is never shown: every message uses ``redact(url)``."""

from __future__ import annotations

import contextlib
import errno
import re

__all__ = ["StorageError", "StorageFailure", "DiskFull", "StorageLost", "failures", "redact", "password_free",
           "server_url", "scrub"]


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
    if lost is None:
        return None
    reason = redact(str(lost).strip().splitlines()[0] if str(lost).strip() else type(lost).__name__)[:200]
    if "database is locked" in reason:  # SQLite waited its whole timeout: the database is there, held
        return StorageFailure(f"the study database stayed locked by another process for longer than SQLite waits "
                              f"({reason}): close what holds it (a database browser, a backup) and run the same "
                              "command again (what was stored is kept)")
    if "readonly database" in reason:
        return StorageFailure(f"the study database became read-only while in use ({reason}); make it writable "
                              "and run the same command again (what was stored is kept)")
    return StorageLost(f"lost the study database ({reason}); when it is back, run the same command again "
                       "or `lambda-search resume` (finished folds and checkpoints are kept)")


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


def server_url(text: str):
    """``text`` parsed as SQLAlchemy parses a PostgreSQL URL (as the storage will read it),
    or None where it is not one."""
    if not re.match(r"^postgres(ql)?(\+\w+)?://", text):
        return None
    try:
        from sqlalchemy.engine import make_url

        return make_url(text)
    except Exception:
        return None


def redact(url: str) -> str:
    """``url`` with any password (``USER:PASSWORD@``, or ``?password=``) replaced by ``***``."""
    text = str(url)
    parsed = server_url(text)
    if parsed is not None and (parsed.password is not None or "password" in parsed.query):
        if "password" in parsed.query:
            parsed = parsed.update_query_dict({"password": "***"})
        return parsed.render_as_string(hide_password=True)
    return re.sub(r"(://[^/@:]*:)[^@/]*@", r"\1***@", text)


def password_free(url: str) -> str:
    """``url`` without its password (where another process takes it from its environment:
    PGPASSWORD, ~/.pgpass)."""
    text = str(url)
    parsed = server_url(text)
    if parsed is None or (parsed.password is None and "password" not in parsed.query):
        return re.sub(r"(://[^/@:]*):[^@/]*@", r"\1@", text)
    return parsed._replace(password=None).difference_update_query(["password"]).render_as_string(hide_password=False)


def scrub(text: str, url: str) -> str:
    """Remove ``url``'s password from ``text`` (a driver's message may quote the URL)."""
    text = str(text).replace(url, redact(url))
    m = re.search(r"://[^/@:]*:([^@/]*)@", url)
    if m and m.group(1):
        text = text.replace(m.group(1), "***")
    return redact(text).splitlines()[0] if text else text
