"""The tapdisk processes tap-ctl starts and stops: spawn, wait for exit, shut down.

``spawn`` starts a detached ``tapdisk daemon`` and returns once it listens on its
control socket; ``shutdown`` asks a daemon to exit over that socket and waits for it;
``wait_exit`` waits for one that exits by itself (its last minor detached);
``abandon`` stops one spawned for a command that then failed, so no orphan tapdisk
stays behind.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time

from tapdisk.ctl import directory as control_directory
from tapdisk.ctl.client import CallError, Client

#: Seconds a spawned tapdisk may take to start listening.
SPAWN_TIMEOUT = 30.0
#: Seconds a tapdisk may take to exit after shutdown.
EXIT_TIMEOUT = 30.0


class SpawnError(Exception):
    """A tapdisk did not start; the message holds what it logged."""


def spawn(directory: str, config: str | None = None) -> subprocess.Popen[bytes]:
    """Start a detached ``tapdisk daemon`` and wait until it listens.

    ``config`` is the configuration file it reads (its own default when None).
    Its log goes to ``<directory>/tapdisk.log``; on failure the lines it wrote
    there are part of the error.
    """
    log_path = os.path.join(directory, "tapdisk.log")
    try:
        control_directory.prepare(directory)
        log_fd = control_directory.open_file(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    except control_directory.UnsafeDirectoryError as exc:
        raise SpawnError(f"tapdisk not started: {exc}") from None
    log_start = os.fstat(log_fd).st_size
    ready_r, ready_w = os.pipe()
    argv = [sys.executable, "-m", "tapdisk.cli", "daemon", "--control-dir", directory]
    argv += ["--ready-fd", str(ready_w)]
    if config is not None:
        argv += ["--config", os.path.abspath(config)]
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_fd,
            pass_fds=(ready_w,),
            start_new_session=True,
        )
    finally:
        os.close(ready_w)
        os.close(log_fd)
    try:
        line = _read_line(ready_r, SPAWN_TIMEOUT)
    finally:
        os.close(ready_r)
    if line:
        return proc
    _stop(proc)
    with os.fdopen(control_directory.open_file(log_path, os.O_RDONLY), "rb") as log:
        log.seek(log_start)
        tail = log.read().decode(errors="replace").strip()
    raise SpawnError(f"tapdisk failed to start{': ' + tail if tail else ''}")


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


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Make sure a tapdisk we spawned is gone: SIGTERM, then SIGKILL after EXIT_TIMEOUT."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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


def abandon(directory: str, proc: subprocess.Popen[bytes]) -> None:
    """Stop a tapdisk spawned for a command that failed before it served anything.

    It is asked to shut down first, which closes its images and detaches nothing
    half-made; a tapdisk that does not answer or does not exit in time is stopped.
    """
    with contextlib.suppress(CallError), Client.connect(directory, proc.pid) as client:
        client.call("shutdown")
    try:
        proc.wait(EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        _stop(proc)
