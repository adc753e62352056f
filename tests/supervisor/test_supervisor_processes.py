"""Process plumbing behind the supervisor, with real processes: who survives whom, who reaps orphans."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from clowder_common.processes import SUPERVISOR_ENV

pytestmark = pytest.mark.processes


MIDDLE = """
import sys, time
from clowder_common.processes import spawn
free = spawn([sys.executable, "-c", "import time; time.sleep(120)"], None, die_with_parent=False)
guarded = spawn([sys.executable, "-c", "import time; time.sleep(120)"], None)
print(free.pid, guarded.pid, flush=True)
time.sleep(120)
"""

# Runs as its own process: becoming a subreaper is for the rest of a process's life, not for pytest's.
SUBREAPER = """
import json, subprocess, sys, time
from clowder_common.processes import become_subreaper, child_pids, pid_alive, stop_pids

assert become_subreaper()
middle = subprocess.Popen([sys.executable, sys.argv[1]], stdout=subprocess.PIPE, text=True)
free, guarded = map(int, middle.stdout.readline().split())
time.sleep(0.5)  # setpriv has applied PDEATHSIG and exec'd
middle.kill()
middle.wait(10)
deadline = time.monotonic() + 10
while pid_alive(guarded) and time.monotonic() < deadline:
    time.sleep(0.05)
out = {"free_alive": pid_alive(free), "guarded_alive": pid_alive(guarded), "free_is_mine": free in child_pids()}
out["left"] = stop_pids([p for p in child_pids() if p != middle.pid], 5)
out["free_after_stop"] = pid_alive(free)
print(json.dumps(out))
"""


def test_orphans_reparent_to_the_subreaper_and_only_guarded_children_die_with_their_parent(tmp_path):
    """A 'controller' starts two 'runtimes', one guarded (PDEATHSIG) and one not, then is SIGKILLed.

    The unguarded one lives on, re-parented to the subreaper ('clowder up'), which stops and reaps it.
    """
    (tmp_path / "middle.py").write_text(MIDDLE)
    (tmp_path / "subreaper.py").write_text(SUBREAPER)
    done = subprocess.run([sys.executable, str(tmp_path / "subreaper.py"), str(tmp_path / "middle.py")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "free_alive": True, "guarded_alive": False, "free_is_mine": True, "left": [], "free_after_stop": False}


def test_a_process_stops_itself_when_its_supervisor_is_gone(tmp_path):
    supervisor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    watcher = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom clowder_common.lifecycle import watch_supervisor\n"
                               "watch_supervisor(0.1)\ntime.sleep(120)"],
        env={**os.environ, SUPERVISOR_ENV: str(supervisor.pid)})
    try:
        time.sleep(1.0)
        assert watcher.poll() is None  # the supervisor runs: it keeps running
        supervisor.kill()
        supervisor.wait(10)
        assert watcher.wait(10) == -signal.SIGTERM
    finally:
        for proc in (supervisor, watcher):
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def test_a_process_whose_supervisor_is_already_gone_stops_at_once():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(10)
    watcher = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom clowder_common.lifecycle import watch_supervisor\n"
                               "watch_supervisor(0.1)\ntime.sleep(120)"],
        env={**os.environ, SUPERVISOR_ENV: str(gone.pid)})
    try:
        assert watcher.wait(10) == -signal.SIGTERM
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait(10)


def test_a_runtime_spawned_to_outlive_its_parent_does_not_inherit_the_parents_parent_pid(monkeypatch):
    """The controller itself runs with CLOWDER_PARENT_PID (of `clowder up`); its runtimes must not inherit it,
    or die_with_parent() in the runtime would see another parent and stop at once."""
    from clowder_common.processes import spawn

    monkeypatch.setenv("CLOWDER_PARENT_PID", "12345")
    code = "import os; print(os.environ.get('CLOWDER_PARENT_PID', '-'))"
    free = spawn([sys.executable, "-c", code], subprocess.PIPE, die_with_parent=False)
    guarded = spawn([sys.executable, "-c", code], subprocess.PIPE)
    assert free.communicate(timeout=30)[0].decode().strip() == "-"
    assert guarded.communicate(timeout=30)[0].decode().strip() == str(os.getpid())


# Its own process: reap_children() collects any exited child of the process that calls it.
REAPER = """
import json, os, subprocess, sys, time
from clowder_common.processes import reap_children

out = {"before": reap_children()}
kept = subprocess.Popen([sys.executable, "-c", "pass"])
other = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
deadline = time.monotonic() + 30
# Both exited and waiting to be collected (WNOWAIT looks without collecting).
while not all(os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) for p in (kept, other)):
    assert time.monotonic() < deadline, "children did not exit"
    time.sleep(0.02)
out["reaped"] = reap_children(keep=[kept.pid])
out["kept_code"] = kept.wait(10)
out["after"] = reap_children()
out["other"] = other.pid
print(json.dumps(out))
"""


def test_reap_children_collects_exited_children_and_leaves_the_kept_ones_to_their_popen(tmp_path):
    (tmp_path / "reaper.py").write_text(REAPER)
    done = subprocess.run([sys.executable, str(tmp_path / "reaper.py")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == {"before": [], "reaped": [[out["other"], 3]], "kept_code": 0, "after": [], "other": out["other"]}
