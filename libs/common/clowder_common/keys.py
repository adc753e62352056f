"""Where each kind of state lives in etcd (relative to the Clowder prefix)."""

from __future__ import annotations

import re

from clowder_common.errors import InvalidArgument

# Names end up in etcd keys, file names and process arguments: keep them plain.
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")


def validate_name(value: str, field: str) -> str:
    if not NAME_RE.match(value or ""):
        raise InvalidArgument(
            f"{field} {value!r} is not a valid name: use 1-63 lowercase letters, digits, '.', '_' or '-',"
            " starting and ending with a letter or digit",
            field=field,
        )
    return value


IMAGES = "images/"
DEPLOYMENTS = "deployments/"
REPLICAS = "replicas/"
NODES = "nodes/"
ENDPOINTS = "endpoints/"


def image(alias: str) -> str:
    return IMAGES + alias


def deployment(name: str) -> str:
    return DEPLOYMENTS + name


def replicas_of(deployment_name: str) -> str:
    return f"{REPLICAS}{deployment_name}/"


def replica(deployment_name: str, replica_id: str) -> str:
    return f"{REPLICAS}{deployment_name}/{replica_id}"


def node(name: str) -> str:
    return NODES + name


def endpoints_of(deployment_name: str) -> str:
    return f"{ENDPOINTS}{deployment_name}/"


def endpoint(deployment_name: str, replica_id: str) -> str:
    return f"{ENDPOINTS}{deployment_name}/{replica_id}"


LOAD = "load/"


def load(balancer: str) -> str:
    return LOAD + balancer


# A service's revisions and traffic split (controller.v1.Service), and each balancer's per-revision counters
# (controller.v1.RevisionTrafficReport, under the balancer's lease).
SERVICES = "services/"
REVSTATS = "revstats/"


def service(name: str) -> str:
    return SERVICES + name


def revstats(balancer: str) -> str:
    return REVSTATS + balancer
