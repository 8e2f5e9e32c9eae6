"""``tap-ctl``: blktap's control tool for tapdisk daemons.

This module owns the command line; the subcommands are in ``commands`` and
``listing``, the tapdisk processes they start and stop in ``processes``, and every
call to a daemon goes through ``tapdisk/ctl/client.py``.  The subcommands and flags
are blktap's, as XCP-ng's storage manager (SM) calls them, plus this project's:

    tap-ctl allocate [-d DEV]                                  prints <dir>/tapdisk/tapdisk-N
    tap-ctl free -m MINOR
    tap-ctl spawn                                              prints the new tapdisk's pid
    tap-ctl attach -p PID -m MINOR                             the minor is the tapdisk's
    tap-ctl open -p PID [-m MINOR] -a TYPE:PATH [-R] [-t SECS] [-D] [-C LOG] [-2 SPEC [-s]]
                                                               prints the NBD socket
    tap-ctl close -p PID -m MINOR [-t SECS] [-f]
    tap-ctl detach -p PID -m MINOR                             the tapdisk exits after its last
    tap-ctl create -a TYPE:PATH [-R] [-t SECS] [-C LOG] [-d /dev/nbdN]
                                                               spawn, open, connect; prints device
    tap-ctl create --no-connect -a TYPE:PATH                   spawn, open; prints the NBD socket
    tap-ctl destroy -p PID -m MINOR | -d /dev/nbdN [-t SECS]   close, detach, free
    tap-ctl list [-p PID] [-m MINOR] [-t TYPE] [-f FILE] [--json]
    tap-ctl connect -p PID -m MINOR [-d /dev/nbdN]             prints /dev/nbdN
    tap-ctl disconnect -p PID -m MINOR
    tap-ctl pause -p PID -m MINOR [-t SECS]
    tap-ctl unpause -p PID -m MINOR [-a TYPE:PATH] [-c LOG] [-2 SPEC [-s]]
    tap-ctl snapshot -p PID -m MINOR -a qcow2:/path/overlay.qcow2
    tap-ctl snapshot -p PID -m MINOR -a rbd:NAME               an RBD snapshot, in place
    tap-ctl stats -p PID [-m MINOR]                            blktap's JSON
    tap-ctl restart -p PID                                     every VBD moves, live
    tap-ctl mirror -p PID -m MINOR -a TYPE:PATH [--switch]    live migration, with progress
    tap-ctl commit -p PID -m MINOR -a PATH                    merge PATH into its parent, live
    tap-ctl query -p PID -m MINOR                             Commit status 'STATE' (DONE/TOTAL)
    tap-ctl cancel -p PID -m MINOR [-w]                       stop the commit
    tap-ctl shutdown -p PID

``-C LOG`` (open, create) marks every written 64 KiB block in the CBT log LOG,
which cbt-util made; ``unpause -c LOG`` goes on marking in LOG, read afresh,
and ``unpause`` without it stops marking.
Commands on an opened image accept ``-d /dev/nbdN`` instead of ``-p``/``-m`` once it
is connected.  ``-2 SPEC`` (open, create, unpause) mirrors every write to a secondary
image, ``-s`` holds it for when the image is full (drivers/mirror.py); ``mirror``
migrates a running device (control/tapctl/mirror.py).  blktap's flags this project
does not do (``-e``, ``-r``, ``-E``) are accepted by the parser and refused with a
one-line message naming them.
Failures print ``tap-ctl: message`` to stderr and exit 1, or with the errno of the
system call that failed in the tapdisk.  Usage errors (an unknown command or flag, a bad
value, a missing ``-p``/``-m``) print one line and exit EINVAL (22), as blktap's tap-ctl
does; blktap exits 0 after its help for an unknown command or none, this one 22 there too,
so that a mistyped command in a script fails.
``create`` undoes what it did before failing, so no half-created device or orphan
tapdisk stays behind.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from typing import Any, NoReturn

from tapdisk import config as configuration
from tapdisk.ctl import protocol
from tapdisk.ctl.client import CallError

from .commands import (
    TapCtlError,
    cmd_allocate,
    cmd_attach,
    cmd_close,
    cmd_connect,
    cmd_create,
    cmd_destroy,
    cmd_detach,
    cmd_free,
    cmd_open,
    cmd_restart,
    cmd_shutdown,
    cmd_snapshot,
    cmd_spawn,
    cmd_stats,
    cmd_unpause,
    simple_command,
)
from .commit import cmd_cancel, cmd_commit, cmd_query
from .listing import cmd_list
from .mirror import cmd_mirror
from .processes import SpawnError
from .recovery import RecoveryError

EXAMPLES = """\
examples:
  tap-ctl create -a vhd:/var/lib/images/disk.vhd          prints /dev/nbd0
  tap-ctl create --no-connect -a qcow2:/images/d.qcow2    prints the NBD unix socket
  tap-ctl list
  tap-ctl pause -d /dev/nbd0
  tap-ctl unpause -d /dev/nbd0 -a vhd:/var/lib/images/new-leaf.vhd
  tap-ctl snapshot -p 1234 -m 0 -a qcow2:/images/overlay.qcow2
  tap-ctl stats -p 1234 -m 0
  tap-ctl restart -d /dev/nbd0                            a new tapdisk serves it; prints its pid
  tap-ctl destroy -d /dev/nbd0
"""


#: ``tap-ctl COMMAND --help`` examples, one block per subcommand.
COMMAND_EXAMPLES = {
    "allocate": "  tap-ctl allocate          prints /run/blktap-control/tapdisk/tapdisk-0\n",
    "free": "  tap-ctl free -m 0\n",
    "create": "  tap-ctl create -a vhd:/var/lib/images/disk.vhd\n"
    "  tap-ctl create -a qcow2:/images/d.qcow2 -R -t 30 -d /dev/nbd3\n"
    "  tap-ctl create --no-connect -a raw:/images/d.img    prints the NBD socket\n",
    "destroy": "  tap-ctl destroy -d /dev/nbd0\n  tap-ctl destroy -p 1234 -m 0 -t 120\n",
    "list": "  tap-ctl list\n  tap-ctl list -t vhd --json\n  tap-ctl list -p 1234\n",
    "spawn": "  tap-ctl spawn                                        prints the new pid\n",
    "attach": "  tap-ctl attach -p 1234 -m 0\n",
    "detach": "  tap-ctl detach -p 1234 -m 0\n",
    "open": "  tap-ctl open -p 1234 -a vhd:/images/disk.vhd          a minor of its own\n"
    "  tap-ctl open -p 1234 -m 2 -a aio:/images/d.img -R -t 30   minor 2, attached first\n"
    "  tap-ctl open -p 1234 -a vhd:/images/disk.vhd -C /images/disk.cbtlog\n",
    "close": "  tap-ctl close -p 1234 -m 0 -t 120\n",
    "connect": "  tap-ctl connect -p 1234 -m 0\n  tap-ctl connect -p 1234 -m 0 -d /dev/nbd5 -n 4\n",
    "disconnect": "  tap-ctl disconnect -p 1234 -m 0\n  tap-ctl disconnect -d /dev/nbd5\n",
    "pause": "  tap-ctl pause -d /dev/nbd0\n  tap-ctl pause -p 1234 -m 0\n",
    "unpause": "  tap-ctl unpause -d /dev/nbd0\n"
    "  tap-ctl unpause -d /dev/nbd0 -a vhd:/var/lib/images/new-leaf.vhd\n"
    "  tap-ctl unpause -d /dev/nbd0 -c /var/lib/images/disk.cbtlog\n",
    "snapshot": "  tap-ctl snapshot -d /dev/nbd0 -a qcow2:/images/overlay.qcow2\n",
    "stats": "  tap-ctl stats -d /dev/nbd0\n  tap-ctl stats -p 1234             every open minor\n",
    "shutdown": "  tap-ctl shutdown -p 1234\n",
    "mirror": "  tap-ctl mirror -d /dev/nbd0 -a qcow2:/images/moved.qcow2 --switch\n"
    "  tap-ctl mirror -p 1234 -m 0 -a raw:/images/copy.img     copy, then keep mirroring\n",
    "restart": "  tap-ctl restart -d /dev/nbd0                  prints the new tapdisk's pid\n"
    "  tap-ctl restart -p 1234                       every VBD of tapdisk 1234\n",
    "commit": "  tap-ctl commit -p 1234 -m 0 -a /sr/base-2.qcow2   then poll tap-ctl query\n",
    "query": "  tap-ctl query -p 1234 -m 0        Commit status 'running' (1048576/8589934592)\n",
    "cancel": "  tap-ctl cancel -p 1234 -m 0 -w\n",
}


CBT_OPEN_HELP = "mark every written 64 KiB block in this CBT log (made by cbt-util; it must exist)"


class Parser(argparse.ArgumentParser):
    """A parser whose usage errors are one line naming the command (``tap-ctl open: ...``)
    and exit EINVAL, as blktap's tap-ctl exits on a usage error."""

    def error(self, message: str) -> NoReturn:
        self.exit(errno.EINVAL, f"{self.prog}: {message}\n")


#: blktap's flags this project does not do: destination -> (flag, what it asks for).
#: They are parsed, so that a call written for blktap gets a one-line refusal.
UNSUPPORTED = {
    "reuse_parent": ("-e", "sharing the parent chain of another minor"),
    "local_cache": ("-r", "a local read cache"),
    "encrypted": ("-E", "encrypted images"),
}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--control-dir",
        metavar="DIR",
        help=f"socket and minor directory (default ${protocol.DIR_ENV}, else the "
        f"configuration's control_dir, else {protocol.DEFAULT_DIR})",
    )
    common.add_argument(
        "--config",
        metavar="PATH",
        help=f"configuration file for control_dir (default {configuration.DEFAULT_PATH}, "
        "if it exists); tapdisks spawned by create and spawn read it too",
    )
    parser = Parser(
        prog="tap-ctl",
        description="Control tapdisk daemons: create, pause, snapshot and destroy block devices.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            parents=[common],
            help=help_text,
            description=help_text,
            epilog="examples:\n" + COMMAND_EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(func=func)
        return p

    def add_target(p: argparse.ArgumentParser, device: bool = True) -> None:
        p.add_argument("-p", "--pid", type=int, help="tapdisk process id")
        p.add_argument("-m", "--minor", type=int, help="minor in that tapdisk")
        if device:
            p.add_argument("-d", "--device", metavar="/dev/nbdN", help="the connected device")

    def add_image(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("-a", "--args", metavar="TYPE:PATH", required=required, help="image spec")

    def add_call_timeout(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "-t",
            "--timeout",
            dest="call_timeout",
            type=float,
            metavar="SECS",
            help="how long the tapdisk may take to answer (default 600)",
        )

    def add_refused(p: argparse.ArgumentParser, dest: str, metavar: str | None = None) -> None:
        flag, what = UNSUPPORTED[dest]
        action = "store_true" if metavar is None else "store"
        kwargs = {} if metavar is None else {"metavar": metavar}
        p.add_argument(flag, dest=dest, action=action, help=f"{what}: refused", **kwargs)

    def add_secondary(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "-2",
            dest="secondary",
            metavar="TYPE:PATH",
            help="mirror every write to this image too (null: none); one that fails is "
            "dropped and stats shows nbd_mirror_failed 1",
        )
        p.add_argument(
            "-s",
            dest="standby",
            action="store_true",
            help="with -2: only hold the secondary open; it takes over when the image is full",
        )

    def add_open_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("-R", "--read-only", action="store_true", help="open read-only")
        p.add_argument(
            "-t",
            "--timeout",
            type=float,
            metavar="SECS",
            help="retry deadline of each request (default 120)",
        )
        p.add_argument(
            "-D",
            dest="page_cache",
            action="store_true",
            help="no O_DIRECT: go through the page cache (always the case here)",
        )
        add_secondary(p)
        add_refused(p, "reuse_parent", "MINOR")
        add_refused(p, "local_cache")

    def add_cbt_log(p: argparse.ArgumentParser, flag: str, help_text: str) -> None:
        p.add_argument(flag, "--cbt-log", metavar="LOG", help=help_text)

    def add_kernel_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("-n", "--connections", type=int, help="kernel sockets (multi-conn)")
        p.add_argument(
            "--kernel-timeout",
            type=int,
            metavar="SECS",
            help="the kernel's request timeout: a request lost with a dead tapdisk (or in "
            "a restart by RECONFIGURE) is resent after it (default: the retry deadline plus 60)",
        )

    p = add("allocate", cmd_allocate, "allocate a minor; prints its marker file")
    p.add_argument("-d", "--device", metavar="MINOR", help="this minor (N or .../tapdisk-N)")
    p = add("free", cmd_free, "free an allocated minor no tapdisk has attached")
    p.add_argument("-m", "--minor", type=int, help="the minor")
    p = add("create", cmd_create, "spawn a tapdisk, open an image and connect it as /dev/nbdN")
    add_image(p)
    add_open_flags(p)
    add_cbt_log(p, "-C", CBT_OPEN_HELP)
    p.add_argument("-d", "--device", metavar="/dev/nbdN", help="use this nbd device")
    add_kernel_flags(p)
    p.add_argument(
        "--no-connect",
        action="store_true",
        help="do not connect to the kernel; print the NBD unix socket instead",
    )
    p = add("destroy", cmd_destroy, "close, detach and free a minor; its tapdisk exits if idle")
    add_target(p)
    add_call_timeout(p)
    p = add("list", cmd_list, "list tapdisks and their minors")
    p.add_argument("-p", "--pid", type=int, help="only this tapdisk")
    p.add_argument("-m", "--minor", type=int, help="only this minor")
    p.add_argument("-t", "--type", help="only images of this type")
    p.add_argument("-f", "--file", help="only this image file")
    p.add_argument("--json", action="store_true", help="JSON for scripts")
    add("spawn", cmd_spawn, "start an idle tapdisk; prints its pid")
    p = add("attach", cmd_attach, "attach an allocated minor to a tapdisk")
    add_target(p, device=False)
    p = add("detach", cmd_detach, "detach a closed minor from its tapdisk")
    add_target(p, device=False)
    p = add("open", cmd_open, "open an image in a tapdisk; prints its NBD socket")
    add_target(p, device=False)
    add_image(p)
    add_open_flags(p)
    add_cbt_log(p, "-C", CBT_OPEN_HELP)
    add_refused(p, "encrypted")
    p = add("close", cmd_close, "close the image of a minor (disconnecting it first)")
    add_target(p)
    add_call_timeout(p)
    p.add_argument(
        "-f", "--force", action="store_true", help="accepted: no Xen rings to give up here"
    )
    p = add("connect", cmd_connect, "connect an open image to the kernel; prints /dev/nbdN")
    add_target(p, device=False)
    p.add_argument("-d", "--device", metavar="/dev/nbdN", help="use this nbd device")
    add_kernel_flags(p)
    p = add("disconnect", simple_command("disconnect"), "take /dev/nbdN back, keep it open")
    add_target(p)
    p = add("pause", simple_command("pause"), "pause: drain, flush and close the image")
    add_target(p)
    add_call_timeout(p)
    p = add("unpause", cmd_unpause, "let a paused device run again, optionally on a new image")
    add_target(p)
    add_image(p, required=False)
    add_cbt_log(
        p,
        "-c",
        "go on marking changed blocks in this CBT log, read afresh from the "
        "file; without it the device stops marking",
    )
    add_secondary(p)
    p = add("snapshot", cmd_snapshot, "overlay the current image and continue on the overlay")
    add_target(p)
    p.add_argument(
        "-a",
        "--args",
        metavar="FORMAT:PATH",
        required=True,
        help="overlay to create; for an rbd device rbd:NAME takes RBD snapshot NAME and the "
        "device stays on its image (prints the snapshot's spec)",
    )
    p = add("stats", cmd_stats, "print device statistics as JSON")
    add_target(p)
    p = add("restart", cmd_restart, "move a tapdisk's VBDs to a new one, live; prints its pid")
    add_target(p)
    p = add("mirror", cmd_mirror, "migrate a running device to another image, live")
    add_target(p)
    p.add_argument("-a", "--args", metavar="TYPE:PATH", required=True, help="the target image")
    p.add_argument(
        "--switch",
        action="store_true",
        help="once copied, run the device on the target and close the source",
    )
    p = add("commit", cmd_commit, "merge an image below the leaf into its parent, live")
    add_target(p)
    p.add_argument("-a", "--args", metavar="PATH", required=True, help="the image to merge")
    p = add("query", cmd_query, "how far the commit got: Commit status 'STATE' (DONE/TOTAL)")
    add_target(p)
    p = add("cancel", cmd_cancel, "stop the commit; the chain stays as it was")
    add_target(p)
    p.add_argument(
        "-w", "--wait", action="store_true", help="accepted: cancel always waits for the stop"
    )
    p = add("shutdown", cmd_shutdown, "close every image of a tapdisk and stop it")
    add_target(p, device=False)
    return parser


def refuse_unsupported(args: argparse.Namespace) -> None:
    """Refuse, in one line naming it, a blktap flag this project does not do."""
    for dest, (flag, what) in UNSUPPORTED.items():
        if getattr(args, dest, None) not in (None, False):
            raise TapCtlError(f"{args.command}: {flag} ({what}) is not supported")


def resolve_control_dir(args: argparse.Namespace) -> None:
    """Fill in ``args.control_dir``: the flag, else $TAPDISK_CONTROL_DIR, else the file's."""
    if args.control_dir is not None:
        return
    args.control_dir = os.environ.get(protocol.DIR_ENV)
    if not args.control_dir:
        try:
            args.control_dir = configuration.load(args.config).control_dir
        except configuration.ConfigError as exc:
            raise TapCtlError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        refuse_unsupported(args)
        resolve_control_dir(args)
        args.func(args)
    except (TapCtlError, CallError, SpawnError, RecoveryError) as exc:
        print(f"tap-ctl: {exc}", file=sys.stderr)
        # A system call failed in the tapdisk: its errno, as blktap's tap-ctl exits (SM
        # reads ENOMEDIUM from open as an empty CD drive).
        return getattr(exc, "errno", None) or 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
