"""The tapdisk processes tap-ctl starts and stops: spawn, wait for exit, shut down.

``spawn`` has the directory's spawner fork a detached ``tapdisk daemon`` and returns
once it listens on its control socket; ``shutdown`` asks a daemon to exit over that
socket and waits for it; ``wait_exit`` waits for one that exits by itself (its last
minor detached); ``abandon`` stops one spawned for a command that then failed, so no
orphan tapdisk stays behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

from tapdisk.ctl import directory as control_directory
from tapdisk.ctl import protocol
from tapdisk.ctl.client import CallError, Client

#: Seconds a spawned tapdisk may take to start listening.
SPAWN_TIMEOUT = 30.0
#: Seconds a tapdisk may take to exit after shutdown.
EXIT_TIMEOUT = 30.0


class SpawnError(Exception):
    """A tapdisk did not start; the message holds what it logged."""


def spawn(directory: str, config: str | None = None) -> int:
    """Start a detached ``tapdisk daemon`` and wait until it listens; its pid.

    The directory's spawner forks it (one is started when none runs; see
    ``tapdisk.daemon.spawner``).  ``config`` is the configuration file it reads (its
    own default when None).  Its log goes to ``<directory>/tapdisk.log``; on failure
    the lines it wrote there are part of the error.
    """
    log_path = os.path.join(directory, "tapdisk.log")
    try:
        control_directory.prepare(directory)
        log_fd = control_directory.open_file(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    except control_directory.UnsafeDirectoryError as exc:
        raise SpawnError(f"tapdisk not started: {exc}") from None
    log_start = os.fstat(log_fd).st_size
    ready_r, ready_w = os.pipe()
    request = json.dumps({"config": config and os.path.abspath(config)}).encode()
    try:
        pid = _ask_spawner(directory, request, (log_fd, ready_w))
        line = ""
        if pid is not None:
            os.close(ready_w)
            ready_w = -1
            line = _read_line(ready_r, SPAWN_TIMEOUT)
    finally:
        for fd in (ready_r, ready_w, log_fd):
            if fd >= 0:
                os.close(fd)
    if line:
        assert pid is not None
        return pid
    if pid is not None:
        wait_exit(pid, 0)
    with os.fdopen(control_directory.open_file(log_path, os.O_RDONLY), "rb") as log:
        log.seek(log_start)
        tail = log.read().decode(errors="replace").strip()
    raise SpawnError(f"tapdisk failed to start{': ' + tail if tail else ''}")


def _ask_spawner(directory: str, request: bytes, fds: tuple[int, int]) -> int | None:
    """Have the directory's spawner fork a tapdisk; its pid, None if no spawner answered.

    A spawner exiting as we connect closes the connection unanswered: one more try
    starts a new one.
    """
    for _ in range(2):
        with _connect_spawner(directory, fds[0]) as sock:
            try:
                socket.send_fds(sock, [request], list(fds))
                reply = sock.makefile("rb").readline()
            except OSError:
                continue
            if reply.strip().isdigit():
                return int(reply)
    return None


def _connect_spawner(directory: str, log_fd: int) -> socket.socket:
    """A connection to the directory's spawner, started first when none listens."""
    path = os.path.join(directory, protocol.SPAWNER_SOCKET)
    with contextlib.suppress(FileNotFoundError, ConnectionRefusedError):
        return _connect(path)
    lock_path = os.path.join(directory, "spawner.lock")
    lock_fd = control_directory.open_file(lock_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    with os.fdopen(lock_fd, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError, ConnectionRefusedError):
            return _connect(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by a spawner that was killed
        _start_spawner(directory, log_fd)
        return _connect(path)


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(SPAWN_TIMEOUT)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


def _start_spawner(directory: str, log_fd: int) -> None:
    """Start ``tapdisk spawner`` for ``directory`` and wait until it listens."""
    ready_r, ready_w = os.pipe()
    argv = [sys.executable, "-m", "tapdisk.cli", "spawner", "--control-dir", directory]
    argv += ["--ready-fd", str(ready_w)]
    try:
        subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_fd,
            pass_fds=(ready_w,),
            start_new_session=True,
        )
    finally:
        os.close(ready_w)
    try:
        line = _read_line(ready_r, SPAWN_TIMEOUT)
    finally:
        os.close(ready_r)
    if not line:
        raise SpawnError("the tapdisk spawner failed to start; see tapdisk.log")


def _read_line(fd: int, timeout: float) -> str:
    """Read from ``fd`` until EOF or the deadline; the text read."""
    data = b""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return ""
        chunk = os.read(fd, 4096)
        if not chunk:
            return data.decode().strip()
        data += chunk


def wait_exit(pid: int, timeout: float = EXIT_TIMEOUT) -> None:
    """Wait until process ``pid`` (not our child), which is exiting, is gone; kill it after
    ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def shutdown(directory: str, pid: int) -> None:
    """Ask tapdisk ``pid`` to exit and wait until it has."""
    with Client.connect(directory, pid) as client:
        client.call("shutdown")
    wait_exit(pid)


def abandon(directory: str, pid: int) -> None:
    """Stop a tapdisk spawned for a command that failed before it served anything.

    It is asked to shut down first, which closes its images and detaches nothing
    half-made; a tapdisk that does not answer or does not exit in time is killed.
    """
    with contextlib.suppress(CallError), Client.connect(directory, pid) as client:
        client.call("shutdown")
    wait_exit(pid)
