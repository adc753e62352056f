"""BalancerConfig: documented defaults, file < env < flags, and bad values refused with the field named."""

from __future__ import annotations

import pytest

from clowder_common.config import load_config
from clowder_common.errors import InvalidArgument

from clowder_balancer.config import BalancerConfig


@pytest.mark.unit
def test_defaults() -> None:
    config = BalancerConfig()
    assert (config.http_listen, config.grpc_listen) == ("127.0.0.1:3090", "127.0.0.1:3091")
    assert (config.ready_timeout_s, config.request_timeout_s, config.first_token_timeout_s) == (60, 600, 60)
    assert config.name == "balancer"


@pytest.mark.unit
def test_file_then_env_then_overrides(tmp_path) -> None:
    path = tmp_path / "balancer.yaml"
    path.write_text("http_listen: 0.0.0.0:8080\nready_timeout_s: 5\netcd_endpoints: [a:1, b:2]\n")
    config = load_config(
        BalancerConfig, path, env={"CLOWDER_READY_TIMEOUT_S": "7", "CLOWDER_GRPC_LISTEN": "127.0.0.1:9"},
        overrides={"grpc_listen": "127.0.0.1:10", "first_token_timeout_s": None},
    )
    assert config.http_listen == "0.0.0.0:8080"
    assert config.ready_timeout_s == 7.0
    assert config.grpc_listen == "127.0.0.1:10"
    assert config.etcd_endpoints == ("a:1", "b:2")
    assert config.first_token_timeout_s == 60


@pytest.mark.unit
@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"http_listen": "3090"}, "http_listen"),
        ({"grpc_listen": "host:port"}, "grpc_listen"),
        ({"grpc_listen": "h:70000"}, "grpc_listen"),
        ({"ready_timeout_s": -1}, "ready_timeout_s"),
        ({"request_timeout_s": 0}, "request_timeout_s"),
        ({"first_token_timeout_s": 0}, "first_token_timeout_s"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_body_bytes": 10}, "max_body_bytes"),
        ({"stream_idle_timeout_s": 0}, "stream_idle_timeout_s"),
        ({"max_continuations": -1}, "max_continuations"),
        ({"endpoint_grace_s": -1}, "endpoint_grace_s"),
        ({"stats_interval_s": -1}, "stats_interval_s"),
        ({"outlier_consecutive_failures": 0}, "outlier_consecutive_failures"),
        ({"outlier_base_ejection_s": -1}, "outlier_base_ejection_s"),
        ({"prefix_block_chars": 8}, "prefix_block_chars"),
        ({"session_header": "X-Session"}, "session_header"),
        ({"load_report_interval_s": 0}, "load_report_interval_s"),
        ({"load_lease_ttl_s": 1}, "load_lease_ttl_s"),
    ],
)
def test_bad_values_name_their_field(values: dict, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        BalancerConfig(**values)
    assert [v.field for v in info.value.violations] == [field]


@pytest.mark.inprocess
def test_unknown_routing_profile_fails_at_build_time(etcd) -> None:
    import asyncio

    from clowder_balancer.app import create_balancer

    with pytest.raises(InvalidArgument) as info:
        asyncio.run(create_balancer(BalancerConfig(etcd_endpoints=(etcd.endpoint,), routing_profile="fastest")))
    assert info.value.violations[0].field == "routing_profile"
