#!/usr/bin/env python3
"""Measure what idle and slow clients cost ``tapdisk serve`` in memory (RSS from /proc).

Starts one ``tapdisk serve`` of a sparse raw image with no connection limit, then:

1. opens N connections that read the greeting and send nothing (before the handshake);
2. finishes the handshake on each (``NBD_OPT_EXPORT_NAME``) and sends nothing more;
3. closes them all;
4. opens S connections that each send the header of one large WRITE and then a byte
   of it now and then (slow writers), then closes them;
5. opens R connections that each send K large READs and receive nothing (slow readers),
   then receive every reply and close.

After each step it prints the server's RSS, its growth per connection, and how long
``nbdinfo`` took to be served meanwhile.  The wire is spelled out here (fixed newstyle,
EXPORT_NAME, one request header) so that a thousand clients cost the bench only sockets.

Run it from the checkout's venv: ``.venv/bin/python bench/idle.py -n 1000 -s 15 -r 50``.
A measuring tool, not a test: the times from a busy machine are noise.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TAPDISK = str(Path(sys.executable).with_name("tapdisk"))
MiB = 1 << 20
IMAGE_SIZE = 256 * MiB
#: Seconds the server gets to release memory after the clients hang up.
SETTLE = 3.0

FIXED_NEWSTYLE_NO_ZEROES = struct.pack(">I", 3)
OPT_EXPORT_NAME = struct.pack(">QII", 0x49484156454F5054, 1, 0)
WRITE_HEADER = READ_HEADER = struct.Struct(">IHHQQI")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray(n)
    view = memoryview(data)
    while view:
        got = sock.recv_into(view)
        if not got:
            raise ConnectionError("server closed the connection")
        view = view[got:]
    return bytes(data)


def connect(path: str) -> socket.socket:
    """A connection that has read the greeting and sent nothing."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(path)
    recv_exactly(sock, 18)
    return sock


def negotiate(sock: socket.socket) -> None:
    """Finish the handshake with EXPORT_NAME of the default export."""
    sock.sendall(FIXED_NEWSTYLE_NO_ZEROES + OPT_EXPORT_NAME)
    recv_exactly(sock, 10)


def nbdinfo_seconds(path: str) -> float:
    start = time.perf_counter()
    subprocess.run(
        ["nbdinfo", "--size", f"nbd+unix:///?socket={path}"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return time.perf_counter() - start


def report(step: str, pid: int, base: int, count: int, path: str) -> None:
    rss = rss_kib(pid)
    per = (rss - base) / count if count else 0.0
    print(
        f"{step:<34} RSS {rss / 1024:8.1f} MB  growth {(rss - base) / 1024:8.1f} MB  "
        f"{per:7.1f} KiB/conn  nbdinfo {nbdinfo_seconds(path) * 1e3:6.0f} ms",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--idle", type=int, default=1000, help="idle connections")
    parser.add_argument("-s", "--slow", type=int, default=15, help="slow writers")
    parser.add_argument(
        "--write-mib", type=int, default=32, help="size of each slow writer's WRITE (MiB)"
    )
    parser.add_argument("-r", "--readers", type=int, default=50, help="slow readers")
    parser.add_argument("--reads", type=int, default=4, help="READs each slow reader sends")
    parser.add_argument(
        "--read-mib", type=int, default=32, help="size of each slow reader's READs (MiB)"
    )
    parser.add_argument(
        "--direct",
        action="store_true",
        help="serve with O_DIRECT: every read goes to the disk, none is answered inline",
    )
    parser.add_argument("--tapdisk", default=TAPDISK, help="the tapdisk command to measure")
    args = parser.parse_args()
    if shutil.which("nbdinfo") is None:
        sys.exit("idle.py: nbdinfo is not installed")
    raise_file_limit(2 * max(args.idle, args.slow) + 256)
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp, "disk.raw")
        image.write_bytes(b"")
        os_truncate(image, IMAGE_SIZE)
        path = str(Path(tmp, "s.sock"))
        limits = ["--max-connections", "0", "--handshake-timeout", "600"]
        if args.direct:
            limits.append("--direct")
        if (
            "--max-handshakes"
            in subprocess.run(
                [args.tapdisk, "serve", "--help"], capture_output=True, text=True, check=True
            ).stdout
        ):
            limits += ["--max-handshakes", "0"]  # (a tapdisk from before it had none)
        with open(Path(tmp, "log"), "w") as log:
            server = subprocess.Popen(
                [args.tapdisk, "serve", "--unix", path, *limits, f"raw:{image}"],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        try:
            assert server.stdout is not None
            if not server.stdout.readline():
                sys.exit(f"idle.py: tapdisk serve did not start:\n{Path(tmp, 'log').read_text()}")
            nbdinfo_seconds(path)  # warm: the first client's code paths
            time.sleep(0.5)
            base = rss_kib(server.pid)
            print(f"{'start':<34} RSS {base / 1024:8.1f} MB")
            clients = [connect(path) for _ in range(args.idle)]
            report(f"{args.idle} before handshake", server.pid, base, args.idle, path)
            for sock in clients:
                negotiate(sock)
            report(f"{args.idle} after handshake", server.pid, base, args.idle, path)
            for sock in clients:
                sock.close()
            time.sleep(SETTLE)
            report("all closed", server.pid, base, 0, path)
            slow_writers(args, path, server.pid, base)
            slow_readers(args, path, server.pid, base)
        finally:
            server.terminate()
            server.wait(30)


def slow_writers(args: argparse.Namespace, path: str, pid: int, base: int) -> None:
    length = args.write_mib * MiB
    writers = []
    for i in range(args.slow):
        sock = connect(path)
        negotiate(sock)
        sock.sendall(WRITE_HEADER.pack(0x25609513, 0, 1, i, i * length % IMAGE_SIZE, length))
        sock.sendall(b"\x00")
        writers.append(sock)
    for _ in range(3):  # a byte at a time, each after the server has read the previous ones
        time.sleep(0.3)
        for sock in writers:
            sock.sendall(b"\x00")
    report(f"{args.slow} slow {args.write_mib} MiB writers", pid, base, args.slow, path)
    for sock in writers:
        sock.close()
    time.sleep(SETTLE)
    report("slow writers closed", pid, base, 0, path)


def slow_readers(args: argparse.Namespace, path: str, pid: int, base: int) -> None:
    if not args.readers:
        return
    length = args.read_mib * MiB
    readers = []
    for i in range(args.readers):
        sock = connect(path)
        negotiate(sock)
        sock.sendall(
            b"".join(
                READ_HEADER.pack(0x25609513, 0, 0, n, (i + n) * length % IMAGE_SIZE, length)
                for n in range(args.reads)
            )
        )
        readers.append(sock)
    time.sleep(SETTLE)  # the server reads what it takes and answers into full sockets
    step = f"{args.readers} slow readers ({args.reads}x{args.read_mib} MiB)"
    report(step, pid, base, args.readers, path)
    start = time.perf_counter()
    with ThreadPoolExecutor(len(readers)) as pool:  # all start reading at once
        served = sum(pool.map(lambda sock: take_replies(sock, args.reads, length), readers))
    print(
        f"{'':<34} {served} of {args.readers} took all their replies in "
        f"{time.perf_counter() - start:.1f} s, {args.readers - served} were closed",
        flush=True,
    )
    time.sleep(SETTLE)
    report("slow readers read, closed", pid, base, 0, path)


def take_replies(sock: socket.socket, count: int, length: int) -> bool:
    """Receive ``count`` simple READ replies of ``length`` bytes; False if the server closed
    the connection first."""
    sock.settimeout(300)  # a READ may wait for the reply budget while others are taken
    try:
        for _ in range(count):
            header = recv_exactly(sock, 16)
            assert header[:8] == b"\x67\x44\x66\x98\x00\x00\x00\x00", header
            recv_exactly(sock, length)
        return True
    except (ConnectionError, OSError):
        return False
    finally:
        sock.close()


def raise_file_limit(wanted: int) -> None:
    """Let this process and the server it starts (which inherits it) hold ``wanted`` files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


def os_truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


if __name__ == "__main__":
    main()
