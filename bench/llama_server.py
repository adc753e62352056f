"""llama.cpp's own C++ server (`llama-server`), the strongest baseline for the runtime benchmark.

Built once from the llama.cpp sources vendored in the llama-cpp-python sdist of the version installed here,
so the baseline runs the same llama.cpp code as Clowder's runtime, with the same build options (a native
CPU build, as pip builds llama-cpp-python). The binary is cached outside the repository, under
$XDG_CACHE_HOME/clowder (or ~/.cache/clowder), keyed by the version; a build takes minutes on 2 cores and
prints its progress. Run as a script to build it ahead of a benchmark.
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile


def cache_root() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(pathlib.Path.home() / ".cache")
    return pathlib.Path(base) / "clowder"


def binary_path(version: str) -> pathlib.Path:
    return cache_root() / f"llama-server-{version}" / "llama-server"


def _run(argv: list[str], cwd: pathlib.Path | None = None) -> None:
    print("  $ " + " ".join(argv), flush=True)
    subprocess.run(argv, cwd=cwd, check=True)


def build(version: str) -> pathlib.Path:
    """Download the sdist, configure and build the `llama-server` target; returns the cached binary."""
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"cannot build llama-server: {', '.join(missing)} not installed")
    target = binary_path(version)
    with tempfile.TemporaryDirectory(prefix="llama-server-build-") as tmp:
        work = pathlib.Path(tmp)
        print(f"building llama-server {version} from the llama-cpp-python sdist (minutes on 2 cores)", flush=True)
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
              f"llama-cpp-python=={version}", "-d", str(work)])
        sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as archive:
            archive.extractall(work, filter="data")
        source = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
        out = work / "out"
        _run(["cmake", "-S", str(source), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
              "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
              "-DBUILD_SHARED_LIBS=OFF"])
        _run(["cmake", "--build", str(out), "--target", "llama-server", "-j", str(os.cpu_count() or 1)])
        built = next(out.rglob("bin/llama-server"))
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        shutil.copy2(built, partial)
        partial.replace(target)  # a half-copied binary is never taken for a built one
    print(f"llama-server cached at {target}", flush=True)
    return target


def llama_server() -> pathlib.Path | None:
    """The cached binary, built on first use; None (with the reason printed) where it cannot be built."""
    version = importlib.metadata.version("llama-cpp-python")
    target = binary_path(version)
    if target.exists():
        return target
    try:
        return build(version)
    except (RuntimeError, subprocess.CalledProcessError, StopIteration, OSError) as error:
        print(f"llama-server baseline skipped: it could not be built here ({error})", flush=True)
        return None


if __name__ == "__main__":
    path = llama_server()
    print(path or "not built")
    sys.exit(0 if path else 1)
