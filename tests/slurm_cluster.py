"""A real single-node SLURM cluster on localhost for the tests: munged, slurmctld and slurmd.

Follows ``../shared/ref/slurm-local.md``: Debian's ``slurmctld slurmd slurm-client munge``,
started as root with every config, state, spool, pid, log and socket file in a private folder
under the system temp dir, on two free TCP ports, so it neither touches nor collides with a
cluster (or another test run) on the same machine. Client commands find it through
``SLURM_CONF`` in :attr:`LocalSlurm.env`. :meth:`LocalSlurm.stop` cancels the remaining jobs
and stops the three daemons by the pids in their pid files (never by name).

:func:`missing` says why a cluster cannot be started here (the tests skip with that reason).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

BINARIES = ("munged", "munge", "unmunge", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo",
            "scontrol", "scancel")
MUNGE_KEY = Path("/etc/munge/munge.key")


def _which(name: str) -> str | None:
    return shutil.which(name) or next((str(Path(d) / name) for d in ("/usr/sbin", "/sbin")
                                       if (Path(d) / name).is_file()), None)


def missing() -> str | None:
    """Why a local cluster cannot run here, or ``None`` when it can."""
    absent = [b for b in BINARIES if not _which(b)]
    if absent:
        return (f"SLURM/munge binaries not found: {', '.join(absent)} "
                "(apt-get install slurmctld slurmd slurm-client munge)")
    if os.geteuid() != 0:
        return "starting slurmd needs root (the local test cluster runs its daemons as root)"
    if not MUNGE_KEY.is_file():
        return f"no munge key at {MUNGE_KEY} (the munge package's post-install step makes it)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user (the munge package creates it)"
    return None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _mem_total_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("MemTotal not found in /proc/meminfo; cannot size the SLURM node")


class LocalSlurm:
    """Start with :meth:`start`, use :attr:`env` for client commands, end with :meth:`stop`."""

    def __init__(self, cpus: int | None = None):
        self.cpus = cpus or os.cpu_count() or 1
        self.root = Path(tempfile.mkdtemp(prefix="volseg-slurm-"))
        self.root.chmod(0o755)  # munged (user munge) must reach its folder inside
        self.conf = self.root / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.socket = self.munge_dir / "munge.socket"
        self.pid_files = {"slurmd": self.root / "slurmd.pid", "slurmctld": self.root / "slurmctld.pid",
                          "munged": self.munge_dir / "munged.pid"}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for var in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SQUEUE_"))]:
            if var != "SLURM_CONF":  # when the tests themselves run inside a SLURM job
                del self.env[var]

    # ------------------------------------------------------------------ configuration
    def _write_conf(self) -> None:
        ctld_port, slurmd_port = _free_ports(2)
        real_mb = max(512, int(_mem_total_mb() * 0.9))
        r = self.root
        for sub in ("state", "spool"):
            (r / sub).mkdir(exist_ok=True)
        self.conf.write_text(f"""\
# written by tests/slurm_cluster.py for one test session
ClusterName=volsegtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MailProg=/bin/true
ReturnToService=2
MinJobAge=600
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={self.pid_files['slurmctld']}
SlurmdPidFile={self.pid_files['slurmd']}
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
DefMemPerCPU={real_mb // self.cpus}
NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={real_mb} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")

    # ------------------------------------------------------------------ daemons
    def _run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        res = subprocess.run([_which(cmd[0]) or cmd[0], *cmd[1:]], capture_output=True, text=True,
                             env=self.env, timeout=kw.pop("timeout", 60), **kw)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {res.returncode}: {res.stderr.strip()}\n"
                               f"{self.logs()}")
        return res

    def _start_munge(self) -> None:
        mu = pwd.getpwnam("munge")
        self.munge_dir.mkdir(mode=0o755, exist_ok=True)
        os.chown(self.munge_dir, mu.pw_uid, mu.pw_gid)
        self._run("runuser", "-u", "munge", "--", _which("munged"), f"--socket={self.socket}",
                  f"--pid-file={self.pid_files['munged']}", f"--log-file={self.munge_dir}/munged.log",
                  f"--seed-file={self.munge_dir}/munged.seed", f"--key-file={MUNGE_KEY}")
        cred = self._run("munge", "-n", f"--socket={self.socket}").stdout
        self._run("unmunge", f"--socket={self.socket}", input=cred)

    def start(self, timeout: float = 60.0) -> "LocalSlurm":
        self._write_conf()
        self._start_munge()
        self._run("slurmctld", "-i", "-f", str(self.conf))
        self._run("slurmd", "-N", "localhost", "-f", str(self.conf))
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            res = self._run("sinfo", "-h", "-N", "-o", "%t", check=False)
            state = res.stdout.strip()
            if state in ("idle", "mix", "alloc"):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"the local SLURM node did not become idle in {timeout:.0f} s "
                           f"(sinfo says {state!r})\n{self.logs()}")

    def logs(self, tail: int = 20) -> str:
        out = []
        for log in (self.root / "slurmctld.log", self.root / "slurmd.log", self.munge_dir / "munged.log"):
            if log.exists():
                lines = log.read_text(errors="replace").splitlines()[-tail:]
                out.append(f"--- {log} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(out)

    def _pid(self, name: str) -> int | None:
        try:
            pid = int(self.pid_files[name].read_text().split()[0])
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except (OSError, ValueError, IndexError):
            return None
        return pid if comm == name else None  # the pid file may be stale and the pid reused

    def stop(self, timeout: float = 20.0) -> None:
        """Cancel the remaining jobs, then stop slurmd, slurmctld and munged by their pids."""
        if self.conf.exists() and self._pid("slurmctld"):
            ids = self._run("squeue", "-h", "-o", "%A", check=False).stdout.split()
            if ids:
                self._run("scancel", *sorted(set(ids)), check=False)
                time.sleep(1.0)
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self._pid(name)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                if Path(f"/proc/{pid}/stat").exists() and \
                        Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                    break  # a zombie: exited, only waiting for its parent
                time.sleep(0.2)
            else:
                if Path(f"/proc/{pid}").exists():
                    os.kill(pid, signal.SIGKILL)

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


__all__ = ["LocalSlurm", "missing"]
