"""The ``tap-ctl`` subcommands: each takes the parsed arguments, calls the daemons, prints.

Daemons are reached through ``tapdisk/ctl/client.py`` and started or stopped through
``processes``; ``tapctl`` parses the command line and maps failures to exit codes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from tapdisk.ctl import protocol
from tapdisk.ctl.client import CallError, Client, daemon_pids

from .processes import abandon, shutdown, spawn


class TapCtlError(Exception):
    """A failure to report and exit non-zero on."""


def list_all(directory: str, pid: int | None = None) -> list[tuple[int, list[dict[str, Any]]]]:
    """(pid, [VBD-INFO...]) of every live daemon (or only ``pid``)."""
    result = []
    for each in [pid] if pid is not None else daemon_pids(directory):
        try:
            with Client.connect(directory, each) as client:
                result.append((each, client.call("list")))
        except CallError:
            if pid is not None:
                raise
            # A control socket left by a tapdisk that died; nobody listens.
    return result


def find_device(directory: str, device: str) -> tuple[int, int]:
    """(pid, minor) of the VBD attached as ``device`` (/dev/nbdN or nbdN)."""
    wanted = device if device.startswith("/") else f"/dev/{device}"
    for pid, vbds in list_all(directory):
        for info in vbds:
            if info["device"] == wanted:
                return pid, info["minor"]
    raise TapCtlError(f"no tapdisk serves {wanted}")


def target(args: argparse.Namespace, *, need_minor: bool = True) -> tuple[int, int | None]:
    """(pid, minor) from ``-p``/``-m`` or ``-d``."""
    if getattr(args, "device", None):
        return find_device(args.control_dir, args.device)
    if args.pid is None:
        raise TapCtlError("missing -p PID (or -d DEVICE)")
    if need_minor and args.minor is None:
        raise TapCtlError("missing -m MINOR (or -d DEVICE)")
    return args.pid, args.minor


def cmd_spawn(args: argparse.Namespace) -> None:
    print(spawn(args.control_dir, args.config))


def cmd_open(args: argparse.Namespace) -> None:
    pid, minor = target(args, need_minor=False)
    with Client.connect(args.control_dir, pid) as client:
        info = client.call(
            "open",
            spec=args.args,
            minor=minor,
            read_only=args.read_only,
            timeout=args.timeout,
            cbt_log=log_path(args.cbt_log),
        )
    print(info["nbd_socket"])


def cmd_create(args: argparse.Namespace) -> None:
    index = parse_device(args.device) if args.device else None
    pid = spawn(args.control_dir, args.config)
    try:
        with Client.connect(args.control_dir, pid) as client:
            info = client.call(
                "open",
                spec=args.args,
                read_only=args.read_only,
                timeout=args.timeout,
                cbt_log=log_path(args.cbt_log),
            )
            if not args.no_attach:
                info = client.call(
                    "attach",
                    minor=info["minor"],
                    index=index,
                    connections=args.connections,
                    timeout=args.kernel_timeout,
                )
    except BaseException:
        abandon(args.control_dir, pid)
        raise
    print(info["nbd_socket"] if args.no_attach else info["device"])


def log_path(path: str | None) -> str | None:
    """A CBT log as the daemon needs it, absolute (it may run in another directory)."""
    return None if path is None else os.path.abspath(path)


def parse_device(text: str) -> int:
    match = re.fullmatch(r"(?:/dev/)?nbd(\d+)", text)
    if not match:
        raise TapCtlError(f"bad device {text!r}: expected /dev/nbdN")
    return int(match.group(1))


def cmd_destroy(args: argparse.Namespace) -> None:
    pid, minor = target(args)
    with Client.connect(args.control_dir, pid) as client:
        client.call("close", minor=minor)
        remaining = client.call("list")
    if not remaining:
        shutdown(args.control_dir, pid)


def cmd_close(args: argparse.Namespace) -> None:
    pid, minor = target(args)
    with Client.connect(args.control_dir, pid) as client:
        client.call("close", minor=minor)


def cmd_attach(args: argparse.Namespace) -> None:
    if args.pid is None or args.minor is None:
        raise TapCtlError("attach needs -p PID and -m MINOR")
    index = parse_device(args.device) if args.device else None
    with Client.connect(args.control_dir, args.pid) as client:
        info = client.call(
            "attach",
            minor=args.minor,
            index=index,
            connections=args.connections,
            timeout=args.kernel_timeout,
        )
    print(info["device"])


def cmd_restart(args: argparse.Namespace) -> None:
    """Hand an attached device to a new tapdisk without detaching it; print the new pid.

    The new tapdisk is started first; the old VBD is then paused (image flushed
    and closed) before the new one opens the image, so the two never have it
    open at once.  Until the old tapdisk releases the device every failure
    stops the new one and unpauses the old.  The old tapdisk exits once it
    serves nothing else.
    """
    pid, minor = target(args)
    with Client.connect(args.control_dir, pid) as old:
        info = next((row for row in old.call("list") if row["minor"] == minor), None)
        if info is None:
            raise TapCtlError(f"tapdisk {pid} has no minor {minor}")
        if info["device"] is None:
            raise TapCtlError(f"tapdisk {pid} minor {minor} is not attached to the kernel")
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
        others = old.call("list")
    if not others:
        shutdown(args.control_dir, pid)
    print(new_pid)


def simple_command(op: str) -> Callable[[argparse.Namespace], None]:
    """A subcommand that sends ``op`` for the target's minor and prints nothing."""

    def command(args: argparse.Namespace) -> None:
        pid, minor = target(args)
        with Client.connect(args.control_dir, pid) as client:
            client.call(op, minor=minor)

    return command


def cmd_unpause(args: argparse.Namespace) -> None:
    pid, minor = target(args)
    with Client.connect(args.control_dir, pid) as client:
        client.call("unpause", minor=minor, spec=args.args, cbt_log=log_path(args.cbt_log))


def cmd_snapshot(args: argparse.Namespace) -> None:
    fmt, sep, path = args.args.partition(":")
    if not sep or not path:
        raise TapCtlError(f"bad overlay {args.args!r}: expected FORMAT:PATH, e.g. qcow2:/x.qcow2")
    pid, minor = target(args)
    with Client.connect(args.control_dir, pid) as client:
        info = client.call("snapshot", minor=minor, path=os.path.abspath(path), format=fmt)
    print(info["spec"])


def cmd_stats(args: argparse.Namespace) -> None:
    pid, minor = target(args, need_minor=False)
    with Client.connect(args.control_dir, pid) as client:
        stats = client.call("stats", minor=minor)
    print(json.dumps(stats, indent=2 if sys.stdout.isatty() else None))


def cmd_shutdown(args: argparse.Namespace) -> None:
    pid, _ = target(args, need_minor=False)
    shutdown(args.control_dir, pid)


def cmd_list(args: argparse.Namespace) -> None:
    rows: list[dict[str, Any]] = []
    idle: list[int] = []
    for pid, vbds in list_all(args.control_dir, args.pid):
        if not vbds and args.minor is None and args.type is None and args.file is None:
            idle.append(pid)
        for info in vbds:
            kind, _, path = info["spec"].partition(":")
            if args.minor is not None and info["minor"] != args.minor:
                continue
            if args.type is not None and kind != args.type:
                continue
            if args.file is not None and os.path.abspath(args.file) != path:
                continue
            rows.append(info)
    if args.json:
        print(json.dumps({"tapdisks": rows, "idle": idle}, indent=2))
    elif sys.stdout.isatty():
        print_table(rows, idle)
    else:
        for info in rows:
            print(
                f"pid={info['pid']} minor={info['minor']} state=0x{info['state']:x} "
                f"args={info['spec']}"
            )
        for pid in idle:
            print(f"pid={pid} minor=- state=- args=-")


def print_table(rows: list[dict[str, Any]], idle: list[int]) -> None:
    header = ("PID", "MINOR", "STATE", "DEVICE", "SIZE", "IMAGE", "NBD SOCKET")
    lines = [header]
    for info in rows:
        lines.append(
            (
                str(info["pid"]),
                str(info["minor"]),
                describe_state(info["state"]),
                info["device"] or "-",
                human_size(info["size"]),
                info["spec"] + (" (ro)" if info["read_only"] else ""),
                info["nbd_socket"],
            )
        )
    for pid in idle:
        lines.append((str(pid), "-", "idle", "-", "-", "-", "-"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )


def describe_state(state: int) -> str:
    names = [
        (protocol.STATE_ATTACHED, "attached"),
        (protocol.STATE_PAUSED, "paused"),
        (protocol.STATE_PAUSING, "pausing"),
        (protocol.STATE_CLOSING, "closing"),
    ]
    words = [name for bit, name in names if state & bit]
    return ",".join(words) or "running"


def human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:g} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    return str(size)
