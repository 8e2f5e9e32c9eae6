"""Helpers the tests share: external tools, commands, and real ``tapdisk serve`` processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

#: The tapdisk console script of the interpreter running the tests.
TAPDISK = str(Path(sys.executable).with_name("tapdisk"))


def require(tool: str) -> str:
    """Path of an external tool; the test fails (not skips) when it is missing."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed; .ci/run installs it")
    return path


def proc_status(pid: int, field: str) -> int:
    """The number a line of ``/proc/PID/status`` gives for ``field`` (e.g. VmHWM in kB)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """``size`` bytes from ``sock``; fails the test if the peer closes first."""
    data = b""
    while len(data) < size:
        more = sock.recv(size - len(data))
        assert more, f"the connection ended after {len(data)} of {size} bytes"
        data += more
    return data


def run(*argv: str | os.PathLike[str], check: bool = True, timeout: float = 120) -> str:
    """Run a command, return its stdout; raise with its stderr on failure."""
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, argv))} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        )
    return proc.stdout


@dataclass
class Served:
    """A running ``tapdisk serve`` process."""

    proc: subprocess.Popen[str]
    socket: Path
    uris: list[str] = field(default_factory=list)

    def uri(self, export: str = "") -> str:
        """nbd+unix URI for an export ("" = the default export)."""
        return f"nbd+unix:///{export}?socket={self.socket}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Signal the server and wait for it; returns its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    @property
    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read()


def start_tapdisk(socket: Path, *args: str, timeout: float = 20) -> Served:
    """Start ``tapdisk serve --unix SOCKET ARGS...`` and wait until it listens."""
    proc = subprocess.Popen(
        [TAPDISK, "serve", "--unix", str(socket), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the first URI is printed once listening
    if not line:
        err = proc.stderr.read() if proc.stderr else ""
        proc.wait(timeout)
        raise AssertionError(f"tapdisk serve {' '.join(args)} failed to start:\n{err}")
    served = Served(proc, socket, [line.strip()])
    return served
