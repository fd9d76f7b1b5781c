"""A real single-host SLURM (munged + slurmctld + slurmd) living in one folder, for the SLURM tests.

Why its own folder and ports: no system service is touched (container images keep apt from
starting daemons), two clusters never collide, and stopping is killing three PIDs we started.
Recipe and gotchas: ../shared/notes/slurm-local.md. Also a CLI for .ci/slurm-up.sh / slurm-down.sh:
    python tests/slurm_cluster.py up DIR    # prints `export SLURM_CONF=...`
    python tests/slurm_cluster.py down DIR
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from mugs.core.ports import free_port

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo", "squeue")
DAEMONS = ("slurmd", "slurmctld", "munged")  # stop order


def missing() -> str | None:
    """Why a cluster cannot start here (None if it can)."""
    absent = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if absent:
        return f"SLURM not installed (missing {', '.join(absent)}): run .ci/slurm-up.sh"
    if os.geteuid() != 0:
        return "the local SLURM runs its daemons as root (SlurmUser=root)"
    return None


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _alive(pid: int) -> bool:
    """Zombies count as dead: PID 1 may reap our exited daemons late."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


class LocalSlurm:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.conf = self.root / "slurm.conf"
        self.env: dict[str, str] = {**os.environ, "SLURM_CONF": str(self.conf)}

    # --- configuration
    def _node(self) -> str:
        name = socket.gethostname().split(".")[0]
        try:
            socket.gethostbyname(name)
            return name
        except OSError:
            return "localhost"

    def _hardware(self) -> str:
        """CPU layout from `slurmd -C` and 90% of its memory (slurmd refuses a node that claims more)."""
        out = subprocess.run([_exe("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
        fields = dict(re.findall(r"(\w+)=(\S+)", out.splitlines()[0]))
        keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
        return " ".join(f"{k}={fields[k]}" for k in keys) + f" RealMemory={int(int(fields['RealMemory']) * 0.9)}"

    def write_config(self) -> None:
        r, node = self.root, self._node()
        for d in ("state", "slurmd", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        for d in (r, r / "munge"):  # munged wants its socket folder and the one above it 0755
            os.chmod(d, 0o755)
        key = r / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            os.chmod(key, 0o400)
        self.conf.write_text(f"""\
ClusterName=localci
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: the default 120 s would hold a requeued job's restart for two minutes
AuthInfo=socket={r}/munge/munge.socket,cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/slurmd
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=5
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobRequeue=1
ReturnToService=2
MailProg=/bin/true
NodeName={node} NodeAddr=127.0.0.1 {self._hardware()}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    # --- life cycle
    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, check=check, timeout=timeout)

    def start(self, timeout: float = 30) -> LocalSlurm:
        self.write_config()
        m = self.root / "munge"
        subprocess.run(
            [
                _exe("munged"),
                f"--key-file={m / 'munge.key'}",
                f"--socket={m / 'munge.socket'}",
                f"--pid-file={m / 'munged.pid'}",
                f"--log-file={m / 'munged.log'}",
                f"--seed-file={m / 'munged.seed'}",
            ],
            check=True,
            env=self.env,
        )
        self._wait(lambda: (m / "munge.socket").exists(), timeout, "munged socket")
        subprocess.run([_exe("slurmctld"), "-f", str(self.conf)], check=True, env=self.env)
        subprocess.run([_exe("slurmd"), "-f", str(self.conf), "-N", self._node()], check=True, env=self.env)
        self._wait(self.idle, timeout, "an idle node")
        return self

    def idle(self) -> bool:
        r = self.run("sinfo", "-h", "-o", "%t", check=False, timeout=10)
        return r.returncode == 0 and r.stdout.strip() == "idle"

    def is_up(self) -> bool:
        """slurmctld answers (client commands would otherwise retry for a long time)."""
        pid = self.root / "slurmctld.pid"
        if not (self.conf.exists() and pid.exists() and _alive(int(pid.read_text().strip() or 0))):
            return False
        try:
            return "UP" in self.run("scontrol", "ping", check=False, timeout=10).stdout
        except subprocess.TimeoutExpired:
            return False

    def _pids(self) -> list[int]:
        files = [self.root / "slurmd.pid", self.root / "slurmctld.pid", self.root / "munge" / "munged.pid"]
        return [int(f.read_text().strip()) for f in files if f.exists() and f.read_text().strip()]

    def _stepds(self) -> list[int]:
        """slurmstepd processes of this cluster (their cwd is our folder): one whose job was cut short
        can outlive slurmd, waiting for it forever."""
        pids = []
        for proc in Path("/proc").iterdir():
            try:
                if (
                    proc.name.isdigit()
                    and (proc / "comm").read_text().strip() == "slurmstepd"
                    and os.readlink(proc / "cwd").removesuffix(" (deleted)") == str(self.root)
                ):
                    pids.append(int(proc.name))
            except OSError:
                continue
        return pids

    def stop(self, timeout: float = 20) -> None:
        """Cancel jobs (slurmd then ends their processes), then end the daemons and stray steps by PID."""
        if self.conf.exists() and self.is_up():
            self.run("scancel", "--full", "--quiet", "-u", "root", check=False, timeout=10)
            self._wait(lambda: not self.run("squeue", "-h", check=False, timeout=10).stdout.strip(), 10, None)
        for pid in self._pids():
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            if not self._wait(lambda pid=pid: not _alive(pid), timeout, None):
                os.kill(pid, signal.SIGKILL)
        for pid in self._stepds():  # they ignore SIGTERM
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    @staticmethod
    def _wait(cond, timeout: float, what: str | None) -> bool:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if cond():
                return True
            time.sleep(0.2)
        if what:
            raise TimeoutError(f"local SLURM: no {what} after {timeout:.0f} s")
        return False

    def log_tail(self, n: int = 30) -> str:
        parts = []
        for f in (self.root / "slurmctld.log", self.root / "slurmd.log"):
            if f.exists():
                parts.append(f"--- {f}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-n:]))
        return "\n".join(parts)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("up", "down"):
        print(__doc__, file=sys.stderr)
        return 2
    cluster = LocalSlurm(Path(argv[1]))
    if argv[0] == "up":
        reason = missing()
        if reason:
            print(reason, file=sys.stderr)
            return 1
        if not cluster.is_up():
            cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
