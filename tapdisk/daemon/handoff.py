"""The kernel hand-off: a device served to ``/dev/nbdN`` through ``tapdisk.kernel``.

Connect and takeover serve socketpairs without handshake (``DirectAttach``) and
give the kernel their other ends: connect with CONNECT, for a device nobody
serves; takeover with RECONFIGURE, for a ``/dev/nbdN`` whose previous server
has gone (tap-ctl restart).  Release is the predecessor's half of a restart: it
cuts the kernel's sockets without DISCONNECT, so the kernel keeps its requests
for the successor.  Disconnect takes the device back from the kernel.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from collections.abc import Callable

from .. import kernel
from ..export import DirectAttach
from ..nbd.handshake import connection_flags
from .device import Device
from .errors import ControlError

log = logging.getLogger("tapdisk.daemon")

#: Seconds the kernel waits for a reply beyond our own retry deadline before
#: declaring a socket dead; the device's deadline must fire first.
KERNEL_TIMEOUT_MARGIN = 60
#: Seconds I/O on a device whose sockets all died waits for new ones.
KERNEL_DEAD_CONN_TIMEOUT = 60
#: Seconds a takeover waits for the kernel to notice that the old server's sockets closed.
TAKEOVER_WAIT = 10.0


async def connect(
    device: Device, connections: int, index: int | None, timeout: float | None
) -> None:
    """Connect ``device`` to the kernel as ``/dev/nbd<index>`` (None: the kernel picks one).

    ``timeout`` is the kernel's request timeout (None: the retry deadline plus
    ``KERNEL_TIMEOUT_MARGIN``).
    """
    _check_connectable(device, connections)
    await _load_kernel_module()
    vbd = device.vbd
    kernel_timeout = int(vbd.limits.timeout + KERNEL_TIMEOUT_MARGIN if timeout is None else timeout)
    export = device.server.exports[""]

    def hand(kernel_ends: list[socket.socket]) -> int:
        return kernel.connect(
            kernel_ends,
            vbd.size,
            server_flags=int(connection_flags(export.info, structured=False)),
            backend_id=_backend_id(device),
            block_size=max(512, vbd.block_size),
            timeout=kernel_timeout,
            dead_conn_timeout=KERNEL_DEAD_CONN_TIMEOUT,
            index=index,
        )

    index = await _hand_to_kernel(device, connections, hand)
    log.info("minor %d: connected as /dev/nbd%d", device.minor, index)


async def takeover(device: Device, index: int, connections: int | None) -> None:
    """Serve a connected /dev/nbdN whose previous server has gone (tap-ctl restart).

    RECONFIGURE gives the kernel fresh sockets in place of the dead ones; the
    kernel resends the requests it lost with the old sockets once their
    request timeout fires.  The kernel keeps its timeouts and flags.
    ``connections`` defaults to as many as the device has.
    """
    _check_connectable(device, 1 if connections is None else connections)
    await _load_kernel_module()
    backend_id = await asyncio.to_thread(kernel.backend, index)
    if backend_id is None:
        raise ControlError("state", f"/dev/nbd{index} is not connected: nothing to take over")
    connections = connections or _hardware_queues(index)

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

    await _hand_to_kernel(device, connections, reconfigure)
    log.info("minor %d: took over /dev/nbd%d (%s)", device.minor, index, backend_id)


def release(device: Device) -> None:
    """Cut the kernel's sockets of a paused, connected device, without DISCONNECT.

    The sockets are cut before the queued requests fail (when the caller closes
    the device), so no error reaches the kernel: it sees dead sockets and keeps
    its requests for the successor.
    """
    if device.kernel_index is None:
        raise ControlError("state", f"minor {device.minor} is not connected to the kernel")
    if not device.vbd.paused:
        raise ControlError("state", f"minor {device.minor} must be paused to be released")
    for connection in list(device.server.connections):
        if connection.transport is not None:
            connection.transport.abort()
    log.info("minor %d: released /dev/nbd%d", device.minor, device.kernel_index)


async def disconnect(device: Device) -> None:
    """Take ``device``'s ``/dev/nbdN`` back from the kernel."""
    index = device.kernel_index
    assert index is not None
    await asyncio.to_thread(kernel.disconnect, index)
    device.kernel_index = None
    log.info("minor %d: disconnected from /dev/nbd%d", device.minor, index)


def _check_connectable(device: Device, connections: int) -> None:
    if device.kernel_index is not None:
        raise ControlError("state", f"minor {device.minor} is already {device.device}")
    if not 1 <= connections <= 64:
        raise ControlError("invalid", f"connections must be 1..64, got {connections}")


async def _load_kernel_module() -> None:
    """Load nbd.ko if needed; a kernel without it makes the request ``unsupported``."""
    try:
        await asyncio.to_thread(kernel.ensure_module)
    except kernel.KernelAttachError as exc:
        raise ControlError("unsupported", exc.strerror or str(exc)) from exc


async def _hand_to_kernel(
    device: Device,
    connections: int,
    hand: Callable[[list[socket.socket]], int],
) -> int:
    """Serve ``connections`` socketpairs without handshake and give the kernel
    their other ends with ``hand`` (CONNECT or RECONFIGURE, run in a thread)."""
    _check_connectable(device, connections)
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


def _backend_id(device: Device) -> str:
    """Shown in /sys/block/nbdN/backend; free of the pid, so a successor can reconfigure."""
    return f"tapdisk:minor{device.minor}"


def _hardware_queues(index: int) -> int:
    """How many connections /dev/nbdN has: one blk-mq hardware queue each."""
    try:
        return max(1, len(os.listdir(f"/sys/block/nbd{index}/mq")))
    except OSError:
        return 1
