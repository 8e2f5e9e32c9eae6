"""``tap-ctl commit``, ``query`` and ``cancel``: online commit, as XCP-ng's SM drives it.

``commit -p PID -m MINOR -a PATH`` starts merging PATH, an image below the device's
leaf, into its parent (tapdisk/commitjob.py) and returns; ``query`` prints blktap's
line, ``Commit status 'STATE' (DONE/TOTAL)``, which SM parses and polls until STATE is
``concluded`` (``undefined``: no job); ``cancel [-w]`` stops a running job, the chain
as it was.  A job that failed or was cancelled is no status line but a one-line error
(exit 1), so that a caller polling for ``concluded`` stops instead of relinking the
image's children to a parent that lacks its data.
"""

from __future__ import annotations

import argparse
import os

from tapdisk.ctl.client import CallError

from .commands import TapCtlError, client, target


def image_path(args: argparse.Namespace) -> str:
    """The image ``-a`` names (a path, as SM passes it, or ``qcow2:PATH``), absolute: the
    tapdisk does not share this command's working directory."""
    kind, colon, rest = args.args.partition(":")
    return os.path.abspath(rest if colon and kind == "qcow2" else args.args)


def cmd_commit(args: argparse.Namespace) -> None:
    pid, minor = target(args)
    path = image_path(args)
    with client(args, pid) as daemon:
        try:
            daemon.call("commit", minor=minor, path=path)
        except CallError as exc:
            raise TapCtlError(f"commit of {path} refused: {exc}") from None


def cmd_query(args: argparse.Namespace) -> None:
    pid, minor = target(args)
    with client(args, pid) as daemon:
        status = daemon.call("commit_status", minor=minor)
    if status["state"] in ("failed", "cancelled"):
        raise TapCtlError(f"commit of {status['path']} {status['state']}: {status['error']}")
    print(f"Commit status '{status['state']}' ({status['done']}/{status['total']})")


def cmd_cancel(args: argparse.Namespace) -> None:
    pid, minor = target(args)
    with client(args, pid) as daemon:
        daemon.call("commit_cancel", minor=minor)
