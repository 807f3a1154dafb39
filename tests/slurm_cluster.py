"""A real two-node SLURM cluster on this machine, for the tests.

munged, slurmctld and two slurmd daemons (named after two host names that
resolve to loopback, see loopback_names) run from one temporary
folder, on free ports, as root. No accounting daemon: an `sacct` stand-in on
PATH answers submitit's state queries from `scontrol show job`. `stop()` ends
only the daemons this object started.

Two settings keep the tests short: a requeued job waits cred_expire + 1 seconds
before it may start again (SLURM's default 120 s), and the main and backfill
schedulers pass every 2 s instead of every 60 and 30 s.
"""

import os
import shutil
import socket
import subprocess
import textwrap
import time
from pathlib import Path

from distill.launcher import free_port

PACKAGES = ["munge", "slurm-wlm", "slurmctld", "slurmd", "slurm-client"]

SACCT = r'''#!/usr/bin/env python3
"""sacct stand-in: `sacct -o JobID,State,NodeList --parsable2 -j ID ...` from scontrol."""
import subprocess, sys
ids = [sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == "-j"]
print("JobID|State|NodeList")
for jid in ids:
    out = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True).stdout
    for line in out.splitlines():
        f = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if "JobId" not in f:
            continue
        name = f["JobId"] if f.get("ArrayTaskId", "N/A") == "N/A" else f"{f['ArrayJobId']}_{f['ArrayTaskId']}"
        print(f"{name}|{f.get('JobState', 'UNKNOWN')}|{f.get('NodeList', '')}")
'''


def loopback_names() -> list:
    """Names that resolve to loopback, this machine's hostname first.

    SLURM reads NodeName=localhost as the machine's own hostname, so the two
    nodes need two other names; /etc/hosts usually holds them."""
    names = [socket.gethostname()]
    for line in Path("/etc/hosts").read_text().splitlines():
        fields = line.split("#")[0].split()
        if fields and fields[0].startswith("127."):
            names += [n for n in fields[1:] if n != "localhost"]
    unique = []
    for n in names:
        try:
            if n not in unique and socket.gethostbyname(n).startswith("127."):
                unique.append(n)
        except OSError:
            pass
    return unique


def available() -> str:
    """'' when a cluster can be started here, else why not."""
    if os.geteuid() != 0:
        return "SLURM tests need root (to run munged and slurmd)"
    if not all(shutil.which(b) for b in ("munged", "slurmctld", "slurmd", "sbatch")):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        done = subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            return f"could not install {PACKAGES}: {done.stderr[-500:]}"
    return ""


class LocalSlurm:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.procs = []
        self.nodes = loopback_names()[:2]
        self.conf = self.root / "slurm.conf"
        self.bin = self.root / "bin"

    @property
    def env(self) -> dict:
        return {"SLURM_CONF": str(self.conf), "PATH": f"{self.bin}:{os.environ['PATH']}"}

    def start(self) -> "LocalSlurm":
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        self._start_munge()
        self._write_conf()
        self.bin.mkdir(exist_ok=True)
        (self.bin / "sacct").write_text(SACCT)
        os.chmod(self.bin / "sacct", 0o755)
        env = dict(os.environ, **self.env)
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)], env, logs / "slurmctld.out")
        for node in self.nodes:
            self._spawn(["slurmd", "-D", "-N", node, "-f", str(self.conf)], env, logs / f"slurmd-{node}.out")
        self._wait_idle(env)
        return self

    def _spawn(self, cmd, env, log_file):
        self.procs.append(subprocess.Popen(cmd, env=env, stdout=open(log_file, "w"), stderr=subprocess.STDOUT))

    def _start_munge(self) -> None:
        munge = self.root / "munge"
        munge.mkdir(exist_ok=True)
        os.chmod(munge, 0o755)
        key = munge / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}", "--force"], check=True, capture_output=True)
        shutil.chown(key, "munge", "munge")
        os.chmod(key, 0o600)
        self.munge_socket = munge / "munge.sock"
        self._spawn(
            ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
             f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
             f"--seed-file={munge / 'munged.seed'}"],
            os.environ.copy(),
            munge / "munged.out",
        )
        deadline = time.time() + 20
        while not self.munge_socket.exists():
            if time.time() > deadline:
                raise RuntimeError(f"munged did not start: {(munge / 'munged.out').read_text()}")
            time.sleep(0.1)

    def _write_conf(self) -> None:
        r = self.root
        (r / "state").mkdir(exist_ok=True)
        (r / "spool").mkdir(exist_ok=True)
        node_lines = "\n".join(
            f"NodeName={n} NodeHostName={n} NodeAddr=127.0.0.1 Port={free_port()} CPUs=2 RealMemory=10000"
            for n in self.nodes
        )
        self.conf.write_text(textwrap.dedent(f"""\
            ClusterName=distilltest
            SlurmctldHost=localhost
            SlurmctldPort={free_port()}
            SlurmUser=root
            SlurmdUser=root
            AuthType=auth/munge
            CredType=cred/munge
            AuthInfo=socket={self.munge_socket},cred_expire=10
            CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
            StateSaveLocation={r / 'state'}
            SlurmdSpoolDir={r / 'spool'}/%n
            SlurmctldPidFile={r / 'slurmctld.pid'}
            SlurmdPidFile={r / 'slurmd-%n.pid'}
            SlurmctldLogFile={r / 'logs' / 'slurmctld.log'}
            SlurmdLogFile={r / 'logs' / 'slurmd-%n.log'}
            ProctrackType=proctrack/linuxproc
            TaskPlugin=task/none
            MpiDefault=none
            JobAcctGatherType=jobacct_gather/none
            AccountingStorageType=accounting_storage/none
            SelectType=select/cons_tres
            SelectTypeParameters=CR_Core
            ReturnToService=2
            MailProg=/bin/true
            MinJobAge=3600
            SchedulerParameters=sched_interval=2,bf_interval=2
            {node_lines}
            PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
            """))

    def _wait_idle(self, env, timeout=60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%n %T"], env=env, capture_output=True, text=True).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if len(states) == len(self.nodes) and all(s == "idle" for s in states.values()):
                return
            time.sleep(0.5)
        logs = "\n".join(p.read_text()[-2000:] for p in (self.root / "logs").glob("*"))
        raise RuntimeError(f"SLURM nodes not idle after {timeout}s:\n{logs}")

    def run(self, *cmd) -> str:
        return subprocess.run(list(cmd), env=dict(os.environ, **self.env), capture_output=True, text=True).stdout

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs = []


if __name__ == "__main__":
    import tempfile

    why = available()
    if why:
        raise SystemExit(why)
    cluster = LocalSlurm(Path(tempfile.mkdtemp())).start()
    print(cluster.run("sinfo"))
    print(cluster.run("srun", "-N2", "hostname"))
    cluster.stop()
