"""The daemon's control operations: the control socket, request dispatch, one handler per op.

``Daemon`` listens on ``<dir>/ctl<pid>``, answers each connection's requests in
order, and turns every failure into an error response of the kind the control
protocol names.  Minors follow blktap (``minors.py``): attach binds an allocated
minor to the daemon, open opens an image on it as a VBD served over NBD on
``<dir>/nbd<pid>.<minor>``, close closes the image, detach unbinds the minor, and a
spawned daemon left without minors exits.  Connect, disconnect, takeover and release
go through the kernel hand-off (handoff.py); handover and adopt move every VBD to a
successor process with its live sockets (handover.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
from typing import Any

from tapdisk.ctl import directory as control_directory
from tapdisk.ctl import minors, protocol
from tapdisk.ctl.protocol import ControlProtocolError, Request, Response
from tapdisk.drivers.base import ImageError
from tapdisk.drivers.registry import OpenOptions

from .. import busypoll, kernel
from .. import config as configuration
from ..export import Export
from ..migration import Migration
from ..scheduler import SchedulerLimits
from ..server import NBDServer
from ..tls import ServerTLS
from ..vbd import VBD, VBDError, open_stack
from . import commitops, handoff, handover, recovery
from .confinement import Confinement
from .device import Device
from .errors import ControlError
from .fdreceiver import FdReceiver
from .minors import Minor

log = logging.getLogger("tapdisk.daemon")


class Daemon:
    """The control server and the minors of one tapdisk process.

    ``exit_when_idle``: shut down once the last minor is detached, as blktap's
    tapdisk does (what tap-ctl spawns); ``tapdisk service`` keeps running.
    """

    def __init__(
        self,
        directory: str,
        limits: SchedulerLimits | None = None,
        allowed_dirs: tuple[str, ...] = (),
        busy_poll: int = busypoll.DEFAULT_MAX_US,
        exit_when_idle: bool = False,
        tls: ServerTLS | None = None,
        open_defaults: OpenOptions | None = None,
        remote_images: bool = False,
        config: str | None = None,
    ) -> None:
        self.directory = os.path.abspath(directory)
        #: The configuration file it was started with (None: the default one): a restart
        #: starts its successor with the same, TLS and allowed directories included.
        self.config = config
        #: TLS offered or required on every device's NBD socket (never on the kernel's).
        self.tls = tls
        #: What every image is opened with before per-device flags (the Ceph defaults, and
        #: whether backing files named by NBD URIs may be opened).
        self.open_defaults = open_defaults or OpenOptions()
        self.limits = limits or SchedulerLimits()
        #: When ``allowed_dirs`` is set, images, their parents and snapshot overlays must
        #: lie inside them.
        self.confinement = Confinement(allowed_dirs, remote_images)
        #: Shared by the NBD servers of every device: one event loop, one spin.
        self.poller = busypoll.BusyPoller(busy_poll)
        self.exit_when_idle = exit_when_idle
        self.pid = os.getpid()
        self.control_path = protocol.control_socket(self.directory, self.pid)
        #: The minors attached here, in the order they were attached.
        self.minors: dict[int, Minor] = {}
        self.stopped = asyncio.Event()
        self._stopping = False
        #: A successor is taking the minors over (handover.py).
        self.handing_over = False
        self._server: asyncio.AbstractServer | None = None
        self._fd_receiver: FdReceiver | None = None
        self._ops = {
            "pid": self._op_pid,
            "list": self._op_list,
            "attach": self._op_attach,
            "detach": self._op_detach,
            "open": self._op_open,
            "close": self._op_close,
            "connect": self._op_connect,
            "disconnect": self._op_disconnect,
            "takeover": self._op_takeover,
            "adopt": self._op_adopt,
            "release": self._op_release,
            "pause": self._op_pause,
            "unpause": self._op_unpause,
            "snapshot": self._op_snapshot,
            "stats": self._op_stats,
            "mirror": self._op_mirror,
            "mirror_status": self._op_mirror_status,
            "mirror_cancel": self._op_mirror_cancel,
            "commit": self._op_commit,
            "commit_status": self._op_commit_status,
            "commit_cancel": self._op_commit_cancel,
            "shutdown": self._op_shutdown,
        }

    # -- lifetime ----------------------------------------------------------------

    async def start(self) -> None:
        """Create the directory (0700) if needed, check that only we can write it, listen."""
        control_directory.prepare(self.directory)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.control_path)  # a previous process with our pid is gone
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve_client, self.control_path)
        finally:
            os.umask(old_umask)
        os.chmod(self.control_path, 0o600)
        log.info("control socket %s", self.control_path)
        self._fd_receiver = FdReceiver(self.directory, self.pid)

    async def shutdown(self) -> None:
        """Close every device and detach every minor (freeing those allocated here), stop
        listening, remove the control socket."""
        if self._stopping:
            return
        self._stopping = True
        log.info("shutting down; %s", self.poller.summary())
        recovery.forget(self)
        for minor in list(self.minors.values()):
            try:
                if minor.device is not None:
                    await self._close_device(minor)
            except Exception:
                log.exception("minor %d: close at shutdown failed", minor.number)
            self._detach(minor, free=minor.owned)
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.control_path)
        if self._fd_receiver is not None:
            self._fd_receiver.close()
            self._fd_receiver = None
        self.stopped.set()

    def vacate(self) -> None:
        """Stop as a predecessor whose minors a successor now holds: remove the control
        socket and exit, touching no minor, image or socket (they are the successor's)."""
        self._stopping = True
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._fd_receiver is not None:
            self._fd_receiver.close()
            self._fd_receiver = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.control_path)
        self.stopped.set()

    def _shutdown_soon(self) -> None:
        """Shut down once the current answer has been written."""
        asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.shutdown()))

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
                    if message.get("op") == "handover":  # takes the connection over
                        await handover.give(self, message, reader, writer, decoder)
                        return
                    response = await self.handle_message(message)
                    recovery.sync(self, stopping=self._stopping)
                    writer.write(protocol.encode(response))
                    await writer.drain()
                    if self.stopped.is_set():
                        return
        except ControlProtocolError as exc:
            log.warning("control client sent a bad frame, closing it: %s", exc)
            with contextlib.suppress(ConnectionError):
                writer.write(protocol.encode(Response.failure(0, "invalid", str(exc))))
                await writer.drain()
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
        except ControlProtocolError as exc:
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
            return Response.failure(request.id, "os", str(exc), exc.errno)
        except Exception as exc:
            log.exception("%s request failed", request.op)
            return Response.failure(request.id, "internal", f"{type(exc).__name__}: {exc}")
        return Response.success(request.id, result)

    # -- minors ------------------------------------------------------------------

    def _minor(self, request: Request) -> Minor:
        number = request.args["minor"]
        minor = self.minors.get(number)
        if minor is None:
            raise ControlError("not-found", f"tapdisk {self.pid} has no minor {number}")
        return minor

    def _device(self, request: Request) -> tuple[Minor, Device]:
        minor = self._minor(request)
        if minor.device is None:
            raise ControlError(
                "state", f"minor {minor.number} of tapdisk {self.pid} has no image open"
            )
        return minor, minor.device

    def _bind(self, number: int, *, owned: bool = False) -> Minor:
        """Attach the allocated minor ``number`` to this daemon."""
        try:
            fd = minors.bind(self.directory, number)
        except minors.MinorError as exc:
            kind = "not-found" if exc.errno == errno.ENOENT else "state"
            raise ControlError(kind, str(exc)) from None
        minor = Minor(number, fd, owned=owned)
        self.minors[number] = minor
        log.info("minor %d: attached", number)
        return minor

    def _attach_new(self) -> Minor:
        """Allocate a minor and attach it (an open without a minor)."""
        try:
            number = minors.allocate(self.directory)
        except minors.MinorError as exc:
            raise ControlError("os", str(exc)) from None
        try:
            return self._bind(number, owned=True)
        except BaseException:
            minors.free(self.directory, number)
            raise

    def _detach(self, minor: Minor, *, free: bool = False) -> None:
        """Unbind ``minor`` (nothing open on it); ``free`` removes its marker too."""
        del self.minors[minor.number]
        minors.unbind(minor.lock_fd)
        log.info("minor %d: detached", minor.number)
        if free:
            try:
                minors.free(self.directory, minor.number)
            except minors.MinorError as exc:
                log.warning("minor %d: not freed: %s", minor.number, exc)

    def info(self, minor: Minor) -> dict[str, Any]:
        """VBD-INFO of ``minor`` (``tapdisk/ctl/protocol.py``)."""
        device = minor.device
        if device is None:
            return {
                "pid": self.pid,
                "minor": minor.number,
                "state": minor.state,
                **dict.fromkeys(
                    ("spec", "size", "read_only", "cbt_log", "timeout", "nbd_socket", "device")
                ),
            }
        vbd = device.vbd
        return {
            "pid": self.pid,
            "minor": minor.number,
            "state": minor.state,
            "spec": device.served,
            "size": vbd.size,
            "read_only": vbd.read_only,
            "cbt_log": vbd.cbt_log,
            "timeout": vbd.limits.timeout,
            "nbd_socket": device.nbd_socket,
            "device": device.device,
        }

    # -- operations --------------------------------------------------------------

    async def _op_pid(self, request: Request) -> dict[str, Any]:
        return {"pid": self.pid, "config": self.config}

    async def _op_list(self, request: Request) -> list[dict[str, Any]]:
        return [self.info(minor) for minor in self.minors.values()]

    async def _op_attach(self, request: Request) -> dict[str, Any]:
        number = request.args["minor"]
        if number in self.minors:
            raise ControlError("state", f"minor {number} is already attached to tapdisk {self.pid}")
        return self.info(self._bind(number))

    async def _op_detach(self, request: Request) -> dict[str, int]:
        minor = self._minor(request)
        if minor.device is not None:
            raise ControlError(
                "state", f"minor {minor.number} has {minor.device.spec} open: close it first"
            )
        self._detach(minor)
        if not self.minors and self.exit_when_idle:
            log.info("no minor left: exiting")
            self._shutdown_soon()
        return {"attached": len(self.minors)}

    async def _op_open(self, request: Request) -> dict[str, Any]:
        args = request.args
        timeout = args.get("timeout", self.limits.timeout)
        self.confinement.check_spec(args["spec"])
        if args.get("cbt_log") is not None:
            self.confinement.check_log(args["cbt_log"])
        self.confinement.check_secondary(args.get("secondary"))
        if "minor" not in args:
            minor = self._attach_new()
        else:
            minor = self.minors.get(args["minor"])
            if minor is None:
                raise ControlError(
                    "not-found",
                    f"minor {args['minor']} is not attached to tapdisk {self.pid} "
                    "(tap-ctl attach it first, or open without -m)",
                )
            if minor.device is not None:
                raise ControlError(
                    "state", f"minor {minor.number} already has {minor.device.spec} open"
                )
        try:
            device = await self._open_device(minor.number, args, float(timeout))
        except BaseException:
            if "minor" not in args:
                self._detach(minor, free=True)  # allocated for this open: as if never
            raise
        minor.device, minor.closed = device, False
        if not minor.owned and kernel.nbd_loaded():
            try:
                await self._connect(minor, device, 1, None, None)
            except ControlError as exc:
                log.warning("minor %d: not connected to the kernel: %s", minor.number, exc)
        return self.info(minor)

    async def _open_device(
        self, number: int, args: dict[str, Any], timeout: float, adopted: str | None = None
    ) -> Device:
        """``adopted``: the NBD path of a VBD handed over, whose listener comes with it."""
        options = dataclasses.replace(
            self.open_defaults,
            read_only=args.get("read_only", False),
            allowed_dirs=self.confinement.allowed_dirs,
        )
        cbt_log = args.get("cbt_log")
        image = await open_stack(
            args["spec"], options, cbt_log, args.get("secondary"), args.get("standby", False)
        )
        limits = SchedulerLimits(
            queue_depth=self.limits.queue_depth,
            max_merge=self.limits.max_merge,
            timeout=timeout,
            watchdog=self.limits.watchdog,
        )
        vbd = VBD(image, options=options, limits=limits, name=f"minor {number}")
        path = adopted or protocol.nbd_socket(self.directory, self.pid, number)
        export = Export("", vbd, label=vbd.name, changes=vbd)
        server = NBDServer([export], poller=self.poller, tls=self.tls)
        try:
            if adopted is None:
                await server.listen_unix(path)
        except BaseException:
            await server.shutdown()
            raise
        tracking = f", changed blocks marked in {cbt_log}" if cbt_log else ""
        log.info("minor %d: opened %s%s, NBD on %s", number, vbd.spec, tracking, path)
        return Device(number, args["spec"], vbd, server, path)

    async def open_adopted(
        self, number: int, args: dict[str, Any], timeout: float, path: str
    ) -> Device:
        """Open a predecessor's VBD for a hand-over: its checks as open's, its NBD path
        kept (the listener comes handed over)."""
        self.confinement.check_spec(args["spec"])
        if args.get("cbt_log") is not None:
            self.confinement.check_log(args["cbt_log"])
        self.confinement.check_secondary(args.get("secondary"))
        return await self._open_device(number, args, timeout, path)

    async def _op_close(self, request: Request) -> None:
        minor = self._minor(request)
        if minor.device is not None:
            await self._close_device(minor)
        minor.closed = True

    async def _close_device(self, minor: Minor, *, disconnect: bool = True) -> None:
        device = minor.device
        assert device is not None
        if device.closing:
            raise ControlError("state", f"minor {minor.number} is already closing")
        device.closing = True
        try:
            await commitops.stop(device)
            if device.migration is not None:
                await device.migration.cancel()  # the device goes back to its source first
            if device.kernel_index is not None and disconnect:
                await handoff.disconnect(device)
            if device.vbd.paused:
                await device.vbd.close()  # requests waiting for the pause fail now
            await device.server.shutdown()
        finally:
            minor.device = None
            minor.closed = True
            minors.record_device(minor.lock_fd, None)
        log.info("minor %d: closed", minor.number)

    async def _connect(
        self,
        minor: Minor,
        device: Device,
        connections: int,
        index: int | None,
        timeout: float | None,
    ) -> None:
        await handoff.connect(device, connections, index, timeout)
        minors.record_device(minor.lock_fd, device.device)

    async def _op_connect(self, request: Request) -> dict[str, Any]:
        minor, device = self._device(request)
        args = request.args
        await self._connect(
            minor, device, args.get("connections", 1), args.get("index"), args.get("timeout")
        )
        return self.info(minor)

    async def _op_disconnect(self, request: Request) -> dict[str, Any]:
        minor, device = self._device(request)
        if device.kernel_index is None:
            raise ControlError("state", f"minor {minor.number} is not connected to the kernel")
        await handoff.disconnect(device)
        minors.record_device(minor.lock_fd, None)
        return self.info(minor)

    async def _op_takeover(self, request: Request) -> dict[str, Any]:
        minor, device = self._device(request)
        args = request.args
        await handoff.takeover(device, args["index"], args.get("connections"))
        minors.record_device(minor.lock_fd, device.device)
        return self.info(minor)

    async def _op_adopt(self, request: Request) -> list[dict[str, Any]]:
        return await recovery.adopt(self, request.args)

    async def _op_release(self, request: Request) -> None:
        minor, device = self._device(request)
        handoff.release(device)
        await self._close_device(minor, disconnect=False)

    async def _op_pause(self, request: Request) -> dict[str, Any]:
        minor, device = self._device(request)
        _not_migrating(device)
        await commitops.stop(device)
        await device.vbd.pause()
        return self.info(minor)

    async def _op_unpause(self, request: Request) -> dict[str, Any]:
        minor, device = self._device(request)
        spec = request.args.get("spec")
        if spec is not None:
            self.confinement.check_spec(spec)
        cbt_log = request.args.get("cbt_log")
        if cbt_log is not None:
            self.confinement.check_log(cbt_log)
        secondary = request.args.get("secondary")
        self.confinement.check_secondary(secondary)
        try:
            await device.vbd.unpause(spec, cbt_log, secondary, request.args.get("standby", False))
        finally:
            device.resume_failed = device.vbd.paused
        if spec is not None:
            device.spec = spec
        return self.info(minor)

    async def _op_snapshot(self, request: Request) -> dict[str, Any]:
        minor, device = self._device(request)
        _not_migrating(device)
        await commitops.stop(device)
        if configuration.is_remote(request.args.get("format", "") + ":"):
            snapshot = await device.vbd.snapshot_in_store(request.args["path"])
            return {**self.info(minor), "snapshot": snapshot}
        path = os.path.abspath(request.args["path"])
        self.confinement.check_image(path, path)
        device.spec = await device.vbd.snapshot(
            request.args["path"], request.args.get("format", "qcow2")
        )
        return self.info(minor)

    async def _op_stats(self, request: Request) -> dict[str, Any] | list[dict[str, Any]]:
        if "minor" in request.args:
            return self._device(request)[1].stats(self.pid)
        return [m.device.stats(self.pid) for m in self.minors.values() if m.device is not None]

    async def _op_mirror(self, request: Request) -> dict[str, Any]:
        minor, device = self._device(request)
        spec = request.args["spec"]
        self.confinement.check_spec(spec)
        if device.running_migration is not None:
            raise ControlError("state", f"minor {minor.number} is already migrating")
        commitops.refuse_during(device, "migrate")

        def switched(target: str) -> None:
            device.spec = target
            recovery.sync(self, stopping=self._stopping)

        migration = Migration(
            device.vbd, spec, device.vbd.options, request.args.get("switch", False), switched
        )
        await migration.start()
        device.migration = migration
        return migration.status()

    def _migration(self, request: Request) -> Migration:
        minor, device = self._device(request)
        if device.migration is None:
            raise ControlError("state", f"minor {minor.number} has not been migrated")
        return device.migration

    async def _op_mirror_status(self, request: Request) -> dict[str, Any]:
        return self._migration(request).status()

    async def _op_mirror_cancel(self, request: Request) -> dict[str, Any]:
        migration = self._migration(request)
        await migration.cancel()
        return migration.status()

    async def _op_commit(self, request: Request) -> dict[str, Any]:
        return await commitops.start(self._device(request)[1], request.args["path"])

    async def _op_commit_status(self, request: Request) -> dict[str, Any]:
        return commitops.status(self._device(request)[1])

    async def _op_commit_cancel(self, request: Request) -> dict[str, Any]:
        return await commitops.cancel(self._device(request)[1])

    async def _op_shutdown(self, request: Request) -> None:
        self._shutdown_soon()


def _not_migrating(device: Device) -> None:
    """Refuse to pause a device while ``tap-ctl mirror`` copies it."""
    if (migration := device.running_migration) is not None:
        raise ControlError(
            "state",
            f"minor {device.minor} is being migrated to {migration.target}; "
            "wait for tap-ctl mirror to finish, or interrupt it",
        )
