"""What the tenancy tests share: names."""

from __future__ import annotations

ADMIN = "admin-token-for-tenancy-tests"
MODEL = "d"
# Few slots, so a burst saturates the replica and the fair queue decides who goes next.
SLOTS = 2
