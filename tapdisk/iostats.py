"""The statistics of one VBD: plain integers the request path bumps.

The scheduler (and the VBD's page-cache shortcut) count every request here; the
control socket (``tap-ctl stats``) and Prometheus (metrics.py) read them.  Nothing on
the request path allocates or locks for them.
"""

from __future__ import annotations

import bisect
import errno
from typing import Any, Final

#: Upper bounds (microseconds) of the latency histogram buckets; the last bucket is +Inf.
LATENCY_BUCKETS_US: Final = (
    50,
    100,
    250,
    500,
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
)


class Stats:
    """Counters of one VBD; plain integers, read by the control socket."""

    __slots__ = (
        "bytes_read",
        "bytes_read_failed",
        "bytes_written",
        "bytes_written_failed",
        "discard_us",
        "discards",
        "errors",
        "flush_us",
        "flushes",
        "io_ns",
        "latency_buckets",
        "latency_count",
        "latency_max_us",
        "latency_sum_us",
        "read_merges",
        "read_us",
        "reads",
        "retries",
        "write_merges",
        "write_us",
        "writes",
        "zeroes",
        "zeroes_us",
    )

    def __init__(self) -> None:
        self.reads = 0
        self.writes = 0
        self.flushes = 0
        self.discards = 0
        self.zeroes = 0
        self.bytes_read = 0
        self.bytes_written = 0
        # Bytes of the reads and writes failed to the client (blktap's stats count them).
        self.bytes_read_failed = 0
        self.bytes_written_failed = 0
        # Summed latency of the requests completed successfully, per kind.
        self.read_us = 0
        self.write_us = 0
        self.flush_us = 0
        self.discard_us = 0
        self.zeroes_us = 0
        self.read_merges = 0
        self.write_merges = 0
        self.retries = 0
        #: Nanoseconds with at least one request in flight, up to the start of the
        #: current busy period (``Scheduler.io_time_ns`` adds the rest).
        self.io_ns = 0
        #: (operation, errno name) -> count of requests that failed with it.
        self.errors: dict[tuple[str, str], int] = {}
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS_US) + 1)
        self.latency_count = 0
        self.latency_sum_us = 0
        self.latency_max_us = 0

    @property
    def merges(self) -> int:
        """Requests absorbed into a neighbour's I/O, reads and writes together."""
        return self.read_merges + self.write_merges

    def latency(self, us: int) -> None:
        self.latency_buckets[bisect.bisect_left(LATENCY_BUCKETS_US, us)] += 1
        self.latency_count += 1
        self.latency_sum_us += us
        if us > self.latency_max_us:
            self.latency_max_us = us

    def error(self, op: str, code: int | None) -> None:
        key = (op, errno.errorcode.get(code or 0, "EIO") if code else "EIO")
        self.errors[key] = self.errors.get(key, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        """The counters as JSON-ready data (part of ``VBD.stats_dict``)."""
        cumulative = 0
        buckets: list[list[Any]] = []
        for bound, count in zip((*LATENCY_BUCKETS_US, "+Inf"), self.latency_buckets, strict=True):
            cumulative += count
            buckets.append([bound, cumulative])
        return {
            "reads": self.reads,
            "writes": self.writes,
            "flushes": self.flushes,
            "discards": self.discards,
            "write_zeroes": self.zeroes,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "read_time_us": self.read_us,
            "write_time_us": self.write_us,
            "flush_time_us": self.flush_us,
            "discard_time_us": self.discard_us,
            "write_zeroes_time_us": self.zeroes_us,
            "merges": self.merges,
            "read_merges": self.read_merges,
            "write_merges": self.write_merges,
            "retries": self.retries,
            "errors": [
                {"op": op, "errno": name, "count": count}
                for (op, name), count in sorted(self.errors.items())
            ],
            "latency_us": {
                "count": self.latency_count,
                "sum": self.latency_sum_us,
                "max": self.latency_max_us,
                "buckets": buckets,
            },
        }
