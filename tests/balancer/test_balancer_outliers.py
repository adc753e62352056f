"""Outlier detection: ejection after consecutive failures, growing ejections, recovery, immediate ejection."""

from __future__ import annotations

import pytest

from clowder_balancer.outliers import OutlierDetector

from balancer_helpers import Clock

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("events", "ejected"),
    [
        (["fail", "fail"], False),
        (["fail", "fail", "fail"], True),
        (["fail", "fail", "ok", "fail"], False),  # a success breaks the streak
        (["fail", "fail", "fail", "wait 9"], True),
        (["fail", "fail", "fail", "wait 11"], False),  # base ejection is 10 s
        # Second ejection lasts twice as long.
        (["fail", "fail", "fail", "wait 11", "fail", "fail", "fail", "wait 19"], True),
        (["fail", "fail", "fail", "wait 11", "fail", "fail", "fail", "wait 21"], False),
        # Recovery: a success after the ejection resets the doubling.
        (["fail", "fail", "fail", "wait 11", "ok", "fail", "fail", "fail", "wait 11"], False),
        (["refused"], True),
        (["refused", "wait 6"], False),  # immediate ejection for 5 s
    ],
)
def test_ejection(events, ejected) -> None:
    clock = Clock()
    detector = OutlierDetector(consecutive_failures=3, base_ejection_s=10, max_ejection_s=120, clock=clock)
    for event in events:
        if event == "fail":
            detector.failure("a")
        elif event == "ok":
            detector.success("a")
        elif event == "refused":
            detector.failure("a", eject_for=5)
        else:
            clock.now += float(event.split()[1])
    assert detector.ejected("a") is ejected
    assert detector.ejected("b") is False


def test_ejection_is_capped() -> None:
    clock = Clock()
    detector = OutlierDetector(consecutive_failures=1, base_ejection_s=10, max_ejection_s=30, clock=clock)
    for _ in range(6):
        detector.failure("a")
        clock.now += 1
    clock.now += 30
    assert not detector.ejected("a")
    assert detector.ejected_addresses() == set()
