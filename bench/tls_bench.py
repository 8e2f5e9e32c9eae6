#!/usr/bin/env python3
"""What NBD over TLS costs: tapdisk, nbdkit and qemu-nbd over TCP, each without and with TLS.

Every server serves the same fully written raw image (bench.py's) on 127.0.0.1 twice: plain,
and with TLS required (a certificate made here with the openssl tool; no client
certificates); all six run at once, on ports from PORT up. The workloads:

- ``seqread``: nbdcopy reads the whole image (its defaults: 4 connections, 256 KiB requests,
  64 in flight per connection);
- ``seqwrite``: nbdcopy writes the whole image from a file, then flushes;
- ``read-4k-qd16`` / ``write-4k-qd16``: the same with one connection, 4 KiB requests, 16 in
  flight.

fio, which bench.py drives, cannot take part: its nbd engine does not let libnbd read the
``tls-certificates`` directory a URI names; nor can ``qemu-img bench``, which takes no
``--object`` for the TLS credentials. Printed: MB/s per server and mode, TLS over plain
for each server, and tapdisk with TLS over each peer with TLS; then the same for the CPU time
each server spent per GB, which a shared machine disturbs less than the time. The servers
run side by side and take turns; each number is the median of ``--rounds`` runs. A
measuring tool, not a test; numbers from a busy machine are noise.

Run from the checkout's venv: ``.venv/bin/python bench/tls_bench.py --quick``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import (
    _die_with_parent,
    drop_page_cache,
    make_raw_image,
    tapdisk_command,
    warm_page_cache,
    write_back,
)

PORT = 10899
QUICK_SIZE = 256 << 20
NORMAL_SIZE = 1 << 30


@dataclass(frozen=True)
class Peer:
    """A server: its command line, given the port, the image and (for TLS) the certificates."""

    name: str
    argv: Callable[[int, Path, Path | None], list[str]]


def tapdisk_argv(port: int, image: Path, certs: Path | None) -> list[str]:
    tls = ["--tls", "require", "--tls-certificates", str(certs)] if certs else []
    return [
        tapdisk_command(),
        "--log-level",
        "warning",
        "serve",
        "--tcp",
        f"127.0.0.1:{port}",
        *tls,
        f"raw:{image}",
    ]


def nbdkit_argv(port: int, image: Path, certs: Path | None) -> list[str]:
    tls = ["--tls=require", f"--tls-certificates={certs}"] if certs else []
    return [
        "nbdkit",
        "-f",
        "--exit-with-parent",
        "-i",
        "127.0.0.1",
        "-p",
        str(port),
        *tls,
        "file",
        str(image),
    ]


def qemu_nbd_argv(port: int, image: Path, certs: Path | None) -> list[str]:
    tls = []
    if certs:
        tls = [
            "--object",
            f"tls-creds-x509,id=tls0,endpoint=server,dir={certs},verify-peer=off",
            "--tls-creds",
            "tls0",
        ]
    return [
        "qemu-nbd",
        "-f",
        "raw",
        "-t",
        "-e",
        "4",
        "--cache=writeback",
        "-b",
        "127.0.0.1",
        "-p",
        str(port),
        *tls,
        str(image),
    ]


PEERS = (
    Peer("tapdisk", tapdisk_argv),
    Peer("nbdkit", nbdkit_argv),
    Peer("qemu-nbd", qemu_nbd_argv),
)
WORKLOADS = ("seqread", "seqwrite", "read-4k-qd16", "write-4k-qd16")


def make_certificates(directory: Path) -> None:
    """A CA and a server certificate for 127.0.0.1, in nbdkit's and qemu's layout."""
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    quiet = {"check": True, "capture_output": True}
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            *key,
            "-keyout",
            directory / "ca-key.pem",
            "-out",
            directory / "ca-cert.pem",
            "-days",
            "2",
            "-subj",
            "/CN=bench-ca",
        ],
        **quiet,
    )
    subprocess.run(
        [
            "openssl",
            "req",
            *key,
            "-keyout",
            directory / "server-key.pem",
            "-out",
            directory / "server.csr",
            "-subj",
            "/CN=localhost",
        ],
        **quiet,
    )
    (directory / "ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    subprocess.run(
        [
            "openssl",
            "x509",
            "-req",
            "-in",
            directory / "server.csr",
            "-CA",
            directory / "ca-cert.pem",
            "-CAkey",
            directory / "ca-key.pem",
            "-CAcreateserial",
            "-out",
            directory / "server-cert.pem",
            "-days",
            "2",
            "-extfile",
            directory / "ext",
        ],
        **quiet,
    )


class Running:
    """One server process on ``port``, until ``stop``."""

    def __init__(self, peer: Peer, port: int, image: Path, certs: Path | None, log: Path) -> None:
        self.port, self.certs = port, certs
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            raise RuntimeError(f"bench: port {port} is already in use")
        self.argv = peer.argv(port, image, certs)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{' '.join(self.argv)} exited:\n{log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{' '.join(self.argv)} is not listening after 30 s")

    def cpu_seconds(self) -> float:
        """User and system time of the server process so far (every thread)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def uri(self) -> str:
        if self.certs:
            return f"nbds://127.0.0.1:{self.port}/?tls-certificates={self.certs}"
        return f"nbd://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_workload(workload: str, server: Running, image: Path, source: Path) -> tuple[float, float]:
    """(seconds, server CPU seconds) of one run of ``workload`` against ``server``."""
    uri = server.uri()
    small = ["--connections=1", "--request-size=4096", "--requests=16"]
    argv = {
        "seqread": ["nbdcopy", uri, "null:"],
        "seqwrite": ["nbdcopy", "--flush", str(source), uri],
        "read-4k-qd16": ["nbdcopy", *small, uri, "null:"],
        "write-4k-qd16": ["nbdcopy", "--flush", *small, str(source), uri],
    }[workload]
    if "write" in workload:
        drop_page_cache(image)
    else:
        warm_page_cache(image)
    cpu = server.cpu_seconds()
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, timeout=600)
    took = time.perf_counter() - start
    cpu = server.cpu_seconds() - cpu
    if "write" in workload:
        write_back(image)
    return took, cpu


Key = tuple[str, str, bool]  # (server, workload, TLS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 256 MiB image, one round")
    parser.add_argument("--rounds", type=int, default=3, help="runs per number (median)")
    parser.add_argument("--dir", type=Path, help="where the image goes (default: a temp dir)")
    args = parser.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    size = QUICK_SIZE if args.quick else NORMAL_SIZE
    runs: dict[Key, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="tls-bench-") as tmp:
        work = Path(tmp)
        certs = work / "pki"
        certs.mkdir()
        make_certificates(certs)
        image, source = work / "image.raw", work / "source.raw"
        make_raw_image(image, size)
        make_raw_image(source, size)
        servers: dict[tuple[str, bool], Running] = {}
        try:
            for peer in PEERS:
                for tls in (False, True):
                    log = work / f"{peer.name}-{tls}.log"
                    port, tls_certs = PORT + len(servers), certs if tls else None
                    servers[peer.name, tls] = Running(peer, port, image, tls_certs, log)
            # Servers take turns within each round, so a busy moment hits them all alike.
            for round_ in range(rounds):
                for workload in WORKLOADS:
                    for (name, tls), server in servers.items():
                        took, cpu = run_workload(workload, server, image, source)
                        runs.setdefault((name, workload, tls), []).append((took, cpu))
                        mode = "TLS" if tls else "plain"
                        print(
                            f"# round {round_ + 1}: {name} {mode} {workload}: "
                            f"{size / took / 1e6:.0f} MB/s, server CPU {cpu:.2f} s",
                            flush=True,
                        )
        finally:
            for server in servers.values():
                server.stop()
    speeds = {key: size / statistics.median(t for t, _ in each) / 1e6 for key, each in runs.items()}
    cpu = {key: statistics.median(c for _, c in each) / size * 1e9 for key, each in runs.items()}
    print_table(speeds, "MB/s (10^6 bytes) of nbdcopy copying the whole image, TCP on 127.0.0.1")
    print()
    print_table(cpu, "server CPU seconds per GB moved (lower is better)", higher_is_better=False)
    return 0


def print_table(values: dict[Key, float], caption: str, higher_is_better: bool = True) -> None:
    """Plain and TLS per server, TLS over plain, and tapdisk's TLS over each peer's."""
    names = [peer.name for peer in PEERS]
    head = ["workload"] + [f"{n} plain / TLS (TLS÷plain)" for n in names]
    head += [f"tapdisk TLS ÷ {n} TLS" for n in names[1:]]
    print(caption)
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    shown = "{:.0f}" if higher_is_better else "{:.2f}"
    for workload in WORKLOADS:
        cells = [workload]
        for name in names:
            plain, tls = values[name, workload, False], values[name, workload, True]
            cells.append(f"{shown.format(plain)} / {shown.format(tls)} ({tls / plain:.2f})")
        ours = values["tapdisk", workload, True]
        cells += [f"{ours / values[n, workload, True]:.2f}x" for n in names[1:]]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    os.environ.setdefault("LC_ALL", "C")
    raise SystemExit(main())
