"""The supervisor's restart loop on real child processes that listen on a port (no cluster needed)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from rich.console import Console

from clowder_cli import paths, supervisor as supervisor_module
from clowder_cli.main import main as clowder_main
from clowder_cli.supervisor import BACKOFF, RUNNING, Component, Supervisor
from clowder_common.processes import free_port, spawn, terminate

LISTENER = "import socket, sys, time\ns = socket.socket()\ns.bind(('127.0.0.1', int(sys.argv[1])))\ns.listen()\n" \
           "time.sleep(300)"


def listener(port: int, log: str):
    def launch() -> subprocess.Popen:
        with open(log, "ab") as log_file:
            return spawn([sys.executable, "-c", LISTENER, str(port)], log_file)
    return launch


@pytest.fixture
def supervised(tmp_path):
    out = io.StringIO()
    supervisor = Supervisor(tmp_path, Console(file=out, width=200))
    ports = {}
    for name in ("alpha", "beta"):
        ports[name] = free_port()
        supervisor.start_first(Component(name, "127.0.0.1", ports[name], listener(ports[name], str(tmp_path / name)),
                                         tmp_path / f"{name}.log", stop_grace=5, start_timeout=30))
    supervisor.start_loop()
    yield supervisor, out
    supervisor.stop_loop()
    for c in supervisor.components:
        if c.proc is not None:
            terminate(c.proc, 5)


def state_of(tmp_path, name: str) -> dict:
    return json.loads((tmp_path / paths.SUPERVISOR_FILE).read_text())["components"][name]


def wait_state(tmp_path, name: str, check, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = state_of(tmp_path, name)
        if check(state):
            return state
        time.sleep(0.05)
    raise AssertionError(f"{name}: {state}")


@pytest.mark.processes
def test_a_killed_component_is_restarted_with_backoff_while_the_other_keeps_running(supervised, tmp_path):
    supervisor, out = supervised
    first = state_of(tmp_path, "alpha")
    beta = state_of(tmp_path, "beta")
    assert first["state"] == RUNNING and first["restarts"] == 0 and first["last_exit_code"] is None
    assert json.loads((tmp_path / paths.SUPERVISOR_FILE).read_text())["pid"] == os.getpid()

    os.kill(first["pid"], signal.SIGKILL)
    backoff = wait_state(tmp_path, "alpha", lambda s: s["state"] == BACKOFF)
    assert backoff["last_exit_code"] == -9 and backoff["pid"] is None and backoff["next_start_at"] > time.time()
    second = wait_state(tmp_path, "alpha", lambda s: s["state"] == RUNNING)
    assert second["restarts"] == 1 and second["pid"] != first["pid"]
    assert "alpha exited with code -9" in out.getvalue() and "alpha restarted" in out.getvalue()

    # It crashed again at once: the backoff doubled (0.5 s, then 1 s).
    os.kill(second["pid"], signal.SIGKILL)
    again = wait_state(tmp_path, "alpha", lambda s: s["state"] == BACKOFF)
    assert again["next_start_at"] - time.time() > supervisor_module.MIN_BACKOFF_S
    third = wait_state(tmp_path, "alpha", lambda s: s["state"] == RUNNING)
    assert third["restarts"] == 2

    # The other component was never touched.
    assert state_of(tmp_path, "beta") == {**beta, "state": RUNNING}


@pytest.mark.processes
def test_backoff_resets_after_a_stable_run(supervised, tmp_path, monkeypatch):
    supervisor, _ = supervised
    monkeypatch.setattr(supervisor_module, "STABLE_S", 0.0)  # every run counts as a long one
    for _ in range(3):
        pid = wait_state(tmp_path, "beta", lambda s: s["state"] == RUNNING)["pid"]
        os.kill(pid, signal.SIGKILL)
        left = wait_state(tmp_path, "beta", lambda s: s["state"] == BACKOFF)["next_start_at"] - time.time()
        assert left <= supervisor_module.MIN_BACKOFF_S + 0.1
    assert wait_state(tmp_path, "beta", lambda s: s["state"] == RUNNING)["restarts"] == 3


@pytest.mark.unit
def test_status_without_a_cluster_says_so(tmp_path, capsys):
    assert clowder_main(["--data-dir", str(tmp_path), "status"]) == 1
    assert "no cluster is running from" in capsys.readouterr().out
    assert clowder_main(["--data-dir", str(tmp_path), "status", "--json"]) == 1
    assert json.loads(capsys.readouterr().out) == {"running": False, "data_dir": str(tmp_path)}


@pytest.mark.processes
def test_status_shows_the_supervisors_state(supervised, tmp_path, capsys, monkeypatch):
    supervisor, _ = supervised
    os.kill(state_of(tmp_path, "alpha")["pid"], signal.SIGKILL)
    wait_state(tmp_path, "alpha", lambda s: s["state"] == RUNNING and s["restarts"] == 1)
    monkeypatch.setenv("COLUMNS", "200")
    assert clowder_main(["--data-dir", str(tmp_path), "status", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["running"] is True and shown["pid"] == os.getpid()
    assert shown["components"]["alpha"]["restarts"] == 1 and shown["components"]["alpha"]["uptime_s"] >= 0
    assert clowder_main(["--data-dir", str(tmp_path), "status"]) == 0
    table = capsys.readouterr().out
    alpha = next(line for line in table.splitlines() if "alpha" in line)
    assert "running" in alpha and f" {shown['components']['alpha']['pid']} " in alpha and " -9 " in alpha
