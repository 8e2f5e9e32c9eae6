"""Prometheus metrics of tapdisk devices, built at scrape time from VBD stats.

The request path only bumps plain integers (``iostats.Stats``); this module turns a
list of STATS objects (the shape is documented in ``tapdisk/ctl/protocol.py``) into metric
families when Prometheus scrapes.  Nothing is kept between scrapes, so a device that
goes away simply stops appearing and its series go stale.

Names follow node_exporter's ``node_disk_*`` metrics with the ``tapdisk_`` prefix and
a ``device`` label: ``nbd0`` for a device attached to the kernel as /dev/nbd0, else
``td<pid>.<minor>`` (the VBD as tap-ctl names it, reachable over its NBD socket).
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from tapdisk import __version__
from tapdisk.config import image_path

#: Errno names that get their own ``errno`` label value; the rest are counted as
#: ``other``, so a misbehaving driver cannot create unbounded series.
ERRNO_LABELS = frozenset(
    {
        "EIO",
        "ENOSPC",
        "EDQUOT",
        "EROFS",
        "EPERM",
        "EACCES",
        "EINVAL",
        "EFBIG",
        "EOVERFLOW",
        "ENOMEM",
        "ETIMEDOUT",
        "EAGAIN",
        "EBUSY",
        "EINTR",
        "ESTALE",
        "ENXIO",
        "ENODEV",
        "EOPNOTSUPP",
        "ENOTSUP",
        "ESHUTDOWN",
    }
)

#: Operations of the ``op`` label (``tapdisk/ctl/protocol.py`` STATS ``errors``).
OPERATIONS = frozenset({"read", "write", "flush", "discard", "write_zeroes", "extents", "cache"})

#: (name, STATS key, help, scale) of every per-device counter.  Times are summed
#: request latencies in microseconds, exported in seconds.
COUNTERS: tuple[tuple[str, str, str, float], ...] = (
    ("tapdisk_reads_completed", "reads", "Read requests completed.", 1),
    ("tapdisk_writes_completed", "writes", "Write requests completed.", 1),
    ("tapdisk_discards_completed", "discards", "Discard (trim) requests completed.", 1),
    ("tapdisk_write_zeroes_completed", "write_zeroes", "Write-zeroes requests completed.", 1),
    ("tapdisk_flush_requests", "flushes", "Flush requests completed.", 1),
    ("tapdisk_read_bytes", "bytes_read", "Bytes read.", 1),
    ("tapdisk_written_bytes", "bytes_written", "Bytes written.", 1),
    ("tapdisk_read_time_seconds", "read_time_us", "Time spent by all reads.", 1e-6),
    ("tapdisk_write_time_seconds", "write_time_us", "Time spent by all writes.", 1e-6),
    ("tapdisk_discard_time_seconds", "discard_time_us", "Time spent by all discards.", 1e-6),
    (
        "tapdisk_write_zeroes_time_seconds",
        "write_zeroes_time_us",
        "Time spent by all write-zeroes requests.",
        1e-6,
    ),
    (
        "tapdisk_flush_requests_time_seconds",
        "flush_time_us",
        "Time spent by all flushes.",
        1e-6,
    ),
    (
        "tapdisk_io_time_seconds",
        "io_time_us",
        "Time with at least one request in flight.",
        1e-6,
    ),
    ("tapdisk_reads_merged", "read_merges", "Reads merged into an adjacent read's I/O.", 1),
    ("tapdisk_writes_merged", "write_merges", "Writes merged into an adjacent write's I/O.", 1),
    ("tapdisk_retries", "retries", "Request attempts repeated after a transient error.", 1),
)

#: (name, STATS key, help) of every per-device gauge.
GAUGES: tuple[tuple[str, str, str], ...] = (
    ("tapdisk_io_now", "in_flight", "Requests queued or in progress."),
    ("tapdisk_io_queued", "queued", "Requests waiting to be dispatched (all while paused)."),
    ("tapdisk_paused", "paused", "1 when the device is paused."),
    ("tapdisk_nbd_connections", "connections", "NBD connections to the device."),
    ("tapdisk_size_bytes", "size", "Virtual size of the device."),
)


#: STATS keys the collector reads; the exporter refuses answers that lack one.
REQUIRED_STATS = frozenset(
    {key for _, key, _, _ in COUNTERS}
    | {key for _, key, _ in GAUGES}
    | {"pid", "minor", "spec", "format", "read_only", "errors", "latency_us"}
)


def check_stats(stats: object) -> None:
    """Raise ValueError unless ``stats`` has the STATS shape the collector reads.

    The exporter talks to daemons of possibly another version; one malformed answer
    must cost that daemon's devices, not the whole scrape.
    """
    if not isinstance(stats, dict):
        raise ValueError(f"a device's stats are a {type(stats).__name__}, not an object")
    missing = REQUIRED_STATS - stats.keys()
    if missing:
        raise ValueError(f"stats lack {', '.join(sorted(missing))}")
    for _, key, *_ in (*COUNTERS, *GAUGES):
        if not isinstance(stats[key], int | float):
            raise ValueError(f"stats field {key!r} is {stats[key]!r}, not a number")
    for key in ("spec", "format"):
        if not isinstance(stats[key], str):
            raise ValueError(f"stats field {key!r} is {stats[key]!r}, not text")
    errors, latency = stats["errors"], stats["latency_us"]
    if not isinstance(errors, list) or not all(
        isinstance(e, dict)
        and isinstance(e.get("op"), str)
        and isinstance(e.get("errno"), str)
        and isinstance(e.get("count"), int)
        for e in errors
    ):
        raise ValueError(f"stats field 'errors' is malformed: {errors!r}")
    if not (
        isinstance(latency, dict)
        and isinstance(latency.get("sum"), int | float)
        and isinstance(latency.get("buckets"), list)
        and latency["buckets"]
        and latency["buckets"][-1][0] == "+Inf"
        and all(
            isinstance(b, list) and len(b) == 2 and isinstance(b[1], int)
            for b in latency["buckets"]
        )
    ):
        raise ValueError(f"stats field 'latency_us' is malformed: {latency!r}")


def device_label(stats: Mapping[str, Any]) -> str:
    """``nbd0`` for a device attached as /dev/nbd0, else ``td<pid>.<minor>``."""
    device = stats.get("device")
    if isinstance(device, str) and device:
        return device.rpartition("/")[2]
    return f"td{stats['pid']}.{stats['minor']}"


def errno_label(name: str) -> str:
    """The ``errno`` label value: the name if it is in ERRNO_LABELS, else ``other``."""
    return name if name in ERRNO_LABELS else "other"


def build_info() -> InfoMetricFamily:
    info = InfoMetricFamily("tapdisk_build", "Version of tapdisk serving these metrics.")
    info.add_metric(
        [],
        {
            "version": __version__,
            "python": platform.python_version(),
            "implementation": sys.implementation.name,
        },
    )
    return info


def families(devices: Iterable[Mapping[str, Any]]) -> list[Metric]:
    """Metric families for a list of STATS objects (one per device)."""
    counters = {
        name: CounterMetricFamily(name, text, labels=["device"]) for name, _, text, _ in COUNTERS
    }
    gauges = {name: GaugeMetricFamily(name, text, labels=["device"]) for name, _, text in GAUGES}
    errors = CounterMetricFamily(
        "tapdisk_errors",
        "Requests failed to the client, by operation and errno.",
        labels=["device", "op", "errno"],
    )
    latency = HistogramMetricFamily(
        "tapdisk_request_duration_seconds",
        "Time from a request's arrival at the device to its completion.",
        labels=["device"],
    )
    info = InfoMetricFamily(
        "tapdisk_device",
        "The image behind each device.",
        labels=["device"],
    )
    for stats in devices:
        device = device_label(stats)
        for name, key, _, scale in COUNTERS:
            counters[name].add_metric([device], stats[key] * scale)
        for name, key, _ in GAUGES:
            gauges[name].add_metric([device], int(stats[key]))
        by_label: dict[tuple[str, str], int] = {}
        for entry in stats["errors"]:
            op = entry["op"] if entry["op"] in OPERATIONS else "other"
            key = (op, errno_label(entry["errno"]))
            by_label[key] = by_label.get(key, 0) + entry["count"]
        for (op, name), count in sorted(by_label.items()):
            errors.add_metric([device, op, name], count)
        histogram = stats["latency_us"]
        buckets = [
            (bound if bound == "+Inf" else repr(bound / 1e6), count)
            for bound, count in histogram["buckets"]
        ]
        latency.add_metric([device], buckets, histogram["sum"] / 1e6)
        info.add_metric(
            [device],
            {
                "format": stats["format"],
                "image": image_path(stats["spec"]) or stats["spec"],
                "readonly": "true" if stats["read_only"] else "false",
            },
        )
    return [*counters.values(), errors, *gauges.values(), latency, info]


class TapdiskCollector(Collector):
    """A custom collector: asks ``source`` for every device's STATS on each scrape.

    ``source`` returns (devices, daemons that answered, daemons that failed); the
    exporter's source talks to every control socket on the host.
    """

    def __init__(self, source: Callable[[], tuple[list[dict[str, Any]], int, int]]) -> None:
        self.source = source

    def describe(self) -> Iterable[Metric]:
        return []  # the metric set depends on the devices; never collect at registration

    def collect(self) -> Iterator[Metric]:
        devices, answered, failed = self.source()
        yield build_info()
        daemons = GaugeMetricFamily(
            "tapdisk_daemons", "tapdisk processes whose control socket answered this scrape."
        )
        daemons.add_metric([], answered)
        yield daemons
        failures = GaugeMetricFamily(
            "tapdisk_daemon_scrape_failures",
            "Control sockets that could not be read this scrape (stale or hung daemons).",
        )
        failures.add_metric([], failed)
        yield failures
        yield from families(devices)
