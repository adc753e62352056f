"""Child processes that cannot outlive their parent, and helpers to wait for them to be ready."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from typing import IO, Mapping, Sequence


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def guarded_argv(argv: Sequence[str]) -> list[str]:
    """Prefix argv so Linux sends SIGTERM to the child when its parent dies.

    `setpriv --pdeathsig` (util-linux) does it without a preexec_fn, which is
    unsafe in a process that runs threads (grpc does).
    """
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, "--pdeathsig", "TERM", "--", *argv]
    return list(argv)


# Set by `clowder up` in its children's environment (and inherited by the runtimes the controller starts):
# the pid of the supervising `clowder up`. A process that must outlive its direct parent (a runtime outlives
# a killed controller) watches this pid instead and stops itself once the supervisor is gone.
SUPERVISOR_ENV = "CLOWDER_SUPERVISOR_PID"
PARENT_ENV = "CLOWDER_PARENT_PID"
PR_SET_CHILD_SUBREAPER = 36


def child_env(extra: Mapping[str, str] | None = None, die_with_parent: bool = True) -> dict[str, str]:
    env = dict(os.environ)
    if die_with_parent:
        env[PARENT_ENV] = str(os.getpid())
    else:
        # Inherited from our own parent, it would make the child kill itself at once (its parent differs).
        env.pop(PARENT_ENV, None)
    env.update(extra or {})
    return env


def spawn(argv: Sequence[str], log_file: IO[bytes] | None, env: Mapping[str, str] | None = None,
          cwd: str | None = None, die_with_parent: bool = True) -> subprocess.Popen:
    """Start a child in its own session (Ctrl-C reaches only the supervisor, which stops children in order).

    die_with_parent=False: the child survives us (a runtime outlives its controller); it is then reaped by
    the nearest subreaper (`clowder up`) and watches CLOWDER_SUPERVISOR_PID instead.
    """
    return subprocess.Popen(
        guarded_argv(argv) if die_with_parent else list(argv),
        stdin=subprocess.DEVNULL,
        stdout=log_file if log_file is not None else subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        env=child_env(env, die_with_parent),
        cwd=cwd,
        start_new_session=True,
    )


def terminate(proc: subprocess.Popen, grace: float = 10.0) -> int | None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL. Returns the exit code."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        proc.send_signal(signal.SIGTERM)
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)
    except ProcessLookupError:
        return proc.poll()


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as dead.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before opening {host}:{port}")
        if port_open(host, port):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


async def async_wait_for_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 0.5)
            writer.close()
            return
        except (OSError, asyncio.TimeoutError):
            await asyncio.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): with the pid, an identity
    that survives pid reuse. None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process instead of init (Linux PR_SET_CHILD_SUBREAPER).

    `clowder up` uses it so runtimes orphaned by a killed controller stay its children: it can stop them at
    shutdown and reaps them when they exit. False where the call is not available.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    return False


def child_pids(parent: int | None = None) -> list[int]:
    """Direct children of `parent` (default: this process), zombies included, from /proc."""
    parent = os.getpid() if parent is None else parent
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            found.append(int(entry.name))
    return found


def _a_child_exited() -> bool:
    """Whether some child has exited and waits to be collected; it is left uncollected (WNOWAIT).

    True where the platform has no waitid (macOS): the caller then looks at every child, as before."""
    if not hasattr(os, "waitid"):
        return True
    try:
        return os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # no children at all
        return False


def reap_children(keep: Sequence[int] = ()) -> list[tuple[int, int]]:
    """Collect exited children other than `keep` (those a Popen object waits for itself).

    Returns (pid, exit code) for each one reaped; negative codes are signals, as in Popen.returncode.
    """
    if not _a_child_exited():
        # The usual case, and `clowder up` asks five times a second: one syscall instead of reading
        # every process's /proc entry (that scan was 1% of a core on an idle cluster).
        return []
    reaped = []
    for pid in child_pids():
        if pid in keep:
            continue
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue
        if got:
            reaped.append((pid, os.waitstatus_to_exitcode(status)))
    return reaped


def stop_pids(pids: Sequence[int], grace: float, keep: Sequence[int] = ()) -> list[int]:
    """SIGTERM every pid, wait up to `grace` seconds for all, SIGKILL what is left; reaps our own children.

    `keep`: our children that a Popen object reaps itself. Returns the pids still alive after SIGKILL and
    5 more seconds (should be none).
    """
    pids = list(pids)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)

    def alive() -> list[int]:
        reap_children(keep)
        return [p for p in pids if pid_alive(p)]

    deadline = time.monotonic() + grace
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in alive():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive()
