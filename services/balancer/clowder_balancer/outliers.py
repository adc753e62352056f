"""Outlier detection: a replica that keeps failing is ejected for a while, longer each time, then tried again."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable


@dataclass
class _Record:
    consecutive: int = 0
    ejections: int = 0
    until: float = 0.0


class OutlierDetector:
    def __init__(
        self,
        consecutive_failures: int = 3,
        base_ejection_s: float = 10.0,
        max_ejection_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.consecutive_failures = max(1, consecutive_failures)
        self.base_ejection_s = base_ejection_s
        self.max_ejection_s = max(base_ejection_s, max_ejection_s)
        self._clock = clock
        self._records: dict[str, _Record] = {}

    def success(self, address: str) -> None:
        # A replica that serves again after its ejection has recovered: the next failure streak starts afresh.
        self._records.pop(address, None)

    def failure(self, address: str, eject_for: float | None = None) -> bool:
        """Count a failure; True if the replica is now ejected.

        `eject_for` ejects at once for that long (a refused connection needs no second opinion);
        otherwise `consecutive_failures` in a row eject for base * 2^(ejections so far), capped.
        """
        record = self._records.setdefault(address, _Record())
        record.consecutive += 1
        now = self._clock()
        if eject_for is not None:
            record.until = max(record.until, now + eject_for)
            return True
        if record.consecutive >= self.consecutive_failures:
            duration = min(self.max_ejection_s, self.base_ejection_s * 2 ** record.ejections)
            record.ejections += 1
            record.consecutive = 0
            record.until = now + duration
            return True
        return self.ejected(address)

    def ejected(self, address: str) -> bool:
        record = self._records.get(address)
        return record is not None and record.until > self._clock()

    def ejected_addresses(self) -> set[str]:
        now = self._clock()
        return {a for a, r in self._records.items() if r.until > now}

    def forget(self, address: str) -> None:
        self._records.pop(address, None)
