"""A real Slurm cluster on localhost for the e2e tests: munged, slurmctld and one slurmd per node.

Debian's slurm-wlm and munge are installed with apt-get when missing (CI runs as root on a fresh
machine); without root or apt the tests skip with that reason. Every daemon is started with its
own config and state under a temp dir and killed afterwards, so nothing of the host's setup is used.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time

NODES = ("node1", "node2")
_BINARIES = ("slurmctld", "slurmd", "sbatch", "munged")


def _which(name: str):
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")


def ensure_installed() -> str | None:
    """None when Slurm and munge are usable, else the reason to skip."""
    if all(_which(b) for b in _BINARIES):
        return None
    if os.geteuid() != 0:
        return "Slurm is not installed and installing it needs root (apt-get install slurm-wlm munge)"
    if not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install it (install slurm-wlm and munge)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode != 0:
            return f"{' '.join(cmd)} failed: {proc.stderr[-500:]}"
    missing = [b for b in _BINARIES if not _which(b)]
    return f"installed slurm-wlm and munge but {missing} are still missing" if missing else None


def _free_ports(n: int) -> list[int]:
    import socket
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


CRED_EXPIRE_S = 10


class SlurmCluster:
    def __init__(self, nodes=NODES, cpus: int = 2, memory_mb: int = 4000):
        self.nodes, self.cpus, self.memory_mb = nodes, cpus, memory_mb
        self.root = tempfile.mkdtemp(prefix="mgpt4-slurm-")
        self.procs: list[subprocess.Popen] = []
        self.conf = os.path.join(self.root, "slurm.conf")
        self.env = {**os.environ, "SLURM_CONF": self.conf}

    def _write_config(self) -> None:
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        for sub in ("state", "spool", "log", "munge"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        nodes = "\n".join(
            f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={p} CPUs={self.cpus} "
            f"RealMemory={self.memory_mb} State=UNKNOWN" for n, p in zip(self.nodes, node_ports))
        r = self.root
        with open(self.conf, "w") as f:
            f.write(f"""ClusterName=mgpt4test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
SchedulerType=sched/backfill
# Pending jobs (a requeued one once its hold ends) are looked at every second or two, not every 30-60 s.
SchedulerParameters=sched_interval=2,bf_interval=1
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# Jobs stay visible to `scontrol show job` after they end (no accounting database here).
MinJobAge=600
KillWait=5
InactiveLimit=0
Waittime=0
{nodes}
PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")

    def _start(self, cmd: list[str]) -> None:
        log = open(os.path.join(self.root, "log", os.path.basename(cmd[0]) + f"-{len(self.procs)}.out"), "w")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))

    def start(self, timeout: float = 60) -> "SlurmCluster":
        self._write_config()
        key, sock = os.path.join(self.root, "munge", "munge.key"), os.path.join(self.root, "munge", "munge.sock")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        os.chmod(os.path.join(self.root, "munge"), 0o700)
        self._start([_which("munged"), "-F", "--force", f"--key-file={key}", f"--socket={sock}",
                     f"--pid-file={self.root}/munge/munged.pid", f"--log-file={self.root}/log/munged.log",
                     f"--seed-file={self.root}/munge/seed"])
        # Slurm's munge plugins find the daemon through this socket. cred_expire is also how long Slurm
        # holds a requeued job (BeginTime) so that no node still refuses it as revoked: 120 s by default,
        # CRED_EXPIRE_S here to keep the requeue tests short.
        with open(self.conf, "a") as f:
            f.write(f"AuthInfo=socket={sock},cred_expire={CRED_EXPIRE_S}\n")
        deadline = time.time() + 10
        while not os.path.exists(sock) and time.time() < deadline:
            time.sleep(0.1)
        self._start([_which("slurmctld"), "-D", "-i", "-f", self.conf])
        for n in self.nodes:
            self._start([_which("slurmd"), "-D", "-N", n, "-f", self.conf])
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split("\n")
            states = dict(line.split() for line in out if line.strip())
            if len(states) == len(self.nodes) and all(s == "idle" for s in states.values()):
                return self
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode}; logs in {self.root}/log")
            time.sleep(0.5)
        raise RuntimeError(f"Slurm nodes not idle after {timeout}s ({states}); logs in {self.root}/log")

    def run(self, cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**self.env, **kw.pop("env", {})}, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def idle(self) -> bool:
        """Every node idle: no job, and no job still being cleaned up."""
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split("\n")
        return all(line.split()[1] == "idle" for line in out if line.strip())

    def log_tail(self, chars: int = 3000) -> str:
        """The end of slurmctld's log, for assertion messages (the logs go with the cluster)."""
        try:
            with open(os.path.join(self.root, "log", "slurmctld.log")) as f:
                return f.read()[-chars:]
        except OSError:
            return ""

    def batch_output(self, job_id: int) -> str:
        """What a job's batch shell printed (sbatch --output in this cluster's log dir)."""
        try:
            with open(os.path.join(self.root, "log", f"batch-{job_id}.out")) as f:
                return f.read()
        except OSError:
            return ""

    def sbatch(self, args: list[str], env: dict | None = None, cwd: str | None = None) -> int:
        out = self.run(["sbatch", "--parsable", *args], env=env or {}, cwd=cwd).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict:
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait_job(self, job_id: int, timeout: float, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                           "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in until:
                return info
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} still {info.get('JobState')} after {timeout}s: {info}")

    def stop(self) -> None:
        # Cancel jobs first: their tasks run under slurmstepd, which outlives slurmd if left alone.
        self.run(["scancel", "--partition=debug"], check=False)
        deadline = time.time() + 20
        while time.time() < deadline and self.run(["squeue", "-h"], check=False).stdout.strip():
            time.sleep(0.5)
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        shutil.rmtree(self.root, ignore_errors=True)
