"""``tap-ctl``: blktap's control tool for tapdisk daemons.

This module owns the command line; the subcommands are in ``commands``, the
tapdisk processes they start and stop in ``processes``, and every call to a daemon
goes through ``tapdisk/ctl/client.py``.  The subcommands and flags follow blktap's
``tap-ctl`` where they apply:

    tap-ctl create -a TYPE:PATH [-R] [-t SECS] [-C LOG] [-d /dev/nbdN]
                                                                spawn, open, attach; prints device
    tap-ctl create --no-attach -a TYPE:PATH                     spawn, open; prints the NBD socket
    tap-ctl destroy -p PID -m MINOR | -d /dev/nbdN              detach, close, stop an idle tapdisk
    tap-ctl list [-p PID] [-m MINOR] [-t TYPE] [-f FILE] [--json]
    tap-ctl spawn                                               prints the new tapdisk's pid
    tap-ctl open -p PID [-m MINOR] -a TYPE:PATH [-R] [-t SECS] [-C LOG]  prints the NBD socket
    tap-ctl close -p PID -m MINOR
    tap-ctl attach -p PID -m MINOR [-d /dev/nbdN]               prints /dev/nbdN
    tap-ctl detach -p PID -m MINOR
    tap-ctl pause -p PID -m MINOR
    tap-ctl unpause -p PID -m MINOR [-a TYPE:PATH] [-c LOG]
    tap-ctl snapshot -p PID -m MINOR -a qcow2:/path/overlay.qcow2
    tap-ctl stats -p PID [-m MINOR]                             JSON
    tap-ctl shutdown -p PID

Every command accepts ``-d /dev/nbdN`` instead of ``-p``/``-m`` once attached.
``-C LOG`` (open, create) marks every written 64 KiB block in the CBT log LOG,
which cbt-util made; ``unpause -c LOG`` goes on marking in LOG, read afresh,
and ``unpause`` without it stops marking.
Failures print ``tap-ctl: message`` to stderr and exit 1 (2 for usage errors);
``create`` undoes what it did before failing, so no half-created device or
orphan tapdisk stays behind.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from tapdisk import config as configuration
from tapdisk.ctl import protocol
from tapdisk.ctl.client import CallError

from .commands import (
    TapCtlError,
    cmd_attach,
    cmd_close,
    cmd_create,
    cmd_destroy,
    cmd_list,
    cmd_open,
    cmd_restart,
    cmd_shutdown,
    cmd_snapshot,
    cmd_spawn,
    cmd_stats,
    cmd_unpause,
    simple_command,
)
from .processes import SpawnError

EXAMPLES = """\
examples:
  tap-ctl create -a vhd:/var/lib/images/disk.vhd          prints /dev/nbd0
  tap-ctl create --no-attach -a qcow2:/images/d.qcow2     prints the NBD unix socket
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
    "create": "  tap-ctl create -a vhd:/var/lib/images/disk.vhd\n"
    "  tap-ctl create -a qcow2:/images/d.qcow2 -R -t 30 -d /dev/nbd3\n"
    "  tap-ctl create --no-attach -a raw:/images/d.img     prints the NBD socket\n",
    "destroy": "  tap-ctl destroy -d /dev/nbd0\n  tap-ctl destroy -p 1234 -m 0\n",
    "list": "  tap-ctl list\n  tap-ctl list -t vhd --json\n  tap-ctl list -p 1234\n",
    "spawn": "  tap-ctl spawn                                        prints the new pid\n",
    "open": "  tap-ctl open -p 1234 -a vhd:/images/disk.vhd\n"
    "  tap-ctl open -p 1234 -m 2 -a raw:/images/d.img -R -t 30\n"
    "  tap-ctl open -p 1234 -a vhd:/images/disk.vhd -C /images/disk.cbtlog\n",
    "close": "  tap-ctl close -p 1234 -m 0\n",
    "attach": "  tap-ctl attach -p 1234 -m 0\n  tap-ctl attach -p 1234 -m 0 -d /dev/nbd5 -n 4\n",
    "detach": "  tap-ctl detach -p 1234 -m 0\n  tap-ctl detach -d /dev/nbd5\n",
    "pause": "  tap-ctl pause -d /dev/nbd0\n  tap-ctl pause -p 1234 -m 0\n",
    "unpause": "  tap-ctl unpause -d /dev/nbd0\n"
    "  tap-ctl unpause -d /dev/nbd0 -a vhd:/var/lib/images/new-leaf.vhd\n"
    "  tap-ctl unpause -d /dev/nbd0 -c /var/lib/images/disk.cbtlog\n",
    "snapshot": "  tap-ctl snapshot -d /dev/nbd0 -a qcow2:/images/overlay.qcow2\n",
    "stats": "  tap-ctl stats -d /dev/nbd0\n  tap-ctl stats -p 1234                every minor\n",
    "shutdown": "  tap-ctl shutdown -p 1234\n",
    "restart": "  tap-ctl restart -d /dev/nbd0                  prints the new tapdisk's pid\n"
    "  tap-ctl restart -p 1234 -m 0\n",
}


CBT_OPEN_HELP = "mark every written 64 KiB block in this CBT log (made by cbt-util; it must exist)"


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--control-dir",
        metavar="DIR",
        help=f"socket directory (default ${protocol.DIR_ENV}, else the configuration's "
        f"control_dir, else {protocol.DEFAULT_DIR})",
    )
    common.add_argument(
        "--config",
        metavar="PATH",
        help=f"configuration file for control_dir (default {configuration.DEFAULT_PATH}, "
        "if it exists); tapdisks spawned by create and spawn read it too",
    )
    parser = argparse.ArgumentParser(
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
        p.add_argument("-m", "--minor", type=int, help="device minor in that tapdisk")
        if device:
            p.add_argument("-d", "--device", metavar="/dev/nbdN", help="the attached device")

    def add_image(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("-a", "--args", metavar="TYPE:PATH", required=required, help="image spec")

    def add_open_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("-R", "--read-only", action="store_true", help="open read-only")
        p.add_argument(
            "-t",
            "--timeout",
            type=float,
            metavar="SECS",
            help="retry deadline of each request (default 120)",
        )

    def add_cbt_log(p: argparse.ArgumentParser, flag: str, help_text: str) -> None:
        p.add_argument(flag, "--cbt-log", metavar="LOG", help=help_text)

    def add_kernel_timeout(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--kernel-timeout",
            type=int,
            metavar="SECS",
            help="the kernel's request timeout: a request lost with a restarted tapdisk is "
            "resent after it (default: the retry deadline plus 60)",
        )

    p = add("create", cmd_create, "spawn a tapdisk, open an image and attach it as /dev/nbdN")
    add_image(p)
    add_open_flags(p)
    add_cbt_log(p, "-C", CBT_OPEN_HELP)
    p.add_argument("-d", "--device", metavar="/dev/nbdN", help="use this nbd device")
    p.add_argument("-n", "--connections", type=int, help="kernel sockets (multi-conn)")
    add_kernel_timeout(p)
    p.add_argument(
        "--no-attach",
        action="store_true",
        help="do not attach to the kernel; print the NBD unix socket instead",
    )
    p = add("destroy", cmd_destroy, "detach and close a device; stop its tapdisk if idle")
    add_target(p)
    p = add("list", cmd_list, "list tapdisks and their devices")
    p.add_argument("-p", "--pid", type=int, help="only this tapdisk")
    p.add_argument("-m", "--minor", type=int, help="only this minor")
    p.add_argument("-t", "--type", help="only images of this type")
    p.add_argument("-f", "--file", help="only this image file")
    p.add_argument("--json", action="store_true", help="JSON for scripts")
    add("spawn", cmd_spawn, "start an idle tapdisk; prints its pid")
    p = add("open", cmd_open, "open an image in a tapdisk; prints its NBD socket")
    add_target(p, device=False)
    add_image(p)
    add_open_flags(p)
    add_cbt_log(p, "-C", CBT_OPEN_HELP)
    p = add("close", cmd_close, "close a device (detaching it first)")
    add_target(p)
    p = add("attach", cmd_attach, "attach an open device to the kernel; prints /dev/nbdN")
    p.add_argument("-p", "--pid", type=int, help="tapdisk process id")
    p.add_argument("-m", "--minor", type=int, help="device minor in that tapdisk")
    p.add_argument("-d", "--device", metavar="/dev/nbdN", help="use this nbd device")
    p.add_argument("-n", "--connections", type=int, help="kernel sockets (multi-conn)")
    add_kernel_timeout(p)
    p = add("detach", simple_command("detach"), "detach a device from the kernel, keep it open")
    add_target(p)
    p = add("pause", simple_command("pause"), "pause: drain, flush and close the image")
    add_target(p)
    p = add("unpause", cmd_unpause, "let a paused device run again, optionally on a new image")
    add_target(p)
    add_image(p, required=False)
    add_cbt_log(
        p,
        "-c",
        "go on marking changed blocks in this CBT log, read afresh from the "
        "file; without it the device stops marking",
    )
    p = add("snapshot", cmd_snapshot, "overlay the current image and continue on the overlay")
    add_target(p)
    p.add_argument("-a", "--args", metavar="FORMAT:PATH", required=True, help="overlay to create")
    p = add("stats", cmd_stats, "print device statistics as JSON")
    add_target(p)
    p = add("restart", cmd_restart, "hand an attached device to a new tapdisk; prints its pid")
    add_target(p)
    p = add("shutdown", cmd_shutdown, "close every device of a tapdisk and stop it")
    add_target(p, device=False)
    return parser


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
        resolve_control_dir(args)
        args.func(args)
    except (TapCtlError, CallError, SpawnError) as exc:
        print(f"tap-ctl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
