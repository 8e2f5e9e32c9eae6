"""Helpers for the kernel group: a tapdisk NBD server attached to /dev/nbdX in-process.

``DirectServer`` runs the project's own ``NBDServer`` on an event-loop thread
and serves socketpairs in the no-handshake mode (``DirectAttach``); the kernel
ends go to ``control.kernel``.  Run as a script it is a minimal stand-alone
attacher, used to kill and replace a server process under a live device:

    python kerneltools.py raw:/path/disk.img [--conns N] [--reconfigure INDEX]

prints ``nbd INDEX`` once attached, then serves until SIGTERM (drain, close
the sockets, leave the device attached) or SIGKILL.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from tapdisk.drivers.registry import OpenOptions, open_image

from tapdisk import kernel
from tapdisk.export import DirectAttach, Export
from tapdisk.nbd.handshake import connection_flags
from tapdisk.server import NBDServer

T = TypeVar("T")

#: Seconds any helper command may take before the test fails.
COMMAND_TIMEOUT = 300


def sh(*argv: str | os.PathLike[str], timeout: float = COMMAND_TIMEOUT) -> str:
    """Run a command; return stdout; raise with its output when it fails."""
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, argv))} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        )
    return proc.stdout


def sha256_file(path: str | os.PathLike[str], length: int | None = None) -> str:
    """SHA-256 of a file or device (its first ``length`` bytes), read with plain I/O."""
    digest = hashlib.sha256()
    remaining = length
    with open(path, "rb", buffering=0) as f:
        while remaining is None or remaining > 0:
            chunk = f.read(1 << 20 if remaining is None else min(1 << 20, remaining))
            if not chunk:
                break
            digest.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    return digest.hexdigest()


def device(index: int) -> str:
    return f"/dev/nbd{index}"


def sysfs(index: int, attr: str) -> str:
    return Path(f"/sys/block/nbd{index}/{attr}").read_text().strip()


class DirectServer:
    """One image served by ``NBDServer`` to the kernel over socketpairs."""

    def __init__(self, spec: str, *, read_only: bool = False, name: str = "disk") -> None:
        self.spec = spec
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="nbd-server")
        self.thread.start()
        image = open_image(spec, OpenOptions(read_only=read_only))
        self.export = Export(name, image, read_only=read_only)
        self.server = NBDServer([self.export])
        self.flags = int(connection_flags(self.export.info, structured=False))
        self.size = image.size
        self.indexes: list[int] = []
        self._stopped = False

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def serve_pairs(self, count: int) -> list[socket.socket]:
        """``count`` socketpairs: our ends served, the kernel ends returned."""
        kernel_ends = []
        for _ in range(count):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self.call(self.server.serve_socket(ours, DirectAttach(self.export.name)))
            kernel_ends.append(theirs)
        return kernel_ends

    def attach(self, conns: int = 1, **options: Any) -> int:
        """CONNECT a device to ``conns`` fresh sockets; returns its index."""
        options.setdefault("server_flags", self.flags)
        options.setdefault("backend_id", self.spec)
        options.setdefault("timeout", 60)
        ends = self.serve_pairs(conns)
        try:
            index = kernel.connect(ends, self.size, **options)
        finally:
            for end in ends:
                end.close()
        self.indexes.append(index)
        return index

    def take_over(self, index: int, conns: int = 1, **options: Any) -> None:
        """RECONFIGURE a device whose sockets died to fresh sockets served here."""
        options.setdefault("backend_id", self.spec)
        ends = self.serve_pairs(conns)
        try:
            kernel.reconfigure(index, ends, **options)
        finally:
            for end in ends:
                end.close()
        self.indexes.append(index)

    def stop(self, *, detach: bool = True) -> None:
        """Detach our devices (unless ``detach`` is False), drain and close the server."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if detach:
                for index in self.indexes:
                    if kernel.status(index).get(index):
                        kernel.disconnect(index)
            self.call(self.server.shutdown())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)
            self.loop.close()


def main() -> int:
    parser = argparse.ArgumentParser(description="attach one image to /dev/nbdX and serve it")
    parser.add_argument("spec")
    parser.add_argument("--conns", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=60)
    parser.add_argument("--dead-conn-timeout", type=int, default=60)
    parser.add_argument("--reconfigure", type=int, metavar="INDEX")
    args = parser.parse_args()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    server = DirectServer(args.spec)
    if args.reconfigure is None:
        index = server.attach(
            args.conns, timeout=args.timeout, dead_conn_timeout=args.dead_conn_timeout
        )
    else:
        index = args.reconfigure
        server.take_over(index, args.conns)
    print(f"nbd {index}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop(detach=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
