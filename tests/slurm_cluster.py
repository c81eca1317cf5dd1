"""A single-node Slurm cluster of its own, for tests (needs root and slurm-wlm + munge).

Everything lives in one temporary folder: a munged with its own key and socket, a
slurm.conf on free TCP ports, and slurmctld + slurmd started with -f on that file. Nothing
system-wide is read or changed (no /etc/slurm, /etc/munge, systemctl). Clients reach the
cluster through SLURM_CONF, so pass `cluster.env` to any subprocess that calls sbatch etc.

Skipped where Slurm is missing, except where LAMBDA_SEARCH_REQUIRE_SLURM is set.
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

BINARIES = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "squeue", "sinfo", "scancel")

# AuthInfo cred_expire also sets how long a requeued job waits (BeginTime = requeue + it + 1 s);
# 5 is its minimum (smaller values are refused and the default, 120, is used).
CONF = """\
ClusterName=lstest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder}/munge.socket,cred_expire=5
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
PlugStackConfig={folder}/plugstack.conf
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
KillWait=10
JobRequeue=1
MinJobAge=10
SchedulerParameters=sched_interval=1,bf_interval=1
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def need_slurm(what):
    if os.environ.get("LAMBDA_SEARCH_REQUIRE_SLURM"):
        pytest.fail(f"{what} is missing; .ci/run installs it")
    pytest.skip(f"{what} is not available")


class Cluster:
    """A running cluster: .conf, .env (for subprocesses), .folder, .host, and run()."""

    def __init__(self, folder, conf, host):
        self.folder, self.conf, self.host = folder, conf, host
        self.env = {**os.environ, "SLURM_CONF": str(conf)}

    def run(self, *args, check=True, timeout=60):
        """Run a Slurm client command on this cluster; return its stdout, stripped."""
        done = subprocess.run([str(a) for a in args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode:
            raise RuntimeError(f"{' '.join(map(str, args))} failed: {done.stderr.strip()}")
        return done.stdout.strip()

    def logs(self):
        return "\n".join(
            f"--- {name}:\n" + _tail(self.folder / name) for name in ("munged.log", "slurmctld.log", "slurmd.log")
        )


def _tail(path, lines=15):
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(none)"


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start_munged(folder):
    """Start munged on a key and socket of our own; return its pid."""
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    done = subprocess.run(
        [
            "munged",
            "--force",
            f"--socket={folder}/munge.socket",
            f"--key-file={key}",
            f"--pid-file={folder}/munged.pid",
            f"--log-file={folder}/munged.log",
            f"--seed-file={folder}/munged.seed",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if done.returncode:
        need_slurm(f"a working munged ({done.stderr.strip()})")
    return int((folder / "munged.pid").read_text())


def _write_conf(folder, host):
    for sub in ("state", "spool"):
        (folder / sub).mkdir()
    (folder / "plugstack.conf").write_text("")
    ctld_port, slurmd_port = _free_ports(2)
    conf = folder / "slurm.conf"
    conf.write_text(
        CONF.format(host=host, folder=folder, ctld_port=ctld_port, slurmd_port=slurmd_port, cpus=os.cpu_count() or 1)
    )
    return conf


def _wait_idle(cluster, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=10)
        if state == "idle":
            return
        time.sleep(0.2)
    raise RuntimeError(f"the Slurm node did not become idle:\n{cluster.logs()}")


def _ours(conf):
    """Pids of processes (slurmstepd, job scripts) whose environment names our slurm.conf."""
    mark = f"SLURM_CONF={conf}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if mark in (entry / "environ").read_bytes().split(b"\0"):
                    yield int(entry.name)


def _stop(pid, wait=10.0):
    """SIGTERM pid, wait up to `wait` s for it to go, then SIGKILL."""
    for sig, patience in ((signal.SIGTERM, wait), (signal.SIGKILL, 2.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            if not Path(f"/proc/{pid}").exists() or _zombie(pid):
                return
            time.sleep(0.05)


def _zombie(pid):
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    return True


@contextlib.contextmanager
def slurm_cluster():
    """Start munged, slurmctld and slurmd in a temporary folder; yield a Cluster; stop them."""
    if os.geteuid() != 0:
        need_slurm("root (the test Slurm cluster runs its daemons as root)")
    missing = [b for b in BINARIES if not shutil.which(b)]
    if missing:
        need_slurm(f"Slurm ({', '.join(missing)})")
    folder = Path(tempfile.mkdtemp(prefix="ls-slurm-"))
    folder.chmod(0o755)  # munged wants its socket's folder reachable by all
    host = socket.gethostname().split(".")[0]
    daemons, munged = [], None
    try:
        munged = _start_munged(folder)
        cluster = Cluster(folder, _write_conf(folder, host), host)
        for name in ("slurmctld", "slurmd"):
            log = open(folder / f"{name}.out", "w")
            daemons.append(
                subprocess.Popen(
                    [name, "-D", "-f", str(cluster.conf)],
                    env=cluster.env,
                    stdout=log,
                    stderr=log,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
            log.close()
        _wait_idle(cluster)
        yield cluster
    finally:
        for proc in reversed(daemons):
            _stop(proc.pid)
            proc.wait()
        for pid in _ours(folder / "slurm.conf"):
            _stop(pid, wait=0)
        if munged:
            _stop(munged)
        if not os.environ.get("LAMBDA_SEARCH_KEEP_SLURM"):  # set it to read the daemons' logs after
            shutil.rmtree(folder, ignore_errors=True)
