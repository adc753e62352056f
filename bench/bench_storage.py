"""Verified pull vs curl and curl+sha256sum from one loopback HTTP server; disk used by aimages sharing a base."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from clowder.storage.v1 import storage_pb2, storage_pb2_grpc
from clowder_common.auth import TOKEN_ENV, bearer_metadata
from clowder_common.clients import sync_channel
from clowder_common.etcd_server import start_etcd
from clowder_common.processes import free_port, spawn, terminate, wait_for_port

SERVER = """
import sys
from aiohttp import web
root = sys.argv[1]
async def handle(request):
    # FileResponse honours Range and sends with sendfile(): the server costs little CPU, as nginx would.
    return web.FileResponse(f"{root}/{request.match_info['name']}")
app = web.Application()
app.router.add_get("/{name}", handle)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), print=None, access_log=None)
"""


def write_random(path: pathlib.Path, size: int) -> str:
    hasher = hashlib.sha256()
    block = 8 << 20
    with open(path, "wb") as handle:
        left = size
        while left:
            chunk = os.urandom(min(block, left))
            hasher.update(chunk)
            handle.write(chunk)
            left -= len(chunk)
    return "sha256:" + hasher.hexdigest()


def pull(stub, metadata, url: str, expected: str) -> float:
    started = time.perf_counter()
    last = None
    # The loop keeps the last message: the pull's result, checked below.
    for last in stub.PullBlob(storage_pb2.PullBlobRequest(source_url=url, expected_digest=expected),  # noqa: B007
                              metadata=metadata, timeout=600):
        pass
    elapsed = time.perf_counter() - started
    assert last is not None and last.blob.digest == expected, "pull did not return the verified blob"
    return elapsed


def disk_bytes(root: pathlib.Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--base-mb", type=int, default=64)
    args = parser.parse_args()
    if shutil.which("curl") is None or shutil.which("sha256sum") is None:
        raise SystemExit("needs curl and sha256sum (apt-get install curl coreutils)")
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-storage-"))
    token = secrets.token_urlsafe(16)
    procs = []
    try:
        files = work / "files"
        files.mkdir()
        size = args.size_mb * 1_000_000
        digest = write_random(files / "model.gguf", size)
        http_port, storage_port = free_port(), free_port()
        logs = [open(work / name, "wb") for name in ("http.log", "storage.log")]  # noqa: SIM115
        server = spawn([sys.executable, "-c", SERVER, str(files), str(http_port)], logs[0])
        procs.append(server)
        wait_for_port("127.0.0.1", http_port, 20, server)
        etcd = start_etcd(work / "etcd")
        env = {**os.environ, TOKEN_ENV: token}
        storage = spawn([sys.executable, "-m", "clowder_storage", "--listen", f"127.0.0.1:{storage_port}",
                         "--data-dir", str(work / "store"), "--etcd-endpoints", etcd.endpoint,
                         "--log-level", "WARNING"], logs[1], env=env)
        procs.append(storage)
        wait_for_port("127.0.0.1", storage_port, 30, storage)
        stub = storage_pb2_grpc.StorageServiceStub(sync_channel(f"127.0.0.1:{storage_port}"))
        metadata = bearer_metadata(token)
        url = f"http://127.0.0.1:{http_port}/model.gguf"
        out = work / "curl.out"
        curl = ["curl", "-sSf", "-o", str(out), url]

        def run_curl() -> float:
            started = time.perf_counter()
            subprocess.run(curl, check=True)
            return time.perf_counter() - started

        def run_careful() -> float:
            started = time.perf_counter()
            subprocess.run(curl, check=True)
            line = subprocess.run(["sha256sum", str(out)], check=True, capture_output=True, text=True).stdout
            elapsed = time.perf_counter() - started
            assert "sha256:" + line.split()[0] == digest
            return elapsed

        def run_durable() -> float:
            started = time.perf_counter()
            subprocess.run(curl, check=True)
            subprocess.run(["sync", "--data", str(out)], check=True)
            return time.perf_counter() - started

        def run_clowder() -> float:
            return pull(stub, metadata, url, digest)

        # clowder's pull verifies every byte and is crash-safe: large blobs are renamed into place once
        # verified and flushed in the background under a journal that startup re-checks. Plain curl leaves its
        # bytes in the page cache too; curl+fsync (durable, unverified) is printed for the disk's share.
        contenders = {"curl": run_curl, "curl+sha256sum": run_careful, "curl+fsync": run_durable,
                      "clowder": run_clowder}
        results: dict[str, list[float]] = {name: [] for name in contenders}
        # The source file in the page cache before anyone is timed, as it is for every later contender.
        subprocess.run(["curl", "-sSf", "-o", os.devnull, url], check=True)
        names = list(contenders)
        for round_ in range(args.rounds):
            # Interleaved, and rotated so no contender always follows the same one under the shared load.
            order = names[round_ % len(names):] + names[:round_ % len(names)]
            for name in order:
                # Nobody pays for the previous contender's writeback (curl's dirty pages, clowder's flush).
                subprocess.run(["sync"], check=True)
                results[name].append(contenders[name]())
                if name == "clowder":
                    stub.DeleteBlob(storage_pb2.DeleteBlobRequest(digest=digest), metadata=metadata, timeout=30)
                else:
                    out.unlink()
            print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in results.items()),
                  flush=True)
        med = {k: statistics.median(v) for k, v in results.items()}
        # Per-round ratios: each round's contenders ran back to back under the same load.
        vs_curl = statistics.median(c / p for c, p in zip(results["curl"], results["clowder"]))
        vs_careful = statistics.median(c / p for c, p in zip(results["curl+sha256sum"], results["clowder"]))
        vs_durable = statistics.median(c / p for c, p in zip(results["curl+fsync"], results["clowder"]))
        for name, value in med.items():
            print(f"{name:>16}: median {value:.2f}s = {size / value / 1e6:.0f} MB/s")

        # Ten aimages over one base model, each with its own small adapter layer.
        base_digest = write_random(files / "base.gguf", args.base_mb * 1_000_000)
        logical = args.base_mb * 1_000_000
        for i in range(args.images):
            adapter = files / f"adapter-{i}.gguf"
            write_random(adapter, 200_000)
            logical += 200_000
            request = storage_pb2.PullImageRequest(
                name=f"img-{i}", configuration_json=json.dumps({"system_prompt": f"you are {i}"}),
                layers=[storage_pb2.LayerSource(kind=storage_pb2.LAYER_KIND_MODEL,
                                                source_url=f"file://{files}/base.gguf", expected_digest=base_digest),
                        storage_pb2.LayerSource(kind=storage_pb2.LAYER_KIND_ADAPTER,
                                                source_url=f"file://{adapter}")])
            for _ in stub.PullImage(request, metadata=metadata, timeout=600):
                pass
        listed = stub.ListImages(storage_pb2.ListImagesRequest(), metadata=metadata, timeout=30).images
        assert len(listed) == args.images and all(i.complete for i in listed)
        used = disk_bytes(work / "store" / "blobs")
        dedup = used / logical
        print(f"{args.images} aimages over a {args.base_mb} MB base: {used / 1e6:.1f} MB on disk for"
              f" {logical / 1e6:.1f} MB of distinct content (naive copies: {args.images * args.base_mb} MB)")
        print(json.dumps({
            "size_mb": args.size_mb,
            "rounds": args.rounds,
            "median_s": {k: round(v, 3) for k, v in med.items()},
            "pull_ratio_vs_curl": round(vs_curl, 3),
            "speedup_vs_curl_then_sha256sum": round(vs_careful, 3),
            "ratio_of_medians_vs_curl": round(med["curl"] / med["clowder"], 3),
            "pull_ratio_vs_curl_then_fsync": round(vs_durable, 3),
            "dedup_disk_ratio": round(dedup, 4),
        }))
        return 0
    finally:
        for proc in reversed(procs):
            terminate(proc, 5)
        if "etcd" in locals():
            etcd.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
