"""The scheduler a controller runs, from its configuration."""

from __future__ import annotations

from clowder_controller.scheduling.framework import Scheduler
from clowder_controller.scheduling.gpus import GpuFit
from clowder_controller.scheduling.labels import LabelMatch
from clowder_controller.scheduling.locality import Locality
from clowder_controller.scheduling.memory import MemoryFit
from clowder_controller.scheduling.spread import BinPack, Spread

PLACEMENTS = ("spread", "binpack")


def build_scheduler(placement: str = "spread", locality_weight: float = 0.3) -> Scheduler:
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, not {placement!r}")
    fullness = Spread() if placement == "spread" else BinPack()
    # Cheap filters first: each one shrinks the list the next one walks.
    return Scheduler([LabelMatch(), GpuFit(), MemoryFit()], [(fullness, 1.0), (Locality(), locality_weight)])
