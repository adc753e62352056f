"""`python -m clowder_runtime` as a real process: port file, a streamed completion, SIGTERM drains, exit 0."""

from __future__ import annotations

import signal
import sys
import threading

import grpc
import pytest
from clowder.runtime.v1 import runtime_pb2, runtime_pb2_grpc

from clowder_common.clients import sync_channel
from clowder_common.processes import spawn, terminate
from helpers.wait import wait_for_port_file

pytestmark = pytest.mark.processes


def test_process_serves_a_completion_and_exits_zero_on_sigterm(model_path, tmp_path):
    port_file = tmp_path / "runtime.port"
    log_path = tmp_path / "runtime.log"
    argv = [
        sys.executable, "-m", "clowder_runtime",
        "--model-path", str(model_path),
        "--listen", "127.0.0.1:0",
        "--port-file", str(port_file),
        "--deployment", "d",
        "--replica-id", "r1",
        "--threads", "1",
        "--context-size", "512",
    ]
    with open(log_path, "wb") as log_file:
        proc = spawn(argv, log_file)
    try:
        port = wait_for_port_file(port_file, proc, timeout=60)
        with sync_channel(f"127.0.0.1:{port}") as channel:
            stub = runtime_pb2_grpc.RuntimeServiceStub(channel)
            request = runtime_pb2.GenerateRequest(
                prompt="The sky is", sampling=runtime_pb2.SamplingParams(temperature=0, max_tokens=8)
            )
            responses = list(stub.Generate(request, timeout=30))
            stats = stub.GetStats(runtime_pb2.GetStatsRequest(), timeout=5)
        assert "".join(r.text for r in responses)
        assert responses[-1].finish_reason != runtime_pb2.FINISH_REASON_UNSPECIFIED
        assert 0 < responses[-1].usage.completion_tokens <= 8
        assert stats.model == "d"
        assert stats.requests_total == 1

        # SIGTERM while a generation runs: it is finished (drained), not cut off.
        drained: list[runtime_pb2.GenerateResponse] = []
        started = threading.Event()

        def long_generation() -> None:
            with sync_channel(f"127.0.0.1:{port}") as channel:
                call = runtime_pb2_grpc.RuntimeServiceStub(channel).Generate(
                    runtime_pb2.GenerateRequest(
                        prompt="Once upon a time", sampling=runtime_pb2.SamplingParams(temperature=0, max_tokens=48)
                    ),
                    timeout=30,
                )
                for response in call:
                    started.set()
                    drained.append(response)

        reader = threading.Thread(target=long_generation)
        reader.start()
        assert started.wait(30)
        proc.send_signal(signal.SIGTERM)
        reader.join(30)
        assert drained[-1].finish_reason == runtime_pb2.FINISH_REASON_LENGTH
        assert drained[-1].usage.completion_tokens == 48
        assert proc.wait(30) == 0
        log = log_path.read_text()
        assert f"serving on 127.0.0.1:{port}" in log
        assert not port_file.exists(), "a stopped runtime should not leave its port behind"
        with sync_channel(f"127.0.0.1:{port}") as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=0.5)
                raise AssertionError("the port still answers after exit")
            except grpc.FutureTimeoutError:
                pass
    finally:
        terminate(proc, grace=5)
