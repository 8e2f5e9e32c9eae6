"""The host's Prometheus endpoint: one scrape covers every tapdisk process and device.

Each tapdisk process counts in plain integers and answers ``stats`` on its control
socket.  At every scrape the exporter lists the control sockets in the control
directory, asks each daemon for its stats through ``tapdisk/ctl/client.py`` (in
parallel, with a timeout, so one hung daemon costs a scrape at most
``--scrape-timeout`` seconds), and hands the answers to ``metrics.TapdiskCollector``.
Nothing is cached: a device that went away is simply absent from the next scrape.
This avoids prometheus-client's multiprocess mode and its shared files altogether.

Run as ``tapdisk-exporter`` or ``tapdisk exporter``; it prints its URL once listening.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.registry import CollectorRegistry

from tapdisk.ctl import protocol
from tapdisk.ctl.client import CallError, Client, DaemonGone, daemon_pids

from . import config as configuration
from . import logs, sdnotify
from .metrics import TapdiskCollector, check_stats

log = logging.getLogger("tapdisk.exporter")

#: Seconds a daemon may take to answer a scrape's stats request.
SCRAPE_TIMEOUT = 2.0
#: Daemons asked at the same time.
PARALLEL = 8
#: Settings of the configuration file the exporter uses (and the flags that override them).
CONFIG_KEYS = ("control_dir", "metrics_listen")

EXAMPLES = """\
examples:
  tapdisk-exporter                                  settings from /etc/tapdisk/tapdisk.yaml
  tapdisk-exporter --metrics-listen 127.0.0.1:9847 --control-dir /run/blktap-control
  tapdisk exporter --config /etc/tapdisk/tapdisk.yaml
  curl -s http://127.0.0.1:9847/metrics | grep tapdisk_reads_completed_total
"""


def fetch_stats(directory: str, pid: int, timeout: float = SCRAPE_TIMEOUT) -> list[dict[str, Any]]:
    """Every device's VBD-STATS from tapdisk ``pid``, connection and answer within ``timeout``.

    Raises ``DaemonGone`` when the daemon has exited, ``CallError`` when it cannot be
    reached or does not answer in time, and ValueError when the answer is not a list
    of STATS objects with their VBD-STATS under ``vbd``.
    """
    deadline = time.monotonic() + timeout
    with Client.connect(directory, pid, timeout) as daemon:
        daemon.timeout = max(0.001, deadline - time.monotonic())  # the connection used some
        answer = daemon.call("stats")
    if not isinstance(answer, list):
        raise ValueError(f"stats answered a {type(answer).__name__}, not a list")
    devices = []
    for stats in answer:
        if not isinstance(stats, dict) or "vbd" not in stats:
            raise ValueError(f"a device's stats have no 'vbd' object: {stats!r:.200}")
        check_stats(stats["vbd"])
        devices.append(stats["vbd"])
    return devices


class Gatherer:
    """The collector's source: stats of every daemon under one control directory."""

    def __init__(self, directory: str, timeout: float = SCRAPE_TIMEOUT) -> None:
        self.directory = directory
        self.timeout = timeout
        self.pool = ThreadPoolExecutor(PARALLEL, thread_name_prefix="scrape")

    def _one(self, pid: int) -> list[dict[str, Any]] | str:
        """The daemon's devices, or why it could not be read ("" if it has just exited)."""
        try:
            return fetch_stats(self.directory, pid, self.timeout)
        except DaemonGone:
            return ""  # the daemon exited between the listing and the scrape
        except (CallError, ValueError) as exc:
            # The path is the subject, so a stale socket is reported a few times, not forever.
            path = protocol.control_socket(self.directory, pid)
            log.warning("%s: no stats: %s", path, exc)
            return str(exc) or type(exc).__name__

    def __call__(self) -> tuple[list[dict[str, Any]], int, int]:
        devices: list[dict[str, Any]] = []
        answered = failed = 0
        for result in self.pool.map(self._one, daemon_pids(self.directory)):
            if isinstance(result, list):
                answered += 1
                devices.extend(result)
            elif result:
                failed += 1
        return devices, answered, failed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    configuration.add_arguments(parser, keys=CONFIG_KEYS)
    parser.add_argument(
        "--scrape-timeout",
        type=float,
        default=SCRAPE_TIMEOUT,
        metavar="SECS",
        help="how long each tapdisk may take to answer (default %(default)s)",
    )


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The ``tapdisk exporter`` subcommand."""
    parser = sub.add_parser(
        "exporter",
        help="serve Prometheus metrics of every tapdisk on this host",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)


DESCRIPTION = (
    "Serve /metrics for Prometheus: at each scrape, ask every tapdisk whose control "
    "socket is in the control directory for its device statistics."
)


def run(args: argparse.Namespace, log_level: str | None) -> int:
    """Serve until SIGTERM or SIGINT; ``log_level`` from the command line overrides the file."""
    try:
        config = configuration.from_arguments(args, CONFIG_KEYS)
    except configuration.ConfigError as exc:
        print(f"tapdisk exporter: {exc}", file=sys.stderr)
        return 1
    logs.setup(log_level or config.log_level, program="tapdisk-exporter")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TapdiskCollector(Gatherer(config.control_dir, args.scrape_timeout)))
    host, port = config.metrics_listen
    try:
        server, _ = start_http_server(port, host, registry)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", host, port, exc.strerror or exc)
        return 1
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{server.server_port}/metrics"
    print(url, flush=True)
    log.info("serving %s for the tapdisks in %s", url, config.control_dir)
    sdnotify.ready(f"serving {url}")
    stop.wait()
    server.shutdown()
    server.server_close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tapdisk-exporter``."""
    parser = argparse.ArgumentParser(
        prog="tapdisk-exporter",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.add_argument(
        "--log-level", choices=configuration.LOG_LEVELS, help="overrides the configuration file"
    )
    args = parser.parse_args(argv)
    return run(args, args.log_level)


if __name__ == "__main__":
    sys.exit(main())
