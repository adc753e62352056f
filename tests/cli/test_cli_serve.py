"""`clowder serve`: specs applied idempotently against a real controller process and etcd."""

from __future__ import annotations

import io
import os
import pathlib
import subprocess
import sys

import pytest
from rich.console import Console

from clowder_cli import serve
from clowder_cli.control import open_control_plane
from clowder_common.auth import TOKEN_ENV
from clowder_common.errors import FailedPrecondition, InvalidArgument, NotFound
from clowder_common.processes import free_port, terminate, wait_for_port

TOKEN = "serve-test-token"


@pytest.fixture(scope="module")
def control(etcd, tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("controller") / "controller.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "clowder_controller", "--listen", f"127.0.0.1:{port}", "--etcd-endpoints",
         etcd.endpoint, "--etcd-prefix", "/serve-test/", "--data-dir", str(tmp_path_factory.mktemp("data"))],
        env={**os.environ, TOKEN_ENV: TOKEN}, stdout=log, stderr=subprocess.STDOUT)
    wait_for_port("127.0.0.1", port, 30, proc)
    plane = open_control_plane(f"127.0.0.1:{port}", TOKEN)
    yield plane
    plane.close()
    terminate(proc)
    log.close()


def write_spec(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    path = tmp_path / "service.yaml"
    path.write_text(text)
    return path


SPEC = """
name: {name}
image:
  source: file:///models/smol.gguf
  configuration:
    systemPrompt: "{prompt}"
    contextSize: 1024
replicas: {replicas}
"""


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


@pytest.mark.processes
def test_up_twice_changes_nothing(control, tmp_path):
    spec = serve.load_spec(write_spec(tmp_path, SPEC.format(name="svc-a", prompt="Be brief.", replicas=2)))
    assert serve.serve_up(control, spec, quiet()) == 0
    first = control.deployments.get("svc-a")
    out = quiet()
    assert serve.serve_up(control, spec, out) == 0
    assert "nothing changed" in out.file.getvalue()
    again = control.deployments.get("svc-a")
    assert again.update_time == first.update_time
    image = control.images.get(spec.image_alias)
    assert image.configuration.system_prompt == "Be brief." and image.configuration.context_size == 1024


@pytest.mark.processes
def test_update_scales_and_rolls_to_a_new_image(control, tmp_path):
    spec = serve.load_spec(write_spec(tmp_path, SPEC.format(name="svc-b", prompt="One.", replicas=1)))
    serve.serve_up(control, spec, quiet())
    with pytest.raises(FailedPrecondition):
        serve.serve_up(control, serve.load_spec(write_spec(tmp_path, SPEC.format(
            name="svc-b", prompt="One.", replicas=3))), quiet())
    scaled = serve.load_spec(write_spec(tmp_path, SPEC.format(name="svc-b", prompt="One.", replicas=3)))
    serve.serve_update(control, scaled, quiet())
    got = control.deployments.get("svc-b")
    assert got.replicas == 3 and got.image == spec.image_alias
    changed = serve.load_spec(write_spec(tmp_path, SPEC.format(name="svc-b", prompt="Two.", replicas=3)))
    assert changed.image_alias != spec.image_alias
    serve.serve_update(control, changed, quiet())
    got = control.deployments.get("svc-b")
    assert got.image == changed.image_alias


@pytest.mark.processes
def test_down_removes_deployment_and_its_images(control, tmp_path):
    spec = serve.load_spec(write_spec(tmp_path, SPEC.format(name="svc-c", prompt="x", replicas=0)))
    serve.serve_up(control, spec, quiet())
    serve.serve_down(control, "svc-c", quiet())
    with pytest.raises(NotFound):
        control.deployments.get("svc-c")
    with pytest.raises(NotFound):
        control.images.get(spec.image_alias)
    with pytest.raises(NotFound):
        serve.serve_status(control, "svc-c", quiet())


@pytest.mark.unit
@pytest.mark.parametrize("text, field", [
    ("name: Bad Name\nimage: {source: file:///m.gguf}\n", "name"),
    ("name: ok\n", "image.source"),
    ("name: ok\nimage: {source: file:///m.gguf}\nreplicas: -1\n", "replicas"),
    ("name: ok\nimage: {source: file:///m.gguf, configuration: {temprature: 1}}\n", "image.configuration"),
])
def test_bad_specs_name_the_field(tmp_path, text, field):
    with pytest.raises(InvalidArgument) as err:
        serve.load_spec(write_spec(tmp_path, text))
    assert err.value.violations[0].field == field


@pytest.mark.unit
def test_unknown_top_level_key_is_rejected(tmp_path):
    with pytest.raises(InvalidArgument, match="unknown keys"):
        serve.load_spec(write_spec(tmp_path, "name: ok\nimage: {source: file:///m.gguf}\nreplica: 2\n"))


@pytest.mark.unit
def test_logs_print_each_replica_and_follow_new_lines(tmp_path):
    (tmp_path / "runtime-svc-r1.log").write_text("loaded\n")
    (tmp_path / "runtime-other-r9.log").write_text("not mine\n")
    out = quiet()
    serve.follow_logs(tmp_path, "svc", out, follow=False)
    text = out.file.getvalue()
    assert "[r1] loaded" in text and "not mine" not in text


RUNTIME_SPEC = """
name: {name}
image:
  source: file:///models/smol.gguf
  configuration: {{slots: 2, contextSize: 1024}}
replicas: 0
{runtime}
"""


@pytest.mark.processes
def test_spec_runtime_settings_reach_the_deployment_and_are_applied_idempotently(control, tmp_path):
    spec = serve.load_spec(write_spec(tmp_path, RUNTIME_SPEC.format(
        name="svc-r", runtime="runtime: {slots: 8, threads: 1, batch_size: 128}")))
    serve.serve_up(control, spec, quiet())
    got = control.deployments.get("svc-r")
    assert (got.slots, got.threads, got.batch_size, got.HasField("context_size")) == (8, 1, 128, False)
    # The aimage keeps its own slots; the deployment's override them.
    assert control.images.get(spec.image_alias).configuration.slots == 2
    out = quiet()
    serve.serve_up(control, spec, out)
    assert "nothing changed" in out.file.getvalue()
    # The spec is the whole truth: settings it drops are unset, new ones set; the aimage stays.
    changed = serve.load_spec(write_spec(tmp_path, RUNTIME_SPEC.format(
        name="svc-r", runtime="runtime: {slots: 16, context_size: 512}")))
    assert changed.image_alias == spec.image_alias
    out = quiet()
    serve.serve_update(control, changed, out)
    got = control.deployments.get("svc-r")
    assert (got.slots, got.context_size, got.HasField("threads"), got.HasField("batch_size")) == (16, 512, False,
                                                                                                  False)
    assert "slots 8 -> 16" in out.file.getvalue()
    # Ranges are the controller's to check, and it names the deployment's field.
    bad = serve.load_spec(write_spec(tmp_path, RUNTIME_SPEC.format(name="svc-r", runtime="runtime: {threads: 999}")))
    with pytest.raises(InvalidArgument) as err:
        serve.serve_update(control, bad, quiet())
    assert err.value.violations[0].field == "deployment.threads"


@pytest.mark.unit
@pytest.mark.parametrize("runtime, field", [
    ("runtime: {slot: 8}", "runtime"),
    ("runtime: [8]", "runtime"),
    ("runtime: {slots: 0}", "runtime.slots"),
    ("runtime: {threads: two}", "runtime.threads"),
])
def test_bad_runtime_sections_name_the_field(tmp_path, runtime, field):
    with pytest.raises(InvalidArgument) as err:
        serve.load_spec(write_spec(tmp_path, RUNTIME_SPEC.format(name="ok", runtime=runtime)))
    assert err.value.violations[0].field == field


@pytest.mark.processes
def test_deploy_and_image_add_flags_set_the_runtime_settings(control):
    from clowder_cli.main import build_parser, cmd_deploy, cmd_image

    args = build_parser().parse_args(["image", "add", "flagged", "file:///models/smol.gguf", "--no-pull",
                                      "--slots", "4", "--batch-size", "64", "--context-size", "1024"])
    cmd_image(args, control, quiet())
    configuration = control.images.get("flagged").configuration
    assert (configuration.slots, configuration.batch_size, configuration.context_size) == (4, 64, 1024)
    assert not configuration.HasField("threads")
    cmd_deploy(build_parser().parse_args(["deploy", "flagged", "--replicas", "0", "--slots", "8", "--threads", "1"]),
               control, quiet())
    got = control.deployments.get("flagged")
    assert (got.slots, got.threads, got.HasField("batch_size")) == (8, 1, False)
    # Deploying again changes only what the flags name.
    cmd_deploy(build_parser().parse_args(["deploy", "flagged", "--replicas", "0", "--context-size", "512"]),
               control, quiet())
    got = control.deployments.get("flagged")
    assert (got.slots, got.threads, got.context_size) == (8, 1, 512)
    with pytest.raises(InvalidArgument) as err:
        cmd_deploy(build_parser().parse_args(["deploy", "flagged", "--replicas", "0", "--slots", "0"]), control,
                   quiet())
    assert err.value.violations[0].field == "deployment.slots"
