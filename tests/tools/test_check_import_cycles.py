"""tools/check_import_cycles.py on small trees of its own, and on this repository (which must have no cycle)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

pytestmark = pytest.mark.unit

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "check_import_cycles.py"


def write(root: pathlib.Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _load_tool():
    # tools/ is not a package: load the script by its path, as `make lint` runs it.
    spec = importlib.util.spec_from_file_location("check_import_cycles", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


TOOL_MODULE = _load_tool()


class Result:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def check(capsys):
    def run(root: pathlib.Path) -> Result:
        code = TOOL_MODULE.main(["--root", str(root)])
        out = capsys.readouterr()
        return Result(code, out.out, out.err)
    return run


def test_a_cycle_through_a_lazy_and_a_type_checking_import_is_found(tmp_path, check):
    write(tmp_path, {
        "libs/common/clowder_common/__init__.py": "",
        "libs/common/clowder_common/x/__init__.py": "",
        "libs/common/clowder_common/x/a.py": "def f():\n    from . import b\n",
        "libs/common/clowder_common/x/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                             "    from clowder_common.x.a import f\n",
        "services/balancer/clowder_balancer/__init__.py": "",
        "services/balancer/clowder_balancer/one.py": "import clowder_balancer.two\n",
        "services/balancer/clowder_balancer/two.py": "from clowder_balancer import one\n",
    })
    result = check(tmp_path)
    assert result.returncode == 1, result.stdout
    assert "clowder_common.x.a -> clowder_common.x.b -> clowder_common.x.a" in result.stdout
    assert "clowder_common/x/b.py:3: clowder_common.x.b imports clowder_common.x.a (typing)" in result.stdout
    assert "clowder_balancer.one -> clowder_balancer.two -> clowder_balancer.one" in result.stdout


def test_packages_reexporting_their_modules_and_generated_code_are_not_cycles(tmp_path, check):
    write(tmp_path, {
        # The package re-exports a module that imports a sibling by its full name: no cycle.
        "cli/clowder_cli/__init__.py": "from clowder_cli.main import main\n",
        "cli/clowder_cli/main.py": "from clowder_cli.util import helper\n\ndef main():\n    pass\n",
        "cli/clowder_cli/util.py": "import clowder.controller.v1.controller_pb2\n\ndef helper():\n    pass\n",
        # Generated code that imports ours back is not looked at.
        "libs/common/gen/clowder/controller/v1/controller_pb2.py": "import clowder_cli.util\n",
    })
    result = check(tmp_path)
    assert result.returncode == 0, result.stdout
    assert "no import cycles in 3 modules" in result.stdout


def test_this_repository_has_no_import_cycle(check):
    result = check(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
