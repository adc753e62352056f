"""Typed config: defaults < file < environment < overrides, and loud failures on typos."""

from __future__ import annotations

import dataclasses

import pytest

from clowder_common.config import EtcdConfig, load_config
from clowder_common.errors import InvalidArgument

pytestmark = pytest.mark.unit


@dataclasses.dataclass(frozen=True)
class SampleConfig(EtcdConfig):
    listen: str = "127.0.0.1:1"
    threads: int = 0
    ratio: float = 0.5
    debug: bool = False
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    note: str | None = None


def test_layers_apply_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("listen: 0.0.0.0:2\nthreads: 3\nlabels: {zone: a}\n")
    env = {"CLOWDER_THREADS": "4", "CLOWDER_DEBUG": "yes", "CLOWDER_ETCD_ENDPOINTS": "h1:1, h2:2"}
    config = load_config(SampleConfig, path, env=env, overrides={"ratio": "0.25", "listen": None})
    assert config.listen == "0.0.0.0:2"  # a None override keeps the file's value
    assert config.threads == 4 and config.debug is True and config.ratio == 0.25
    assert config.etcd_endpoints == ("h1:1", "h2:2")
    assert config.labels == {"zone": "a"}
    assert config.note is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.threads = 9  # type: ignore[misc]


def test_unknown_file_keys_and_bad_values_fail(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("thread: 3\n")
    with pytest.raises(InvalidArgument, match="unknown keys"):
        load_config(SampleConfig, path, env={})
    with pytest.raises(InvalidArgument) as err:
        load_config(SampleConfig, None, env={"CLOWDER_THREADS": "many"})
    assert err.value.violations[0].field == "threads"
    with pytest.raises(InvalidArgument):
        load_config(SampleConfig, None, env={"CLOWDER_DEBUG": "perhaps"})


def test_labels_from_environment():
    config = load_config(SampleConfig, None, env={"CLOWDER_LABELS": "gpu=none,zone=b"})
    assert config.labels == {"gpu": "none", "zone": "b"}
