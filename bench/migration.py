#!/usr/bin/env python3
"""Measure a live migration (``tap-ctl mirror --switch``): copy rate, and what the guest feels.

Starts a tapdisk on a raw source of ``--size`` MiB filled with data, keeps one libnbd
writer doing 64 KiB writes at queue depth 1 at random offsets, and times each write
before, during and after ``tap-ctl mirror --switch`` to a raw target (with ``--nbds``, the
target served by ``tapdisk serve`` over TCP with TLS and client certificates, as another
host would, reached as ``nbd:nbds://127.0.0.1:PORT/``); prints the
migration's time and rate and the writes' latency (p50, p99, max) in each phase, the
switch included in "during".  Everything runs in a private control directory and temporary
directory, removed at the end.

Run it from the checkout's venv: ``.venv/bin/python bench/migration.py --size 1024``.
A measuring tool, not a test: times from a busy machine are noise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nbd

BIN = Path(sys.executable).parent
WRITE = 64 << 10


def tool(*argv: str, env: dict[str, str]) -> str:
    """Run a tool of this checkout; its stdout, stripped."""
    done = subprocess.run(
        [str(BIN / argv[0]), *argv[1:]], env=env, check=True, capture_output=True, text=True
    )
    return done.stdout.strip()


class Writer(threading.Thread):
    """64 KiB writes at queue depth 1; each latency goes to the current phase."""

    def __init__(self, uri: str, size: int) -> None:
        super().__init__(daemon=True)
        self.uri, self.size = uri, size
        self.phase = "before"
        self.latencies: dict[str, list[float]] = {"before": [], "during": [], "after": []}
        self.stop = threading.Event()

    def run(self) -> None:
        h = nbd.NBD()
        h.connect_uri(self.uri)
        rng = random.Random(1)
        data = rng.randbytes(WRITE)
        while not self.stop.is_set():
            offset = rng.randrange(self.size // WRITE) * WRITE
            start = time.perf_counter()
            h.pwrite(data, offset)
            self.latencies[self.phase].append(time.perf_counter() - start)
        h.shutdown()


def certificates(work: Path) -> tuple[Path, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate: (server's directory,
    client's directory), as ``tapdisk serve --tls-certificates`` and libnbd read them."""
    pki = work / "pki"
    pki.mkdir()
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"]
    ca = ["-CA", str(pki / "ca-cert.pem"), "-CAkey", str(pki / "ca-key.pem"), "-CAcreateserial"]
    openssl = ["openssl", "req", *key, "-x509", "-subj", "/CN=CA", "-keyout"]
    ca_files = [pki / "ca-key.pem", "-out", pki / "ca-cert.pem"]
    subprocess.run([*openssl, *ca_files], check=True, capture_output=True)
    dirs = []
    for role, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "")):
        req = ["openssl", "req", *key, "-subj", f"/CN={role}", "-keyout", pki / f"{role}-key.pem"]
        subprocess.run([*req, "-out", pki / f"{role}.csr"], check=True, capture_output=True)
        (pki / "ext.cnf").write_text(f"{ext}\nextendedKeyUsage={role}Auth\n")
        sign = ["openssl", "x509", "-req", "-in", pki / f"{role}.csr", *ca, "-days", "2"]
        sign += ["-out", pki / f"{role}-cert.pem", "-extfile", pki / "ext.cnf"]
        subprocess.run(sign, check=True, capture_output=True)
        directory = work / role
        directory.mkdir()
        for name in ("ca-cert.pem", f"{role}-cert.pem", f"{role}-key.pem"):
            shutil.copy(pki / name, directory / name)
        dirs.append(directory)
    return dirs[0], dirs[1]


def serve_nbds(work: Path, target: Path) -> tuple[subprocess.Popen[str], str]:
    """``tapdisk serve`` of ``target`` over TCP, TLS required, client certificates checked;
    the process and the ``nbd:`` spec that reaches it."""
    server_dir, client_dir = certificates(work)
    argv = [str(BIN / "tapdisk"), "serve", "--tcp", "127.0.0.1:0", "--tls", "require"]
    argv += ["--tls-certificates", str(server_dir), "--tls-verify-peer", f"raw:{target}"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = proc.stdout.readline().strip().rsplit(":", 1)[1].split("/")[0]
    return proc, f"nbd:nbds://127.0.0.1:{port}/?tls-certificates={client_dir}"


def summary(latencies: list[float]) -> str:
    if not latencies:
        return "no writes"
    ms = sorted(x * 1000 for x in latencies)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return (
        f"{len(ms):6d} writes  p50 {statistics.median(ms):7.2f} ms  p99 {p99:7.2f} ms  "
        f"max {ms[-1]:7.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="source size in MiB (all data)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before and after")
    parser.add_argument("--nbds", action="store_true", help="migrate to a TLS NBD server")
    args = parser.parse_args()
    size = args.size << 20
    work = Path(tempfile.mkdtemp(prefix="tdmig", dir="/var/tmp"))
    env = {**os.environ, "TAPDISK_CONTROL_DIR": str(work / "run")}
    source, target = work / "source.img", work / "target.img"
    with open(source, "wb") as f:
        chunk = random.Random(2).randbytes(1 << 20)
        for _ in range(args.size):
            f.write(chunk)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", target, str(size)], check=True)
    server, spec = serve_nbds(work, target) if args.nbds else (None, f"raw:{target}")
    pid = tool("tap-ctl", "spawn", env=env)
    try:
        sock = tool("tap-ctl", "open", "-p", pid, "-a", f"raw:{source}", env=env)
        writer = Writer(f"nbd+unix:///?socket={sock}", size)
        writer.start()
        time.sleep(args.settle)
        writer.phase = "during"
        started = time.perf_counter()
        out = tool("tap-ctl", "mirror", "-p", pid, "-m", "0", "-a", spec, "--switch", env=env)
        elapsed = time.perf_counter() - started
        writer.phase = "after"
        time.sleep(args.settle)
        writer.stop.set()
        writer.join()
        final = json.loads(out.splitlines()[-1])
        print(
            f"migration of {args.size} MiB: {elapsed:.2f} s, "
            f"{args.size / elapsed:.0f} MiB/s ({final['state']}, {final['copied'] >> 20} MiB "
            f"copied, {final['zeroed'] >> 20} MiB zeroed)"
        )
        for phase, latencies in writer.latencies.items():
            print(f"  writes {phase:6s} {summary(latencies)}")
    finally:
        subprocess.run([str(BIN / "tap-ctl"), "shutdown", "-p", pid], env=env, check=False)
        if server is not None:
            server.terminate()
            server.wait(20)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
