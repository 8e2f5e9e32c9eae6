"""The fallback of ``tap-ctl restart`` when the old tapdisk is dead or wedged.

A live hand-over (``tapdisk/daemon/handover.py``) needs the old tapdisk to answer.
One that was killed or crashed cannot; one stopped (SIGSTOP) or stuck does not.
Its VBDs are then restarted from their records (``tapdisk/ctl/records.py``):

1. ``reach`` asks the old tapdisk for its VBDs, giving it ``PROBE_TIMEOUT``.  No
   process behind its control socket: it is gone.  A process that accepted the
   connection (the socket's credentials name it) and stays silent: it is wedged,
   and is killed (SIGKILL) and waited for.  Either way one line on stderr says so.
2. ``recover`` spawns a new tapdisk and sends it ``adopt`` with ``recover``: it
   opens every recorded image, listens on the recorded NBD socket paths (clients
   reconnect there) and takes every recorded ``/dev/nbdN`` over with RECONFIGURE
   (``tapdisk/daemon/recovery.py``).  The kernel held the device's requests while
   it had no server (up to ``KERNEL_DEAD_CONN_TIMEOUT``, 60 s) and resends those the
   dead tapdisk had read when their request timeout fires: I/O stalls that long,
   and no error reaches the guest.

A tapdisk that answers is never killed, even when the hand-over then fails: it
serves on (``commands.cmd_restart``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import struct
import sys
import time
from typing import Any

from tapdisk.ctl import protocol, records
from tapdisk.ctl.client import CallError, CallTimeout, Client

from .processes import abandon, spawn

#: Seconds a tapdisk has to answer ``list`` before restart takes it for wedged.
PROBE_TIMEOUT = 5.0
#: Seconds a killed tapdisk has to be gone.
KILL_TIMEOUT = 10.0


class RecoveryError(Exception):
    """The VBDs of a dead or wedged tapdisk cannot be restarted; the message says why."""


def recorded_target(directory: str, device: str) -> tuple[int, int] | None:
    """(pid, minor) of the VBD recorded as connected to ``device``, without asking any
    tapdisk (a wedged one would not answer); None if no record names it.  A record of a
    running tapdisk comes before one left by a dead tapdisk."""
    wanted = device if device.startswith("/") else f"/dev/{device}"
    named = [record for record in records.read_all(directory) if record.device == wanted]
    named.sort(key=lambda record: not records.marker_locked(directory, record.minor))
    return (named[0].pid, named[0].minor) if named else None


def reach(directory: str, pid: int) -> list[dict[str, Any]] | str:
    """VBD-INFO of every minor of tapdisk ``pid``; or, when it cannot answer, why: it is
    not running, or it did not answer within ``PROBE_TIMEOUT`` and was killed (only if
    its VBDs are on record: nothing else could bring them back)."""
    path = protocol.control_socket(directory, pid)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(PROBE_TIMEOUT)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return "is not running"
    except OSError as exc:
        sock.close()
        raise RecoveryError(f"tapdisk {pid}: {path}: {exc}") from None
    listener = _listener_pid(sock)
    with Client(pid, path, sock, PROBE_TIMEOUT) as client:
        try:
            rows: list[dict[str, Any]] = client.call("list")
            return rows
        except CallTimeout:
            pass
        except CallError:
            if _alive(pid):
                raise
            return "is not running"
    silent = f"tapdisk {pid} did not answer within {PROBE_TIMEOUT:g} s"
    if listener != pid:
        raise RecoveryError(f"{silent}, and {path} is not its socket; not killing anything")
    if not any(record.pid == pid for record in records.read_all(directory)):
        raise RecoveryError(f"{silent}, and none of its VBDs is on record; not killing it")
    _kill(pid)
    return f"did not answer within {PROBE_TIMEOUT:g} s; killed it"


def recover(args: argparse.Namespace, pid: int, minor: int | None, why: str) -> int:
    """Serve every recorded VBD of the gone tapdisk ``pid`` from a new one; its pid.
    ``why`` the old one is gone goes into the line on stderr that says so."""
    found = [record for record in records.orphans(args.control_dir) if record.pid == pid]
    if not found:
        raise RecoveryError(f"no tapdisk with pid {pid}, and none of its VBDs on record")
    if minor is not None and all(record.minor != minor for record in found):
        raise RecoveryError(f"tapdisk {pid} has no minor {minor} on record")
    say(f"tapdisk {pid} {why}; restarting its VBDs by RECONFIGURE")
    new_pid = spawn(args.control_dir, args.config)
    try:
        with Client.connect(args.control_dir, new_pid) as new:
            new.call("adopt", pid=pid, recover=True)
    except BaseException:
        abandon(args.control_dir, new_pid)
        raise
    with contextlib.suppress(FileNotFoundError):
        os.unlink(protocol.control_socket(args.control_dir, pid))  # left by the dead one
    return new_pid


def say(line: str) -> None:
    print(f"tap-ctl: {line}", file=sys.stderr)


def _listener_pid(sock: socket.socket) -> int:
    """The pid of the process that listens on the unix socket ``sock`` connected to."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid: int = struct.unpack("3i", creds)[0]
    return pid


def _alive(pid: int) -> bool:
    """The process exists and has not exited (a zombie has: its files are closed)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _kill(pid: int) -> None:
    """SIGKILL ``pid`` (stopped or not) and wait until it is gone."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + KILL_TIMEOUT
    while _alive(pid):
        if time.monotonic() > deadline:
            raise RecoveryError(f"tapdisk {pid} did not die within {KILL_TIMEOUT:g} s of SIGKILL")
        time.sleep(0.01)
