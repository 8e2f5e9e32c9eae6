"""tap-ctl helpers the tests share: tap-ctl over a private control directory, processes, images."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tapdisk.ctl.client import daemon_pids
from tapdisk.ctl.protocol import Decoder, parse_response

TAP_CTL = str(Path(sys.executable).with_name("tap-ctl"))


class TapCtl:
    """Runs tap-ctl with a private control directory; kills leftover tapdisks at the end."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.env = {**os.environ, "TAPDISK_CONTROL_DIR": str(directory)}

    def __call__(self, *args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [TAP_CTL, *args], env=self.env, capture_output=True, text=True, timeout=120, **kwargs
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"tap-ctl {' '.join(args)} exited {proc.returncode}: {proc.stderr}"
            )
        return proc

    def out(self, *args: str) -> str:
        return self(*args).stdout.strip()

    def pids(self) -> list[int]:
        return daemon_pids(str(self.dir))

    def spawn_open(self, spec: str, *flags: str) -> tuple[int, int, str]:
        """Spawn a tapdisk and open ``spec``; (pid, minor, NBD socket path)."""
        pid = int(self.out("spawn"))
        sock = self.out("open", "-p", str(pid), "-a", spec, *flags)
        minor = int(sock.rsplit(".", 1)[1])
        return pid, minor, sock

    def listing(self) -> list[dict]:
        return json.loads(self.out("list", "--json"))["tapdisks"]

    def cleanup(self) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            wait_gone(pid, kill=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A process reaped between the kill and the read fails the read with ESRCH.
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z"):
            return False
    return True


def wait_gone(pid: int, timeout: float = 10, kill: bool = False) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.02)
    if kill:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return False


def nbd_uri(sock: str) -> str:
    return f"nbd+unix:///?socket={sock}"


def private_tapctl() -> Iterator[TapCtl]:
    """A TapCtl over a fresh control directory; cleaned up when resumed."""
    # A short directory: unix socket paths are limited to 108 bytes.
    directory = Path(tempfile.mkdtemp(prefix="td", dir="/tmp"))
    ctl = TapCtl(directory / "run")
    yield ctl
    ctl.cleanup()
    shutil.rmtree(directory, ignore_errors=True)


def connect(tapctl, pid: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(tapctl.dir / f"ctl{pid}"))
    return sock


def receive(sock: socket.socket, count: int) -> list:
    decoder = Decoder()
    messages: list = []
    while len(messages) < count:
        data = sock.recv(65536)
        if not data:
            break
        messages += decoder.feed(data)
    return [parse_response(m) for m in messages]
