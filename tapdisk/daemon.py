"""The long-running tapdisk process, steered through its control socket.

One daemon holds any number of VBDs.  Each has a *minor* (unique on the host:
the daemon holds an ``flock`` on ``<dir>/minor<N>.lock`` for as long as the
VBD is open, so minors of crashed processes are reclaimed), is served over
NBD on ``<dir>/nbd<pid>.<minor>``, and may be attached to the kernel as
``/dev/nbdN`` through ``tapdisk.kernel``.  The control socket
``<dir>/ctl<pid>`` speaks ``tapdisk.ctl.protocol``; requests on one
connection are answered in order.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from tapdisk.ctl import protocol
from tapdisk.ctl.protocol import ProtocolError, Request, Response
from tapdisk.drivers.base import ImageError
from tapdisk.drivers.paths import is_inside
from tapdisk.drivers.registry import OpenOptions, open_image

from . import busypoll, logs
from . import config as configuration
from .export import DirectAttach, Export
from .loop import run_loop
from .nbd.handshake import connection_flags
from .scheduler import SchedulerLimits
from .server import NBDServer
from .vbd import VBD, VBDError

log = logging.getLogger("tapdisk.daemon")

DEFAULTS = SchedulerLimits()

#: Seconds the kernel waits for a reply beyond our own retry deadline before
#: declaring a socket dead; the device's deadline must fire first.
KERNEL_TIMEOUT_MARGIN = 60
#: Seconds I/O on a device whose sockets all died waits for new ones.
KERNEL_DEAD_CONN_TIMEOUT = 60
#: Seconds a takeover waits for the kernel to notice that the old server's sockets closed.
TAKEOVER_WAIT = 10.0


class ControlError(Exception):
    """A request that fails with a protocol error kind and a message."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class Device:
    """One opened VBD of this daemon."""

    minor: int
    vbd: VBD
    server: NBDServer
    nbd_socket: str
    lock_fd: int
    kernel_index: int | None = None
    closing: bool = False

    @property
    def state(self) -> int:
        state = 0
        if self.kernel_index is not None:
            state |= protocol.STATE_ATTACHED
        if self.vbd.paused:
            state |= protocol.STATE_PAUSED
        if self.vbd.pausing:
            state |= protocol.STATE_PAUSING
        if self.closing:
            state |= protocol.STATE_CLOSING
        return state

    @property
    def device(self) -> str | None:
        return None if self.kernel_index is None else f"/dev/nbd{self.kernel_index}"


class Daemon:
    """The control server and the VBDs of one tapdisk process."""

    def __init__(
        self,
        directory: str,
        limits: SchedulerLimits | None = None,
        allowed_dirs: tuple[str, ...] = (),
        busy_poll: int = busypoll.DEFAULT_MAX_US,
    ) -> None:
        self.directory = os.path.abspath(directory)
        self.limits = limits or SchedulerLimits()
        #: When set, images, their parents and snapshot overlays must lie inside these.
        self.allowed_dirs = allowed_dirs
        #: Shared by the NBD servers of every device: one event loop, one spin.
        self.poller = busypoll.BusyPoller(busy_poll)
        self.pid = os.getpid()
        self.control_path = protocol.control_socket(self.directory, self.pid)
        self.devices: dict[int, Device] = {}
        self.stopped = asyncio.Event()
        self._stopping = False
        self._server: asyncio.AbstractServer | None = None
        self._ops = {
            "pid": self._op_pid,
            "list": self._op_list,
            "open": self._op_open,
            "close": self._op_close,
            "attach": self._op_attach,
            "detach": self._op_detach,
            "takeover": self._op_takeover,
            "release": self._op_release,
            "pause": self._op_pause,
            "resume": self._op_resume,
            "snapshot": self._op_snapshot,
            "stats": self._op_stats,
            "shutdown": self._op_shutdown,
        }

    # -- lifetime ----------------------------------------------------------------

    async def start(self) -> None:
        """Create the directory (0700) if needed and listen on the control socket."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.control_path)  # a previous process with our pid is gone
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve_client, self.control_path)
        finally:
            os.umask(old_umask)
        os.chmod(self.control_path, 0o600)
        log.info("control socket %s", self.control_path)

    async def shutdown(self) -> None:
        """Detach and close every device, stop listening, remove the control socket."""
        if self._stopping:
            return
        self._stopping = True
        log.info("shutting down; %s", self.poller.summary())
        for minor in list(self.devices):
            try:
                await self._close_device(minor)
            except Exception:
                log.exception("minor %d: close at shutdown failed", minor)
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.control_path)
        self.stopped.set()

    # -- control connections -----------------------------------------------------

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        decoder = protocol.Decoder()
        try:
            while not reader.at_eof():
                data = await reader.read(65536)
                if not data:
                    break
                for message in decoder.feed(data):
                    response = await self.handle_message(message)
                    writer.write(protocol.encode(response))
                    await writer.drain()
                    if self.stopped.is_set():
                        return
        except ProtocolError as exc:
            log.warning("control client sent a bad frame, closing it: %s", exc)
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def handle_message(self, message: dict[str, Any]) -> Response:
        """Validate and run one request; every failure becomes an error response."""
        request_id = message.get("id") if type(message.get("id")) is int else 0
        try:
            request = protocol.parse_request(message)
        except ProtocolError as exc:
            return Response.failure(request_id, "invalid", str(exc))  # type: ignore[arg-type]
        try:
            result = await self._ops[request.op](request)
        except ControlError as exc:
            return Response.failure(request.id, exc.kind, str(exc))
        except VBDError as exc:
            return Response.failure(request.id, "state", str(exc))
        except ImageError as exc:
            return Response.failure(request.id, "image", str(exc))
        except OSError as exc:
            return Response.failure(request.id, "os", str(exc))
        except Exception as exc:
            log.exception("%s request failed", request.op)
            return Response.failure(request.id, "internal", f"{type(exc).__name__}: {exc}")
        return Response.success(request.id, result)

    # -- operations --------------------------------------------------------------

    def _device(self, request: Request) -> Device:
        minor = request.args["minor"]
        device = self.devices.get(minor)
        if device is None:
            raise ControlError("not-found", f"tapdisk {self.pid} has no minor {minor}")
        return device

    def info(self, device: Device) -> dict[str, Any]:
        vbd = device.vbd
        return {
            "pid": self.pid,
            "minor": device.minor,
            "state": device.state,
            "spec": vbd.spec,
            "size": vbd.size,
            "read_only": vbd.read_only,
            "timeout": vbd.limits.timeout,
            "nbd_socket": device.nbd_socket,
            "device": device.device,
        }

    async def _op_pid(self, request: Request) -> dict[str, int]:
        return {"pid": self.pid}

    async def _op_list(self, request: Request) -> list[dict[str, Any]]:
        return [self.info(device) for _, device in sorted(self.devices.items())]

    async def _op_open(self, request: Request) -> dict[str, Any]:
        args = request.args
        timeout = args.get("timeout", self.limits.timeout)
        if not timeout > 0:
            raise ControlError("invalid", f"timeout must be positive, got {timeout}")
        self._check_allowed(args["spec"], configuration.image_path(args["spec"]))
        minor, lock_fd = self._lock_minor(args.get("minor"))
        try:
            options = OpenOptions(
                read_only=args.get("read_only", False), allowed_dirs=self.allowed_dirs
            )
            image = await asyncio.to_thread(open_image, args["spec"], options)
            limits = SchedulerLimits(
                queue_depth=self.limits.queue_depth,
                max_merge=self.limits.max_merge,
                timeout=float(timeout),
                watchdog=self.limits.watchdog,
            )
            vbd = VBD(image, options=options, limits=limits, name=f"minor {minor}")
            path = protocol.nbd_socket(self.directory, self.pid, minor)
            server = NBDServer([Export("", vbd, label=vbd.name)], poller=self.poller)
            try:
                await server.listen_unix(path)
            except BaseException:
                await server.shutdown()
                raise
        except BaseException:
            self._unlock_minor(minor, lock_fd)
            raise
        device = Device(minor, vbd, server, path, lock_fd)
        self.devices[minor] = device
        log.info("minor %d: opened %s, NBD on %s", minor, vbd.spec, path)
        return self.info(device)

    async def _op_close(self, request: Request) -> None:
        self._device(request)
        await self._close_device(request.args["minor"])

    async def _close_device(self, minor: int, *, detach: bool = True) -> None:
        device = self.devices[minor]
        if device.closing:
            raise ControlError("state", f"minor {minor} is already closing")
        device.closing = True
        try:
            if device.kernel_index is not None and detach:
                await self._detach(device)
            if device.vbd.paused:
                await device.vbd.close()  # requests waiting for the pause fail now
            await device.server.shutdown()
        finally:
            del self.devices[minor]
            self._unlock_minor(minor, device.lock_fd)
        log.info("minor %d: closed", minor)

    async def _op_attach(self, request: Request) -> dict[str, Any]:
        device = self._device(request)
        connections = request.args.get("connections", 1)
        self._check_attachable(device, connections)
        kernel = await self._kernel()
        vbd = device.vbd
        timeout = int(request.args.get("timeout", vbd.limits.timeout + KERNEL_TIMEOUT_MARGIN))
        export = device.server.exports[""]

        def connect(kernel_ends: list[socket.socket]) -> int:
            return kernel.connect(
                kernel_ends,
                vbd.size,
                server_flags=int(connection_flags(export.info, structured=False)),
                backend_id=self._backend_id(device),
                block_size=max(512, vbd.block_size),
                timeout=timeout,
                dead_conn_timeout=KERNEL_DEAD_CONN_TIMEOUT,
                index=request.args.get("index"),
            )

        index = await self._hand_to_kernel(device, connections, connect)
        log.info("minor %d: attached as /dev/nbd%d", device.minor, index)
        return self.info(device)

    async def _op_takeover(self, request: Request) -> dict[str, Any]:
        """Serve an attached /dev/nbdN whose previous server has gone (tap-ctl restart).

        RECONFIGURE gives the kernel fresh sockets in place of the dead ones; the
        kernel resends the requests it lost with the old sockets once their
        request timeout fires.  The kernel keeps its timeouts and flags.
        """
        device = self._device(request)
        self._check_attachable(device, request.args.get("connections", 1))
        kernel = await self._kernel()
        index = request.args["index"]
        backend_id = await asyncio.to_thread(kernel.backend, index)
        if backend_id is None:
            raise ControlError("state", f"/dev/nbd{index} is not connected: nothing to take over")
        connections = request.args.get("connections") or _hardware_queues(index)

        def reconfigure(kernel_ends: list[socket.socket]) -> int:
            # One socket per RECONFIGURE, so that each is known taken or not: the
            # kernel takes a socket only into a dead slot, and answers EBUSY until
            # it has noticed that the old server's sockets closed.
            deadline = time.monotonic() + TAKEOVER_WAIT
            waiting = list(kernel_ends)
            while waiting:
                try:
                    kernel.reconfigure(index, waiting[:1], backend_id=backend_id)
                except kernel.KernelAttachError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
                else:
                    waiting.pop(0)
            return index

        await self._hand_to_kernel(device, connections, reconfigure)
        log.info("minor %d: took over /dev/nbd%d (%s)", device.minor, index, backend_id)
        return self.info(device)

    def _check_attachable(self, device: Device, connections: int) -> None:
        if device.kernel_index is not None:
            raise ControlError("state", f"minor {device.minor} is already {device.device}")
        if not 1 <= connections <= 64:
            raise ControlError("invalid", f"connections must be 1..64, got {connections}")

    async def _kernel(self) -> Any:
        """The kernel module of tapdisk.control, with nbd.ko loaded."""
        try:
            from . import kernel
        except ImportError as exc:
            raise ControlError("unsupported", f"kernel attach is not available: {exc}") from exc
        try:
            await asyncio.to_thread(kernel.ensure_module)
        except kernel.KernelAttachError as exc:
            raise ControlError("unsupported", exc.strerror or str(exc)) from exc
        return kernel

    async def _hand_to_kernel(
        self,
        device: Device,
        connections: int,
        hand: Callable[[list[socket.socket]], int],
    ) -> int:
        """Serve ``connections`` socketpairs without handshake and give the kernel
        their other ends with ``hand`` (CONNECT or RECONFIGURE, run in a thread)."""
        from . import kernel

        self._check_attachable(device, connections)
        pairs = [socket.socketpair() for _ in range(connections)]
        for ours, _ in pairs:
            await device.server.serve_socket(ours, DirectAttach(""))
        kernel_ends = [theirs for _, theirs in pairs]
        try:
            index = await asyncio.to_thread(hand, kernel_ends)
        except kernel.KernelAttachError as exc:
            for ours, _ in pairs:
                ours.close()
            kind = "unsupported" if exc.errno == errno.ENOENT else "os"
            raise ControlError(kind, exc.strerror or str(exc)) from exc
        finally:
            for theirs in kernel_ends:
                theirs.close()  # the kernel holds its own references now
        device.kernel_index = index
        return index

    def _backend_id(self, device: Device) -> str:
        """Shown in /sys/block/nbdN/backend; free of the pid, so a successor can reconfigure."""
        return f"tapdisk:minor{device.minor}"

    async def _op_detach(self, request: Request) -> dict[str, Any]:
        device = self._device(request)
        if device.kernel_index is None:
            raise ControlError("state", f"minor {device.minor} is not attached")
        await self._detach(device)
        return self.info(device)

    async def _op_release(self, request: Request) -> None:
        """Let go of a paused, attached device without DISCONNECT (tap-ctl restart).

        The kernel's sockets are cut before the queued requests fail, so no
        error reaches the kernel: it sees dead sockets and keeps its requests
        for the successor.
        """
        device = self._device(request)
        if device.kernel_index is None:
            raise ControlError("state", f"minor {device.minor} is not attached")
        if not device.vbd.paused:
            raise ControlError("state", f"minor {device.minor} must be paused to be released")
        for connection in list(device.server.connections):
            if connection.transport is not None:
                connection.transport.abort()
        log.info("minor %d: released /dev/nbd%d", device.minor, device.kernel_index)
        await self._close_device(device.minor, detach=False)

    async def _detach(self, device: Device) -> None:
        from . import kernel

        index = device.kernel_index
        assert index is not None
        await asyncio.to_thread(kernel.disconnect, index)
        device.kernel_index = None
        log.info("minor %d: detached from /dev/nbd%d", device.minor, index)

    async def _op_pause(self, request: Request) -> dict[str, Any]:
        device = self._device(request)
        await device.vbd.pause()
        return self.info(device)

    async def _op_resume(self, request: Request) -> dict[str, Any]:
        device = self._device(request)
        if "spec" in request.args:
            spec = request.args["spec"]
            self._check_allowed(spec, configuration.image_path(spec))
        await device.vbd.unpause(request.args.get("spec"))
        return self.info(device)

    async def _op_snapshot(self, request: Request) -> dict[str, Any]:
        device = self._device(request)
        path = os.path.abspath(request.args["path"])
        self._check_allowed(path, path)
        await device.vbd.snapshot(request.args["path"], request.args.get("format", "qcow2"))
        return self.info(device)

    async def _op_stats(self, request: Request) -> dict[str, Any] | list[dict[str, Any]]:
        if "minor" in request.args:
            return self.stats(self._device(request))
        return [self.stats(device) for _, device in sorted(self.devices.items())]

    def stats(self, device: Device) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "minor": device.minor,
            "device": device.device,
            "connections": len(device.server.connections),
            **device.vbd.stats_dict(),
        }

    def _check_allowed(self, what: str, path: str | None) -> None:
        """Refuse an image file outside ``allowed_dirs``; the drivers check the parents.

        ``path`` is None for a spec whose path is relative: it cannot be checked.
        """
        if not self.allowed_dirs:
            return
        if path is not None and is_inside(path, self.allowed_dirs):
            return
        raise ControlError(
            "image",
            f"{what}: the image is outside the allowed directories "
            f"({', '.join(self.allowed_dirs)}); give an absolute path inside one of them",
        )

    async def _op_shutdown(self, request: Request) -> None:
        asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.shutdown()))

    # -- minors ------------------------------------------------------------------

    def _lock_minor(self, wanted: int | None) -> tuple[int, int]:
        """Take the lock of ``wanted`` (or of the lowest free minor); (minor, fd)."""
        if wanted is not None:
            if not 0 <= wanted < 1 << 20:
                raise ControlError("invalid", f"minor {wanted} is out of range")
            fd = self._try_lock(wanted)
            if fd is None:
                raise ControlError("state", f"minor {wanted} is in use")
            return wanted, fd
        minor = 0
        while True:
            fd = self._try_lock(minor)
            if fd is not None:
                return minor, fd
            minor += 1

    def _try_lock(self, minor: int) -> int | None:
        path = f"{self.directory}/minor{minor}.lock"
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)  # we locked a file its owner just unlinked; try again

    def _unlock_minor(self, minor: int, fd: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self.directory}/minor{minor}.lock")
        os.close(fd)


def _hardware_queues(index: int) -> int:
    """How many connections /dev/nbdN has: one blk-mq hardware queue each."""
    try:
        return max(1, len(os.listdir(f"/sys/block/nbd{index}/mq")))
    except OSError:
        return 1


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The ``tapdisk daemon`` subcommand (tap-ctl spawn runs it)."""
    parser = sub.add_parser(
        "daemon",
        help="run a tapdisk steered through its control socket (what tap-ctl spawn starts)",
        description="Run in the foreground, listening on <dir>/ctl<pid>; tap-ctl opens, pauses, "
        "attaches and closes images in it.  Logs go to stderr.",
        epilog=DAEMON_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--control-dir",
        metavar="DIR",
        default=os.environ.get(protocol.DIR_ENV, protocol.DEFAULT_DIR),
        help=f"socket directory (default ${protocol.DIR_ENV} or {protocol.DEFAULT_DIR})",
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=f"configuration file (default {configuration.DEFAULT_PATH}, if it exists); "
        "its retry_deadline, queue_depth, merge_size, busy_poll, allowed_dirs and log_level apply "
        "unless a flag is given",
    )
    configuration.add_allowed_dirs_argument(parser)
    parser.add_argument(
        "--timeout",
        "-t",
        type=float,
        metavar="SECS",
        help="default per-request retry deadline of opened images "
        f"(default: the configuration's, else {DEFAULTS.timeout:g})",
    )
    parser.add_argument(
        "--queue-depth",
        type=int,
        metavar="N",
        help="requests queued or in flight per device "
        f"(default: the configuration's, else {DEFAULTS.queue_depth})",
    )
    parser.add_argument(
        "--max-merge",
        type=int,
        metavar="BYTES",
        help="largest merged I/O; 0 disables merging "
        f"(default: the configuration's merge_size, else {DEFAULTS.max_merge})",
    )
    parser.add_argument(
        "--watchdog",
        type=float,
        default=DEFAULTS.watchdog,
        metavar="SECS",
        help="log requests without progress for this long (default %(default)s)",
    )
    configuration.add_busy_poll_argument(parser, None)
    parser.add_argument(
        "--ready-fd",
        type=int,
        metavar="FD",
        help="write the control socket path to FD and close it once listening",
    )


DAEMON_EXAMPLES = """\
examples:
  tapdisk daemon --control-dir /tmp/td &
  tap-ctl open --control-dir /tmp/td -p $! -a raw:/var/lib/images/disk.img
"""


def _given(flag: Any, setting: Any) -> Any:
    """A command-line value if one was given, else the configuration's."""
    return setting if flag is None else flag


def main(args: argparse.Namespace) -> int:
    """Entry point of ``tapdisk daemon``."""
    try:
        settings = configuration.load(args.config)
    except configuration.ConfigError as exc:
        print(f"tapdisk daemon: {exc}", file=sys.stderr)
        return 2
    logs.setup(args.log_level or settings.log_level)
    try:
        limits = SchedulerLimits(
            queue_depth=_given(args.queue_depth, settings.queue_depth),
            max_merge=_given(args.max_merge, settings.merge_size),
            timeout=_given(args.timeout, settings.retry_deadline),
            watchdog=args.watchdog,
        )
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    allowed_dirs = tuple(_given(args.allowed_dirs, settings.allowed_dirs))
    return run_loop(
        run(
            args.control_dir,
            limits,
            args.ready_fd,
            allowed_dirs=allowed_dirs,
            busy_poll=_given(args.busy_poll, settings.busy_poll),
        )
    )


async def run(
    directory: str,
    limits: SchedulerLimits,
    ready: int | None = None,
    boot: Callable[[Daemon], Awaitable[None]] | None = None,
    allowed_dirs: tuple[str, ...] = (),
    busy_poll: int = busypoll.DEFAULT_MAX_US,
) -> int:
    """Run a daemon until shutdown or SIGTERM/SIGINT.

    Once listening, awaits ``boot(daemon)`` if given (``tapdisk service`` attaches
    its configured devices there and notifies systemd; if it raises, the daemon
    shuts down and returns 1), then writes ``<control socket path>\\n`` to file
    descriptor ``ready`` (if given) and closes it, so a spawner knows it can connect.
    """
    daemon = Daemon(directory, limits, allowed_dirs, busy_poll)
    try:
        await daemon.start()
    except OSError as exc:
        log.error("cannot listen on %s: %s", daemon.control_path, exc)
        return 1
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: asyncio.ensure_future(daemon.shutdown()))
    if boot is not None:
        try:
            await boot(daemon)
        except Exception as exc:
            log.error("%s", exc)
            await daemon.shutdown()
            return 1
    if ready is not None:
        os.write(ready, f"{daemon.control_path}\n".encode())
        os.close(ready)
    await daemon.stopped.wait()
    log.info("exiting")
    return 0
