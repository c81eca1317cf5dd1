"""_storage on its own: redact, the refusals of open_store for each kind of URL (exact
messages), the repair of a journal's torn tail, and the file locks (claim lock and leases)
as other processes see them. No training; the other processes are forked peers."""

import errno
import fcntl
import multiprocessing
import os
import shutil
import signal
import sqlite3
import tempfile
import warnings
from pathlib import Path

import optuna
import pytest

from lambda_search import StorageError, open_store
from lambda_search.cli import main
from lambda_search.store.failures import redact
from lambda_search.store.locks import FileLocks

NOBODY = 65534


# ---------------------------------------------------------------- redact


@pytest.mark.parametrize("url, shown", [
    ("postgresql://user:secret@host:5432/db", "postgresql://user:***@host:5432/db"),
    ("postgresql+psycopg://u:p%40ss@db.example.org/lambda", "postgresql+psycopg://u:***@db.example.org/lambda"),
    ("postgres://u:pa:ss@h/db", "postgres://u:***@h/db"),  # a colon in the password
    ("postgresql://u:@h/db", "postgresql://u:***@h/db"),  # an empty one
    ("postgresql://user@host/db", "postgresql://user@host/db"),  # no password: unchanged
    ("postgresql://host/db", "postgresql://host/db"),
    ("sqlite:///studies/a:b@c.db", "sqlite:///studies/a:b@c.db"),  # a path, not a password
    ("journal:studies/x.log", "journal:studies/x.log"),
    ("mysql://root:hunter2@localhost/x", "mysql://root:***@localhost/x"),
])
def test_redact(url, shown):
    assert redact(url) == shown
    assert redact(shown) == shown  # idempotent


def test_redact_takes_a_path_and_hides_every_password_in_a_text():
    assert redact(Path("studies/q.db")) == "studies/q.db"
    text = "a postgresql://a:one@h/x and b postgresql://b:two@h/y"
    assert redact(text) == "a postgresql://a:***@h/x and b postgresql://b:***@h/y"


# ---------------------------------------------------------------- open_store refusals


def test_open_store_requires_a_url():
    for url in ("", None):
        with pytest.raises(StorageError,
                           match=r"^a storage URL is required, such as sqlite:///studies/quickstart\.db$"):
            open_store(url)


def _refused(url, **kwargs) -> str:
    with pytest.raises(StorageError) as info:
        open_store(url, **kwargs)
    return str(info.value)


def test_sqlite_refusals(tmp_path):
    db = tmp_path / "missing.db"
    assert _refused("sqlite:///") == "storage URL 'sqlite:///' has no file path; use sqlite:///path/to/study.db"
    assert _refused("sqlite:///?timeout=3") == ("storage URL 'sqlite:///?timeout=3' has no file path; "
                                                "use sqlite:///path/to/study.db")
    assert _refused(f"sqlite:///{db}") == (f"storage 'sqlite:///{db}': no database file '{db}'; "
                                           "`lambda-search search CONFIG` creates one")
    assert not db.exists()  # opening to read creates nothing
    assert _refused(f"sqlite:///{tmp_path}") == f"storage 'sqlite:///{tmp_path}': '{tmp_path}' is not a file"
    text = tmp_path / "notes.db"
    text.write_text("not a database\n")
    for create in (False, True):
        assert _refused(f"sqlite:///{text}", create=create) == (f"storage 'sqlite:///{text}': '{text}' is not an "
                                                                "SQLite database")
    assert text.read_text() == "not a database\n"
    foreign = tmp_path / "foreign.db"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    before = foreign.read_bytes()
    assert _refused(f"sqlite:///{foreign}") == (f"storage 'sqlite:///{foreign}': '{foreign}' is an SQLite database "
                                                "but not an Optuna storage")
    assert _refused(f"sqlite:///{foreign}", create=True).endswith("is an SQLite database but not an Optuna storage")
    assert foreign.read_bytes() == before  # refused: nothing written
    nowhere = tmp_path / "no-such-folder" / "s.db"
    assert _refused(f"sqlite:///{nowhere}", create=True) == (f"storage 'sqlite:///{nowhere}': folder "
                                                             f"'{nowhere.parent}' does not exist")
    assert not nowhere.parent.exists()


def test_a_new_sqlite_store_opens_and_reopens(tmp_path):
    db = tmp_path / "s.db"
    store = open_store(f"sqlite:///{db}", create=True)
    assert (store.kind, store.path, store.study_names()) == ("sqlite", db, [])
    assert isinstance(store.locks, FileLocks) and store.locks.path == db
    optuna.create_study(storage=store.storage, study_name="one")
    assert open_store(f"sqlite:///{db}", write=True).study_names() == ["one"]


def test_journal_refusals(tmp_path):
    log = tmp_path / "missing.log"
    assert _refused("journal:") == "storage URL 'journal:' has no file path; use journal:path/to/study.log"
    assert _refused("journal://") == "storage URL 'journal://' has no file path; use journal:path/to/study.log"
    assert _refused(f"journal:{log}") == (f"storage 'journal:{log}': no journal file '{log}'; "
                                          "`lambda-search search CONFIG` creates one")
    assert not log.exists()
    assert _refused(f"journal:{tmp_path}") == f"storage 'journal:{tmp_path}': '{tmp_path}' is not a file"
    nowhere = tmp_path / "no-such-folder" / "s.log"
    assert _refused(f"journal:{nowhere}", create=True) == (f"storage 'journal:{nowhere}': folder "
                                                           f"'{nowhere.parent}' does not exist")
    foreign = tmp_path / "foreign.log"
    foreign.write_text('{"not": "an optuna record"}\n')
    assert _refused(f"journal:{foreign}") == (f"storage 'journal:{foreign}': '{foreign}' is not an Optuna journal "
                                              "(KeyError)")
    for text in (b"hello\n", b"\n", b"[1, 2]\n" + CREATE):  # Optuna would skip such lines: an empty storage
        foreign.write_bytes(text)
        assert _refused(f"journal:{foreign}") == (f"storage 'journal:{foreign}': '{foreign}' is not an Optuna "
                                                  "journal (its first line is not a record)")
        assert foreign.read_bytes() == text


@pytest.mark.parametrize("url, scheme, shown", [
    ("mysql://root:hunter2@localhost/x", "mysql", "mysql://root:***@localhost/x"),
    ("studies/quickstart.db", "studies/quickstart.db", "studies/quickstart.db"),
    ("sqlite://relative.db", "sqlite", "sqlite://relative.db"),  # two slashes: not sqlite:///
    ("file:study.log", "file", "file:study.log"),
])
def test_an_unsupported_scheme_is_named_without_its_password(url, scheme, shown):
    assert _refused(url) == (f"unsupported storage URL scheme {scheme!r} in {shown!r}; use sqlite:///FILE, "
                             "postgresql://USER:PASSWORD@HOST/DB or journal:FILE")


def test_an_unreachable_postgresql_server_is_refused_without_its_password():
    pytest.importorskip("psycopg")
    message = _refused("postgresql://user:s3cr3t-pw@127.0.0.1:1/db")  # port 1: connection refused at once
    assert message.startswith("cannot open storage 'postgresql://user:***@127.0.0.1:1/db': ")
    assert "s3cr3t-pw" not in message and len(message.splitlines()) == 1


# ---------------------------------------------------------------- journal tail repair

CREATE = b'{"op_code":0,"worker_id":"w-1","study_name":"demo","directions":[2]}\n'
ATTR = b'{"op_code":2,"worker_id":"w-1","study_id":0,"user_attr":{"k":1}}'


def _journal(path, tail=b""):
    path.write_bytes(CREATE + ATTR + b"\n" + tail)
    return f"journal:{path}"


def _user_attrs(store):
    return store.storage.get_study_user_attrs(store.storage.get_study_id_from_name("demo"))


def test_an_intact_hand_written_journal_is_read_and_left_as_it_is(tmp_path):
    path = tmp_path / "s.log"
    url = _journal(path)
    before = path.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        store = open_store(url, write=True)
    assert (store.kind, store.study_names(), _user_attrs(store)) == ("journal", ["demo"], {"k": 1})
    assert path.read_bytes() == before and not path.with_name("s.log.torn").exists()


def test_a_torn_journal_tail_is_moved_aside_and_every_whole_record_kept(tmp_path):
    path = tmp_path / "s.log"
    torn = b'{"op_code":2,"worker_id":"w-1","study_id":0,"user_at'  # a power loss mid-record
    url = _journal(path, torn)
    with pytest.warns(UserWarning, match=rf"^journal '{path}' ended in a torn record \({len(torn)} bytes, as a power "
                                         r"loss or a full disk leaves it\): moved to s\.log\.torn; every whole "
                                         r"record is kept$"):
        store = open_store(url, write=True)
    assert path.read_bytes() == CREATE + ATTR + b"\n"
    assert path.with_name("s.log.torn").read_bytes() == torn + b"\n"
    assert store.study_names() == ["demo"] and _user_attrs(store) == {"k": 1}
    # a second torn write later: its bytes join the first in the .torn file, kept
    with open(path, "ab") as f:
        f.write(b'{"op_')
    with pytest.warns(UserWarning, match="ended in a torn record \\(5 bytes"):
        open_store(url, write=True)
    assert path.with_name("s.log.torn").read_bytes() == torn + b"\n" + b'{"op_\n'
    assert path.read_bytes() == CREATE + ATTR + b"\n"


def test_a_reader_reports_a_torn_journal_and_writes_nothing(tmp_path):
    """Reading commands never write: a torn tail is reported, and repaired by the next writer."""
    path = tmp_path / "s.log"
    torn = b'{"op_code":2,"worker_id":"w-1","study_id":0,"user_at'
    for tail, said in ((torn, rf"ends in a torn record \({len(torn)} bytes or more, as a power loss or a full disk "
                              r"leaves it\): read without it; it is set aside when"),
                       (None, r"lacks the newline after its last record: read without that record until")):
        if tail is None:
            path.write_bytes(CREATE + ATTR)
        else:
            _journal(path, tail)
        before = path.read_bytes()
        with pytest.warns(UserWarning, match=rf"^journal '{path}' {said} the next search, resume or worker opens it "
                                             r"\(a reading command never writes\)$"):
            store = open_store(f"journal:{path}")
        assert store.study_names() == ["demo"] and _user_attrs(store) == ({"k": 1} if tail else {})
        assert path.read_bytes() == before and not path.with_name("s.log.torn").exists()
    with pytest.warns(UserWarning, match="a reading command never writes"):
        assert main(["studies", "--storage", f"journal:{path}"]) == 0  # a reading command: the same
    assert path.read_bytes() == before


def test_a_journal_that_lost_only_its_last_newline_keeps_its_last_record(tmp_path):
    path = tmp_path / "s.log"
    path.write_bytes(CREATE + ATTR)
    with pytest.warns(UserWarning, match=rf"^journal '{path}' lacked the newline after its last record: added$"):
        store = open_store(f"journal:{path}", write=True)
    assert path.read_bytes() == CREATE + ATTR + b"\n" and not path.with_name("s.log.torn").exists()
    assert _user_attrs(store) == {"k": 1}


def test_an_empty_journal_is_an_empty_storage(tmp_path):
    path = tmp_path / "s.log"
    path.write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_store(f"journal:{path}").study_names() == []
    assert path.read_bytes() == b""


# ---------------------------------------------------------------- file locks, seen from other processes


def _peer_main(conn):
    """A forked process that takes and drops locks as told; answers each command."""
    held, claim = {}, None
    while True:
        cmd, *args = conn.recv()
        try:
            if cmd == "lease":
                held[args[1]] = FileLocks(Path(args[0])).lease(args[1])
                answer = "held"
            elif cmd == "release":
                held.pop(args[0]).release()
                answer = "released"
            elif cmd == "alive":
                answer = FileLocks(Path(args[0])).alive(args[1])
            elif cmd == "try-flock":  # the claim lock, without waiting: True if taken (then dropped)
                fd = os.open(args[0], os.O_RDONLY | os.O_DIRECTORY)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    answer = True
                except BlockingIOError:
                    answer = False
                finally:
                    os.close(fd)
            elif cmd == "flock":  # hold the claim lock until "unflock"
                claim = os.open(args[0], os.O_RDONLY | os.O_DIRECTORY)
                fcntl.flock(claim, fcntl.LOCK_EX)
                answer = "locked"
            elif cmd == "unflock":
                os.close(claim)
                answer = "unlocked"
            else:
                answer = "bye"
        except Exception as exc:  # sent back, to be asserted on
            answer = exc
        conn.send(answer)
        if answer == "bye":
            return


class Peer:
    """Another process (forked: no import time), with its own open file descriptions."""

    def __init__(self):
        ctx = multiprocessing.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_peer_main, args=(child,), daemon=True)
        self.process.start()
        child.close()

    def __call__(self, *cmd, timeout=30):
        self.conn.send(cmd)
        assert self.conn.poll(timeout), f"the peer did not answer {cmd}"
        return self.conn.recv()

    def kill(self):
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(30)
        assert self.process.exitcode == -signal.SIGKILL

    def close(self):
        if self.process.is_alive():
            self("bye")
            self.process.join(30)


@pytest.fixture
def peer():
    p = Peer()
    yield p
    p.close()


def test_the_claim_lock_excludes_another_process(tmp_path, peer):
    locks = FileLocks(tmp_path / "s.db")
    assert peer("try-flock", str(tmp_path)) is True
    with locks.exclusive():
        assert peer("try-flock", str(tmp_path)) is False
    assert peer("try-flock", str(tmp_path)) is True  # dropped on leaving
    with pytest.raises(KeyError):  # dropped also when the block raises
        with locks.exclusive():
            raise KeyError("x")
    assert peer("try-flock", str(tmp_path)) is True


def test_the_claim_lock_waits_for_another_process(tmp_path, peer):
    import threading

    locks, entered = FileLocks(tmp_path / "s.db"), threading.Event()

    def claim():
        with locks.exclusive():
            entered.set()

    assert peer("flock", str(tmp_path)) == "locked"
    thread = threading.Thread(target=claim, daemon=True)
    thread.start()
    assert not entered.wait(0.5)  # waits while the peer holds it
    assert peer("unflock") == "unlocked"
    assert entered.wait(30)
    thread.join(30)


def test_a_lease_is_seen_from_another_process_until_released(tmp_path, peer):
    db = tmp_path / "s.db"
    locks = FileLocks(db)
    assert not locks.alive(7) and peer("alive", str(db), 7) is False
    lease = locks.lease(7)
    assert peer("alive", str(db), 7) is True  # another process sees it
    assert locks.alive(7)  # so does another open file description of this process
    assert not locks.alive(6) and not locks.alive(8)  # one byte per trial
    assert not FileLocks(tmp_path / "other.db").alive(7)  # another database of the folder keeps apart
    lease.release()
    lease.release()  # twice is harmless
    assert not locks.alive(7) and peer("alive", str(db), 7) is False
    assert peer("lease", str(db), 7) == "held"  # free again: the peer takes it
    assert locks.alive(7)
    # a lease is a shared lock (a folder opens for reading only): one holder because leases
    # are taken under the claim lock; a second one keeps the trial alive until both go
    second = locks.lease(7)
    assert peer("release", 7) == "released"
    assert locks.alive(7) and peer("alive", str(db), 7) is True
    second.release()
    assert not locks.alive(7) and peer("alive", str(db), 7) is False
    assert sorted(os.listdir(tmp_path)) == []  # no lock file: the locks are on the folder


def test_a_lease_dies_with_its_process(tmp_path):
    db = tmp_path / "s.db"
    locks, holder = FileLocks(db), Peer()
    try:
        assert holder("lease", str(db), 3) == "held" and holder("lease", str(db), 4) == "held"
        assert locks.alive(3) and locks.alive(4)
        holder.kill()  # no clean-up of any kind runs
        assert not locks.alive(3) and not locks.alive(4)
        locks.lease(3).release()  # and it can be taken again
    finally:
        holder.close()


def test_alive_raises_what_is_not_a_missing_folder(tmp_path, monkeypatch):
    """Only a missing folder means "no lease"; a folder that cannot be opened (too many open
    files, say) is an error, never a dead worker whose point would be run twice."""
    locks = FileLocks(tmp_path / "s.db")
    monkeypatch.setattr(os, "open", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EMFILE, "Too many open files")))
    with pytest.raises(OSError, match="Too many open files"):
        locks.alive(1)


def test_failures_name_what_happened():
    """A full disk names the file (also when torch.save wraps it); SQLite's lock timeout and a
    database made read-only are said as such, not as a lost database; a dropped connection is."""
    import sqlalchemy

    from lambda_search.store.failures import DiskFull, StorageFailure, StorageLost, failures

    def raised(exc):
        with pytest.raises(StorageFailure) as info, failures():
            raise exc
        return info.value

    def sa(message):
        return sqlalchemy.exc.OperationalError("INSERT ...", {}, sqlite3.OperationalError(message))

    full = raised(OSError(errno.ENOSPC, "No space left on device", "/ck/f0.pt"))
    assert type(full) is DiskFull and str(full).startswith("no space left on the device writing /ck/f0.pt;")
    locked = raised(sa("database is locked"))
    assert type(locked) is StorageFailure and "stayed locked by another process" in str(locked)
    readonly = raised(sa("attempt to write a readonly database"))
    assert type(readonly) is StorageFailure and "became read-only while in use" in str(readonly)
    lost = raised(sa("disk I/O error"))
    assert type(lost) is StorageLost and str(lost).startswith("lost the study database (")
    with pytest.raises(ValueError), failures():
        raise ValueError("not a storage failure")


def test_a_checkpoint_write_torch_wraps_names_the_checkpoint(tmp_path, monkeypatch):
    from lambda_search.store.failures import DiskFull, failures
    from lambda_search.train import foldrun as _fold

    def save(obj, f, *args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise RuntimeError("[enforce fail at inline_container.cc] file write failed") from exc

    monkeypatch.setattr(_fold.torch, "save", save)
    path = tmp_path / "f0.pt"
    with pytest.raises(DiskFull, match=f"writing {path};"), failures():
        _fold.save_checkpoint(path, {"x": 1})
    assert os.listdir(tmp_path) == []  # no partial file left


def test_alive_writes_nothing_and_needs_a_folder(tmp_path):
    locks = FileLocks(tmp_path / "gone" / "s.db")
    assert locks.alive(1) is False  # no folder: no lease to see
    assert not (tmp_path / "gone").exists()
    FileLocks(tmp_path / "s.db").alive(1)
    assert os.listdir(tmp_path) == []


def test_a_bare_file_name_locks_the_current_folder(tmp_path, peer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lease = FileLocks(Path("s.db")).lease(2)
    try:
        assert peer("alive", str(tmp_path / "s.db"), 2) is True
    finally:
        lease.release()


def _alive_as_reader(conn, db, ids):
    """In a forked child: become a user who may not write the folder, then ask."""
    try:
        if os.geteuid() == 0:  # nothing is read-only to root
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        assert not os.access(db.parent, os.W_OK)
        conn.send([FileLocks(db).alive(i) for i in ids])
    except BaseException as exc:
        conn.send(exc)


def test_alive_works_in_a_folder_that_cannot_be_written(peer):
    """A reader who may not write the folder (chmod 555; as root, the reader runs as nobody)
    sees the leases of a search all the same, and writes nothing there."""
    folder = Path(tempfile.mkdtemp(prefix="ls-storage-"))  # in /tmp: every user may reach it
    db = folder / "s.db"
    try:
        assert peer("lease", str(db), 5) == "held"
        os.chmod(folder, 0o555)
        ctx = multiprocessing.get_context("fork")
        conn, child = ctx.Pipe()
        reader = ctx.Process(target=_alive_as_reader, args=(child, db, [5, 6]))
        reader.start()
        assert conn.poll(60)
        answer = conn.recv()
        reader.join(30)
        assert answer == [True, False]
        assert os.listdir(folder) == []
    finally:
        os.chmod(folder, 0o755)
        peer("release", 5)
        shutil.rmtree(folder, ignore_errors=True)
