"""The ``tap-ctl`` subcommands: each takes the parsed arguments, calls the daemons, prints.

Daemons are reached through ``tapdisk/ctl/client.py``, minors are allocated and freed
through ``tapdisk/ctl/minors.py`` (as blktap's tap-ctl does it, on the file system),
and tapdisks are started or stopped through ``processes``; ``cli`` parses the command
line and maps failures to exit codes.  ``list`` is in ``listing``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from errno import EINVAL
from typing import Any

from tapdisk.drivers.registry import REMOTE

from tapdisk.ctl import minors
from tapdisk.ctl.client import REQUEST_TIMEOUT, CallError, Client

from .listing import gather
from .processes import abandon, shutdown, spawn, wait_exit
from .recovery import reach, recorded_target, recover


class TapCtlError(Exception):
    """A failure to report and exit non-zero on."""


class UsageError(TapCtlError):
    """A command line that names no valid target: blktap's tap-ctl exits EINVAL on it."""

    errno = EINVAL


def client(args: argparse.Namespace, pid: int) -> Client:
    """A connection to tapdisk ``pid``; a command's ``-t SECS`` bounds each of its calls."""
    timeout = getattr(args, "call_timeout", None)
    return Client.connect(args.control_dir, pid, timeout or REQUEST_TIMEOUT)


def find_device(directory: str, device: str) -> tuple[int, int]:
    """(pid, minor) of the VBD connected as ``device`` (/dev/nbdN or nbdN)."""
    wanted = device if device.startswith("/") else f"/dev/{device}"
    for row in gather(directory):
        if row.info is not None and row.info["device"] == wanted:
            return row.info["pid"], row.info["minor"]
    raise TapCtlError(f"no tapdisk serves {wanted}")


def target(args: argparse.Namespace, *, need_minor: bool = True) -> tuple[int, int | None]:
    """(pid, minor) from ``-p``/``-m`` or ``-d``."""
    if getattr(args, "device", None):
        return find_device(args.control_dir, args.device)
    if args.pid is None:
        raise UsageError("missing -p PID (or -d DEVICE)")
    if need_minor and args.minor is None:
        raise UsageError("missing -m MINOR (or -d DEVICE)")
    return args.pid, args.minor


def parse_device(text: str) -> int:
    match = re.fullmatch(r"(?:/dev/)?nbd(\d+)", text)
    if not match:
        raise UsageError(f"bad device {text!r}: expected /dev/nbdN")
    return int(match.group(1))


def parse_minor(text: str) -> int:
    """The minor named by ``allocate -d``: N, or a path ending in tapdisk-N or tapdevN."""
    match = re.fullmatch(r"(?:(?:.*/)?(?:tapdisk-|tapdev))?(\d+)", text)
    if not match:
        raise UsageError(f"bad minor {text!r}: expected N or a path ending in tapdisk-N")
    return int(match.group(1))


# -- minors ---------------------------------------------------------------------------


def cmd_allocate(args: argparse.Namespace) -> None:
    wanted = None if args.device is None else parse_minor(args.device)
    try:
        minor = minors.allocate(args.control_dir, wanted)
    except minors.MinorError as exc:
        raise TapCtlError(str(exc)) from None
    print(minors.marker_path(os.path.abspath(args.control_dir), minor))


def cmd_free(args: argparse.Namespace) -> None:
    if args.minor is None:
        raise UsageError("missing -m MINOR")
    free_minor(args.control_dir, args.minor)


def free_minor(directory: str, minor: int) -> None:
    try:
        minors.free(directory, minor)
    except minors.MinorError as exc:
        raise TapCtlError(str(exc)) from None


def cmd_attach(args: argparse.Namespace) -> None:
    pid, minor = target(args)
    with client(args, pid) as daemon:
        daemon.call("attach", minor=minor)


def cmd_detach(args: argparse.Namespace) -> None:
    pid, minor = target(args)
    with client(args, pid) as daemon:
        daemon.call("detach", minor=minor)


# -- tapdisks and images ----------------------------------------------------------------


def cmd_spawn(args: argparse.Namespace) -> None:
    print(spawn(args.control_dir, args.config))


def log_path(path: str | None) -> str | None:
    """A CBT log as the daemon needs it, absolute (it may run in another directory)."""
    return None if path is None else os.path.abspath(path)


def secondary(args: argparse.Namespace) -> dict[str, Any]:
    """The ``secondary``/``standby`` arguments of ``-2 SPEC [-s]``."""
    if args.secondary is None:
        if args.standby:
            raise TapCtlError(f"{args.command}: -s needs a secondary image (-2 TYPE:PATH)")
        return {}
    return {"secondary": args.secondary, "standby": args.standby}


def cmd_open(args: argparse.Namespace) -> None:
    pid, minor = target(args, need_minor=False)
    with client(args, pid) as daemon:
        info = daemon.call(
            "open",
            spec=args.args,
            minor=minor,
            read_only=args.read_only,
            timeout=args.timeout,
            cbt_log=log_path(args.cbt_log),
            **secondary(args),
        )
    print(info["nbd_socket"])


def cmd_create(args: argparse.Namespace) -> None:
    index = parse_device(args.device) if args.device else None
    pid = spawn(args.control_dir, args.config)
    try:
        with Client.connect(args.control_dir, pid) as daemon:
            info = daemon.call(
                "open",
                spec=args.args,
                read_only=args.read_only,
                timeout=args.timeout,
                cbt_log=log_path(args.cbt_log),
                **secondary(args),
            )
            if not args.no_connect:
                info = daemon.call(
                    "connect",
                    minor=info["minor"],
                    index=index,
                    connections=args.connections,
                    timeout=args.kernel_timeout,
                )
    except BaseException:
        abandon(args.control_dir, pid)
        raise
    print(info["nbd_socket"] if args.no_connect else info["device"])


def cmd_close(args: argparse.Namespace) -> None:
    pid, minor = target(args)
    with client(args, pid) as daemon:
        daemon.call("close", minor=minor)


def cmd_destroy(args: argparse.Namespace) -> None:
    """blktap's destroy: close, detach, free; the tapdisk exits when that was its last minor."""
    pid, minor = target(args)
    assert minor is not None
    with client(args, pid) as daemon:
        daemon.call("close", minor=minor)
        remaining = daemon.call("detach", minor=minor)["attached"]
    free_minor(args.control_dir, minor)
    if not remaining:
        wait_exit(pid)


def cmd_connect(args: argparse.Namespace) -> None:
    pid, minor = target(args)
    index = parse_device(args.device) if args.device else None
    with client(args, pid) as daemon:
        info = daemon.call(
            "connect",
            minor=minor,
            index=index,
            connections=args.connections,
            timeout=args.kernel_timeout,
        )
    print(info["device"])


def simple_command(op: str) -> Callable[[argparse.Namespace], None]:
    """A subcommand that sends ``op`` for the target's minor and prints nothing."""

    def command(args: argparse.Namespace) -> None:
        pid, minor = target(args)
        with client(args, pid) as daemon:
            daemon.call(op, minor=minor)

    return command


def cmd_unpause(args: argparse.Namespace) -> None:
    pid, minor = target(args)
    with client(args, pid) as daemon:
        daemon.call(
            "unpause",
            minor=minor,
            spec=args.args,
            cbt_log=log_path(args.cbt_log),
            **secondary(args),
        )


def cmd_snapshot(args: argparse.Namespace) -> None:
    fmt, sep, path = args.args.partition(":")
    if not sep or not path:
        raise UsageError(f"bad overlay {args.args!r}: expected FORMAT:PATH, e.g. qcow2:/x.qcow2")
    pid, minor = target(args)
    in_store = fmt in REMOTE  # rbd:NAME, a snapshot inside the cluster: NAME is no file
    with client(args, pid) as daemon:
        info = daemon.call(
            "snapshot", minor=minor, path=path if in_store else os.path.abspath(path), format=fmt
        )
    print(info["snapshot"] if in_store else info["spec"])


def cmd_stats(args: argparse.Namespace) -> None:
    """blktap's stats line: one JSON object (a list without ``-m``), spaced as tapdisk does."""
    pid, minor = target(args, need_minor=False)
    with client(args, pid) as daemon:
        stats = daemon.call("stats", minor=minor)
    print(blktap_json(stats))


def blktap_json(value: Any) -> str:
    """``value`` as JSON spaced the way blktap's tapdisk writes its stats:
    ``{ "name": "vhd:/x", "secs": [ 0, 0 ], "images": [  ] }``."""
    if isinstance(value, dict):
        items = ", ".join(f"{json.dumps(key)}: {blktap_json(item)}" for key, item in value.items())
        return "{ " + items + " }"
    if isinstance(value, list):
        return "[ " + ", ".join(blktap_json(item) for item in value) + " ]"
    return json.dumps(value, ensure_ascii=False)


def cmd_shutdown(args: argparse.Namespace) -> None:
    pid, _ = target(args, need_minor=False)
    shutdown(args.control_dir, pid)


def cmd_restart(args: argparse.Namespace) -> None:
    """Move every VBD of a tapdisk to a new one with its live sockets; print the new pid.

    The new tapdisk adopts them (``tapdisk/daemon/handover.py``): the old one stops
    reading, answers what it read, pauses, and passes its sockets over; it exits once
    the new one has confirmed.  On any failure the old tapdisk serves on and the new
    one is stopped.  An old tapdisk without the hand-over (an older version) is
    restarted the former way, for a named connected minor: ``restart_by_reconfigure``.
    An old tapdisk that is dead, or silent and then killed, has its VBDs restarted from
    their records (``recovery``).
    """
    device = getattr(args, "device", None)
    recorded = recorded_target(args.control_dir, device) if device else None
    pid, minor = recorded or target(args, need_minor=False)
    rows = reach(args.control_dir, pid)
    if isinstance(rows, str):
        print(recover(args, pid, minor, rows))
        return
    if minor is not None and not any(row["minor"] == minor for row in rows):
        raise TapCtlError(f"tapdisk {pid} has no minor {minor}")
    with client(args, pid) as old:
        config = args.config or old.call("pid").get("config")  # the same, unless told
    new_pid = spawn(args.control_dir, config)
    try:
        with Client.connect(args.control_dir, new_pid) as new:
            new.call("adopt", pid=pid)
    except CallError as exc:
        abandon(args.control_dir, new_pid)  # it closes what it took, touching no socket
        why = reach(args.control_dir, pid)  # it died, or went silent, during the hand-over
        if isinstance(why, str):
            print(recover(args, pid, minor, why))
            return
        if exc.kind == "unsupported" and minor is not None:
            row = next(row for row in rows if row["minor"] == minor)
            if row["device"] is not None:
                print(
                    f"tap-ctl: live hand-over failed ({exc}); restarting by RECONFIGURE",
                    file=sys.stderr,
                )
                restart_by_reconfigure(args, pid, minor)
                return
        raise TapCtlError(f"tapdisk {pid} serves on; the restart failed: {exc}") from None
    wait_exit(pid)
    print(new_pid)


def restart_by_reconfigure(args: argparse.Namespace, pid: int, minor: int) -> None:
    """Hand a connected device to a new tapdisk without disconnecting it; print the new pid.

    The new tapdisk is started first; the old VBD is then paused (image flushed
    and closed) before the new one opens the image, so the two never have it
    open at once.  Until the old tapdisk releases the device every failure
    stops the new one and unpauses the old.  The old minor is then detached
    and freed; the old tapdisk exits once it has no minor left.  The kernel
    resends the requests it had sent the old tapdisk once its request timeout
    fires: I/O stalls that long.
    """
    with client(args, pid) as old:
        info = next((row for row in old.call("list") if row["minor"] == minor), None)
        if info is None:
            raise TapCtlError(f"tapdisk {pid} has no minor {minor}")
        if info["device"] is None:
            raise TapCtlError(f"tapdisk {pid} minor {minor} is not connected to the kernel")
        new_pid = spawn(args.control_dir, args.config)  # before the pause: not part of the stall
        paused = False
        try:
            new = Client.connect(args.control_dir, new_pid)
            old.call("pause", minor=minor)
            paused = True
            opened = new.call(
                "open",
                spec=info["spec"],
                read_only=info["read_only"],
                timeout=info["timeout"],
                cbt_log=info["cbt_log"],
            )
            old.call("release", minor=minor)
        except BaseException:
            abandon(args.control_dir, new_pid)  # closes the image before the old VBD reopens it
            if paused:
                old.call("unpause", minor=minor, cbt_log=info["cbt_log"])
            raise
        with new:
            try:
                new.call("takeover", minor=opened["minor"], index=parse_device(info["device"]))
            except CallError as exc:
                raise TapCtlError(
                    f"{info['device']}: tapdisk {new_pid} could not take it over ({exc}); "
                    f"it has the image open as minor {opened['minor']}"
                ) from None
        remaining = old.call("detach", minor=minor)["attached"]
    free_minor(args.control_dir, minor)
    if not remaining:
        wait_exit(pid)
    print(new_pid)
