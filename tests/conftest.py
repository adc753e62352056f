"""Shared fixtures (a real etcd on loopback, the bundled model) and the three test levels.

Every test carries exactly one level marker, so `pytest -m unit` runs the quick ones alone:
- unit: pure Python in the test's own process; no sockets, no child processes, no etcd (enforced below);
- inprocess: servers in the test's own process (gRPC, aiohttp, a llama.cpp engine), real etcd allowed;
- processes: spawns service processes (`python -m clowder_*`, `clowder up`, a private etcd, a browser).
A module states its level with `pytestmark = pytest.mark.<level>`; a module that mixes levels marks each test.
"""

from __future__ import annotations

import pathlib
import socket
import subprocess

import pytest

from clowder_cli.bundled import bundled_model_path
from clowder_common.etcd_server import start_etcd
from helpers.state import fresh_prefix, prefixed_state

LEVELS = ("unit", "inprocess", "processes")
# Fixtures that make a test more than a unit test: the shared etcd process and the real model.
NOT_UNIT_FIXTURES = frozenset({"etcd", "model_path"})


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items) -> None:
    """Fail collection (before -m selects) when a test has no level, more than one, or a unit test uses etcd."""
    wrong = []
    for item in items:
        levels = sorted({mark.name for mark in item.iter_markers() if mark.name in LEVELS})
        if len(levels) != 1:
            wrong.append(f"{item.nodeid}: levels {levels or 'none'}")
        elif levels == ["unit"] and NOT_UNIT_FIXTURES & set(getattr(item, "fixturenames", ())):
            wrong.append(f"{item.nodeid}: marked unit but uses {sorted(NOT_UNIT_FIXTURES & set(item.fixturenames))}")
    if wrong:
        raise pytest.UsageError(
            "every test needs exactly one level marker (" + ", ".join(LEVELS) + "; see tests/conftest.py):\n  "
            + "\n  ".join(wrong))


@pytest.fixture(autouse=True)
def _unit_tests_stay_in_process(request, monkeypatch) -> None:
    """A unit test that opens a connection, listens, or starts a process fails: it belongs to another level."""
    if request.node.get_closest_marker("unit") is None:
        return

    def refuse(what: str):
        def refused(*args, **kwargs):
            raise AssertionError(f"a unit test may not {what}: mark {request.node.nodeid} inprocess or processes")
        return refused

    monkeypatch.setattr(socket.socket, "connect", refuse("connect a socket"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect a socket"))
    monkeypatch.setattr(socket.socket, "bind", refuse("bind a socket"))
    # Every child process goes through Popen (subprocess.run, asyncio's subprocesses, clowder's spawn).
    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse("start a process"))


@pytest.fixture(scope="session")
def model_path() -> pathlib.Path:
    return bundled_model_path()


@pytest.fixture(scope="session")
def etcd(tmp_path_factory):
    """One etcd process for the whole run; tests isolate themselves by key prefix."""
    data = tmp_path_factory.mktemp("etcd")
    proc = start_etcd(data / "data", log_path=data / "etcd.log")
    yield proc
    proc.stop()


@pytest.fixture
def etcd_prefix() -> str:
    return fresh_prefix("test")


@pytest.fixture
async def state(etcd, etcd_prefix):
    async with prefixed_state(etcd.endpoint, etcd_prefix) as st:
        yield st
