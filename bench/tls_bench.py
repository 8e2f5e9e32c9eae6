#!/usr/bin/env python3
"""What NBD over TLS costs: tapdisk, nbdkit and qemu-nbd over TCP, each without and with TLS.

Every server serves the same fully written raw image (bench.py's) on 127.0.0.1, first plain,
then with TLS required (a certificate made here with the openssl tool; no client
certificates), one server at a time. The workloads:

- ``seqread``: nbdcopy reads the whole image (4 connections, 256 KiB requests, 64 in flight);
- ``seqwrite``: nbdcopy writes the whole image from a file;
- ``read-4k-qd16`` / ``write-4k-qd16``: ``qemu-img bench``, 4 KiB requests, 16 in flight.

fio, which bench.py drives, cannot take part: its nbd engine does not let libnbd read the
``tls-certificates`` directory a URI names. Printed: MB/s per server and mode, TLS over plain
for each server, and tapdisk with TLS over each peer with TLS. Each number is the median of
``--rounds`` runs. A measuring tool, not a test; numbers from a busy machine are noise.

Run from the checkout's venv: ``.venv/bin/python bench/tls_bench.py --quick``.
"""

from __future__ import annotations

import argparse
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
    """One server process on PORT, until ``stop``."""

    def __init__(self, peer: Peer, image: Path, certs: Path | None, log: Path) -> None:
        self.argv = peer.argv(PORT, image, certs)
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
                socket.create_connection(("127.0.0.1", PORT), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{' '.join(self.argv)} is not listening after 30 s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_workload(workload: str, image: Path, source: Path, certs: Path | None) -> float:
    """Seconds one run of ``workload`` takes against the server on PORT."""
    size = image.stat().st_size
    if certs:
        uri = f"nbds://127.0.0.1:{PORT}/?tls-certificates={certs}"
        qemu = [
            "--object",
            f"tls-creds-x509,id=tls0,endpoint=client,dir={certs}",
            "--image-opts",
            f"driver=nbd,host=127.0.0.1,port={PORT},tls-creds=tls0",
        ]
    else:
        uri = f"nbd://127.0.0.1:{PORT}/"
        qemu = ["--image-opts", f"driver=nbd,host=127.0.0.1,port={PORT}"]
    count = size // 4096 // 4
    argv = {
        "seqread": ["nbdcopy", uri, "null:"],
        "seqwrite": ["nbdcopy", "--flush", str(source), uri],
        "read-4k-qd16": ["qemu-img", "bench", "-c", str(count), "-d", "16", "-s", "4k", *qemu],
        "write-4k-qd16": [
            "qemu-img",
            "bench",
            "-w",
            "-c",
            str(count),
            "-d",
            "16",
            "-s",
            "4k",
            *qemu,
        ],
    }[workload]
    if "write" in workload:
        drop_page_cache(image)
    else:
        warm_page_cache(image)
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, timeout=600)
    took = time.perf_counter() - start
    if "write" in workload:
        write_back(image)
    return took


def bytes_moved(workload: str, size: int) -> int:
    return size if workload.startswith("seq") else size // 4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 256 MiB image, one round")
    parser.add_argument("--rounds", type=int, default=3, help="runs per number (median)")
    parser.add_argument("--dir", type=Path, help="where the image goes (default: a temp dir)")
    args = parser.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    size = QUICK_SIZE if args.quick else NORMAL_SIZE
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="tls-bench-") as tmp:
        work = Path(tmp)
        certs = work / "pki"
        certs.mkdir()
        make_certificates(certs)
        image, source = work / "image.raw", work / "source.raw"
        make_raw_image(image, size)
        make_raw_image(source, size)
        speeds: dict[tuple[str, str, bool], float] = {}
        for peer in PEERS:
            for tls in (False, True):
                server = Running(peer, image, certs if tls else None, work / f"{peer.name}.log")
                try:
                    for workload in WORKLOADS:
                        times = [
                            run_workload(workload, image, source, certs if tls else None)
                            for _ in range(rounds)
                        ]
                        mbs = bytes_moved(workload, size) / statistics.median(times) / 1e6
                        speeds[peer.name, workload, tls] = mbs
                        mode = "TLS" if tls else "plain"
                        print(f"# {peer.name} {mode} {workload}: {mbs:.0f} MB/s", flush=True)
                finally:
                    server.stop()
    print_table(speeds)
    return 0


def print_table(speeds: dict[tuple[str, str, bool], float]) -> None:
    names = [peer.name for peer in PEERS]
    head = ["workload"] + [f"{n} plain / TLS (TLS÷plain)" for n in names]
    head += [f"tapdisk TLS ÷ {n} TLS" for n in names[1:]]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for workload in WORKLOADS:
        cells = [workload]
        for name in names:
            plain, tls = speeds[name, workload, False], speeds[name, workload, True]
            cells.append(f"{plain:.0f} / {tls:.0f} ({tls / plain:.2f})")
        ours = speeds["tapdisk", workload, True]
        cells += [f"{ours / speeds[n, workload, True]:.2f}x" for n in names[1:]]
        print("| " + " | ".join(cells) + " |")
    print("MB/s; seq: nbdcopy of the whole image; 4k: qemu-img bench, 16 in flight")


if __name__ == "__main__":
    os.environ.setdefault("LC_ALL", "C")
    raise SystemExit(main())
