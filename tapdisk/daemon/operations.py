"""The daemon's control operations: the control socket, request dispatch, one handler per op.

``Daemon`` listens on ``<dir>/ctl<pid>``, answers each connection's requests in
order, and turns every failure into an error response of the kind the control
protocol names.  Open takes a minor (minors.py), opens the image as a VBD and
serves it over NBD on ``<dir>/nbd<pid>.<minor>``; attach, takeover, release and
detach go through the kernel hand-off (handoff.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

from tapdisk.ctl import protocol
from tapdisk.ctl.protocol import ControlProtocolError, Request, Response
from tapdisk.drivers.base import ImageError
from tapdisk.drivers.paths import is_inside
from tapdisk.drivers.registry import OpenOptions

from .. import busypoll
from .. import config as configuration
from ..export import Export
from ..scheduler import SchedulerLimits
from ..server import NBDServer
from ..vbd import VBD, VBDError, open_stack
from . import handoff
from .device import Device
from .errors import ControlError
from .minors import lock_minor, unlock_minor

log = logging.getLogger("tapdisk.daemon")


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
            "unpause": self._op_unpause,
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
        except ControlProtocolError as exc:
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
            "cbt_log": vbd.cbt_log,
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
        cbt_log = args.get("cbt_log")
        if cbt_log is not None:
            self._check_log_allowed(cbt_log)
        minor, lock_fd = lock_minor(self.directory, args.get("minor"))
        try:
            options = OpenOptions(
                read_only=args.get("read_only", False), allowed_dirs=self.allowed_dirs
            )
            image = await open_stack(args["spec"], options, cbt_log)
            limits = SchedulerLimits(
                queue_depth=self.limits.queue_depth,
                max_merge=self.limits.max_merge,
                timeout=float(timeout),
                watchdog=self.limits.watchdog,
            )
            vbd = VBD(image, options=options, limits=limits, name=f"minor {minor}")
            path = protocol.nbd_socket(self.directory, self.pid, minor)
            export = Export("", vbd, label=vbd.name, changes=vbd)
            server = NBDServer([export], poller=self.poller)
            try:
                await server.listen_unix(path)
            except BaseException:
                await server.shutdown()
                raise
        except BaseException:
            unlock_minor(self.directory, minor, lock_fd)
            raise
        device = Device(minor, vbd, server, path, lock_fd)
        self.devices[minor] = device
        tracking = f", changed blocks marked in {cbt_log}" if cbt_log else ""
        log.info("minor %d: opened %s%s, NBD on %s", minor, vbd.spec, tracking, path)
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
                await handoff.detach(device)
            if device.vbd.paused:
                await device.vbd.close()  # requests waiting for the pause fail now
            await device.server.shutdown()
        finally:
            del self.devices[minor]
            unlock_minor(self.directory, minor, device.lock_fd)
        log.info("minor %d: closed", minor)

    async def _op_attach(self, request: Request) -> dict[str, Any]:
        device = self._device(request)
        args = request.args
        await handoff.attach(
            device, args.get("connections", 1), args.get("index"), args.get("timeout")
        )
        return self.info(device)

    async def _op_takeover(self, request: Request) -> dict[str, Any]:
        device = self._device(request)
        args = request.args
        await handoff.takeover(device, args["index"], args.get("connections"))
        return self.info(device)

    async def _op_detach(self, request: Request) -> dict[str, Any]:
        device = self._device(request)
        if device.kernel_index is None:
            raise ControlError("state", f"minor {device.minor} is not attached")
        await handoff.detach(device)
        return self.info(device)

    async def _op_release(self, request: Request) -> None:
        device = self._device(request)
        handoff.release(device)
        await self._close_device(device.minor, detach=False)

    async def _op_pause(self, request: Request) -> dict[str, Any]:
        device = self._device(request)
        await device.vbd.pause()
        return self.info(device)

    async def _op_unpause(self, request: Request) -> dict[str, Any]:
        device = self._device(request)
        if "spec" in request.args:
            spec = request.args["spec"]
            self._check_allowed(spec, configuration.image_path(spec))
        cbt_log = request.args.get("cbt_log")
        if cbt_log is not None:
            self._check_log_allowed(cbt_log)
        await device.vbd.unpause(request.args.get("spec"), cbt_log)
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

    def _check_log_allowed(self, path: str) -> None:
        """A CBT log must be named by an absolute path (and lie inside ``allowed_dirs``)."""
        if not os.path.isabs(path):
            raise ControlError("invalid", f"CBT log {path!r}: give an absolute path")
        if self.allowed_dirs and not is_inside(path, self.allowed_dirs):
            raise ControlError(
                "image",
                f"CBT log {path}: outside the allowed directories ({', '.join(self.allowed_dirs)})",
            )

    async def _op_shutdown(self, request: Request) -> None:
        asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.shutdown()))
