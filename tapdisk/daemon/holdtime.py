"""A live hand-over's hold kept short, and measured (daemon/handover.py).

Short: the predecessor flushes before it holds (``flush_ahead``), and each side runs its
per-VBD steps concurrently (``all_of``), so the hold lasts the slowest VBD, not the sum.
Measured: the predecessor times its steps (quiesce, pause) and sends them with its state;
the successor adds its own (state received, images open, confirmed, serving) and logs the
whole hold, from the predecessor's first step to the successor serving.  Both read
``time.monotonic`` (CLOCK_MONOTONIC, one clock for every process of the machine), so the
predecessor's start is a point on the successor's clock too.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Iterable
from typing import Any

from .device import Device

#: Seconds the predecessor flushes its VBDs at most before the hold (see ``flush_ahead``).
FLUSH_AHEAD_TIMEOUT = 5.0


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


async def flush_ahead(devices: list[Device]) -> None:
    """Flush every running writable VBD while still serving, so that the flush inside the
    hold has only what was written since (bench/restart.py measures the difference).

    Best effort, for at most ``FLUSH_AHEAD_TIMEOUT``: a flush still queued then (a VBD
    pausing for SM) is left to run whenever its VBD runs again, and a failure shows again
    in the pause's own flush.
    """

    async def flush(device: Device) -> None:
        with contextlib.suppress(Exception):
            await device.vbd.flush()

    tasks = [
        asyncio.ensure_future(flush(device))
        for device in devices
        if not (device.vbd.read_only or device.vbd.paused or device.vbd.pausing)
    ]
    if tasks:
        await asyncio.wait(tasks, timeout=FLUSH_AHEAD_TIMEOUT)


async def all_of(steps: Iterable[Awaitable[None]]) -> None:
    """Run ``steps`` concurrently and wait for every one, even after one failed (what
    the others opened or paused must be known before undoing); then raise the first error."""
    results = await asyncio.gather(*steps, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
