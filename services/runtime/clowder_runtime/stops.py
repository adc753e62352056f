"""Stop strings over streamed text: never emit a character that might turn out to start one."""

from __future__ import annotations

from typing import Iterable


class StopMatcher:
    """Feed text as it is generated; get back what is safe to emit and whether a stop string ended it.

    Text that could be the beginning of a stop string is held back until the
    next pieces show whether it is one (then it is dropped) or not (then it is
    emitted). Because everything that might start a match is held, a stop
    string can only begin inside the held text or the new piece, so only that
    short window is searched.
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._longest = max((len(s) for s in self._stops), default=0)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, True if a stop string was found)."""
        if self.stopped:
            return "", True
        if not self._stops:
            return text, False
        window = self._held + text
        hits = [i for i in (window.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._held = ""
            self.stopped = True
            return window[: min(hits)], True
        keep = self._partial_suffix(window)
        self._held = window[len(window) - keep :] if keep else ""
        return window[: len(window) - keep], False

    def flush(self) -> str:
        """At the end of generation the held text is known not to be a stop string."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_suffix(self, window: str) -> int:
        """Length of the longest suffix of `window` that is a proper prefix of some stop string."""
        for size in range(min(len(window), self._longest - 1), 0, -1):
            tail = window[-size:]
            if any(s.startswith(tail) for s in self._stops):
                return size
        return 0
