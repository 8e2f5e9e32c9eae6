"""Attach images to the Linux nbd driver (``/dev/nbdX``) through generic netlink.

The daemon creates one ``socket.socketpair()`` per connection, serves one end
with the NBD server in its no-handshake mode (``DirectAttach``) and hands the
other end to the kernel here.  The kernel takes its own reference to each
socket during the call, so the caller closes its copies of the kernel ends once
``connect``/``reconfigure`` returned.

The calls are blocking, and the kernel may start reading the device (partition
scan, udev) as soon as CONNECT runs: **serve the sockets before calling**, and
from an event loop call these functions in a thread (``asyncio.to_thread``),
never on the loop that serves the sockets.

Timeouts (seconds):

- ``timeout``: a request unanswered for this long makes the kernel declare its
  socket dead (a LINK_DEAD event) and requeue the request.  It must be longer
  than the daemon's own per-request retry deadline.  It is also how requests
  that were lost with a dying server (sent, never read) are resent after a
  restart, so 0 ("never") is refused: they would hang forever.
- ``dead_conn_timeout``: once every socket of a device is dead, I/O waits this
  long for ``reconfigure`` to supply fresh ones before failing with EIO.

Restarting a server under a live device: subscribe a ``LinkDeadWatcher``, stop
the old server (its sockets close, the kernel emits LINK_DEAD per socket), wait
for those events, then ``reconfigure`` with fresh sockets and the device's
``backend(index)``.  The kernel only fills *dead* slots and drops other
sockets while still reporting success, which is why the wait comes first
(``reconfigure`` notices a dropped socket and raises EBUSY).  The new process
does not need to be the one that connected: the device is owned by netlink,
not by a process.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Final

from . import netlink as nl
from .nbd.constants import TransmissionFlag

#: Seconds a request may stay unanswered before its socket is declared dead.
DEFAULT_TIMEOUT: Final = 180
#: Seconds I/O waits for a replacement socket once all sockets are dead.
DEFAULT_DEAD_CONN_TIMEOUT: Final = 60
#: Seconds to wait for the kernel's answer to one request.
REPLY_TIMEOUT: Final = 60.0
#: Seconds ``modprobe nbd`` may take.
MODPROBE_TIMEOUT: Final = 60.0
#: First receive buffer; grown when the kernel reports a larger datagram.
RECV_BUFFER: Final = 64 * 1024


class KernelAttachError(OSError):
    """A netlink request to the nbd driver failed, or the kernel has no nbd support.

    ``errno`` is the kernel's error (EBUSY: device in use, EPERM: not root,
    EINVAL: bad settings, ENOENT: no nbd family).
    """


class GenlSocket:
    """A generic netlink socket that sends requests and waits for their ACK."""

    def __init__(self) -> None:
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, nl.NETLINK_GENERIC)
        except (OSError, AttributeError) as exc:
            raise KernelAttachError(
                errno.EAFNOSUPPORT, f"no generic netlink socket on this system: {exc}"
            ) from exc
        self.sock.bind((0, 0))
        for option in (nl.NETLINK_CAP_ACK, nl.NETLINK_EXT_ACK):
            # Older kernels lack these; errors then come without a message.
            with contextlib.suppress(OSError):
                self.sock.setsockopt(nl.SOL_NETLINK, option, 1)
        self._seq = int(time.monotonic() * 1000) & 0x7FFFFFFF
        self._buf = bytearray(RECV_BUFFER)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> GenlSocket:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def receive(self, timeout: float) -> memoryview:
        """One datagram, however large; KernelAttachError when none arrives in time."""
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            raise KernelAttachError(
                errno.ETIMEDOUT, f"no netlink reply from the kernel in {timeout:.0f} s"
            )
        size = self.sock.recv_into(self._buf, len(self._buf), socket.MSG_PEEK | socket.MSG_TRUNC)
        if size > len(self._buf):
            self._buf = bytearray(size)
        size = self.sock.recv_into(self._buf)
        return memoryview(self._buf)[:size]

    def request(self, what: str, datagram: bytes, seq: int) -> list[nl.GenlReply]:
        """Send one request, return its data replies; raise on a negative ACK."""
        self.sock.sendto(datagram, (0, 0))
        transaction = nl.Transaction(seq)
        deadline = time.monotonic() + REPLY_TIMEOUT
        try:
            while not transaction.feed(
                self.receive(max(0.0, deadline - time.monotonic())), f"{what} reply"
            ):
                pass
        except nl.NetlinkError as exc:
            raise KernelAttachError(errno.EPROTO, f"{what}: {exc}") from exc
        error = transaction.error
        if error is not None and error.errno:
            detail = f" ({error.text})" if error.text else ""
            raise KernelAttachError(
                error.errno, f"{what} failed: {os.strerror(error.errno)}{detail}"
            )
        return transaction.replies

    def family(self, name: str) -> nl.Family:
        """Resolve a generic netlink family; KernelAttachError(ENOENT) when unknown."""
        seq = self.next_seq()
        replies = self.request(
            f"resolving netlink family {name!r}", nl.getfamily_request(name, seq), seq
        )
        if not replies:
            raise KernelAttachError(errno.EPROTO, f"no reply resolving netlink family {name!r}")
        try:
            return nl.parse_family(replies[0])
        except nl.NetlinkError as exc:
            raise KernelAttachError(errno.EPROTO, str(exc)) from exc


def _nbd_family(sock: GenlSocket) -> nl.Family:
    try:
        return sock.family(nl.NBD_FAMILY)
    except KernelAttachError as exc:
        if exc.errno == errno.ENOENT:
            raise KernelAttachError(
                errno.ENOENT,
                "the nbd driver is not loaded (no 'nbd' netlink family); run"
                " kernel.ensure_module() or 'modprobe nbd'",
            ) from exc
        raise


def ensure_module() -> nl.Family:
    """Make sure the nbd driver is loaded, loading it with ``modprobe nbd`` if needed.

    Resolving the family does not load the module on every kernel (Debian
    6.1's nbd.ko has no module alias), hence the explicit modprobe.  Raises
    KernelAttachError(ENOENT) naming the reason when the kernel has no nbd
    support.
    """
    with GenlSocket() as sock:
        try:
            return sock.family(nl.NBD_FAMILY)
        except KernelAttachError as exc:
            if exc.errno != errno.ENOENT:
                raise
        modprobe = shutil.which("modprobe") or "/sbin/modprobe"
        try:
            proc = subprocess.run(
                [modprobe, "nbd"], capture_output=True, text=True, timeout=MODPROBE_TIMEOUT
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KernelAttachError(
                errno.ENOENT, f"the kernel has no nbd driver loaded and modprobe failed: {exc}"
            ) from exc
        if proc.returncode != 0:
            reason = proc.stderr.strip() or f"exit status {proc.returncode}"
            raise KernelAttachError(
                errno.ENOENT,
                f"the kernel has no nbd support: 'modprobe nbd' failed: {reason}",
            )
        try:
            return sock.family(nl.NBD_FAMILY)
        except KernelAttachError as exc:
            if exc.errno != errno.ENOENT:
                raise
            raise KernelAttachError(
                errno.ENOENT,
                "the kernel has no nbd support: 'modprobe nbd' succeeded but no 'nbd'"
                " netlink family exists (a kernel without CONFIG_BLK_DEV_NBD netlink?)",
            ) from exc


def nbd_loaded() -> bool:
    """True when the nbd driver is in the kernel, loaded or built in (no modprobe here)."""
    return os.path.isdir("/sys/module/nbd")


def _check_sockets(sockets: Sequence[socket.socket], server_flags: int, what: str) -> list[int]:
    if len(sockets) > 1 and not server_flags & TransmissionFlag.CAN_MULTI_CONN:
        raise KernelAttachError(
            errno.EINVAL,
            f"{what}: {len(sockets)} sockets need CAN_MULTI_CONN in the server flags"
            f" (0x{server_flags:x})",
        )
    for sock in sockets:
        if sock.type != socket.SOCK_STREAM:
            raise KernelAttachError(
                errno.EINVAL, f"{what}: socket fd {sock.fileno()} is not a stream socket"
            )
    return [sock.fileno() for sock in sockets]


def _check_block_size(block_size: int, what: str) -> None:
    if block_size < 512 or block_size > 65536 or block_size & (block_size - 1):
        raise KernelAttachError(
            errno.EINVAL,
            f"{what}: block size {block_size} is not a power of two between 512 and 65536",
        )


def connect(
    sockets: Sequence[socket.socket],
    size: int,
    *,
    server_flags: int,
    backend_id: str,
    block_size: int = 4096,
    timeout: int = DEFAULT_TIMEOUT,
    dead_conn_timeout: int = DEFAULT_DEAD_CONN_TIMEOUT,
    client_flags: int = 0,
    index: int | None = None,
) -> int:
    """Attach a device to already-served sockets; return its index N (``/dev/nbdN``).

    ``sockets``: the kernel ends, one per connection; several only when
    ``server_flags`` has CAN_MULTI_CONN.  ``size`` in bytes (the kernel rounds
    it down to a multiple of ``block_size``).  ``server_flags``: the NBD
    transmission flags the server uses on these sockets (READ_ONLY makes the
    device read-only).  ``backend_id``: free text shown in
    ``/sys/block/nbdN/backend``, required again by ``reconfigure``.
    ``index``: a given device (EBUSY if in use), or None for a free one.
    ``client_flags``: ``netlink.ClientFlag`` bits.
    """
    what = f"nbd CONNECT of {backend_id!r}"
    if not sockets:
        raise KernelAttachError(errno.EINVAL, f"{what}: no sockets")
    if size <= 0:
        raise KernelAttachError(errno.EINVAL, f"{what}: size {size} must be positive")
    if timeout <= 0:
        raise KernelAttachError(
            errno.EINVAL, f"{what}: timeout {timeout} must be positive (0 never resends)"
        )
    _check_block_size(block_size, what)
    fds = _check_sockets(sockets, server_flags, what)
    with GenlSocket() as sock:
        family = _nbd_family(sock)
        seq = sock.next_seq()
        replies = sock.request(
            what,
            nl.connect_request(
                family.id,
                seq,
                fds=fds,
                size=size,
                block_size=block_size,
                server_flags=server_flags,
                client_flags=client_flags,
                timeout=timeout,
                dead_conn_timeout=dead_conn_timeout,
                backend_id=_backend(family, backend_id),
                index=index,
            ),
            seq,
        )
    if not replies:
        raise KernelAttachError(errno.EPROTO, f"{what}: the kernel replied without a device index")
    try:
        return nl.parse_index(replies[0])
    except nl.NetlinkError as exc:
        raise KernelAttachError(errno.EPROTO, f"{what}: {exc}") from exc


def _backend(family: nl.Family, backend_id: str | None) -> str | None:
    """The backend identifier, or None on kernels that predate the attribute."""
    if backend_id is None or family.maxattr < nl.NbdAttr.BACKEND_IDENTIFIER:
        return None
    return backend_id


def reconfigure(
    index: int,
    sockets: Sequence[socket.socket] = (),
    *,
    backend_id: str | None,
    size: int | None = None,
    block_size: int | None = None,
    timeout: int | None = None,
    dead_conn_timeout: int | None = None,
    client_flags: int | None = None,
) -> None:
    """Give a connected device fresh sockets and/or new settings.

    Each socket replaces one *dead* connection (see the module docstring for
    the restart recipe); ``backend_id`` must equal the one given to
    ``connect`` (``backend(index)`` reads it).  ``size``/``block_size`` resize
    the device online; None leaves a setting as it is.  The server flags
    cannot change: serve the new sockets with the same flags as the old ones.

    The kernel reports success even for sockets it did not take (no dead
    slot), so each socket is checked afterwards: the kernel sets its send
    timeout to the device's request timeout when it adopts it.  A socket left
    untouched raises KernelAttachError(EBUSY).  This needs a device timeout
    above zero, which ``connect`` guarantees.
    """
    what = f"nbd RECONFIGURE of /dev/nbd{index}"
    if block_size is not None:
        _check_block_size(block_size, what)
    fds = [sock.fileno() for sock in sockets]
    for kernel_end in sockets:
        _set_send_timeout(kernel_end, 0)
    with GenlSocket() as sock:
        family = _nbd_family(sock)
        seq = sock.next_seq()
        sock.request(
            what,
            nl.reconfigure_request(
                family.id,
                seq,
                index,
                fds=fds,
                backend_id=_backend(family, backend_id),
                size=size,
                block_size=block_size,
                timeout=timeout,
                dead_conn_timeout=dead_conn_timeout,
                client_flags=client_flags,
            ),
            seq,
        )
    untaken = [kernel_end.fileno() for kernel_end in sockets if not _send_timeout(kernel_end)]
    if untaken:
        raise KernelAttachError(
            errno.EBUSY,
            f"{what}: the kernel did not take socket fds {untaken}: no connection of the"
            " device was dead (is its old server still connected?)",
        )


#: struct timeval, as SO_SNDTIMEO takes and returns it.
TIMEVAL = struct.Struct("@ll")


def _set_send_timeout(sock: socket.socket, seconds: int) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, TIMEVAL.pack(seconds, 0))


def _send_timeout(sock: socket.socket) -> float:
    sec, usec = TIMEVAL.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, TIMEVAL.size))
    return sec + usec / 1e6


def disconnect(index: int) -> None:
    """Detach ``/dev/nbdN``: the kernel sends DISC on every socket and closes them.

    I/O still queued on the device fails, so unmount (or close) it first; a
    last close writes back the device's page cache.
    """
    what = f"nbd DISCONNECT of /dev/nbd{index}"
    with GenlSocket() as sock:
        family = _nbd_family(sock)
        seq = sock.next_seq()
        sock.request(what, nl.disconnect_request(family.id, seq, index), seq)


def status(index: int | None = None) -> dict[int, bool]:
    """{index: connected} for every nbd device, or only ``index`` (empty if absent)."""
    what = "nbd STATUS" if index is None else f"nbd STATUS of /dev/nbd{index}"
    with GenlSocket() as sock:
        family = _nbd_family(sock)
        seq = sock.next_seq()
        replies = sock.request(what, nl.status_request(family.id, seq, index), seq)
    devices: dict[int, bool] = {}
    try:
        for reply in replies:
            devices.update(nl.parse_status(reply))
    except nl.NetlinkError as exc:
        raise KernelAttachError(errno.EPROTO, f"{what}: {exc}") from exc
    return devices


def backend(index: int) -> str | None:
    """The backend identifier of ``/dev/nbdN`` (what ``reconfigure`` must present).

    None when the device is not connected or the kernel does not keep one.
    A new server taking over a device reads it here.
    """
    try:
        with open(f"/sys/block/nbd{index}/backend") as f:
            text = f.read().rstrip("\n")
    except (FileNotFoundError, NotADirectoryError):
        return None
    return text or None


class LinkDeadWatcher:
    """Receives the kernel's LINK_DEAD events (a device lost a socket).

    Subscribe *before* stopping the server whose sockets are to die, then
    ``wait(index, count)``.  Use as a context manager.
    """

    def __init__(self) -> None:
        self._genl = GenlSocket()
        try:
            family = _nbd_family(self._genl)
            group = family.mcast_groups.get(nl.NBD_MCAST_GROUP)
            if group is None:
                raise KernelAttachError(
                    errno.ENOENT, f"the nbd netlink family has no {nl.NBD_MCAST_GROUP!r} group"
                )
            self._genl.sock.setsockopt(nl.SOL_NETLINK, nl.NETLINK_ADD_MEMBERSHIP, group)
        except BaseException:
            self._genl.close()
            raise
        self._family = family.id
        self.events: list[int] = []

    def close(self) -> None:
        self._genl.close()

    def __enter__(self) -> LinkDeadWatcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def wait(self, index: int, count: int = 1, timeout: float = 30.0) -> None:
        """Block until ``count`` LINK_DEAD events for ``index`` arrived in total."""
        deadline = time.monotonic() + timeout
        while self.events.count(index) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise KernelAttachError(
                    errno.ETIMEDOUT,
                    f"/dev/nbd{index}: {self.events.count(index)} of {count} LINK_DEAD"
                    f" events in {timeout:.0f} s",
                )
            try:
                datagram = self._genl.receive(remaining)
            except KernelAttachError:
                continue
            try:
                for message in nl.split_messages(datagram):
                    if message.type != self._family:
                        continue
                    event = nl.parse_genl(message, "nbd multicast event")
                    if event.cmd == nl.NbdCmd.LINK_DEAD:
                        self.events.append(nl.parse_index(event))
            except nl.NetlinkError as exc:
                raise KernelAttachError(errno.EPROTO, str(exc)) from exc
