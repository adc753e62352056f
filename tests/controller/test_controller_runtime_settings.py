"""Slots, threads, context and batch size as deployment settings: precedence, validation over gRPC, update masks,
the runtime argv, and a real runtime serving 8 streams at once because its deployment says 8 slots."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import field_mask_pb2

from clowder.controller.v1 import controller_pb2, controller_pb2_grpc, resources_pb2
from clowder.runtime.v1 import runtime_pb2, runtime_pb2_grpc
from clowder_common import keys
from clowder_common.auth import bearer_metadata
from clowder_common.runtime_settings import DEFAULT_SLOTS, RuntimeSettings, resolve, with_defaults
from clowder_controller.app import create_controller
from clowder_controller.kubernetes_launcher import KubernetesSettings, build_pod
from clowder_controller.launcher import LocalProcessLauncher, RuntimeSpec
from clowder_controller.reconciler import template_hash
from clowder_storage.app import create_storage

from controller_helpers import error_of
from helpers.configs import controller_config, storage_config
from helpers.wait import wait_for

TOKEN = "runtime-settings-test-token"
AUTH = bearer_metadata(TOKEN)
# A shape with a training context, as CreateImage reads it from a file:// GGUF.
SHAPE = resources_pb2.ModelShape(layers=30, embedding_length=576, heads=9, kv_heads=3, train_context=8192,
                                 file_bytes=1 << 20)


@pytest.mark.unit
@pytest.mark.parametrize("deployment, image, cluster, expected", [
    # Nothing set anywhere: the runtime's defaults (threads stay 0: the controller shares the node's cores).
    ({}, {}, {}, dict(slots=DEFAULT_SLOTS, threads=0, context_size=2048, batch_size=256)),
    # The aimage's values over the cluster's ...
    ({}, dict(slots=2, context_size=512), dict(slots=4, threads=3),
     dict(slots=2, threads=3, context_size=512, batch_size=256)),
    # ... and the deployment's over both, field by field.
    (dict(slots=8, batch_size=64), dict(slots=2, threads=1, context_size=512), dict(slots=4),
     dict(slots=8, threads=1, context_size=512, batch_size=64)),
    (dict(context_size=4096, threads=2), dict(context_size=512, batch_size=32), {},
     dict(slots=DEFAULT_SLOTS, threads=2, context_size=4096, batch_size=32)),
])
def test_the_deployment_wins_over_the_aimage_which_wins_over_the_cluster(deployment, image, cluster, expected):
    got = with_defaults(resolve(resources_pb2.Deployment(name="d", **deployment),
                                resources_pb2.ImageConfiguration(**image), RuntimeSettings(**cluster)))
    assert got == RuntimeSettings(**expected)


@pytest.mark.unit
def test_settings_reach_the_runtime_argv_and_the_pod():
    spec = RuntimeSpec(deployment="d", replica_id="r", node="n1", digest="sha256:" + "a" * 64,
                       storage_address="127.0.0.1:9", configuration=resources_pb2.ImageConfiguration(),
                       threads=2, slots=8, context_size=1024, batch_size=128)
    launcher = LocalProcessLauncher(("127.0.0.1:2379",), "/p/", "127.0.0.1:0", None, None)  # type: ignore[arg-type]
    argv = launcher._argv(spec)
    pairs = dict(zip(argv, argv[1:]))
    assert (pairs["--threads"], pairs["--slots"], pairs["--context-size"], pairs["--prefill-chunk"]) == (
        "2", "8", "1024", "128")
    pod = build_pod(spec, KubernetesSettings(), ("etcd:2379",), "/p/", {"name": "o", "uid": "u"})
    args = pod["spec"]["containers"][0]["args"]
    assert dict(zip(args, args[1:]))["--slots"] == "8"
    # Unset settings are not passed: the runtime applies the aimage's, else its own defaults.
    bare = RuntimeSpec(deployment="d", replica_id="r", node="n1", digest="sha256:00", storage_address="h:1",
                       configuration=resources_pb2.ImageConfiguration(), threads=1)
    assert bare.settings_args() == ["--threads", "1"]


@pytest.mark.unit
def test_template_hash_changes_with_settings_and_only_when_they_are_set():
    plain = resources_pb2.Deployment(name="d", image="m", replicas=2)
    # Deployments from before these fields keep their hash (no rolling update on upgrade).
    assert template_hash(plain) == template_hash(resources_pb2.Deployment(name="d", image="m", replicas=5))
    eight = resources_pb2.Deployment(name="d", image="m", slots=8)
    assert template_hash(eight) != template_hash(plain)
    assert template_hash(eight) != template_hash(resources_pb2.Deployment(name="d", image="m", slots=4))


@pytest.fixture
async def control(etcd, etcd_prefix, state, tmp_path):
    config = controller_config(etcd.endpoint, etcd_prefix, tmp_path, max_replicas=10)
    app = await create_controller(config, TOKEN)
    await app.start()
    # An aimage whose model was trained for 8192 tokens, and a node with 2 CPUs.
    await state.put(state.key(keys.image("m")), resources_pb2.Image(
        alias="m", source_url="file:///m.gguf", model_shape=SHAPE,
        configuration=resources_pb2.ImageConfiguration(context_size=1024)))
    await state.put(state.key(keys.node("n1")), resources_pb2.Node(name="n1", storage_address="127.0.0.1:9", cpus=2))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    yield (controller_pb2_grpc.DeploymentServiceStub(channel), controller_pb2_grpc.ImageServiceStub(channel))
    await channel.close()
    await app.stop()


@pytest.mark.processes
@pytest.mark.parametrize("fields, field, says", [
    ({"slots": 0}, "deployment.slots", "between 1 and 256"),
    ({"slots": 257}, "deployment.slots", "between 1 and 256"),
    ({"threads": 0}, "deployment.threads", "between 1 and 512"),
    # More threads than the largest registered node has CPUs (2).
    ({"threads": 3}, "deployment.threads", "at most 2"),
    ({"context_size": 8}, "deployment.context_size", "between 16"),
    # Does not fit the context the model was trained for.
    ({"context_size": 16384}, "deployment.context_size", "at most 8192"),
    # A prefill step never holds more than the context (the aimage's 1024 here).
    ({"batch_size": 2048}, "deployment.batch_size", "context size (1024)"),
    ({"batch_size": 0}, "deployment.batch_size", "between 1"),
])
async def test_bad_settings_are_refused_naming_the_field(control, fields, field, says):
    deployments, _ = control
    err = await error_of(deployments.CreateDeployment(controller_pb2.CreateDeploymentRequest(
        deployment=resources_pb2.Deployment(name="d", image="m", replicas=0, **fields)), metadata=AUTH))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    violations = {v.field: v.description for v in err.violations}
    assert list(violations) == [field] and says in violations[field]


@pytest.mark.processes
async def test_good_settings_are_kept_updated_by_mask_and_cleared(control):
    deployments, _ = control
    created = (await deployments.CreateDeployment(controller_pb2.CreateDeploymentRequest(
        deployment=resources_pb2.Deployment(name="d", image="m", replicas=0, slots=8, threads=2,
                                            context_size=4096, batch_size=512)), metadata=AUTH)).deployment
    assert (created.slots, created.threads, created.context_size, created.batch_size) == (8, 2, 4096, 512)

    async def update(paths, **fields):
        return (await deployments.UpdateDeployment(controller_pb2.UpdateDeploymentRequest(
            deployment=resources_pb2.Deployment(name="d", **fields),
            update_mask=field_mask_pb2.FieldMask(paths=paths)), metadata=AUTH)).deployment

    updated = await update(["slots", "threads"], slots=16)
    # Named and given: set; named and not given: cleared (the aimage's applies again); not named: kept.
    assert updated.slots == 16 and not updated.HasField("threads")
    assert (updated.context_size, updated.batch_size) == (4096, 512)
    # The whole result is checked: a smaller context than the batch is refused.
    err = await error_of(update(["context_size"], context_size=256))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.violations[0].field == "deployment.batch_size"
    err = await error_of(update(["threads"], threads=600))
    assert err.violations[0].field == "deployment.threads"


@pytest.mark.processes
async def test_threads_are_checked_against_the_nodes_when_they_change(control, state):
    deployments, _ = control
    await deployments.CreateDeployment(controller_pb2.CreateDeploymentRequest(
        deployment=resources_pb2.Deployment(name="d", image="m", replicas=0, threads=2)), metadata=AUTH)
    # The 2-CPU node is replaced by a 1-CPU one: scaling still works, asking for 2 threads again does not.
    await state.put(state.key(keys.node("n1")), resources_pb2.Node(name="n1", storage_address="127.0.0.1:9", cpus=1))
    scaled = await deployments.UpdateDeployment(controller_pb2.UpdateDeploymentRequest(
        deployment=resources_pb2.Deployment(name="d", replicas=1)), metadata=AUTH)
    assert scaled.deployment.replicas == 1 and scaled.deployment.threads == 2
    err = await error_of(deployments.UpdateDeployment(controller_pb2.UpdateDeploymentRequest(
        deployment=resources_pb2.Deployment(name="d", threads=2),
        update_mask=field_mask_pb2.FieldMask(paths=["threads"])), metadata=AUTH))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.violations[0].field == "deployment.threads"
    assert "at most 1" in err.violations[0].description


@pytest.mark.processes
async def test_bad_aimage_settings_are_refused_naming_the_field(control, model_path):
    _, images = control

    async def create(alias, url="file:///models/none.gguf", **config):
        return await images.CreateImage(controller_pb2.CreateImageRequest(image=resources_pb2.Image(
            alias=alias, source_url=url, configuration=resources_pb2.ImageConfiguration(**config))), metadata=AUTH)

    for config, field in (({"slots": 0}, "image.configuration.slots"),
                          ({"threads": 4}, "image.configuration.threads"),
                          ({"batch_size": 4096}, "image.configuration.batch_size")):
        err = await error_of(create("bad", **config))
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in err.violations] == [field], config
    # The bundled model was trained for 8192 tokens (read from its GGUF at creation).
    err = await error_of(create("big", model_path.as_uri(), context_size=16384))
    assert [v.field for v in err.violations] == ["image.configuration.context_size"]
    assert "8192" in err.violations[0].description
    good = (await create("good", model_path.as_uri(), context_size=8192, slots=4, threads=2)).image
    assert (good.configuration.slots, good.configuration.threads) == (4, 2)


async def start_node_and_controller(etcd, etcd_prefix, tmp_path):
    """A storage node n1 and a controller on this etcd prefix, both started (stop them: controller, then node)."""
    node_config = storage_config(etcd.endpoint, etcd_prefix, tmp_path / "n1", "n1", lease_ttl_s=2)
    node = await create_storage(node_config, TOKEN)
    await node.start()
    config = controller_config(etcd.endpoint, etcd_prefix, tmp_path / "controller", runtime_stop_grace_s=3)
    controller = await create_controller(config, TOKEN)
    await controller.start()
    return node, controller


@pytest.mark.processes
async def test_a_deployment_with_8_slots_serves_8_streams_at_once(etcd, etcd_prefix, state, tmp_path, model_path):
    """The aimage says 2 slots; the deployment's 8 win, reach the real runtime, and 8 streams run together."""
    node, controller = await start_node_and_controller(etcd, etcd_prefix, tmp_path)
    calls = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{controller.port}") as channel:
            images = controller_pb2_grpc.ImageServiceStub(channel)
            deployments = controller_pb2_grpc.DeploymentServiceStub(channel)
            await images.CreateImage(controller_pb2.CreateImageRequest(image=resources_pb2.Image(
                alias="smol", source_url=model_path.as_uri(),
                configuration=resources_pb2.ImageConfiguration(slots=2, context_size=256))), metadata=AUTH)
            # One thread: 8 streams on 2 shared cores still run together; only their pace is slower.
            await deployments.CreateDeployment(controller_pb2.CreateDeploymentRequest(
                deployment=resources_pb2.Deployment(name="smol", image="smol", replicas=1, slots=8, threads=1,
                                                    context_size=512)), metadata=AUTH)

        async def ready():
            items, _ = await state.list(state.key(keys.replicas_of("smol")), resources_pb2.Replica)
            found = [i.value for i in items if i.value.state == resources_pb2.REPLICA_STATE_READY]
            return found[0] if found else None

        replica = await wait_for(ready, 120, "a ready replica")
        async with grpc.aio.insecure_channel(replica.endpoint) as channel:
            runtime = runtime_pb2_grpc.RuntimeServiceStub(channel)
            stats = await runtime.GetStats(runtime_pb2.GetStatsRequest(), timeout=10)
            assert stats.slots == 8
            for index in range(8):
                call = runtime.Generate(runtime_pb2.GenerateRequest(
                    prompt=f"Story {index}: once upon a time",
                    sampling=runtime_pb2.SamplingParams(temperature=0, max_tokens=400)), timeout=120)
                calls.append(call)
            # Each stream has begun (its first token came) ...
            await asyncio.wait_for(asyncio.gather(*(call.read() for call in calls)), 90)

            async def all_running():
                current = await runtime.GetStats(runtime_pb2.GetStatsRequest(), timeout=10)
                return current if current.num_requests_running == 8 else None

            # ... and all 8 hold a slot at the same moment, none waiting (the aimage's 2 slots would queue 6).
            together = await wait_for(all_running, 30, "8 requests running at once")
            assert together.num_requests_waiting == 0
            for call in calls:
                call.cancel()
    finally:
        for call in calls:
            call.cancel()
        await controller.stop()
        await node.stop()


@pytest.mark.unit
def test_unset_threads_make_the_runtime_follow_its_node():
    spec = dict(deployment="d", replica_id="r", node="n1", digest="sha256:00", storage_address="h:1",
                configuration=resources_pb2.ImageConfiguration())
    # Threads 1 is then only the start value (the controller's share); the runtime follows the node's runtimes.
    assert RuntimeSpec(**spec, threads=1, node_cpus=2).settings_args() == ["--threads", "1", "--node-cpus", "2"]
    assert RuntimeSpec(**spec, threads=2).settings_args() == ["--threads", "2"]


@pytest.mark.processes
async def test_a_replica_started_alone_gives_cores_back_when_a_second_joins(etcd, etcd_prefix, state, tmp_path,
                                                                          model_path):
    """bench-chaos (issue 11): the first replica kept every core after a scale-up, 3 threads on 2 cores."""
    # No runtime_threads: nothing fixes the threads.
    node, controller = await start_node_and_controller(etcd, etcd_prefix, tmp_path)
    logs = tmp_path / "controller" / "logs"
    try:
        cpus = (await state.get(state.key(keys.node("n1")), resources_pb2.Node)).value.cpus
        await state.put(state.key(keys.image("smol")), resources_pb2.Image(
            alias="smol", source_url=model_path.as_uri(),
            configuration=resources_pb2.ImageConfiguration(slots=1, context_size=256)))

        async def scale(replicas: int) -> list[resources_pb2.Replica]:
            await state.put(state.key(keys.deployment("smol")),
                            resources_pb2.Deployment(name="smol", image="smol", replicas=replicas))

            async def ready():
                items, _ = await state.list(state.key(keys.replicas_of("smol")), resources_pb2.Replica)
                found = [i.value for i in items if i.value.state == resources_pb2.REPLICA_STATE_READY]
                return found if len(found) == replicas == len(items) else None

            return await wait_for(ready, 120, f"{replicas} ready replicas")

        def log_of(replica: resources_pb2.Replica) -> str:
            return (logs / f"runtime-smol-{replica.id}.log").read_text(errors="replace")

        async def logged(replica: resources_pb2.Replica, text: str) -> bool:
            return text in log_of(replica)

        [first] = await scale(1)
        await wait_for(lambda: logged(first, f"{cpus} cpus shared by 1 runtimes -> {cpus} threads"), 30,
                       "the first replica on every core")
        second = next(r for r in await scale(2) if r.id != first.id)
        share = max(1, cpus // 2)
        await wait_for(lambda: logged(first, f"{cpus} cpus shared by 2 runtimes -> {share} threads"), 30,
                       "the first replica on its share")
        await wait_for(lambda: logged(second, f"{cpus} cpus shared by 2 runtimes -> {share} threads"), 30,
                       "the second replica on its share")
        if cpus > 1:
            assert f"llama.cpp threads {cpus} -> {share}" in log_of(first)
    finally:
        await controller.stop()
        await node.stop()
