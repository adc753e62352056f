"""Chaos: steady streaming load on `clowder up --demo` while faults are injected on a schedule.

The cluster is started as a user starts it (`clowder up --demo`, a temporary data dir, free ports), `smol`
is scaled to 2 replicas, and a few clients stream chat completions through the balancer without pause.
Faults, one after another, each once the cluster is healthy again and after `--settle-s` of steady load:

  runtime      SIGKILL one ready runtime (its pid from the controller's replica list)
  controller   SIGKILL the controller
  balancer     SIGKILL the balancer
  etcd-pause   SIGSTOP etcd for --etcd-pause-s (20 s), then SIGCONT
  storage      SIGKILL the storage service

Per fault: requests in flight at injection, requests completed, broken streams (an error event, or the
connection cut, after the first byte), failed requests (an HTTP error or no byte at all; the client then
tries again), and the time to heal: until every component runs again (a new pid for a killed one), the
wanted replicas are ready with live runtimes, and a probe request sent then succeeds (the heal counts until
it was sent: under load it waits behind the streams, and that wait is reported apart as `probe_s`). For the
etcd pause the time to heal counts from SIGCONT (the pause lasts as long as it is told to), and
`heal_from_inject_s` keeps the other figure. A request belongs to the last fault injected before it ended; the next fault waits until
the requests in flight at the previous one have ended (at most DRAIN_TIMEOUT_S).

The balancer kill is the one fault where loss is allowed: requests in flight on the killed balancer
(`lost_on_killed_balancer`) and the attempts made while no balancer listened, before the new one accepted
connections (`refused_while_balancer_down`, retried) are reported apart and not counted in `broken_streams`
and `failed_requests`; a failure of a request sent once the new balancer accepts connections counts.

Component pids come from the supervisor's state file in the data dir when `clowder up` writes one, else
from /proc (command lines naming this run's data dir, ports and etcd endpoint).

The last line is JSON: requests, completed, broken_streams, failed_requests, max_heal_s, and `faults` with
the detail of each. Targets (issue 11): broken_streams 0, failed_requests 0, max_heal_s < 15.

Run: .venv/bin/python bench/bench_chaos.py [--faults runtime,etcd-pause] [--settle-s 10] [--clients 5]
  or: make bench-chaos BENCH_ARGS="--faults runtime,etcd-pause --settle-s 5"
Exit status 1 when a target is missed or the run failed.
Bounded by --timeout-s; the cluster is stopped (no process left) however the run ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

import aiohttp

from clowder.client import AsyncClient
from clowder.controller.v1 import resources_pb2
from clowder_cli import paths
from clowder_common.auth import read_admin_token
from clowder_common.errors import ClowderError
from clowder_common.processes import free_port, pid_alive, port_open

MODEL = "smol"
FAULTS = ("runtime", "controller", "balancer", "etcd-pause", "storage")
COMPONENTS = ("etcd", "storage", "controller", "balancer")
CLOWDER = [sys.executable, "-m", "clowder_cli.main"]
PROMPTS = (
    "Write a long story about a cat who learns to fly.",
    "Explain, step by step, how a bicycle stays upright.",
    "Describe a walk through a busy market in the morning.",
    "Tell me about the history of the lighthouse on a rocky coast.",
    "Write a letter from a sailor to his sister at home.",
    "List the things a gardener does in spring, and why.",
)
UP_TIMEOUT_S = 300
STOP_TIMEOUT_S = 90
# A request whose stream sends nothing for this long is given up as broken; the balancer's own stall
# failover (about 10 s) must act well before.
CLIENT_READ_TIMEOUT_S = 45
CLIENT_TOTAL_TIMEOUT_S = 240
PROBE_TIMEOUT_S = 15
RETRY_PAUSE_S = 0.5
PROGRESS_EVERY_S = 5.0
# Longest wait for the requests a fault caught to end before the next fault (a slow machine streams slowly).
DRAIN_TIMEOUT_S = 120


def log(message: str) -> None:
    print(message, flush=True)


def process_start_time(pid: int) -> int | None:
    """Start time in clock ticks since boot (/proc/PID/stat field 22): with the pid, an identity that a reused
    pid does not share. None when the process is gone."""
    try:
        return int(pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt()


# -- the cluster, as `clowder up --demo` runs it -------------------------------------------------------------


class UpProcess:
    """`clowder up --demo` in a temporary data dir on free ports; its output goes to a file and a list."""

    def __init__(self, data_dir: pathlib.Path) -> None:
        self.data_dir = data_dir
        self.http_port = free_port()
        self.lines: list[str] = []
        self.env = {k: v for k, v in os.environ.items() if k != "CLOWDER_ADMIN_TOKEN"}
        self.env["COLUMNS"] = "200"
        self._out = open(data_dir / "up-output.log", "w")
        self.proc = subprocess.Popen(
            [*CLOWDER, "--data-dir", str(data_dir), "up", "--demo", "--http-port", str(self.http_port),
             "--internal-ports", "auto"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, env=self.env)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        # Every pid that ever belonged to this cluster, with its start time (so a reused pid is never killed).
        self.seen: dict[int, int | None] = {}

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._out.write(line)
            self._out.flush()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    async def wait_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any("cluster up" in line for line in self.lines):
                return
            if self.proc.poll() is not None:
                break
            await asyncio.sleep(0.2)
        tail = "\n".join(self.lines[-30:])
        raise RuntimeError(f"`clowder up --demo` was not up within {timeout:.0f}s; its output:\n{tail}")

    def info(self) -> dict[str, Any]:
        try:
            return json.loads((self.data_dir / "cluster.json").read_text())
        except (OSError, ValueError):
            return {}

    def token(self) -> str | None:
        return read_admin_token(self.data_dir)

    def remember(self, pids: list[int]) -> None:
        for pid in pids:
            if pid and pid not in self.seen:
                self.seen[pid] = process_start_time(pid)

    def stop(self) -> list[int]:
        """`clowder down`, then make sure: SIGCONT etcd (a paused etcd cannot stop), SIGKILL whatever is left.

        Returns the pids that were still alive after `clowder down` (should be none)."""
        for pid in self.scan().get("etcd", []):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if self.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                subprocess.run([*CLOWDER, "--data-dir", str(self.data_dir), "down"], capture_output=True,
                               timeout=STOP_TIMEOUT_S + 10, env=self.env)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        time.sleep(0.5)
        left = [pid for pid, born in self.seen.items() if pid_alive(pid) and process_start_time(pid) == born]
        left += [pid for pids in self.scan().values() for pid in pids if pid not in left]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._reader.join(5)
        self._out.close()
        return left

    def scan(self) -> dict[str, list[int]]:
        """This cluster's live processes by component, found by their command lines in /proc."""
        info = self.info()
        etcd_endpoint = info.get("etcd", "")
        found: dict[str, list[int]] = {name: [] for name in (*COMPONENTS, "runtime")}
        data = str(self.data_dir)
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                argv = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if not pid_alive(pid):
                continue
            if "setpriv" in pathlib.Path(argv[0]).name:
                continue  # the instant between fork and exec; the same pid shows the service a moment later
            joined = " ".join(argv)
            if pathlib.Path(argv[0]).name == "etcd" and f"{data}/etcd" in joined:
                found["etcd"].append(pid)
            elif "clowder_storage" in argv and f"{data}/storage" in joined:
                found["storage"].append(pid)
            elif "clowder_controller" in argv and f"{data}/controller" in joined:
                found["controller"].append(pid)
            elif "clowder_balancer" in argv and f"127.0.0.1:{self.http_port}" in argv:
                found["balancer"].append(pid)
            elif "clowder_runtime" in argv and etcd_endpoint and etcd_endpoint in joined:
                found["runtime"].append(pid)
        return found

    def components(self) -> dict[str, int | None]:
        """Pid of each running component: the supervisor's state file when there is one, else /proc."""
        from_file = supervisor_pids(self.data_dir)
        if from_file is not None:
            return from_file
        scanned = self.scan()
        return {name: (scanned[name][0] if len(scanned[name]) == 1 else None) for name in COMPONENTS}


def supervisor_pids(data_dir: pathlib.Path) -> dict[str, int | None] | None:
    """{component: pid while it runs} from the supervisor's state file; None when there is none (yet)."""
    state = paths.read_supervisor_state(data_dir)
    if state is None:
        return None
    entries = state.get("components", {})
    pids: dict[str, int | None] = {}
    for component in COMPONENTS:
        entry = entries.get(component) or {}
        pid = int(entry.get("pid") or 0)
        pids[component] = pid if pid and entry.get("state") == "running" and pid_alive(pid) else None
    return pids


def supervisor_restarts(data_dir: pathlib.Path) -> dict[str, int]:
    state = paths.read_supervisor_state(data_dir) or {}
    return {name: int(entry.get("restarts") or 0) for name, entry in state.get("components", {}).items()}


# -- load ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Request:
    worker: int
    start: float
    end: float = 0.0
    first_byte: float | None = None
    # completed | broken | failed
    outcome: str = ""
    error: str = ""
    tokens: int = 0
    refused: bool = False  # the connection itself was refused (nothing listened)


class Load:
    """`clients` streaming chat clients in a loop; a request that fails before its first byte is tried again."""

    def __init__(self, base_url: str, clients: int, min_tokens: int, max_tokens: int, seed: int) -> None:
        self.url = f"{base_url}/v1/chat/completions"
        self.clients = clients
        self.min_tokens, self.max_tokens = min_tokens, max_tokens
        self.random = random.Random(seed)
        self.requests: list[Request] = []
        self.active: set[int] = set()  # ids (index in requests) of requests in flight
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=CLIENT_TOTAL_TIMEOUT_S, sock_connect=5,
                                        sock_read=CLIENT_READ_TIMEOUT_S)
        # One connection per request (force_close): a kept-alive socket to a killed balancer would turn a
        # refused connection into a confusing reset.
        self._session = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(force_close=True))
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self.clients)]

    async def stop(self, timeout: float) -> None:
        """No new requests; those in flight get `timeout` seconds to finish, then are cancelled."""
        self._stop.set()
        _, pending = await asyncio.wait(self._tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def in_flight(self) -> int:
        return len(self.active)

    async def drain(self, since: float, timeout: float) -> None:
        """Wait (at most `timeout`) until no request that started before `since` is still running."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(self.requests[i].start < since for i in self.active):
            await asyncio.sleep(0.2)

    async def _client(self, worker: int) -> None:
        while not self._stop.is_set():
            req = Request(worker, time.monotonic())
            self.requests.append(req)
            index = len(self.requests) - 1
            self.active.add(index)
            try:
                await self._one(req)
            finally:
                req.end = time.monotonic()
                self.active.discard(index)
            if req.outcome == "failed":
                await asyncio.sleep(RETRY_PAUSE_S)

    async def _one(self, req: Request) -> None:
        assert self._session is not None
        body = {"model": MODEL, "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": self.random.choice(PROMPTS)}],
                "max_tokens": self.random.randint(self.min_tokens, self.max_tokens),
                "temperature": 0.8, "seed": self.random.randrange(1 << 30)}
        done = False
        error_event = None
        try:
            async with self._session.post(self.url, json=body) as resp:
                if resp.status != 200:
                    text = (await resp.text())[:200]
                    req.outcome, req.error = "failed", f"HTTP {resp.status}: {text}"
                    return
                async for raw in resp.content:
                    if req.first_byte is None:
                        req.first_byte = time.monotonic()
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    event = json.loads(data)
                    if "error" in event:
                        error_event = event["error"]
                    elif event.get("choices") and event["choices"][0].get("delta", {}).get("content"):
                        req.tokens += 1
        except aiohttp.ClientConnectorError as err:
            req.refused = True
            req.error = f"connect: {err}"
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as err:
            req.error = f"{type(err).__name__}: {err}"
        if error_event is not None:
            req.error = f"error event: {json.dumps(error_event)[:200]}"
        if done and error_event is None:
            req.outcome = "completed"
        elif req.first_byte is not None:
            req.outcome = "broken"
        else:
            req.outcome = "failed"
            req.error = req.error or "no byte"


# -- faults --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FaultRun:
    name: str
    injected: float = 0.0
    # When the fault stopped acting (SIGCONT for the pause; the injection for a kill): heal counts from here.
    ended: float = 0.0
    healed: float | None = None
    # The balancer kill: when the new balancer first accepted a connection (polled every half second).
    balancer_back: float | None = None
    killed_pid: int | None = None
    component: str = ""
    in_flight: int = 0
    replicas_before: dict[str, int] = dataclasses.field(default_factory=dict)
    replicas_after: dict[str, int] = dataclasses.field(default_factory=dict)
    # Restarts per component as the supervisor counts them, before the fault and once healed.
    restarts_before: dict[str, int] = dataclasses.field(default_factory=dict)
    restarts_after: dict[str, int] = dataclasses.field(default_factory=dict)
    # What healing waited on, as it changed: (seconds after the fault ended, what was missing).
    waited_on: list[tuple[float, str]] = dataclasses.field(default_factory=list)
    # How long the probe that confirmed the heal took (it queues behind the load's streams).
    probe_s: float = 0.0
    # The balancer's count of streams continued on another replica, around the fault (None: not read).
    continued_before: int | None = None
    continued_after: int | None = None


class Chaos:
    def __init__(self, up: UpProcess, args: argparse.Namespace) -> None:
        self.up = up
        self.args = args
        self.t0 = time.monotonic()
        self.control: AsyncClient | None = None
        self._control_address = ""
        self.http: aiohttp.ClientSession | None = None
        self.random = random.Random(args.seed)
        self.probe_sent = 0.0
        self.probe_s = 0.0

    def elapsed(self) -> str:
        # Wall-clock time too, to line the run up with the components' logs.
        return f"[{time.monotonic() - self.t0:7.1f}s {time.strftime('%H:%M:%S')}]"

    async def open(self) -> None:
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S),
                                          connector=aiohttp.TCPConnector(force_close=True))

    async def close(self) -> None:
        if self.control is not None:
            await self.control.close()
        if self.http is not None:
            await self.http.close()

    def _client(self) -> AsyncClient | None:
        """A control-plane client for the controller address in cluster.json (it may move on a restart)."""
        address = self.up.info().get("controller", "")
        if not address:
            return None
        if address != self._control_address or self.control is None:
            if self.control is not None:
                old = self.control
                asyncio.get_running_loop().create_task(old.close())
            self.control = AsyncClient(controller=address, balancer=self.up.info().get("balancer_grpc", address),
                                       admin_token=self.up.token(), timeout_s=5, max_attempts=1)
            self._control_address = address
        return self.control

    async def replicas(self) -> list[resources_pb2.Replica] | None:
        client = self._client()
        if client is None:
            return None
        try:
            return await client.deployments.replicas(MODEL)
        except (ClowderError, asyncio.TimeoutError):
            return None

    async def continued_streams(self) -> int | None:
        """clowder_balancer_continuations_total{outcome="resumed"} summed over models; None when unreadable."""
        assert self.http is not None
        try:
            async with self.http.get(f"{self.up.base_url}/metrics") as resp:
                if resp.status != 200:
                    return None
                text = await resp.text()
        except (asyncio.TimeoutError, aiohttp.ClientError):
            return None
        return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("clowder_balancer_continuations_total{") and 'outcome="resumed"' in line))

    async def probe(self) -> bool:
        return not await self.probe_error()

    async def probe_error(self) -> str:
        """"" when a short chat completion through the balancer succeeds, else why it did not."""
        assert self.http is not None
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        try:
            async with self.http.post(f"{self.up.base_url}/v1/chat/completions", json=body) as resp:
                if resp.status != 200:
                    return f"HTTP {resp.status} {(await resp.text())[:120]}"
                return "" if (await resp.json()).get("choices") else "no choices"
        except asyncio.TimeoutError:
            return f"no answer in {PROBE_TIMEOUT_S}s"
        except (aiohttp.ClientError, ValueError) as err:
            return f"{type(err).__name__}: {err}"

    async def healthy(self, killed_pid: int | None = None) -> tuple[bool, str]:
        """(whole, what is missing): every component runs, the wanted replicas are ready, a probe succeeds.

        Whole means whole when the probe was sent: self.probe_sent is that moment. Under load the probe waits
        its turn behind the streams on a replica; that wait is the load's, not the fault's (self.probe_s).
        """
        components = self.up.components()
        self.up.remember([p for p in components.values() if p])
        missing = [name for name, pid in components.items() if not pid or pid == killed_pid]
        if missing:
            return False, "not running: " + ", ".join(missing)
        replicas = await self.replicas()
        if replicas is None:
            return False, "controller not answering"
        self.up.remember([r.pid for r in replicas])
        ready = [r for r in replicas if r.state == resources_pb2.REPLICA_STATE_READY and r.pid
                 and r.pid != killed_pid and pid_alive(r.pid)]
        if len(ready) < self.args.replicas or len(replicas) != self.args.replicas:
            states = ", ".join(f"{r.id} {resources_pb2.ReplicaState.Name(r.state).removeprefix('REPLICA_STATE_')}"
                               f" pid {r.pid}{'' if pid_alive(r.pid) else ' (dead)'}" for r in replicas)
            return False, f"{len(ready)}/{self.args.replicas} replicas ready ({states})"
        self.probe_sent = time.monotonic()
        error = await self.probe_error()
        self.probe_s = time.monotonic() - self.probe_sent
        if error:
            return False, f"probe failed: {error}"
        return True, ""

    async def wait_healthy(self, run: FaultRun | None, timeout: float) -> float | None:
        """Poll until healthy; the time it happened, or None after `timeout`."""
        deadline = time.monotonic() + timeout
        last_report = 0.0
        why = ""
        while time.monotonic() < deadline:
            if run is not None and run.name == "balancer" and run.balancer_back is None:
                # A new balancer process (the killed one's socket may linger an instant) that accepts.
                pid = self.up.components().get("balancer")
                if pid and pid != run.killed_pid and port_open("127.0.0.1", self.up.http_port):
                    run.balancer_back = time.monotonic()
            ok, why = await self.healthy(run.killed_pid if run else None)
            if run is not None and (not run.waited_on or run.waited_on[-1][1] != why):
                run.waited_on.append((round(time.monotonic() - run.ended, 1), why))
            if ok:
                if run is not None:
                    run.probe_s = self.probe_s
                return self.probe_sent
            if time.monotonic() - last_report > PROGRESS_EVERY_S:
                last_report = time.monotonic()
                log(f"{self.elapsed()}   waiting: {why}")
            await asyncio.sleep(0.5)
        log(f"{self.elapsed()}   not healthy after {timeout:.0f}s: {why}")
        return None

    async def replica_pids(self) -> dict[str, int]:
        replicas = await self.replicas()
        return {r.id: r.pid for r in replicas or []}

    async def inject(self, run: FaultRun, load: Load) -> None:
        components = self.up.components()
        if run.name == "runtime":
            replicas = await self.replicas() or []
            ready = [r for r in replicas if r.state == resources_pb2.REPLICA_STATE_READY and pid_alive(r.pid)]
            if not ready:
                raise RuntimeError("no ready runtime to kill")
            victim = self.random.choice(ready)
            run.component, run.killed_pid = f"runtime {victim.id}", victim.pid
        else:
            run.component = "etcd" if run.name == "etcd-pause" else run.name
            run.killed_pid = components.get(run.component)
            if not run.killed_pid:
                raise RuntimeError(f"{run.component} is not running; cannot inject {run.name}")
        self.up.remember([run.killed_pid])
        run.in_flight = load.in_flight()
        run.injected = time.monotonic()
        if run.name == "etcd-pause":
            os.kill(run.killed_pid, signal.SIGSTOP)
            log(f"{self.elapsed()} {run.name}: SIGSTOP etcd (pid {run.killed_pid}), {run.in_flight} in flight")
            try:
                await self._watch_pause(self.args.etcd_pause_s)
            finally:
                os.kill(run.killed_pid, signal.SIGCONT)
            run.killed_pid = None  # the same etcd goes on; heal does not want a new pid
            log(f"{self.elapsed()} {run.name}: SIGCONT etcd")
        else:
            os.kill(run.killed_pid, signal.SIGKILL)
            log(f"{self.elapsed()} {run.name}: SIGKILL {run.component} (pid {run.killed_pid}), "
                f"{run.in_flight} in flight")
        run.ended = time.monotonic()

    async def _watch_pause(self, seconds: float) -> None:
        """While etcd is stopped: the data plane must keep serving; say so as it goes."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await asyncio.sleep(min(PROGRESS_EVERY_S, max(0.0, end - time.monotonic())))
            left = end - time.monotonic()
            if left > 1:
                try:
                    ok = await asyncio.wait_for(self.probe(), left)
                except asyncio.TimeoutError:
                    ok = False
                log(f"{self.elapsed()}   etcd paused; probe through the balancer: {'ok' if ok else 'FAILED'}")


# -- report --------------------------------------------------------------------------------------------------


def attribute(requests: list[Request], runs: list[FaultRun]) -> dict[str, list[Request]]:
    """Each finished request to the last fault injected before it ended ("baseline" before the first)."""
    groups: dict[str, list[Request]] = {"baseline": []}
    keys = [f"{i}:{run.name}" for i, run in enumerate(runs)]
    for key in keys:
        groups[key] = []
    for req in requests:
        if not req.outcome:
            continue
        owner = "baseline"
        for key, run in zip(keys, runs):
            if run.injected and run.injected <= req.end:
                owner = key
        groups[owner].append(req)
    return groups


def summarize(requests: list[Request], runs: list[FaultRun], t0: float) -> tuple[list[dict[str, Any]], dict]:
    groups = attribute(requests, runs)
    rows = []
    totals = {"requests": 0, "completed": 0, "broken_streams": 0, "failed_requests": 0,
              "lost_on_killed_balancer": 0, "refused_while_balancer_down": 0,
              "continued_streams": 0}
    for key, members in groups.items():
        run = runs[int(key.split(":")[0])] if key != "baseline" else None
        lost = refused = 0
        broken = [r for r in members if r.outcome == "broken"]
        failed = [r for r in members if r.outcome == "failed"]
        if run is not None and run.name == "balancer":
            # In flight on the killed balancer: started before the kill. Refused: started while no balancer
            # answered (a connection accepted in the instant of the kill is reset, not refused: counted here).
            back = run.balancer_back or run.healed or float("inf")
            allowed_lost = [r for r in broken + failed if r.start < run.injected]
            allowed_refused = [r for r in failed if run.injected <= r.start < back]
            lost, refused = len(allowed_lost), len(allowed_refused)
            broken = [r for r in broken if r not in allowed_lost]
            failed = [r for r in failed if r not in allowed_lost and r not in allowed_refused]
        row: dict[str, Any] = {
            "fault": run.name if run else "baseline",
            "in_flight": run.in_flight if run else 0,
            "requests": len(members),
            "completed": sum(1 for r in members if r.outcome == "completed"),
            "broken": len(broken),
            "failed": len(failed),
        }
        if run is not None:
            row["injected_at_s"] = round(run.injected - t0, 1)
            row["killed"] = run.component
            row["heal_s"] = round(run.healed - run.ended, 2) if run.healed else None
            if run.name == "etcd-pause":
                row["heal_from_inject_s"] = round(run.healed - run.injected, 2) if run.healed else None
            row["healed"] = run.healed is not None
            row["probe_s"] = round(run.probe_s, 2)
            changed = sorted(rid for rid, pid in run.replicas_before.items()
                             if run.replicas_after.get(rid) != pid)
            row["replicas_restarted"] = len(changed)
            row["supervisor_restarts"] = {name: count - run.restarts_before.get(name, 0)
                                          for name, count in run.restarts_after.items()
                                          if count != run.restarts_before.get(name, 0)}
            if run.name == "balancer":
                row["lost_on_killed_balancer"] = lost
                row["refused_while_balancer_down"] = refused
            if run.continued_before is not None and run.continued_after is not None:
                # A restarted balancer counts from zero again.
                before = run.continued_before if run.continued_after >= run.continued_before else 0
                row["continued"] = run.continued_after - before
            row["waited_on"] = [list(step) for step in run.waited_on if step[1]]
        errors = sorted({r.error for r in broken + failed if r.error})
        if errors:
            row["errors"] = errors[:5]
        rows.append(row)
        totals["requests"] += row["requests"]
        totals["completed"] += row["completed"]
        totals["broken_streams"] += row["broken"]
        totals["failed_requests"] += row["failed"]
        totals["lost_on_killed_balancer"] += lost
        totals["refused_while_balancer_down"] += refused
        totals["continued_streams"] += row.get("continued", 0)
    heals = [row["heal_s"] for row in rows if "heal_s" in row]
    totals["max_heal_s"] = None if (not heals or None in heals) else max(heals)
    totals["all_healed"] = all(row.get("healed", True) for row in rows)
    return rows, totals


def print_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'fault':<12} {'in flight':>9} {'requests':>8} {'completed':>9} {'broken':>6} {'failed':>6} " \
             f"{'heal s':>7} {'probe s':>7} {'replicas restarted':>18}  note"
    log(header)
    log("-" * len(header))
    for row in rows:
        heal = row.get("heal_s")
        heal_text = "-" if "heal_s" not in row else ("timeout" if heal is None else f"{heal:.1f}")
        notes = []
        if row["fault"] == "etcd-pause" and row.get("heal_from_inject_s") is not None:
            notes.append(f"heal from SIGSTOP {row['heal_from_inject_s']:.1f}s")
        if row.get("supervisor_restarts"):
            notes.append("restarted " + ", ".join(f"{k} x{v}" for k, v in row["supervisor_restarts"].items()))
        if row.get("continued"):
            notes.append(f"{row['continued']} stream(s) continued on another replica")
        if row["fault"] == "balancer":
            notes.append(f"lost in flight {row['lost_on_killed_balancer']}, "
                         f"refused while down {row['refused_while_balancer_down']} (allowed)")
        log(f"{row['fault']:<12} {row['in_flight']:>9} {row['requests']:>8} {row['completed']:>9} "
            f"{row['broken']:>6} {row['failed']:>6} {heal_text:>7} {row.get('probe_s', '-'):>7} "
            f"{row.get('replicas_restarted', '-'):>18}  "
            + "; ".join(notes))
        for error in row.get("errors", []):
            log(f"{'':<12} error: {error}")


# -- main ----------------------------------------------------------------------------------------------------


async def progress(load: Load, chaos: Chaos, stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), PROGRESS_EVERY_S)
        done = [r for r in load.requests if r.outcome]
        log(f"{chaos.elapsed()}   load: {len(done)} finished, "
            f"{sum(r.outcome == 'completed' for r in done)} completed, "
            f"{sum(r.outcome == 'broken' for r in done)} broken, {sum(r.outcome == 'failed' for r in done)} failed, "
            f"{load.in_flight()} in flight")


async def run(up: UpProcess, args: argparse.Namespace, runs: list[FaultRun], on_load: Callable[[Load], None],
              chaos: Chaos) -> None:
    await chaos.open()
    log(f"{chaos.elapsed()} starting `clowder up --demo` in {up.data_dir}")
    await up.wait_up(UP_TIMEOUT_S)
    client = chaos._client()
    if client is None:
        raise RuntimeError("cluster.json names no controller")
    log(f"{chaos.elapsed()} cluster up; scaling {MODEL} to {args.replicas} replicas")
    await client.deployments.scale(MODEL, args.replicas)
    if await chaos.wait_healthy(None, UP_TIMEOUT_S) is None:
        raise RuntimeError("the cluster did not become healthy")
    load = Load(up.base_url, args.clients, args.min_tokens, args.max_tokens, args.seed)
    on_load(load)
    await load.start()
    stop_progress = asyncio.Event()
    reporter = asyncio.create_task(progress(load, chaos, stop_progress))
    try:
        log(f"{chaos.elapsed()} {args.clients} streaming clients running; {args.settle_s:.0f}s of steady load")
        await asyncio.sleep(args.settle_s)
        for name in args.faults:
            run = FaultRun(name)
            runs.append(run)
            run.replicas_before = await chaos.replica_pids()
            run.restarts_before = supervisor_restarts(up.data_dir)
            run.continued_before = await chaos.continued_streams()
            await chaos.inject(run, load)
            run.healed = await chaos.wait_healthy(run, args.heal_timeout_s)
            if run.healed is not None:
                log(f"{chaos.elapsed()} {name}: healed in {run.healed - run.ended:.1f}s")
            run.replicas_after = await chaos.replica_pids()
            run.restarts_after = supervisor_restarts(up.data_dir)
            # The requests this fault caught finish before the next fault, so each is judged by one fault only.
            await load.drain(run.injected, DRAIN_TIMEOUT_S)
            run.continued_after = await chaos.continued_streams()
            await asyncio.sleep(args.settle_s)
    finally:
        log(f"{chaos.elapsed()} stopping the load (requests in flight may finish)")
        await load.stop(timeout=CLIENT_TOTAL_TIMEOUT_S / 2)
        stop_progress.set()
        await reporter


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", default=",".join(FAULTS),
                        help=f"comma-separated, in order, repeats allowed (default {','.join(FAULTS)})")
    parser.add_argument("--settle-s", type=float, default=10.0,
                        help="steady load before the first fault and after each heal (default 10)")
    parser.add_argument("--clients", type=int, default=5, help="concurrent streaming clients (default 5)")
    parser.add_argument("--replicas", type=int, default=2, help=f"replicas of {MODEL} (default 2)")
    parser.add_argument("--min-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--etcd-pause-s", type=float, default=20.0, help="how long etcd is stopped (default 20)")
    parser.add_argument("--heal-timeout-s", type=float, default=120.0,
                        help="a fault not healed after this long is reported as such (default 120)")
    parser.add_argument("--timeout-s", type=float, default=1500.0, help="hard limit of the whole run")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--keep-data", action="store_true", help="keep the data dir (logs) afterwards")
    args = parser.parse_args(argv)
    args.faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = sorted(set(args.faults) - set(FAULTS))
    if unknown or not args.faults:
        parser.error(f"unknown fault(s) {unknown}; choose from {', '.join(FAULTS)}")
    if not 1 <= args.min_tokens <= args.max_tokens:
        parser.error("need 1 <= --min-tokens <= --max-tokens")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data_dir = pathlib.Path(tempfile.mkdtemp(prefix="clowder-chaos-"))
    up = UpProcess(data_dir)
    runs: list[FaultRun] = []
    loads: list[Load] = []
    chaos = Chaos(up, args)
    failure = ""

    async def bounded() -> None:
        try:
            await asyncio.wait_for(run(up, args, runs, loads.append, chaos), args.timeout_s)
        finally:
            await chaos.close()

    # SIGTERM ends the run like Ctrl-C does, so the cluster is still stopped below.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        asyncio.run(bounded())
    except asyncio.TimeoutError:
        failure = f"the run exceeded --timeout-s {args.timeout_s:.0f}"
    except KeyboardInterrupt:
        failure = "interrupted"
    except (RuntimeError, ClowderError, OSError) as err:
        failure = str(err)
    finally:
        log(f"{chaos.elapsed()} stopping the cluster")
        left = up.stop()
        if left:
            log(f"processes left after `clowder down` (killed now): {left}")
        if args.keep_data:
            with open(data_dir / "requests.jsonl", "w") as dump:
                for req in (loads[0].requests if loads else []):
                    dump.write(json.dumps({**dataclasses.asdict(req), "start": round(req.start - chaos.t0, 2),
                                           "end": round(req.end - chaos.t0, 2),
                                           "first_byte": req.first_byte and round(req.first_byte - chaos.t0, 2)})
                               + "\n")
            log(f"data dir kept: {data_dir} (requests.jsonl: every request)")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
    if failure:
        log(f"error: {failure}")
    rows, totals = summarize(loads[0].requests if loads else [], runs, chaos.t0)
    log("")
    print_table(rows)
    result = {**totals, "left_behind": len(left), "error": failure or None,
              "faults": [row for row in rows if row["fault"] != "baseline"],
              "baseline": next((row for row in rows if row["fault"] == "baseline"), None)}
    print(json.dumps(result), flush=True)
    ok = (not failure and not left and totals["broken_streams"] == 0 and totals["failed_requests"] == 0
          and totals["max_heal_s"] is not None and totals["max_heal_s"] < 15)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
