"""``tap-ctl list``: every tapdisk, its minors and the allocated minors no tapdisk holds.

The rows are blktap's three-way join, in blktap's order: the tapdisks in the order
of their control sockets' names, each with its minors, most recently attached first,
or alone (``pid=N``) when it has none; then the minors allocated but attached to no
tapdisk (``minor=N``), in the order of their markers' names.  Off a terminal each row
is printed as blktap prints it (``pid=1 minor=0 state=0 args=vhd:/x``), which XCP-ng's
storage manager parses; on a terminal as a table; with ``--json`` as JSON.  A minor whose
tapdisk died keeps its record (``tapdisk/ctl/records.py``) until ``tap-ctl restart``
brings it back: the table says ``dead`` with what the record holds, JSON lists it
under ``dead``, and blktap's row stays ``minor=N``, which the storage manager skips.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any

from tapdisk.ctl import minors, protocol, records
from tapdisk.ctl.client import CallError, CallTimeout, Client, daemon_pids

#: Seconds a tapdisk has to answer ``list`` (from memory: milliseconds when healthy).  A
#: stopped or stuck one is left out, with a line on stderr, rather than holding up every
#: listing (SM lists often) for the 600 s a pause may take.
LIST_TIMEOUT = 10.0


@dataclass
class Row:
    """One row of the listing: a minor of a tapdisk, an idle tapdisk, or an unattached minor."""

    pid: int | None = None
    minor: int | None = None
    #: VBD-INFO of an attached minor (``tapdisk/ctl/protocol.py``).
    info: dict[str, Any] | None = None

    @property
    def spec(self) -> str | None:
        return None if self.info is None else self.info["spec"]


def daemon_rows(directory: str, pid: int) -> list[Row] | None:
    """The rows of tapdisk ``pid``, its latest minor first; None if nobody answers there."""
    try:
        with Client.connect(directory, pid, LIST_TIMEOUT) as client:
            infos = client.call("list")
    except CallTimeout:
        print(
            f"tap-ctl: tapdisk {pid} did not answer within {LIST_TIMEOUT:g} s; not listed "
            "(tap-ctl restart replaces a wedged tapdisk)",
            file=sys.stderr,
        )
        return None
    except CallError:
        return None  # exited, or a control socket left by a tapdisk that died
    if not infos:
        return [Row(pid)]
    return [Row(pid, info["minor"], info) for info in reversed(infos)]


def gather(directory: str, pid: int | None = None) -> list[Row]:
    """The rows of every tapdisk and unattached minor, or of tapdisk ``pid`` alone."""
    if pid is not None:
        return daemon_rows(directory, pid) or []
    rows: list[Row] = []
    for each in sorted(daemon_pids(directory), key=str):
        rows += daemon_rows(directory, each) or []
    attached = {row.minor for row in rows}
    rows += [Row(minor=minor) for minor in minors.allocated(directory) if minor not in attached]
    return rows


def selected(row: Row, args: argparse.Namespace) -> bool:
    """blktap's filters: a row without the field filtered on is left out."""
    if args.minor is not None and row.minor != args.minor:
        return False
    if args.pid is not None and row.pid != args.pid:
        return False
    kind, _, path = (row.spec or "").partition(":")
    if args.type is not None and (row.spec is None or kind != args.type):
        return False
    return args.file is None or (
        row.spec is not None and path in (args.file, os.path.abspath(args.file))
    )


def cmd_list(args: argparse.Namespace) -> None:
    rows = [row for row in gather(args.control_dir, args.pid) if selected(row, args)]
    unattached = {row.minor for row in rows if row.pid is None}
    dead = [r for r in records.orphans(args.control_dir) if r.minor in unattached]
    if args.json:
        print(
            json.dumps(
                {
                    "tapdisks": [row.info for row in rows if row.info is not None],
                    "idle": [row.pid for row in rows if row.minor is None],
                    "unattached": [row.minor for row in rows if row.pid is None],
                    "dead": [asdict(record) for record in dead],
                },
                indent=2,
            )
        )
    elif sys.stdout.isatty():
        print_table(rows, {record.minor: record for record in dead})
    else:
        for row in rows:
            print(blktap_line(row))


def blktap_line(row: Row) -> str:
    """The row as blktap's ``tap-ctl list`` prints it off a terminal."""
    fields = []
    if row.pid is not None:
        fields.append(f"pid={row.pid}")
    if row.minor is not None:
        fields.append(f"minor={row.minor}")
    if row.info is not None:
        state = row.info["state"]
        fields.append(f"state={state:#x}" if state else "state=0")  # C's %#x prints 0 as 0
    if row.spec is not None:
        fields.append(f"args={row.spec}")
    return " ".join(fields)


def print_table(rows: list[Row], dead: dict[int, records.Record]) -> None:
    header = ("PID", "MINOR", "STATE", "DEVICE", "SIZE", "IMAGE", "NBD SOCKET")
    lines = [header]
    for row in rows:
        record = dead.get(row.minor) if row.pid is None and row.minor is not None else None
        if record is not None:
            image = record.spec + (" (ro)" if record.read_only else "")
            lines.append(
                (
                    str(record.pid),
                    str(record.minor),
                    "dead",
                    record.device or "-",
                    "-",
                    image,
                    record.nbd_socket,
                )
            )
            continue
        info = row.info or {}
        spec = info.get("spec")
        lines.append(
            (
                "-" if row.pid is None else str(row.pid),
                "-" if row.minor is None else str(row.minor),
                describe(row),
                info.get("device") or "-",
                "-" if spec is None else human_size(info["size"]),
                "-" if spec is None else spec + (" (ro)" if info["read_only"] else ""),
                info.get("nbd_socket") or "-",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )


def describe(row: Row) -> str:
    """The row's state in words."""
    if row.info is None:
        return "idle" if row.minor is None else "unattached"
    state = row.info["state"]
    names = [
        (protocol.STATE_PAUSED, "paused"),
        (protocol.STATE_PAUSE_REQUESTED, "pausing"),
        (protocol.STATE_RESUME_FAILED, "unpause-failed"),
        (protocol.STATE_SHUTDOWN_REQUESTED, "closing"),
    ]
    words = [name for bit, name in names if state & bit]
    if words:
        return ",".join(words)
    if row.spec is not None:
        return "running"
    return "closed" if state & protocol.STATE_CLOSED else "attached"


def human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:g} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    return str(size)
