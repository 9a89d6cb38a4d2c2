"""A real single-machine Slurm cluster for tests, started and stopped from Python.

The project carries this itself so that a plain clone (and CI, as root on a fresh Debian
machine) can run its Slurm tests. It follows the team's tested shell helpers
(shared/services/slurm-up.sh, slurm-down.sh) and their lessons:

- Debian's ``slurm-wlm`` and ``munge`` are installed when missing (root only), with a
  temporary ``/usr/sbin/policy-rc.d`` so the packages do not start system-wide daemons;
- everything lives in one state dir: config, munge key and socket, spool, logs. The munge
  socket path must stay under ~100 characters, so keep the state dir path short;
- munged (user ``munge``) needs o+x on every directory above its socket; pytest's basetemp
  is 0700, so then it runs as root with ``--force`` (all clients here are root anyway);
- ``cred_expire=10``: a requeued job restarts after ~10 s instead of Slurm's default 120 s;
- ``sbatch --wait`` polls only at 2, 10, 42, 74... s, so ``wait_job`` polls the job state
  itself every 0.25 s;
- several nodes on one machine are several ``slurmd -N nK`` (own port each, NodeAddr
  127.0.0.1); inside a job tell them apart by ``SLURMD_NODENAME``/``SLURM_NODEID``;
- proctrack/linuxproc loses a job process whose parent exited, so ``stop`` also kills any
  process whose environment names this cluster's ``SLURM_CONF`` and a ``SLURMD_NODENAME``;
- daemons run in their own sessions with stdin /dev/null and logs in files; they are
  stopped by the pids this object started, never by name.

Usage::

    with SlurmCluster(tmp_dir, nodes=2) as cluster:
        job_id = cluster.sbatch(["--nodes=2", "job.sh"])
        assert cluster.wait_job(job_id, timeout_s=60) == "COMPLETED"
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import NoReturn

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("slurmctld", "slurmd", "munged", "mungekey", "sinfo", "scontrol", "sbatch", "squeue", "scancel")
FINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
    }
)
LOG_TAIL_LINES = 25
MAX_SOCKET_PATH = 100


def _sbin_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the sbin folders on PATH, where the daemons live."""
    env = dict(os.environ if base is None else base)
    parts = env.get("PATH", "/usr/bin:/bin").split(":")
    env["PATH"] = ":".join(parts + [p for p in ("/usr/sbin", "/sbin") if p not in parts])
    return env


def _which(name: str) -> str | None:
    return shutil.which(name, path=_sbin_env()["PATH"])


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run here (not root and not installed): tests skip with this message."""


class SlurmClusterError(RuntimeError):
    """The cluster did not come up; the message holds the tails of the daemon logs."""


def ensure_packages() -> None:
    """Install slurm-wlm and munge with apt-get when their programs are missing (needs root)."""
    if all(_which(name) for name in DAEMONS):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(
            f"Slurm is not installed and installing it needs root: apt-get install {' '.join(PACKAGES)}"
        )
    if not _which("apt-get"):
        raise SlurmUnavailable(
            f"Slurm is not installed and there is no apt-get to install {' '.join(PACKAGES)}"
        )
    env = {**_sbin_env(), "DEBIAN_FRONTEND": "noninteractive"}
    apt = ["apt-get", "-q", "-o", "DPkg::Lock::Timeout=300"]
    install = [*apt, "install", "-y", "--no-install-recommends", *PACKAGES]
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = not policy.exists()
    if made_policy:  # keep the packages' maintainer scripts from starting system-wide daemons
        policy.write_text("#!/bin/sh\n# temporary, by unetdist tests/services/slurm_cluster.py\nexit 101\n")
        policy.chmod(0o755)
    try:
        result = subprocess.run(install, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if result.returncode != 0:  # stale package lists: update once, then retry
            subprocess.run([*apt, "update"], env=env, capture_output=True, stdin=subprocess.DEVNULL)
            result = subprocess.run(
                install, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL
            )
        if result.returncode != 0:
            raise SlurmClusterError(
                f"{' '.join(install)} failed ({result.returncode}):\n{result.stderr[-3000:]}"
            )
    finally:
        if made_policy and "unetdist" in policy.read_text():
            policy.unlink()
    missing = [name for name in DAEMONS if not _which(name)]
    if missing:
        raise SlurmClusterError(f"{', '.join(missing)} not found after installing {' '.join(PACKAGES)}")


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that were free on this machine a moment ago (chosen by the kernel)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("0.0.0.0", 0))  # free on every address, so 127.0.0.1 and the host name both work
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _hardware_line() -> str:
    """This machine's ``CPUs=.. Boards=.. ... RealMemory=..`` as ``slurmd -C`` reports it."""
    out = subprocess.run(
        ["slurmd", "-C"], env=_sbin_env(), capture_output=True, text=True, stdin=subprocess.DEVNULL
    ).stdout
    keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    fields = [item for item in out.split() if item.split("=")[0] in keys]
    if not any(item.startswith("CPUs=") for item in fields):
        raise SlurmClusterError(f"could not read this machine's hardware with 'slurmd -C': {out!r}")
    return " ".join(fields)


class SlurmCluster:
    """munged + slurmctld + ``nodes`` slurmd (n1..nN) on 127.0.0.1, all state under ``state_dir``.

    Partitions: ``debug`` (default, jobs are requeued when preempted) and ``urgent``
    (preempts ``debug``). ``env()`` is the client environment (``SLURM_CONF``) for
    sbatch/srun/scontrol; the helpers here pass it themselves.
    """

    def __init__(self, state_dir: str | os.PathLike[str], nodes: int = 1, kill_wait_s: int = 10) -> None:
        if not 1 <= nodes <= 99:
            raise ValueError(f"nodes must be 1..99, got {nodes}")
        self.state_dir = Path(state_dir).resolve()
        self.nodes = nodes
        self.kill_wait_s = kill_wait_s
        self.conf = self.state_dir / "etc" / "slurm.conf"
        self.socket = self.state_dir / "munge" / "munge.socket"
        self.node_names = [f"n{k}" for k in range(1, nodes + 1)]
        self._daemons: dict[str, subprocess.Popen[bytes]] = {}

    # ------------------------------------------------------------ client side

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) without inherited job variables, plus SLURM_CONF.

        Dropping ``SLURM_*``/``SBATCH_*`` matters when the tests themselves run inside a
        Slurm job: sbatch would otherwise read the outer job's settings.
        """
        env = {k: v for k, v in (os.environ if base is None else base).items()
               if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}  # fmt: skip
        env["SLURM_CONF"] = str(self.conf)
        return _sbin_env(env)

    def run(
        self, args: Sequence[str], timeout_s: float = 30.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command (``["scontrol", "requeue", "7"]``) against this cluster."""
        result = subprocess.run(
            list(args),
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise SlurmClusterError(f"{' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def sbatch(
        self,
        args: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> int:
        """Submit a batch job; returns its id. ``env`` is added to the submitting environment."""
        result = subprocess.run(
            ["sbatch", "--parsable", *args],
            env={**self.env(), **(env or {})},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise SlurmClusterError(
                f"sbatch {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}"
            )
        return int(result.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """``scontrol -o show job ID`` as a dict (JobState, RestartCnt, NodeList, ExitCode, ...); {} if unknown."""
        result = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False)
        if result.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", result.stdout))

    def job_state(self, job_id: int) -> str:
        return self.job_info(job_id).get("JobState", "UNKNOWN")

    def wait_job(self, job_id: int, timeout_s: float, states: frozenset[str] = FINAL_STATES) -> str:
        """Poll every 0.25 s until the job reaches one of ``states``; returns it (raises on timeout)."""
        deadline = time.monotonic() + timeout_s
        state = "UNKNOWN"
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(0.25)
        raise TimeoutError(f"job {job_id} still {state} after {timeout_s:.0f} s (wanted {sorted(states)})")

    # ------------------------------------------------------------ daemons

    def start(self, timeout_s: float = 60.0) -> SlurmCluster:
        """Install when needed, write the config, start the daemons, wait until every node is idle."""
        ensure_packages()
        if len(str(self.socket)) >= MAX_SOCKET_PATH:
            raise SlurmClusterError(f"state dir path too long for munge's unix socket ({len(str(self.socket))} chars): "
                                    f"{self.socket}; use a shorter state dir")  # fmt: skip
        for sub in ("etc", "log", "run", "spool/ctld", "tmp", "munge"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        self.state_dir.chmod(0o755)
        try:
            self._start_munged()
            self._write_config()
            self._spawn(
                "slurmctld", ["slurmctld", "-D", "-f", str(self.conf)], self.state_dir / "spool" / "ctld"
            )
            for name in self.node_names:
                # slurmstepd inherits slurmd's cwd: keep it in the state dir
                cwd = self.state_dir / "spool" / f"slurmd-{name}"
                self._spawn(f"slurmd-{name}", ["slurmd", "-D", "-f", str(self.conf), "-N", name], cwd)
            self._wait_idle(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, command: list[str], cwd: Path) -> None:
        cwd.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / "log" / f"{name}.out", "ab") as log:
            self._daemons[name] = subprocess.Popen(
                command,
                env=self.env(),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _start_munged(self) -> None:
        munge_dir = self.socket.parent
        key = munge_dir / "munge.key"
        if not key.exists():
            subprocess.run(["mungekey", "--create", "--bits=1024", f"--keyfile={key}"], check=True,
                           env=_sbin_env(), capture_output=True, stdin=subprocess.DEVNULL)  # fmt: skip
        for stale in (self.socket, Path(f"{self.socket}.lock"), munge_dir / "munged.pid"):
            stale.unlink(missing_ok=True)
        args = [
            "munged", "--foreground", f"--socket={self.socket}", f"--key-file={key}",
            f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_dir / 'munged.log'}",
            f"--seed-file={munge_dir / 'munged.seed'}", "--num-threads=4",
        ]  # fmt: skip
        if self._munge_user_can_reach(munge_dir):
            user = pwd.getpwnam("munge")
            uid, gid = user.pw_uid, user.pw_gid
            command = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *args]
        else:  # an ancestor lacks o+x (pytest's 0700 basetemp): run as root, which munged refuses without --force
            uid, gid = 0, 0
            command = [*args, "--force"]
        for path in (munge_dir, key):
            os.chown(path, uid, gid)
        munge_dir.chmod(0o755)
        key.chmod(0o600)
        self._spawn("munged", command, munge_dir)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._daemons["munged"].poll() is not None:
                self._fail("munged exited at start")
            if self.socket.exists() and self._munge_roundtrip():
                return
            time.sleep(0.1)
        self._fail(f"munged socket {self.socket} did not answer within 10 s")

    @staticmethod
    def _munge_user_can_reach(munge_dir: Path) -> bool:
        try:
            pwd.getpwnam("munge")
        except KeyError:
            return False
        probe = ["setpriv", "--reuid=munge", "--regid=munge", "--clear-groups", "test", "-x", str(munge_dir)]
        return subprocess.run(probe, capture_output=True, stdin=subprocess.DEVNULL).returncode == 0

    def _munge_roundtrip(self) -> bool:
        encode = subprocess.run(
            ["munge", "-n", "-S", str(self.socket)], capture_output=True, stdin=subprocess.DEVNULL
        )
        if encode.returncode != 0:
            return False
        decode = subprocess.run(["unmunge", "-S", str(self.socket)], input=encode.stdout, capture_output=True)
        return decode.returncode == 0

    def _write_config(self) -> None:
        s = self.state_dir
        ctld_port, *node_ports = free_ports(1 + self.nodes)
        host = socket.gethostname().split(".")[0]
        hardware = _hardware_line()
        nodelist = ",".join(self.node_names)
        lines = [
            "# Generated by unetdist tests/services/slurm_cluster.py for a private test cluster.",
            "ClusterName=unetdist",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={node_ports[0]}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # a short credential lifetime: a requeued job restarts after ~10 s, not 120 s
            f"AuthInfo=socket={self.socket},cred_expire=10",
            "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny",
            f"StateSaveLocation={s}/spool/ctld",
            f"SlurmdSpoolDir={s}/spool/slurmd-%n",
            f"SlurmctldPidFile={s}/run/slurmctld.pid",
            f"SlurmdPidFile={s}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={s}/log/slurmctld.log",
            f"SlurmdLogFile={s}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"TmpFS={s}/tmp",
            "MailProg=/bin/true",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={s}/log/jobcomp.txt",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "JobRequeue=1",
            "MinJobAge=300",
            "ReturnToService=2",
            f"KillWait={self.kill_wait_s}",
            "InactiveLimit=0",
            "PreemptType=preempt/partition_prio",
            "PreemptMode=REQUEUE",
        ]
        for name, port in zip(self.node_names, node_ports, strict=True):
            lines.append(
                f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} {hardware} State=UNKNOWN"
            )
        lines.append(f"PartitionName=debug Nodes={nodelist} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 "
                     "PreemptMode=REQUEUE")  # fmt: skip
        lines.append(f"PartitionName=urgent Nodes={nodelist} Default=NO MaxTime=INFINITE State=UP PriorityTier=10 "
                     "PreemptMode=OFF")  # fmt: skip
        self.conf.write_text("\n".join(lines) + "\n")

    def _wait_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        states = ""
        while True:
            for name, process in self._daemons.items():
                if process.poll() is not None:
                    self._fail(f"{name} exited with {process.returncode} during start-up")
            result = self.run(["sinfo", "-h", "-N", "-p", "debug", "-o", "%N=%T"], check=False, timeout_s=10)
            states = " ".join(sorted(set(result.stdout.split())))
            if sum(f"{name}=idle" in states.split() for name in self.node_names) == self.nodes:
                return
            if time.monotonic() > deadline:
                self._fail(
                    f"nodes not idle after {timeout_s:.0f} s (sinfo: {states or result.stderr.strip()})"
                )
            time.sleep(0.3)

    def stop(self, timeout_s: float = 15.0) -> None:
        """Cancel all jobs, stop the daemons this object started, kill leftover job processes. Idempotent."""
        if not self._daemons:
            return
        ctld = self._daemons.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            jobs = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout_s=10).stdout.split()
            if jobs:
                self.run(["scancel", *jobs], check=False, timeout_s=10)
                deadline = time.monotonic() + self.kill_wait_s + 20
                while time.monotonic() < deadline:
                    left = self.run(["squeue", "-h", "-t", "running,completing,configuring", "-o", "%i"],
                                    check=False, timeout_s=10).stdout.split()  # fmt: skip
                    if not left:
                        break
                    time.sleep(0.5)
        # slurmd(s) first, then slurmctld, then munged (the others authenticate through it)
        order = [n for n in self._daemons if n.startswith("slurmd-")] + ["slurmctld", "munged"]
        for group in (order[:-2], ["slurmctld"], ["munged"]):
            self._terminate([self._daemons[n] for n in group if n in self._daemons], timeout_s)
        self._daemons.clear()
        self._kill_leftover_job_processes()

    @staticmethod
    def _terminate(processes: list[subprocess.Popen[bytes]], timeout_s: float) -> None:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + timeout_s
        for process in processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _kill_leftover_job_processes(self) -> None:
        """Job processes that outlived their job: their environment names this cluster (see module doc)."""
        marker = f"SLURM_CONF={self.conf}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in environ and any(item.startswith(b"SLURMD_NODENAME=") for item in environ):
                try:
                    os.kill(int(entry.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        parts = []
        for path in sorted((self.state_dir / "log").glob("*")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"----- {path} -----\n" + "\n".join(text))
        return "\n".join(parts)

    def _fail(self, message: str) -> NoReturn:
        tail = self.log_tail()
        self.stop(timeout_s=5.0)
        raise SlurmClusterError(f"{message}; logs in {self.state_dir / 'log'}:\n{tail}")

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
