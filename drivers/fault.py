"""The fault-injecting layer: ``fault:OPTIONS:INNER-SPEC`` over any image.

It makes an image misbehave the way a flaky disk or an NFS soft mount does, so
that the VBD's retry and deadline logic can be proven against real failures.
A *fault episode* (an outage) is a stretch during which every affected
operation fails with one errno, page-cache hits included (the ``*_nowait``
fast paths stand aside while an episode runs or can still start); outside
episodes the layer forwards to the image below.

Options (comma-separated ``key=value``; ``-`` or an empty list means defaults)::

    rate=P        probability that an operation outside an episode starts one (default 1.0)
    burst=N       an episode ends after N failed operations (0 = no limit; default 0)
    duration=S    an episode ends S seconds after it began (0 = no limit; default 0)
    count=K       K episodes (outages), each failing every affected operation in its
                  window, then the layer is healthy for good (0 = no limit; default 0)
    start=S       no episode starts in the first S seconds after opening (default 0)
    errno=NAME    the error raised, by symbolic name (default EIO)
    ops=LIST      operations affected, ``+``-separated from read, write, flush, zero, discard
                  (default read+write+flush+zero+discard)
    delay=S       sleep S seconds before raising each error, like a slow timeout (default 0)
    seed=N        seed of the random generator, for repeatable runs (default: random)

With neither ``burst`` nor ``duration`` an episode is one failed operation.
When both are given an episode ends at whichever limit comes first.  The
operation right after an episode always goes through, so a retrying caller
makes progress even at ``rate=1``.

Examples::

    fault:rate=1,duration=2,count=1:raw:/images/disk.img    a single 2-second outage
    fault:rate=0.2,burst=3,errno=EAGAIN:qcow2:/images/d.qcow2   frequent 3-failure bursts
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import time
from dataclasses import dataclass

from .base import Image, ImageError, IoDone
from .layer import Layer
from .registry import OpenOptions, open_image

OPERATIONS = ("read", "write", "flush", "zero", "discard")


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """When and how a fault layer fails: the parsed options of a ``fault:`` spec."""

    rate: float = 1.0
    burst: int = 0
    duration: float = 0.0
    count: int = 0
    start: float = 0.0
    error: int = errno.EIO
    ops: frozenset[str] = frozenset(OPERATIONS)
    delay: float = 0.0
    seed: int | None = None

    @classmethod
    def parse(cls, text: str) -> FaultPlan:
        """Parse ``key=value,...``; raise ImageError naming the bad option."""
        values: dict[str, object] = {}
        for item in filter(None, text.split(",")):
            if item == "-":
                continue
            key, sep, value = item.partition("=")
            if not sep:
                raise ImageError(f"fault option {item!r}: expected KEY=VALUE")
            try:
                values.update(_parse_option(key, value))
            except ValueError as exc:
                raise ImageError(f"fault option {key}={value!r}: {exc}") from None
        return cls(**values)  # type: ignore[arg-type]


def _parse_option(key: str, value: str) -> dict[str, object]:
    """One option as dataclass fields; ValueError says what is wrong with it."""
    if key == "rate":
        rate = float(value)
        if not 0.0 <= rate <= 1.0:
            raise ValueError("must be between 0 and 1")
        return {"rate": rate}
    if key in ("burst", "count", "seed"):
        number = int(value)
        if number < 0:
            raise ValueError("must not be negative")
        return {key: number}
    if key in ("duration", "start", "delay"):
        seconds = float(value)
        if not 0.0 <= seconds < float("inf"):
            raise ValueError("must be a non-negative number of seconds")
        return {key: seconds}
    if key == "errno":
        code = getattr(errno, value.upper(), None)
        if not isinstance(code, int):
            raise ValueError("unknown errno name")
        return {"error": code}
    if key == "ops":
        ops = frozenset(value.split("+"))
        unknown = ops - set(OPERATIONS)
        if unknown:
            raise ValueError(f"unknown operation(s) {', '.join(sorted(unknown))}")
        return {"ops": ops}
    raise ValueError("unknown option")


def open_fault(arg: str, options: OpenOptions) -> FaultImage:
    """Opener registered for ``fault:``; ``arg`` is ``OPTIONS:INNER-SPEC``."""
    text, sep, inner_spec = arg.partition(":")
    if not sep or not inner_spec:
        raise ImageError(f"fault:{arg}: expected fault:OPTIONS:TYPE:PATH")
    plan = FaultPlan.parse(text)
    return FaultImage(open_image(inner_spec, options), plan, text)


class FaultImage(Layer):
    """Forwards to ``inner``, failing operations during fault episodes."""

    def __init__(self, inner: Image, plan: FaultPlan, options_text: str = "-") -> None:
        super().__init__(inner)
        self.plan = plan
        self.spec = f"fault:{options_text or '-'}:{inner.spec}"
        self.opened_at = time.monotonic()
        self.episodes = 0
        #: Operations failed so far, for tests and logs.
        self.injected = 0
        self._random = random.Random(plan.seed)
        self._episode_started: float | None = None
        self._episode_failures = 0

    @property
    def exhausted(self) -> bool:
        """True once the last episode is over and no further one can start."""
        return (
            bool(self.plan.count)
            and self.episodes >= self.plan.count
            and self._episode_started is None
        )

    def _check(self, op: str) -> None:
        """Raise the planned error if ``op`` falls in a fault episode."""
        if op not in self.plan.ops or not self._decide():
            return
        self.injected += 1
        raise OSError(self.plan.error, f"{os.strerror(self.plan.error)} (injected)")

    def _decide(self) -> bool:
        """Advance the episode state for one operation; True if it fails."""
        plan = self.plan
        now = time.monotonic()
        if self._episode_started is not None:
            over_burst = plan.burst and self._episode_failures >= plan.burst
            over_time = plan.duration and now - self._episode_started >= plan.duration
            single = not plan.burst and not plan.duration
            if over_burst or over_time or single:
                self._episode_started = None
                return False  # the operation after an episode goes through
            self._episode_failures += 1
            return True
        if self.exhausted or now - self.opened_at < plan.start:
            return False
        if plan.rate < 1.0 and self._random.random() >= plan.rate:
            return False
        self.episodes += 1
        self._episode_started = now
        self._episode_failures = 1
        return True

    async def _fail_or_pass(self, op: str) -> None:
        try:
            self._check(op)
        except OSError:
            if self.plan.delay:
                await asyncio.sleep(self.plan.delay)
            raise

    def read_nowait(self, offset: int, buf: memoryview) -> bool:
        # Reads that might fault (an episode running, or one still to come) take the
        # slow path, where _check runs.
        if "read" in self.plan.ops and not self.exhausted:
            return False
        return self.inner.read_nowait(offset, buf)

    def start_read(self, offset: int, buf: memoryview, done: IoDone) -> bool:
        if "read" in self.plan.ops and not self.exhausted:
            return False  # as read_nowait: reads that might fault go through read
        return self.inner.start_read(offset, buf, done)

    def start_write(self, offset: int, data: memoryview, fua: bool, done: IoDone) -> bool:
        if "write" in self.plan.ops and not self.exhausted:
            return False
        return self.inner.start_write(offset, data, fua, done)

    def write_nowait(self, offset: int, data: memoryview) -> bool:
        if "write" in self.plan.ops and not self.exhausted:
            return False
        return self.inner.write_nowait(offset, data)

    async def read(self, offset: int, buf: memoryview) -> None:
        await self._fail_or_pass("read")
        await self.inner.read(offset, buf)

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        await self._fail_or_pass("write")
        await self.inner.write(offset, data, fua)

    async def flush(self) -> None:
        await self._fail_or_pass("flush")
        await self.inner.flush()

    async def discard(self, offset: int, length: int, fua: bool = False) -> None:
        await self._fail_or_pass("discard")
        await self.inner.discard(offset, length, fua)

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_unmap: bool = True,
        fast_only: bool = False,
        fua: bool = False,
    ) -> None:
        await self._fail_or_pass("zero")
        await self.inner.write_zeroes(
            offset, length, may_unmap=may_unmap, fast_only=fast_only, fua=fua
        )
