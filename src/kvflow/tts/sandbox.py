"""Run untrusted code (a model's candidate program) in a child process that cannot hurt the host.

Each program runs in its own process, in a fresh temporary directory that is its working directory
and HOME, with:
- limits (resource.setrlimit): CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS), no new
  processes (RLIMIT_NPROC 0: fork fails), files of at most `file_bytes` (RLIMIT_FSIZE), no core
  dumps, and a wall-clock timeout after which its whole process group is killed;
- no network: a new network namespace (unshare(CLONE_NEWNET), as root; else inside a new user
  namespace), holding only a down loopback. Where the kernel refuses namespaces, the child's
  `socket` module is replaced by one that refuses to connect instead (`network` says which);
- nothing of the host writable: run as root, the child drops to the unprivileged `nobody` user
  (which owns only the temporary directory), and because RLIMIT_NPROC does not bind root, this is
  also what makes the fork limit hold. Run as another user, it keeps that user's own rights.
  Output goes to a file in the temporary directory (bounded by RLIMIT_FSIZE), never to an
  unbounded pipe.

A program that loops, forks or allocates without bound is killed or gets an error, and counts as
a failure.

The child is set up by this file run as a small launcher (`python -I sandbox.py --launch ...`,
stdlib only) that applies the namespaces, the user drop and the limits, then execs the candidate:
no preexec_fn, so it is safe from a parent full of threads (torch's)."""
from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
NOBODY = 65534
_NO_SOCKETS = """\
import socket as _s
def _refuse(*a, **k):
    raise OSError("network disabled in the sandbox")
_s.socket.connect = _s.socket.connect_ex = _s.socket.bind = _refuse
_s.create_connection = _s.getaddrinfo = _refuse
del _s, _refuse
"""


@dataclass
class SandboxLimits:
    cpu_seconds: int = 4
    wall_seconds: float = 8.0
    memory_bytes: int = 1 << 30  # address space; Python itself needs ~100 MiB of it
    file_bytes: int = 1 << 20


@dataclass
class RunResult:
    status: str  # "passed" | "failed" (non-zero exit or exception) | "timeout" | "killed" (a signal)
    returncode: int | None
    output: str  # the tail of stdout + stderr
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _libc_unshare(flags: int) -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).unshare(flags) == 0
    except (OSError, AttributeError):
        return False


def _child_setup(limits: SandboxLimits, drop_to: int | None, isolate_net: bool) -> None:
    """In the launcher, before exec: namespaces first (they need privileges), then the user drop,
    then the limits."""
    if isolate_net:
        _libc_unshare(CLONE_NEWNET) or _libc_unshare(CLONE_NEWUSER | CLONE_NEWNET)
    if drop_to is not None:
        os.setgroups([])
        os.setgid(drop_to)
        os.setuid(drop_to)
    for which, value in ((resource.RLIMIT_CPU, limits.cpu_seconds), (resource.RLIMIT_AS, limits.memory_bytes),
                         (resource.RLIMIT_FSIZE, limits.file_bytes), (resource.RLIMIT_NPROC, 0),
                         (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(which, (value, value))


@lru_cache(maxsize=None)
def sandbox_setup() -> tuple[str, int | None, str]:
    """(python to run, uid to drop to, how the network is cut), probed once. Running as root, the
    child becomes `nobody`, who may not be able to read this process's interpreter (a home-dir
    pyenv, say): then the system's python3 runs the candidates."""
    drop_to = NOBODY if os.geteuid() == 0 else None
    pythons = [sys.executable] + [p for p in ("/usr/bin/python3", shutil.which("python3")) if p]
    python = next((p for p in pythons if _probe(p, drop_to, isolate_net=False) == 0), None)
    if python is None:
        raise RuntimeError("no Python interpreter runs under the sandbox's user")
    net = "namespace" if _probe(python, drop_to, isolate_net=True, code=_NET_PROBE) == 0 else "socket-patch"
    return python, drop_to, net


_NET_PROBE = "import socket; import sys; sys.exit(0 if [n for _, n in socket.if_nameindex()] == ['lo'] else 1)"


def _launcher(limits: SandboxLimits, drop_to: int | None, isolate_net: bool) -> list[str]:
    return [sys.executable, "-I", os.path.abspath(__file__), "--launch", str(limits.cpu_seconds),
            str(limits.memory_bytes), str(limits.file_bytes), str(-1 if drop_to is None else drop_to),
            str(int(isolate_net))]


def _probe(python: str, drop_to: int | None, isolate_net: bool, code: str = "pass") -> int | None:
    try:
        return subprocess.run(_launcher(SandboxLimits(), drop_to, isolate_net) + [python, "-I", "-c", code],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              cwd="/", env={"PATH": "/usr/bin:/bin"}, timeout=30).returncode
    except (OSError, subprocess.SubprocessError):
        return None


def run_program(source: str, limits: SandboxLimits | None = None) -> RunResult:
    """Run `source` as a Python program under the sandbox; passed means it exited 0 in time."""
    limits = limits or SandboxLimits()
    python, drop_to, net = sandbox_setup()
    workdir = tempfile.mkdtemp(prefix="kvflow-sandbox-")
    try:
        if drop_to is not None:
            os.chown(workdir, drop_to, drop_to)
        os.chmod(workdir, 0o700)
        program = os.path.join(workdir, "candidate.py")
        with open(program, "w") as f:
            f.write((_NO_SOCKETS if net != "namespace" else "") + source)
        log_path = os.path.join(workdir, "output.log")
        with open(log_path, "wb") as log:
            if drop_to is not None:
                os.chown(log_path, drop_to, drop_to)
            return _run(python, program, workdir, log, log_path, limits, drop_to, net == "namespace")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run(python, program, workdir, log, log_path, limits, drop_to, isolate_net) -> RunResult:
    started = time.perf_counter()
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.Popen(_launcher(limits, drop_to, isolate_net) + [python, "-I", "-B", program], cwd=workdir,
                            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        code = proc.wait(timeout=limits.wall_seconds)
        status = "passed" if code == 0 else ("killed" if code < 0 else "failed")
    except subprocess.TimeoutExpired:
        code, status = None, "timeout"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: anything it managed to start
        except ProcessLookupError:
            pass
        proc.wait()
    with open(log_path, "rb") as f:
        f.seek(max(0, os.path.getsize(log_path) - 2000))
        output = f.read().decode("utf-8", "replace")
    return RunResult(status, code, output, time.perf_counter() - started)


def _launch(argv: list[str]) -> None:
    cpu, memory, file_bytes, drop_to, isolate_net = argv[:5]
    limits = SandboxLimits(cpu_seconds=int(cpu), memory_bytes=int(memory), file_bytes=int(file_bytes))
    _child_setup(limits, None if int(drop_to) < 0 else int(drop_to), isolate_net == "1")
    os.execv(argv[5], argv[5:])


if __name__ == "__main__" and sys.argv[1:2] == ["--launch"]:
    _launch(sys.argv[2:])
