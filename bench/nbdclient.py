#!/usr/bin/env python3
"""Benchmark the NBD client driver: ``tapdisk serve nbd:UPSTREAM`` against qemu-nbd serving
the same remote export (``qemu-nbd -f raw 'nbd+unix:///?socket=UPSTREAM'``).

The upstream is one nbdkit memory export, fully written (no holes), that both proxies
reach over a Unix socket; fio's nbd engine drives each proxy in turn, and the export read
straight from nbdkit is the ceiling.  A whole-export copy with ``nbdcopy`` is timed the
same three ways.  Ratios are tapdisk over qemu-nbd (above 1 is better for throughput).

Run it from the checkout's venv: ``.venv/bin/python bench/nbdclient.py [--quick]``.  It is
a measuring tool, not a test; numbers from a busy machine are noise.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench import Workload, run_fio, tapdisk_command

SIZE = 512 << 20
WORKLOADS = (
    Workload("seqread-1m-qd8", "read", "1m", 8),
    Workload("seqwrite-1m-qd8", "write", "1m", 8),
    Workload("randread-4k-qd1", "randread", "4k", 1),
    Workload("randread-4k-qd16", "randread", "4k", 16),
    Workload("randwrite-4k-qd16", "randwrite", "4k", 16),
)


def uri(sock: Path) -> str:
    return f"nbd+unix:///?socket={sock}"


@contextmanager
def server(argv: list[str], sock: Path) -> Iterator[str]:
    """Run ``argv`` until it listens on ``sock``; yield its URI, then stop it."""
    sock.unlink(missing_ok=True)
    errors = sock.with_suffix(".log")
    with errors.open("wb") as log:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{' '.join(argv)} did not start: {errors.read_text()}")
        time.sleep(0.05)
    try:
        yield uri(sock)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def copy_seconds(source: str) -> float:
    """Seconds ``nbdcopy`` takes to read the whole export into nothing."""
    start = time.perf_counter()
    subprocess.run(["nbdcopy", "--", source, "null:"], check=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 s per job instead of 10")
    args = parser.parse_args(argv)
    runtime, ramp = (3, 1) if args.quick else (10, 2)
    with tempfile.TemporaryDirectory(prefix="bench-nbdclient-") as tmp:
        work = Path(tmp)
        up_sock = work / "upstream.sock"
        upstream = ["nbdkit", "-f", "-U", str(up_sock), "memory", str(SIZE)]
        with server(upstream, up_sock) as up:
            fill = work / "fill.bin"
            fill.write_bytes(os.urandom(SIZE))
            subprocess.run(["nbdcopy", "--", str(fill), up], check=True)
            fill.unlink()
            socks = {"tapdisk": work / "t.sock", "qemu-nbd": work / "q.sock"}
            proxies = {
                "tapdisk": [tapdisk_command(), "serve", "--unix", str(socks["tapdisk"]),
                            f"nbd:{up}"],
                "qemu-nbd": ["qemu-nbd", "-f", "raw", "-k", str(socks["qemu-nbd"]), "--shared=8",
                             "--persistent", up],
            }  # fmt: skip
            rows: dict[str, dict[str, float]] = {w.name: {} for w in WORKLOADS}
            rows["nbdcopy-read-512M (MiB/s)"] = {}
            rows["nbdcopy-read-512M (MiB/s)"]["nbdkit direct"] = SIZE / copy_seconds(up) / 2**20
            for workload in WORKLOADS:
                _, iops, _ = run_fio(workload, up, runtime, ramp, work / "fio.json")
                rows[workload.name]["nbdkit direct"] = iops
            for name, command in proxies.items():
                with server(command, socks[name]) as proxy:
                    copy = SIZE / copy_seconds(proxy) / 2**20
                    rows["nbdcopy-read-512M (MiB/s)"][name] = copy
                    for workload in WORKLOADS:
                        _, iops, _ = run_fio(workload, proxy, runtime, ramp, work / "fio.json")
                        rows[workload.name][name] = iops
                        print(f"bench: {name} {workload.name}: {iops:.0f} IOPS", file=sys.stderr)
    print(f"NBD client: {runtime} s per fio job after {ramp} s ramp; IOPS unless noted")
    print(f"{'workload':28} {'nbdkit direct':>14} {'tapdisk':>10} {'qemu-nbd':>10} {'ratio':>6}")
    for workload, values in rows.items():
        ratio = values["tapdisk"] / values["qemu-nbd"]
        print(
            f"{workload:28} {values['nbdkit direct']:14.0f} {values['tapdisk']:10.0f}"
            f" {values['qemu-nbd']:10.0f} {ratio:6.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
