#!/usr/bin/env python3
"""Measure the hold of ``tap-ctl restart``: how long the sockets wait, and in which step.

Starts a tapdisk with ``--vbds`` VHDs of 64 MiB, keeps one libnbd writer per VBD doing
4 KiB writes at queue depth 16, and restarts the tapdisk ``--restarts`` times.  Prints,
per restart, the hold the new tapdisk logged (from the old one's quiesce to the new one
serving) by phase, then the median of each phase, and the slowest write batch of the
writers.  Everything runs in a private control directory and temporary directory,
removed at the end.

Run it from the checkout's venv: ``.venv/bin/python bench/restart.py --vbds 2``.
A measuring tool, not a test: times from a busy machine are noise.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nbd

BIN = Path(sys.executable).parent
SIZE = 64 << 20
BLOCK = 4096
HELD = re.compile(r"its sockets were held (\d+) ms \(([^)]*)\)")


def tool(*argv: str, env: dict[str, str]) -> str:
    """Run a tool of this checkout; its stdout, stripped."""
    done = subprocess.run(
        [str(BIN / argv[0]), *argv[1:]], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode:
        sys.exit(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout.strip()


class Writer(threading.Thread):
    """4 KiB writes at queue depth 16 on one VBD until stopped; keeps the slowest batch."""

    def __init__(self, socket_path: str, seed: int) -> None:
        super().__init__(daemon=True)
        self.handle = nbd.NBD()
        self.handle.connect_uri(f"nbd+unix:///?socket={socket_path}")
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.slowest = 0.0

    def run(self) -> None:
        data = os.urandom(BLOCK)
        while not self.stop.is_set():
            start = time.monotonic()
            for _ in range(16):
                self.handle.aio_pwrite(data, self.rng.randrange(SIZE // BLOCK) * BLOCK)
            while self.handle.aio_in_flight() > 0:
                self.handle.poll(-1)
            self.slowest = max(self.slowest, time.monotonic() - start)
        self.handle.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--vbds", type=int, default=2, help="VBDs in the tapdisk")
    parser.add_argument("--restarts", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        control = Path(tmp, "run")
        control.mkdir()
        env = {**os.environ, "TAPDISK_CONTROL_DIR": str(control)}
        pid = tool("tap-ctl", "spawn", env=env)
        writers = []
        for index in range(args.vbds):
            image = f"{tmp}/disk{index}.vhd"
            tool("vhd-util", "create", "-n", image, "-s", str(SIZE >> 20), env=env)
            path = tool("tap-ctl", "open", "-p", pid, "-a", f"vhd:{image}", env=env)
            writers.append(Writer(path, index))
        for writer in writers:
            writer.start()
        try:
            for _ in range(args.restarts):
                time.sleep(0.5)
                pid = tool("tap-ctl", "restart", "-p", pid, env=env)
            time.sleep(0.5)
        finally:
            for writer in writers:
                writer.stop.set()
                writer.join(30)
            subprocess.run([str(BIN / "tap-ctl"), "destroy", "-p", pid], env=env, check=False)
        log = (control / "tapdisk.log").read_text()
    holds = HELD.findall(log)
    phases: dict[str, list[float]] = {}
    for total, steps in holds:
        print(f"held {total} ms ({steps})")
        for step in steps.removesuffix(" ms").split(", "):
            name, ms = step.rsplit(" ", 1)
            phases.setdefault(name, []).append(float(ms))
    medians = ", ".join(f"{name} {statistics.median(ms):.0f}" for name, ms in phases.items())
    print(f"median of {len(holds)} holds: {statistics.median(float(t) for t, _ in holds):.0f} ms")
    print(f"median by phase: {medians} ms")
    print(f"slowest batch of 16 writes: {max(w.slowest for w in writers) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
