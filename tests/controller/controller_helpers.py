"""The controller and storage node as real processes, shared by the controller tests (waiting: tests/helpers/wait)."""

from __future__ import annotations

import asyncio
import pathlib
import subprocess
import sys
import time

import grpc
import pytest

from clowder.controller.v1 import resources_pb2
from clowder_common.auth import TOKEN_ENV
from clowder_common.errors import from_rpc_error
from clowder_common.etcd import EtcdState
from clowder_common.processes import free_port, spawn


async def error_of(call):
    """The ClowderError a gRPC call fails with (the test fails if it succeeds)."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return from_rpc_error(err.value)


def start_controller_process(endpoints: str, prefix: str, tmp_path: pathlib.Path, name: str, token: str,
                             env: dict[str, str] | None = None) -> tuple[subprocess.Popen, int]:
    """`python -m clowder_controller` on a free port; its log is tmp_path/<name>.log."""
    port = free_port()
    with open(tmp_path / f"{name}.log", "ab") as log:
        proc = spawn([sys.executable, "-m", "clowder_controller", "--listen", f"127.0.0.1:{port}",
                      "--data-dir", str(tmp_path / name), "--etcd-endpoints", endpoints, "--etcd-prefix", prefix],
                     log, env={TOKEN_ENV: token, **(env or {})})
    return proc, port


def start_storage_process(endpoints: str, prefix: str, tmp_path: pathlib.Path, name: str, token: str,
                          extra: list[str] | None = None) -> subprocess.Popen:
    """A storage node as its own process (it can die, or outlive an etcd outage, on its own)."""
    argv = [sys.executable, "-m", "clowder_storage", "--listen", f"127.0.0.1:{free_port()}", "--data-dir",
            str(tmp_path / name), "--node-name", name, "--etcd-endpoints", endpoints, "--etcd-prefix", prefix,
            *(extra or [])]
    with open(tmp_path / f"{name}.log", "ab") as log:
        return spawn(argv, log, env={TOKEN_ENV: token})


class ReplicaHistory:
    """Every change to replicas/ from a revision on, kept across etcd outages (the watch resumes where it broke).

    What a test asserts on: etcd's own record of each write, not samples taken now and then.
    """

    def __init__(self, state: EtcdState, prefix: str, from_revision: int) -> None:
        self._state = state
        self._prefix = prefix
        self.next_revision = from_revision
        self.events: list[tuple[int, str, resources_pb2.Replica | None]] = []
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                async for event in self._state.watch(self._prefix, resources_pb2.Replica, self.next_revision):
                    self.events.append((event.mod_revision, event.key, event.value))
                    self.next_revision = event.mod_revision + 1
            except asyncio.CancelledError:
                raise
            except Exception:  # etcd paused or restarting: watch again from where we were
                await asyncio.sleep(0.2)

    async def caught_up(self, timeout: float = 10) -> None:
        """Wait until every write up to etcd's current revision is in `events`."""
        _, revision = await self._state.list(self._prefix, resources_pb2.Replica)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.next_revision > revision or await self._nothing_after(revision):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"replica history did not reach revision {revision}")

    async def _nothing_after(self, revision: int) -> bool:
        items, _ = await self._state.list(self._prefix, resources_pb2.Replica)
        return all(i.mod_revision < self.next_revision for i in items)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=5)
