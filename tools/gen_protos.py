"""Regenerate the Python code for protos/ into libs/common/gen (run by `make gen`)."""

from __future__ import annotations

import pathlib
import shutil
import sys

from google.api import annotations_pb2
import grpc_tools
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "libs" / "common" / "gen"
# buf resolves google/api/*.proto from a local module, since `buf dep update`
# cannot reach the network here; the files come from the installed wheel.
GOOGLEAPIS = ROOT / "build" / "googleapis"
GOOGLEAPIS_FILES = ("annotations.proto", "http.proto")


def main() -> int:
    googleapis_src = pathlib.Path(annotations_pb2.__file__).parent
    site_packages = googleapis_src.parent.parent
    wkt = pathlib.Path(grpc_tools.__file__).parent / "_proto"

    (GOOGLEAPIS / "google" / "api").mkdir(parents=True, exist_ok=True)
    for name in GOOGLEAPIS_FILES:
        shutil.copyfile(googleapis_src / name, GOOGLEAPIS / "google" / "api" / name)

    shutil.rmtree(OUT / "clowder", ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{site_packages}",
        f"-I{wkt}",
        f"--python_out={OUT}",
        f"--pyi_out={OUT}",
        f"--grpc_python_out={OUT}",
        *sources,
    ]
    if protoc.main(args) != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    # `clowder` stays a namespace package (the SDK and services share the
    # name); every folder below it is a regular package.
    for folder in (OUT / "clowder").rglob("*"):
        if folder.is_dir() and folder.name != "__pycache__":
            (folder / "__init__.py").touch()
    print(f"generated {len(sources)} protos into {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
