"""What the tenancy tests share: names, and the balancer tests' helpers made importable."""

from __future__ import annotations

import pathlib
import sys

# The balancer tests' helpers (config, records, a real runtime process) serve these tests as they are.
sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "balancer"))

ADMIN = "admin-token-for-tenancy-tests"
MODEL = "d"
# Few slots, so a burst saturates the replica and the fair queue decides who goes next.
SLOTS = 2
