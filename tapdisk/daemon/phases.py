"""Where a live hand-over's hold goes: the milliseconds of each of its steps, for one log line.

The predecessor times its steps (quiesce, pause) and sends them with its state; the
successor adds its own (state received, images open, confirmed, serving) and logs the
whole hold, from the predecessor's first step to the successor serving.  Both read
``time.monotonic`` (CLOCK_MONOTONIC, one clock for every process of the machine), so
the predecessor's start is a point on the successor's clock too.
"""

from __future__ import annotations

import time
from typing import Any


class Phases:
    """Named steps of one hold, each timed from the end of the step before."""

    def __init__(self, start: float | None = None) -> None:
        self.start = time.monotonic() if start is None else start
        self._last = self.start
        #: Milliseconds per step, in the order they ran.
        self.steps: dict[str, float] = {}

    def mark(self, step: str) -> None:
        """``step`` ended now."""
        now = time.monotonic()
        self.steps[step] = (now - self._last) * 1000
        self._last = now

    @property
    def total_ms(self) -> float:
        """From the start to the end of the last step."""
        return (self._last - self.start) * 1000

    def to_json(self) -> dict[str, Any]:
        return {"start": self.start, "last": self._last, "steps": self.steps}

    @classmethod
    def from_json(cls, state: dict[str, Any] | None) -> Phases:
        """The steps a predecessor sent, to be continued here; None (a predecessor of a
        version that does not time its steps): steps from now on."""
        if state is None:
            return cls()
        phases = cls(float(state["start"]))
        phases._last = float(state["last"])
        phases.steps = {str(step): float(ms) for step, ms in state["steps"].items()}
        return phases

    def __str__(self) -> str:
        return ", ".join(f"{step} {ms:.0f}" for step, ms in self.steps.items()) + " ms"
