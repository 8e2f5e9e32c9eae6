#!/usr/bin/env python3
"""Measure an online commit (``tap-ctl commit``) beside qemu's own block-commit job.

Makes one QCOW2 chain, base <- mid (``--size`` MiB of data) <- leaf, and a copy of it.
tapdisk serves the first chain's leaf and commits mid into base (``tap-ctl commit``,
``tap-ctl query`` polled as XCP-ng's SM polls it); qemu-storage-daemon serves the copy's
leaf over NBD and commits mid into base with QMP ``block-commit`` (the job XCP-ng's
QEMU-based tapdisk runs).  In both, one libnbd writer does 64 KiB writes at queue depth 1
on the leaf throughout; each write's latency goes to the phase it fell in (before, during,
after the commit).  Prints each commit's time and rate, the ratio, and the writes' latency.
tapdisk's time includes starting ``tap-ctl`` for the commit and every query (about 0.2 s
each here), so small sizes measure that more than the copy: use 1 GiB or more.
Everything runs in a private directory, removed at the end.

Run it from the checkout's venv: ``.venv/bin/python bench/online_commit.py --size 1024``.
A measuring tool, not a test: times from a busy machine are noise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from migration import Writer, summary, tool

BIN = Path(sys.executable).parent
POLL = 0.05


def make_chain(directory: Path, size_mib: int) -> None:
    directory.mkdir()
    size = str((size_mib + 64) << 20)
    qemu_img = ["qemu-img", "create", "-q", "-f", "qcow2"]
    subprocess.run([*qemu_img, directory / "base.qcow2", size], check=True)
    subprocess.run(
        [*qemu_img, "-b", "base.qcow2", "-F", "qcow2", directory / "mid.qcow2"], check=True
    )
    subprocess.run(
        [*qemu_img, "-b", "mid.qcow2", "-F", "qcow2", directory / "leaf.qcow2"], check=True
    )
    write = f"write -P 0x5a 0 {size_mib << 20}"
    io = ["qemu-io", "-f", "qcow2", "-c", write, directory / "mid.qcow2"]
    subprocess.run(io, check=True, stdout=subprocess.DEVNULL)


def timed(writer: Writer, settle: float, commit: Callable[[], None]) -> float:
    """Run ``commit`` between two settle periods of the writer; its seconds."""
    writer.start()
    time.sleep(settle)
    writer.phase = "during"
    started = time.perf_counter()
    commit()
    elapsed = time.perf_counter() - started
    writer.phase = "after"
    time.sleep(settle)
    writer.stop.set()
    writer.join()
    return elapsed


def tapdisk_commit(chain: Path, size: int, settle: float) -> tuple[float, Writer]:
    env = {**os.environ, "TAPDISK_CONTROL_DIR": str(chain / "run")}
    pid = tool("tap-ctl", "spawn", env=env)
    try:
        sock = tool("tap-ctl", "open", "-p", pid, "-a", f"qcow2:{chain / 'leaf.qcow2'}", env=env)
        writer = Writer(f"nbd+unix:///?socket={sock}", size)

        def commit() -> None:
            tool("tap-ctl", "commit", "-p", pid, "-m", "0", "-a", str(chain / "mid.qcow2"), env=env)
            while "'concluded'" not in tool("tap-ctl", "query", "-p", pid, "-m", "0", env=env):
                time.sleep(POLL)

        return timed(writer, settle, commit), writer
    finally:
        subprocess.run([str(BIN / "tap-ctl"), "shutdown", "-p", pid], env=env, check=False)


class Qmp:
    """A QMP connection: one command at a time, events skipped."""

    def __init__(self, path: Path) -> None:
        deadline = time.monotonic() + 20
        while not path.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("qemu-storage-daemon did not start")
            time.sleep(0.02)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.lines = self.sock.makefile("r")
        self.lines.readline()  # the greeting
        self.call("qmp_capabilities")

    def call(self, command: str, **arguments: object) -> object:
        self.sock.sendall(json.dumps({"execute": command, "arguments": arguments}).encode())
        while True:
            answer = json.loads(self.lines.readline())
            if "error" in answer:
                raise RuntimeError(f"{command}: {answer['error']['desc']}")
            if "return" in answer:
                return answer["return"]


def qemu_commit(chain: Path, size: int, settle: float) -> tuple[float, Writer]:
    files = {name: chain / f"{name}.qcow2" for name in ("base", "mid", "leaf")}
    nodes = [
        f"driver=qcow2,node-name={name},file.driver=file,file.filename={path}"
        + (f",backing={below}" if below else "")
        for (name, path), below in zip(files.items(), (None, "base", "mid"), strict=True)
    ]
    sock, qmp_path = chain / "nbd.sock", chain / "qmp.sock"
    daemon = subprocess.Popen(
        ["qemu-storage-daemon"]
        + [arg for node in nodes for arg in ("--blockdev", node)]
        + ["--nbd-server", f"addr.type=unix,addr.path={sock}"]
        + ["--export", "type=nbd,id=leaf,node-name=leaf,name=leaf,writable=on"]
        + ["--chardev", f"socket,path={qmp_path},server=on,wait=off,id=qmp"]
        + ["--monitor", "chardev=qmp"]
    )
    try:
        qmp = Qmp(qmp_path)
        writer = Writer(f"nbd+unix:///leaf?socket={sock}", size)

        def commit() -> None:
            qmp.call("block-commit", **{"job-id": "c", "device": "leaf", "top-node": "mid"})
            while qmp.call("query-block-jobs"):
                time.sleep(POLL)

        return timed(writer, settle, commit), writer
    finally:
        daemon.terminate()
        daemon.wait(20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="MiB of data in the middle image")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before and after")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tdcommit", dir="/var/tmp"))
    try:
        make_chain(work / "tapdisk", args.size)
        shutil.copytree(work / "tapdisk", work / "qemu")
        size = args.size << 20
        results = {
            "tapdisk commit": tapdisk_commit(work / "tapdisk", size, args.settle),
            "qemu block-commit": qemu_commit(work / "qemu", size, args.settle),
        }
        for name, (elapsed, writer) in results.items():
            print(f"{name}: {args.size} MiB in {elapsed:.2f} s, {args.size / elapsed:.0f} MiB/s")
            for phase, latencies in writer.latencies.items():
                print(f"  writes {phase:6s} {summary(latencies)}")
        ours, theirs = (elapsed for elapsed, _ in results.values())
        print(f"rate ratio tapdisk / qemu: {theirs / ours:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
