"""``tap-ctl``: blktap's control tool for tapdisk daemons.

Talks to each daemon over its control socket (``tapdisk/ctl/protocol.py``).  The
subcommands and flags follow blktap's ``tap-ctl`` where they apply:

    tap-ctl create -a TYPE:PATH [-R] [-t SECS] [-d /dev/nbdN]   spawn, open, attach; prints device
    tap-ctl create --no-attach -a TYPE:PATH                     spawn, open; prints the NBD socket
    tap-ctl destroy -p PID -m MINOR | -d /dev/nbdN              detach, close, stop an idle tapdisk
    tap-ctl list [-p PID] [-m MINOR] [-t TYPE] [-f FILE] [--json]
    tap-ctl spawn                                               prints the new tapdisk's pid
    tap-ctl open -p PID [-m MINOR] -a TYPE:PATH [-R] [-t SECS]  prints the NBD socket
    tap-ctl close -p PID -m MINOR
    tap-ctl attach -p PID -m MINOR [-d /dev/nbdN]               prints /dev/nbdN
    tap-ctl detach -p PID -m MINOR
    tap-ctl pause -p PID -m MINOR
    tap-ctl unpause -p PID -m MINOR [-a TYPE:PATH]
    tap-ctl snapshot -p PID -m MINOR -a qcow2:/path/overlay.qcow2
    tap-ctl stats -p PID [-m MINOR]                             JSON
    tap-ctl shutdown -p PID

Every command accepts ``-d /dev/nbdN`` instead of ``-p``/``-m`` once attached.
Failures print ``tap-ctl: message`` to stderr and exit 1 (2 for usage errors);
``create`` undoes what it did before failing, so no half-created device or
orphan tapdisk stays behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from typing import Any

from tapdisk import config as configuration
from tapdisk.ctl import protocol
from tapdisk.ctl.client import CallError, Client, daemon_pids

#: Seconds a spawned tapdisk may take to start listening.
SPAWN_TIMEOUT = 30.0
#: Seconds a tapdisk may take to exit after shutdown.
EXIT_TIMEOUT = 30.0

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
    "  tap-ctl open -p 1234 -m 2 -a raw:/images/d.img -R -t 30\n",
    "close": "  tap-ctl close -p 1234 -m 0\n",
    "attach": "  tap-ctl attach -p 1234 -m 0\n  tap-ctl attach -p 1234 -m 0 -d /dev/nbd5 -n 4\n",
    "detach": "  tap-ctl detach -p 1234 -m 0\n  tap-ctl detach -d /dev/nbd5\n",
    "pause": "  tap-ctl pause -d /dev/nbd0\n  tap-ctl pause -p 1234 -m 0\n",
    "unpause": "  tap-ctl unpause -d /dev/nbd0\n"
    "  tap-ctl unpause -d /dev/nbd0 -a vhd:/var/lib/images/new-leaf.vhd\n",
    "snapshot": "  tap-ctl snapshot -d /dev/nbd0 -a qcow2:/images/overlay.qcow2\n",
    "stats": "  tap-ctl stats -d /dev/nbd0\n  tap-ctl stats -p 1234                every minor\n",
    "shutdown": "  tap-ctl shutdown -p 1234\n",
    "restart": "  tap-ctl restart -d /dev/nbd0                  prints the new tapdisk's pid\n"
    "  tap-ctl restart -p 1234 -m 0\n",
}


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


def spawn(directory: str, config: str | None = None) -> subprocess.Popen[bytes]:
    """Start a detached ``tapdisk daemon`` and wait until it listens.

    ``config`` is the configuration file it reads (its own default when None).
    Its log goes to ``<directory>/tapdisk.log``; on failure the lines it wrote
    there are part of the error.
    """
    os.makedirs(directory, mode=0o700, exist_ok=True)
    log_path = os.path.join(directory, "tapdisk.log")
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
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
    with open(log_path, "rb") as log:
        log.seek(log_start)
        tail = log.read().decode(errors="replace").strip()
    raise TapCtlError(f"tapdisk failed to start{': ' + tail if tail else ''}")


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
    """Make sure a tapdisk we spawned is gone."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_exit(pid: int, timeout: float = EXIT_TIMEOUT) -> None:
    """Wait until process ``pid`` (not our child) is gone; kill it after ``timeout``."""
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


# -- subcommands -------------------------------------------------------------------


def cmd_spawn(args: argparse.Namespace) -> None:
    print(spawn(args.control_dir, args.config).pid)


def cmd_open(args: argparse.Namespace) -> None:
    pid, minor = target(args, need_minor=False)
    with Client.connect(args.control_dir, pid) as client:
        info = client.call(
            "open", spec=args.args, minor=minor, read_only=args.read_only, timeout=args.timeout
        )
    print(info["nbd_socket"])


def cmd_create(args: argparse.Namespace) -> None:
    index = parse_device(args.device) if args.device else None
    proc = spawn(args.control_dir, args.config)
    try:
        with Client.connect(args.control_dir, proc.pid) as client:
            info = client.call(
                "open", spec=args.args, read_only=args.read_only, timeout=args.timeout
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
        with contextlib.suppress(CallError), Client.connect(args.control_dir, proc.pid) as client:
            client.call("shutdown")  # closes the image, detaches nothing half-made
        _stop_after_shutdown(proc)
        raise
    print(info["nbd_socket"] if args.no_attach else info["device"])


def _stop_after_shutdown(proc: subprocess.Popen[bytes]) -> None:
    try:
        proc.wait(EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        _stop(proc)


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
    stops the new one and resumes the old.  The old tapdisk exits once it
    serves nothing else.
    """
    pid, minor = target(args)
    with Client.connect(args.control_dir, pid) as old:
        info = next((row for row in old.call("list") if row["minor"] == minor), None)
        if info is None:
            raise TapCtlError(f"tapdisk {pid} has no minor {minor}")
        if info["device"] is None:
            raise TapCtlError(f"tapdisk {pid} minor {minor} is not attached to the kernel")
        proc = spawn(args.control_dir, args.config)  # before the pause: not part of the stall
        paused = False
        try:
            new = Client.connect(args.control_dir, proc.pid)
            old.call("pause", minor=minor)
            paused = True
            opened = new.call(
                "open", spec=info["spec"], read_only=info["read_only"], timeout=info["timeout"]
            )
            old.call("release", minor=minor)
        except BaseException:
            _abandon(args.control_dir, proc)  # closes the image before the old VBD reopens it
            if paused:
                old.call("resume", minor=minor)
            raise
        with new:
            try:
                new.call("takeover", minor=opened["minor"], index=parse_device(info["device"]))
            except CallError as exc:
                raise TapCtlError(
                    f"{info['device']}: tapdisk {proc.pid} could not take it over ({exc}); "
                    f"it has the image open as minor {opened['minor']}"
                ) from None
        others = old.call("list")
    if not others:
        shutdown(args.control_dir, pid)
    print(proc.pid)


def _abandon(directory: str, proc: subprocess.Popen[bytes]) -> None:
    """Stop a tapdisk spawned for a restart that failed before it took anything over."""
    with contextlib.suppress(CallError), Client.connect(directory, proc.pid) as client:
        client.call("shutdown")
    _stop_after_shutdown(proc)


def _simple(op: str) -> Any:
    def command(args: argparse.Namespace) -> None:
        pid, minor = target(args)
        with Client.connect(args.control_dir, pid) as client:
            client.call(op, minor=minor)

    return command


def cmd_unpause(args: argparse.Namespace) -> None:
    pid, minor = target(args)
    with Client.connect(args.control_dir, pid) as client:
        client.call("resume", minor=minor, spec=args.args)


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


# -- argument parsing --------------------------------------------------------------


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
    p = add("close", cmd_close, "close a device (detaching it first)")
    add_target(p)
    p = add("attach", cmd_attach, "attach an open device to the kernel; prints /dev/nbdN")
    p.add_argument("-p", "--pid", type=int, help="tapdisk process id")
    p.add_argument("-m", "--minor", type=int, help="device minor in that tapdisk")
    p.add_argument("-d", "--device", metavar="/dev/nbdN", help="use this nbd device")
    p.add_argument("-n", "--connections", type=int, help="kernel sockets (multi-conn)")
    add_kernel_timeout(p)
    p = add("detach", _simple("detach"), "detach a device from the kernel, keep it open")
    add_target(p)
    p = add("pause", _simple("pause"), "pause: drain, flush and close the image")
    add_target(p)
    p = add("unpause", cmd_unpause, "resume a paused device, optionally on a new image")
    add_target(p)
    add_image(p, required=False)
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
    except (TapCtlError, CallError) as exc:
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
