"""The services of a cluster in the test's own process (storage node, controller, balancer) on one etcd prefix."""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
from collections.abc import AsyncIterator
from typing import Any

from clowder_balancer.app import BalancerApp, create_balancer
from clowder_controller.app import ControllerApp, create_controller
from clowder_storage.app import StorageApp, create_storage
from helpers.configs import balancer_config, controller_config, storage_config


@dataclasses.dataclass
class Services:
    node: StorageApp
    controller: ControllerApp
    balancer: BalancerApp


@contextlib.asynccontextmanager
async def services_in_process(etcd_endpoint: str, prefix: str, work: pathlib.Path, token: str, *,
                              node: dict[str, Any], controller: dict[str, Any], balancer: dict[str, Any],
                              balancer_admin_token: str | None = None) -> AsyncIterator[Services]:
    """A storage node `n1`, a controller and a balancer, started in that order with these config overrides and
    stopped in the reverse order. The controller launches real runtime processes for the replicas it places."""
    started: list[Any] = []
    try:
        storage_app = await create_storage(storage_config(etcd_endpoint, prefix, work / "n1", "n1", **node), token)
        await storage_app.start()
        started.append(storage_app)
        controller_app = await create_controller(
            controller_config(etcd_endpoint, prefix, work / "controller", **controller), token)
        await controller_app.start()
        started.append(controller_app)
        balancer_app = await create_balancer(balancer_config(etcd_endpoint, prefix, **balancer),
                                             admin_token=balancer_admin_token)
        await balancer_app.start()
        started.append(balancer_app)
        yield Services(storage_app, controller_app, balancer_app)
    finally:
        for app in reversed(started):
            await app.stop()
