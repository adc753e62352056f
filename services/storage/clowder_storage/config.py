"""Storage service configuration: where the store lives, how it pulls, how the node registers."""

from __future__ import annotations

import dataclasses
import os

from clowder_common.config import EtcdConfig
from clowder_common.errors import InvalidArgument
from clowder_common.keys import validate_name
from clowder_common.security import SecurityConfig


@dataclasses.dataclass(frozen=True)
class StorageConfig(EtcdConfig, SecurityConfig):
    """Every field can come from YAML, from CLOWDER_<FIELD>, or from a command-line flag."""

    # gRPC listen address; port 0 picks a free one.
    listen: str = "127.0.0.1:3093"
    # Address other nodes and the controller use to reach this service ("host" or "host:port").
    # Empty: the listen host (the machine's FQDN when listening on a wildcard) and the bound port.
    advertise_address: str = ""
    # Root of the content-addressed store (blobs/sha256/<hex>, tmp/); "~" is expanded.
    data_dir: str = "~/.local/share/clowder/storage"
    # Name of this node in etcd (nodes/<node_name>).
    node_name: str = "local"
    # Placement labels published on the Node ("k=v,k2=v2" from the environment).
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    # GPUs published on the Node for GPU placement; -1 counts /dev/nvidia<N> devices.
    gpus: int = -1
    # TTL of the lease that holds nodes/<node_name>; the node vanishes this long after a crash.
    lease_ttl_s: int = 10
    # Downloads running at once; further pulls wait their turn.
    max_parallel_pulls: int = 4
    # Threads that hash, write and read blobs (the event loop never touches file data).
    io_threads: int = 4
    # HTTP(S) sources: connecting, each read, and the whole transfer.
    http_connect_timeout_s: float = 10.0
    http_read_timeout_s: float = 30.0
    http_total_timeout_s: float = 3600.0
    # Pull retries in a row without progress before a broken transfer fails (progress resets the count).
    pull_retries: int = 5
    # Sources at least this large that serve byte ranges are fetched over parallel_parts connections, one
    # piece after another in file order so hashing keeps up: 1/parallel_parts of the file, clamped to
    # [parallel_part_min_bytes, parallel_part_max_bytes] (see transfer.py for the measurements).
    parallel_min_bytes: int = 64 << 20
    parallel_parts: int = 4
    parallel_part_min_bytes: int = 16 << 20
    parallel_part_max_bytes: int = 128 << 20
    # A pull is refused when it would leave less than this many bytes free on the store's volume.
    reserve_free_bytes: int = 0
    # Most bytes the store may hold (0: the volume is the limit). A pull that cannot fit, even after
    # evicting unpinned blobs, fails up front with RESOURCE_EXHAUSTED.
    max_store_bytes: int = 0
    # Largest single blob accepted (0: no limit); a source sending more is cut off.
    max_blob_bytes: int = 0
    # Blobs at least this large are renamed into place once verified and flushed to disk in the background,
    # under a journal re-checked at startup (durability.py); smaller ones are flushed first. 0: always first.
    background_flush_min_bytes: int = 4 << 20
    # Eviction: above high_watermark x max_store_bytes, least recently used unpinned blobs go until the
    # store is under low_watermark x max_store_bytes. Only with max_store_bytes set.
    # Garbage collection spares unreferenced blobs used (pulled, resolved, path asked) this recently:
    # a PullBlob caller that has not yet written a manifest or pinned its blob keeps it.
    gc_grace_s: float = 600.0
    high_watermark: float = 0.9
    low_watermark: float = 0.7
    # Hugging Face hub for hf:// sources (HF_ENDPOINT is honoured too).
    hf_endpoint: str = ""
    # S3 endpoint for s3:// sources (empty: AWS); region; credentials come per call or from boto3's chain.
    s3_endpoint: str = ""
    s3_region: str = "us-east-1"
    # OCI registries spoken to over plain HTTP (loopback test registries), "host:port" list.
    # Directories file:// sources must lie in (symlinks resolved). Empty allows any path the storage process
    # can read, which suits a laptop; on a shared node set it, so the admin API cannot pull /etc into the store.
    file_roots: tuple[str, ...] = ()
    insecure_registries: tuple[str, ...] = ()
    # A pull named by digest first copies the blob from another node that holds it (nodes found in etcd), and
    # only one node of the cluster reads a blob from its origin at a time: the others wait, then copy from it.
    peer_pulls: bool = True
    # Air-gapped node: blobs come only from peers (by digest), never from origins; needs peer_pulls.
    peers_only: bool = False
    # Shortest gap between two progress messages of one pull.
    progress_interval_s: float = 0.2
    # How often the node record is rewritten with fresh free-space numbers, even without pulls.
    node_refresh_s: float = 60.0
    # Seconds in-flight calls get to finish on shutdown.
    shutdown_grace_s: float = 5.0

    def __post_init__(self) -> None:
        # Expanded here once so every user of the config sees the same absolute path.
        object.__setattr__(self, "data_dir", os.path.abspath(os.path.expanduser(self.data_dir)))
        validate_name(self.node_name, "node_name")
        for name in ("lease_ttl_s", "max_parallel_pulls", "io_threads", "parallel_parts", "parallel_min_bytes",
                     "parallel_part_min_bytes", "parallel_part_max_bytes"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"config {name} must be at least 1", field=name)
        for name in ("http_connect_timeout_s", "http_read_timeout_s", "http_total_timeout_s",
                     "progress_interval_s", "node_refresh_s"):
            if getattr(self, name) <= 0:
                raise InvalidArgument(f"config {name} must be positive", field=name)
        for name in ("reserve_free_bytes", "max_store_bytes", "max_blob_bytes", "pull_retries", "gc_grace_s",
                     "background_flush_min_bytes"):
            if getattr(self, name) < 0:
                raise InvalidArgument(f"config {name} must not be negative", field=name)
        if not 0 < self.low_watermark <= self.high_watermark <= 1:
            raise InvalidArgument("config watermarks need 0 < low_watermark <= high_watermark <= 1",
                                  field="high_watermark")
        if self.shutdown_grace_s < 0:
            raise InvalidArgument("config shutdown_grace_s must not be negative", field="shutdown_grace_s")
        if self.peers_only and not self.peer_pulls:
            raise InvalidArgument("config peers_only needs peer_pulls", field="peers_only")
        host, sep, port = self.listen.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise InvalidArgument(f"config listen {self.listen!r} is not host:port", field="listen")
