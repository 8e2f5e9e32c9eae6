#!/usr/bin/env python3
"""Measure what SM-style tapdisks cost in memory: PSS and RSS per tapdisk, spawn+open time.

SM runs one tapdisk per virtual disk: ``tap-ctl spawn``, then ``tap-ctl open`` of one VHD.
This starts N tapdisks that way in a private control directory (``TAPDISK_CONTROL_DIR``),
each with its own VHD made by ``vhd-util create``, optionally drives a few reads and writes
over each NBD socket (libnbd) and times them, then sums ``Pss`` and ``Rss`` of
``/proc/PID/smaps_rollup`` over the tapdisks and prints a table. PSS is the honest figure
for many processes: a page shared by k processes counts 1/k in each. Everything it
started is shut down at the end.

Run it from the checkout's venv: ``.venv/bin/python bench/memory.py -n 20 --io 200``.
A measuring tool, not a test: times from a busy machine are noise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbd

BIN = Path(sys.executable).parent
BLOCK = 4096
VHD_MB = 256


def tool(*argv: str, env: dict[str, str]) -> str:
    """Run a tool of this checkout; its stdout, stripped."""
    done = subprocess.run(
        [str(BIN / argv[0]), *argv[1:]], env=env, check=True, capture_output=True, text=True
    )
    return done.stdout.strip()


def rollup(pid: int) -> dict[str, int]:
    """The kB fields of ``/proc/PID/smaps_rollup``."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as lines:
        for line in lines:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[name] = int(parts[0])
    return fields


def drive(socket: str, requests: int) -> list[float]:
    """Alternate 4 KiB writes and reads over one NBD socket; each request's seconds."""
    handle = nbd.NBD()
    handle.connect_unix(socket)
    data = os.urandom(BLOCK)
    times = []
    try:
        for i in range(requests):
            offset = (i * 37 % 1024) * BLOCK
            start = time.perf_counter()
            if i % 2:
                handle.pread(BLOCK, offset)
            else:
                handle.pwrite(data, offset)
            times.append(time.perf_counter() - start)
        handle.flush()
    finally:
        handle.shutdown()
    return times


def spawners(pids: list[int]) -> set[int]:
    """The spawners that forked these tapdisks (none when tap-ctl starts them directly)."""
    found = set()
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            parent = int(stat.read().rsplit(") ", 1)[1].split()[1])
        with open(f"/proc/{parent}/cmdline") as cmdline:
            if "spawner" in cmdline.read().split("\0"):
                found.add(parent)
    return found


def table(pids: list[int]) -> tuple[float, float]:
    """Print each tapdisk's PSS/RSS; the sums in MB."""
    pss = rss = 0
    print(f"{'pid':>8} {'PSS kB':>8} {'RSS kB':>8} {'anon kB':>8}")
    for pid in pids:
        fields = rollup(pid)
        pss += fields["Pss"]
        rss += fields["Rss"]
        print(f"{pid:>8} {fields['Pss']:>8} {fields['Rss']:>8} {fields['Anonymous']:>8}")
    return pss / 1024, rss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--tapdisks", type=int, default=20)
    parser.add_argument(
        "--io", type=int, default=0, metavar="N", help="4 KiB requests per tapdisk (default 0)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, TAPDISK_CONTROL_DIR=os.path.join(tmp, "ctl"))
        pids: list[int] = []
        sockets: list[str] = []
        starts: list[float] = []
        try:
            for i in range(args.tapdisks):
                image = os.path.join(tmp, f"disk{i}.vhd")
                tool("vhd-util", "create", "-n", image, "-s", str(VHD_MB), env=env)
                start = time.perf_counter()
                pid = int(tool("tap-ctl", "spawn", env=env))
                pids.append(pid)
                spec = f"vhd:{image}"
                sockets.append(tool("tap-ctl", "open", "-p", str(pid), "-a", spec, env=env))
                starts.append(time.perf_counter() - start)
            latencies = [t for socket in sockets for t in drive(socket, args.io)]
            time.sleep(0.5)  # let the tapdisks settle after the last request
            pss, rss = table(pids)
            spawner_pss = sum(rollup(pid)["Pss"] for pid in spawners(pids)) / 1024
        finally:
            for pid in pids:
                subprocess.run([str(BIN / "tap-ctl"), "shutdown", "-p", str(pid)], env=env)
    count = len(pids)
    print(f"tapdisks: {count}, each with one {VHD_MB} MB VHD open, {args.io} requests each")
    print(f"PSS: {pss:.1f} MB in all, {pss / count:.2f} MB per tapdisk")
    print(
        f"PSS with the spawner ({spawner_pss:.1f} MB): {(pss + spawner_pss) / count:.2f} MB "
        "per tapdisk"
    )
    print(f"RSS: {rss:.1f} MB in all, {rss / count:.2f} MB per tapdisk")
    print(
        f"spawn+open: median {statistics.median(starts) * 1e3:.0f} ms, "
        f"max {max(starts) * 1e3:.0f} ms"
    )
    if latencies:
        print(
            f"4 KiB request latency: median {statistics.median(latencies) * 1e6:.0f} us, "
            f"p99 {statistics.quantiles(latencies, n=100)[98] * 1e6:.0f} us"
        )


if __name__ == "__main__":
    main()
