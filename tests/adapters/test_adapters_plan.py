"""What the controller asks a replica to unload and load for its deployment's adapter set; adapter validation."""

from __future__ import annotations

import pytest
from clowder.controller.v1 import adapters_pb2
from clowder.runtime.v1 import adapters_pb2 as runtime_adapters_pb2
from clowder.runtime.v1 import runtime_pb2

from clowder_common.errors import InvalidArgument
from clowder_controller.adapters import plan, validate_adapter

pytestmark = pytest.mark.unit

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64


def endpoint(*loaded: tuple[str, str, bool]) -> runtime_pb2.Endpoint:
    return runtime_pb2.Endpoint(deployment="d", replica_id="r", adapters=[
        runtime_adapters_pb2.AdapterInfo(name=n, digest=digest, fixed=fixed) for n, digest, fixed in loaded])


def wanted(*adapters: tuple[str, str]) -> dict[str, adapters_pb2.Adapter]:
    return {n: adapters_pb2.Adapter(deployment="d", name=n, source_url=f"file:///{n}.gguf", digest=digest)
            for n, digest in adapters}


@pytest.mark.parametrize("loaded, want, unload, load", [
    # Nothing loaded, two wanted: both load, in name order.
    ((), (("b", ""), ("a", "")), [], ["a", "b"]),
    # Already there (the digest not yet recorded on the adapter counts as the same).
    ((("a", A, False),), (("a", ""),), [], []),
    ((("a", A, False),), (("a", A),), [], []),
    # Removed from the deployment: unloaded.
    ((("a", A, False), ("b", B, False)), (("a", A),), ["b"], []),
    # Replaced by other weights under the same name: out, then in.
    ((("a", A, False),), (("a", B),), ["a"], ["a"]),
    # Started with --adapter: never unloaded, never loaded over.
    ((("a", "", True),), (), [], []),
    ((("a", "", True),), (("a", B),), [], []),
])
def test_plan(loaded, want, unload, load):
    planned_unload, planned_load = plan(endpoint(*loaded), wanted(*want))
    assert planned_unload == unload
    assert [a.name for a in planned_load] == load


@pytest.mark.parametrize("changes, field", [
    ({"name": "Bad Name"}, "adapter.name"),
    ({"deployment": ""}, "adapter.deployment"),
    ({"source_url": "ftp://host/a.gguf"}, "adapter.source_url"),
    ({"source_url": "oci://registry/repo:tag"}, "adapter.source_url"),
    ({"source_url": "file://relative/a.gguf"}, "adapter.source_url"),
    ({"digest": "sha256:ABC"}, "adapter.digest"),
    ({"credentials_ref": "plain-secret"}, "adapter.credentials_ref"),
])
def test_bad_adapters_name_the_field(changes, field):
    adapter = adapters_pb2.Adapter(deployment="d", name="pirate", source_url="https://host/pirate.gguf", digest=A)
    for name, value in changes.items():
        setattr(adapter, name, value)
    with pytest.raises(InvalidArgument) as caught:
        validate_adapter(adapter)
    assert caught.value.violations[0].field == field


def test_a_good_adapter_passes():
    validate_adapter(adapters_pb2.Adapter(deployment="d", name="pirate", source_url="hf:///org/repo/pirate.gguf",
                                          digest=A, credentials_ref="env:HF_TOKEN"))
