"""Compatibility home of the picker seam: a plain picker replaces the profile's scoring (tests use one)."""

from __future__ import annotations

from clowder_balancer.routing.base import Candidate, Picker
from clowder_balancer.routing.pickers import LeastInFlightPicker

__all__ = ["Candidate", "LeastInFlightPicker", "Picker"]
