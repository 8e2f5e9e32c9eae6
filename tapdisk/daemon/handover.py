"""Live hand-over: a new tapdisk takes every VBD of a running one, sockets and all.

``tap-ctl restart`` uses it to replace a tapdisk under a live ``/dev/nbdN`` and under
connected NBD clients without a stall: no socket closes, so neither the kernel nor
a client notices more than a pause of a few milliseconds.  The successor N pulls
from the predecessor O over O's control socket:

1. tap-ctl spawns N and sends it ``adopt {pid: O}``; N connects to ``ctl<O>`` and
   sends ``handover {pid: N}``.
2. O holds: it stops accepting on its NBD listeners and stops reading from every
   connection at a request boundary (bytes read and not yet decoded stay in the
   connection's reader), waits until every request read is answered and its reply
   sent, then pauses every running VBD (flushed, image closed).
3. O answers with its state: the minors, and for each VBD its spec, options,
   statistics, pause state, kernel index, NBD socket path, listeners and
   connections with what they negotiated (or, still in their handshake, with
   what they negotiated so far: the successor continues the handshake).  The
   descriptors ride on the first bytes of that answer (SCM_RIGHTS): the minors'
   markers (their ``flock`` goes along), the listening sockets, the connections,
   and a memfd of each connection's undecoded bytes.
4. N opens every image (a VBD paused in O is paused again) and sends ``confirm``.
5. O answers ``confirm`` and from then on touches nothing but the connections it
   could not hand over (TLS), which it closes cleanly (close_notify, every reply
   sent); it removes its control socket and exits.  N, once it has that answer,
   serves the listeners and connections, feeding each connection its undecoded
   bytes first.

A failure before step 5 (N cannot open an image, dies, or is silent for
``CONFIRM_TIMEOUT``; O's requests do not settle within ``QUIESCE_TIMEOUT``) leaves O
serving as before: it unpauses what it paused, accepts and reads again.  N then
closes what it received without touching a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tapdisk.ctl import protocol
from tapdisk.ctl.protocol import ControlProtocolError, Request, Response

from ..connection import NBDConnection
from ..export import DirectAttach
from ..iostats import Stats
from ..nbd.constants import TransmissionFlag
from ..nbd.handshake import Handshake
from .device import Device
from .errors import ControlError
from .holdtime import Phases, all_of, flush_ahead
from .minors import Minor


class Daemon(Protocol):
    """What the hand-over needs of ``operations.Daemon`` (which imports this module)."""

    pid: int
    directory: str
    config: str | None
    minors: dict[int, Minor]
    handing_over: bool

    def info(self, minor: Minor) -> dict[str, Any]: ...

    def vacate(self) -> None: ...

    async def open_adopted(
        self, number: int, args: dict[str, Any], timeout: float, path: str
    ) -> Device: ...


log = logging.getLogger("tapdisk.daemon")

#: Seconds O waits for the requests it has read to be answered before it gives up.
QUIESCE_TIMEOUT = 10.0
#: Seconds O waits for N's ``confirm`` after handing its state over.
CONFIRM_TIMEOUT = 30.0
#: Seconds O gives the connections it did not hand over (TLS) to close once N confirmed.
CLOSE_TIMEOUT = 1.0
#: Descriptors per SCM_RIGHTS message (the kernel's limit is 253).
FDS_PER_MESSAGE = 250


# -- the predecessor's side --------------------------------------------------------


@dataclass
class _Hold:
    """O's VBDs while held: what to give back if the hand-over fails."""

    devices: list[Device]
    listeners: dict[int, list[tuple[socket.socket, str | None]]] = field(default_factory=dict)
    paused_here: list[Device] = field(default_factory=list)
    #: Per minor: the secondary (spec, standby) it mirrored to before the pause closed it.
    secondaries: dict[int, tuple[str, bool]] = field(default_factory=dict)

    def connections(self, device: Device) -> list[NBDConnection]:
        return list(device.server.connections)  # type: ignore[arg-type]

    async def quiesce(self) -> None:
        """Stop accepting and reading; wait until every request read is answered."""
        for device in self.devices:
            self.listeners[device.minor] = device.server.take_listeners()
        while True:
            busy = False
            for device in self.devices:
                for connection in self.connections(device):
                    connection.hold()  # again for one accepted as the listener closed
                    busy = busy or not _settled(connection)
            if not busy:
                return
            await asyncio.sleep(0.001)

    async def pause(self) -> None:
        """Pause every running VBD, all at once: the hold lasts the slowest flush, not
        their sum.  Raises the first failure once every pause has ended."""
        await all_of(self._pause(device) for device in self.devices)

    async def _pause(self, device: Device) -> None:
        vbd = device.vbd
        if not vbd.paused:
            mirror = vbd.mirror
            if vbd.secondary is not None and mirror is not None:
                self.secondaries[device.minor] = (vbd.secondary, mirror.standby)
            await vbd.pause()
            self.paused_here.append(device)

    async def release(self) -> None:
        """Serve again as before the hold (the hand-over failed)."""
        for device in self.paused_here:
            secondary, standby = self.secondaries.get(device.minor, (None, False))
            try:
                await device.vbd.unpause(None, device.vbd.cbt_log, secondary, standby)
            except Exception as exc:
                device.resume_failed = True
                log.error("minor %d: not resumed after a failed hand-over: %s", device.minor, exc)
        for device in self.devices:
            for sock, path in self.listeners.pop(device.minor, []):
                await device.server.listen_socket(sock, path)
            for connection in self.connections(device):
                connection.hold(False)


# connection.py is the hot path, kept small: its state is read here.


def _settled(connection: NBDConnection) -> bool:
    """Every request the connection read is answered and every reply has left."""
    transport = connection.transport
    return (
        not connection._in_flight
        and not connection._backlog
        and not connection._batch  # replies collected this turn, sent at its end
        and (transport is None or not transport.get_write_buffer_size())
    )


def _handed_over(connection: NBDConnection) -> bool:
    """Without TLS, in transmission or in a handshake: a connection the successor can serve.

    A TLS session cannot leave the process: those connections are closed cleanly once
    the successor confirmed (``_close_cleanly``), and their clients reconnect.
    """
    transport = connection.transport
    handshake = connection._handshake
    return (
        (connection.export is not None or (handshake is not None and handshake.state() is not None))
        and transport is not None
        and not transport.is_closing()
        and transport.get_extra_info("ssl_object") is None
    )


def _busy(device: Device) -> str | None:
    """What a device is doing that a hand-over cannot carry (None: nothing)."""
    if device.closing:
        return "closing"
    if device.running_migration is not None:
        return "migrating"
    if (job := device.running_commit) is not None:
        return f"committing {job.path} (tap-ctl cancel stops it)"
    return None


def _passed_sockets(daemon: Daemon) -> list[str]:
    """Why each VBD whose image or secondary is a socket passed to this process cannot move:
    libnbd connects a socket only by negotiating on it, and the server negotiates once."""
    from tapdisk.drivers.nbdclient import opens_passed_socket  # rarely needed: not at startup

    why = []
    for minor in daemon.minors.values():
        device = minor.device
        if device is None:
            continue
        for spec in (device.served, device.vbd.secondary):
            if spec is not None and opens_passed_socket(spec):
                why.append(
                    f"minor {minor.number} uses {spec}, a socket passed to tapdisk "
                    f"{daemon.pid} that no other process can open"
                )
    return why


class _Outgoing:
    """The descriptors of O's answer, numbered in the order they are sent."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self._owned: list[int] = []

    def add(self, fd: int, *, owned: bool = False) -> int:
        """Number ``fd``; ``owned``: made for the hand-over, closed afterwards."""
        self.fds.append(fd)
        if owned:
            self._owned.append(fd)
        return len(self.fds) - 1

    def close(self) -> None:
        for fd in self._owned:
            os.close(fd)
        self._owned.clear()


def _state(daemon: Daemon, hold: _Hold, out: _Outgoing) -> dict[str, Any]:
    """O's minors and VBDs as N needs them, descriptors as indexes into ``out.fds``."""
    minors = []
    for minor in daemon.minors.values():
        entry: dict[str, Any] = {
            "minor": minor.number,
            "lock": out.add(minor.lock_fd),
            "owned": minor.owned,
            "closed": minor.closed,
            "device": None,
        }
        device = minor.device
        if device is not None:
            vbd = device.vbd
            secondary, standby = hold.secondaries.get(device.minor, (None, False))
            entry["device"] = {
                "secondary": secondary,
                "standby": standby,
                "spec": device.served,
                "mirror_failed": vbd.mirror_failed,
                "read_only": vbd.read_only,
                "timeout": vbd.limits.timeout,
                "cbt_log": vbd.cbt_log,
                "nbd_socket": device.nbd_socket,
                "kernel_index": device.kernel_index,
                "paused": device not in hold.paused_here,
                "resume_failed": device.resume_failed,
                "stats": stats_state(vbd.stats),
                "listeners": [
                    {"fd": out.add(sock.fileno()), "path": path}
                    for sock, path in hold.listeners.get(device.minor, [])
                ],
                "connections": [
                    _connection_state(connection, out)
                    for connection in hold.connections(device)
                    if _handed_over(connection)
                ],
            }
        minors.append(entry)
    return {"pid": daemon.pid, "minors": minors}


def _connection_state(connection: NBDConnection, out: _Outgoing) -> dict[str, Any]:
    """What the connection negotiated, or, in a handshake, where the handshake stopped."""
    assert connection.transport is not None
    sock = connection.transport.get_extra_info("socket")
    handshake = connection._handshake
    unread = connection._reader.unread() if handshake is None else handshake.unread()
    unread_fd = None
    if unread:
        memfd = os.memfd_create("tapdisk-unread", os.MFD_CLOEXEC)
        os.write(memfd, unread)
        unread_fd = out.add(memfd, owned=True)
    state: dict[str, Any] = {
        "fd": out.add(os.dup(sock.fileno()), owned=True),
        "unread": unread_fd,
        "unread_size": len(unread),
    }
    if handshake is not None:
        return {**state, "handshake": handshake.state()}
    assert connection.export is not None
    return {
        **state,
        "export": connection.export.name,
        "flags": connection.flags,
        "structured": connection.structured,
        "contexts": [list(context) for context in connection.contexts],
    }


def stats_state(stats: Stats) -> dict[str, Any]:
    """A VBD's counters as JSON."""
    state = {name: getattr(stats, name) for name in Stats.__slots__ if name != "errors"}
    state["errors"] = [[op, name, count] for (op, name), count in stats.errors.items()]
    return state


def restore_stats(stats: Stats, state: dict[str, Any]) -> None:
    """Continue counting from a predecessor's counters."""
    for name in Stats.__slots__:
        if name == "errors":
            stats.errors = {(op, errno): count for op, errno, count in state["errors"]}
        elif name in state:
            setattr(stats, name, state[name])


async def give(
    daemon: Daemon,
    message: dict[str, Any],
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    decoder: protocol.Decoder,
) -> None:
    """Serve a ``handover`` request (steps 2, 3 and 5 of the module docstring)."""
    try:
        request = protocol.parse_request(message)
    except ControlProtocolError as exc:
        await _answer(writer, Response.failure(0, "invalid", str(exc)))
        return
    successor = request.args["pid"]
    busy = [
        f"minor {m.number} is {why}"
        for m in daemon.minors.values()
        if m.device is not None and (why := _busy(m.device))
    ] + _passed_sockets(daemon)
    if busy or daemon.handing_over:
        why = busy[0] if busy else "a hand-over is under way"
        await _answer(writer, Response.failure(request.id, "state", f"cannot hand over: {why}"))
        return
    daemon.handing_over = True
    devices = [m.device for m in daemon.minors.values() if m.device is not None]
    hold = _Hold(devices)
    out = _Outgoing()
    try:
        await flush_ahead(devices)
        phases = Phases()
        try:
            await asyncio.wait_for(hold.quiesce(), QUIESCE_TIMEOUT)
        except TimeoutError:
            raise ControlError(
                "state", f"requests still unanswered after {QUIESCE_TIMEOUT:g} s"
            ) from None
        phases.mark("quiesce")
        await hold.pause()
        phases.mark("pause")
        state = _state(daemon, hold, out)
        state["phases"] = phases.to_json()
        left_behind = [c for d in devices for c in hold.connections(d) if not _handed_over(c)]
        await _answer(writer, Response.success(request.id, state), out.fds)
        log.info(
            "handed the state of %d minor(s) to tapdisk %d, %d connection(s) left behind",
            len(state["minors"]),
            successor,
            len(left_behind),
        )
        confirm = await asyncio.wait_for(_next_message(reader, decoder), CONFIRM_TIMEOUT)
        if confirm is None or confirm.get("op") != "confirm":
            raise ControlError("state", f"tapdisk {successor} did not confirm")
        # Once this answer is out the successor serves: nothing here may touch a socket
        # but those of the connections left behind.
        await _answer(writer, Response.success(confirm.get("id", 0), None))
        await _close_cleanly(left_behind)
    except Exception as exc:
        why = "did not confirm in time" if isinstance(exc, TimeoutError) else str(exc)
        log.warning("hand-over to tapdisk %d failed, serving on: %s", successor, why)
        with contextlib.suppress(OSError, ControlProtocolError):
            await _answer(writer, Response.failure(request.id, "state", why))
        await hold.release()
        daemon.handing_over = False
        return
    finally:
        out.close()
    log.info(
        "tapdisk %d took over every minor after a %.0f ms hold: exiting",
        successor,
        (time.monotonic() - phases.start) * 1000,
    )
    daemon.vacate()


async def _close_cleanly(connections: list[NBDConnection]) -> None:
    """Close the connections not handed over (TLS), every reply sent: a TLS close_notify
    rather than an end of stream, so their clients see a clean close and reconnect."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(
            asyncio.gather(*(connection.drain_and_close() for connection in connections)),
            CLOSE_TIMEOUT,
        )


async def _answer(
    writer: asyncio.StreamWriter, response: Response, fds: Sequence[int] = ()
) -> None:
    """Write one response; ``fds`` ride on its first bytes, ``FDS_PER_MESSAGE`` per byte."""
    frame = protocol.encode(response)
    await writer.drain()  # nothing of ours may be queued before the bytes sent below
    chunks = [fds[i : i + FDS_PER_MESSAGE] for i in range(0, len(fds), FDS_PER_MESSAGE)]
    if chunks:
        fd = writer.get_extra_info("socket").fileno()
        with socket.socket(fileno=os.dup(fd)) as raw:
            for index, chunk in enumerate(chunks):
                while True:
                    try:
                        socket.send_fds(raw, [frame[index : index + 1]], chunk)
                        break
                    except BlockingIOError:
                        await asyncio.sleep(0.001)
    writer.write(frame[len(chunks) :])
    await writer.drain()


async def _next_message(
    reader: asyncio.StreamReader, decoder: protocol.Decoder
) -> dict[str, Any] | None:
    """The next message on the connection; None at its end."""
    while True:
        data = await reader.read(65536)
        if not data:
            return None
        messages = decoder.feed(data)
        if messages:
            return messages[0]


# -- the successor's side ----------------------------------------------------------


@dataclass
class _Taken:
    """What N received: minors and devices built, nothing served yet."""

    fds: list[int]
    minors: list[Minor] = field(default_factory=list)
    #: Per minor number: (listeners, connections) to serve after the confirm.
    sockets: dict[int, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = field(
        default_factory=dict
    )

    async def discard(self) -> None:
        """Close the images opened and every descriptor received, touching no socket."""
        for minor in self.minors:
            if minor.device is not None:
                await minor.device.vbd.close()
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)


async def adopt(daemon: Daemon, predecessor: int) -> list[dict[str, Any]]:
    """Take every VBD of tapdisk ``predecessor`` (steps 1, 4 and 5); VBD-INFO of each."""
    if daemon.minors:
        raise ControlError("state", f"tapdisk {daemon.pid} already has minors: cannot adopt")
    if predecessor == daemon.pid:
        raise ControlError("invalid", "a tapdisk cannot adopt itself")
    path = protocol.control_socket(daemon.directory, predecessor)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(QUIESCE_TIMEOUT + CONFIRM_TIMEOUT)
    decoder = protocol.Decoder()
    try:
        try:
            await asyncio.to_thread(sock.connect, path)
            request = Request(1, "handover", {"pid": daemon.pid})
            response, fds = await asyncio.to_thread(_call, sock, decoder, request)
        except (OSError, ControlProtocolError) as exc:
            raise ControlError("os", f"tapdisk {predecessor}: {exc}") from None
        if not response.ok:
            kind = "unsupported" if response.kind == "invalid" else response.kind
            message = f"tapdisk {predecessor} did not hand over: {response.message}"
            raise ControlError(kind, message)
        phases = Phases.from_json(response.result.get("phases"))
        phases.mark("state")
        taken = _Taken(fds)
        try:
            await _take(daemon, response.result, taken)
            phases.mark("open")
            confirmed, _ = await asyncio.to_thread(_call, sock, decoder, Request(2, "confirm"))
            if not confirmed.ok:
                raise ControlError("state", f"tapdisk {predecessor}: {confirmed.message}")
            phases.mark("confirm")
        except BaseException as exc:
            await taken.discard()
            if isinstance(exc, OSError | ControlProtocolError):
                raise ControlError("os", f"tapdisk {predecessor}: {exc}") from None
            raise
    finally:
        sock.close()
    await _serve(daemon, taken)
    phases.mark("serve")
    log.info(
        "took %d minor(s) over from tapdisk %d: its sockets were held %.0f ms (%s)",
        len(taken.minors),
        predecessor,
        phases.total_ms,
        phases,
    )
    return [daemon.info(minor) for minor in taken.minors]


def _call(
    sock: socket.socket, decoder: protocol.Decoder, request: Request
) -> tuple[Response, list[int]]:
    """Send ``request`` and read its response with the descriptors riding on it (blocking)."""
    sock.sendall(protocol.encode(request))
    fds: list[int] = []
    while True:
        data, received, flags, _ = socket.recv_fds(sock, 1 << 16, FDS_PER_MESSAGE)
        for fd in received:
            os.set_inheritable(fd, False)
        fds += received
        if flags & socket.MSG_CTRUNC:
            raise ControlProtocolError("descriptors were lost (MSG_CTRUNC)")
        if not data:
            for fd in fds:
                os.close(fd)
            raise ConnectionError("the control connection closed")
        messages = decoder.feed(data)
        if messages:
            return protocol.parse_response(messages[0]), fds


async def _take(daemon: Daemon, state: dict[str, Any], taken: _Taken) -> None:
    """Open every image of the predecessor's ``state``; serve nothing yet."""
    fds = taken.fds
    opening = []
    for entry in state["minors"]:
        minor = Minor(entry["minor"], fds[entry["lock"]], owned=entry["owned"])
        minor.closed = entry["closed"]
        taken.minors.append(minor)
        if entry["device"] is not None:
            opening.append(_take_device(daemon, minor, entry["device"], taken))
    await all_of(opening)  # the images open concurrently: the hold lasts the slowest


async def _take_device(daemon: Daemon, minor: Minor, spec: dict[str, Any], taken: _Taken) -> None:
    """Open one VBD of the predecessor's state as ``minor``'s device; serve nothing yet."""
    args = {
        "spec": spec["spec"],
        "read_only": spec["read_only"],
        "cbt_log": spec["cbt_log"],
        "secondary": spec["secondary"],
        "standby": spec["standby"],
    }
    device = await daemon.open_adopted(minor.number, args, spec["timeout"], spec["nbd_socket"])
    minor.device = device
    device.kernel_index = spec["kernel_index"]
    device.resume_failed = spec["resume_failed"]
    device.vbd.mirror_failed = spec["mirror_failed"]
    restore_stats(device.vbd.stats, spec["stats"])
    if spec["paused"]:
        await device.vbd.pause()
    taken.sockets[minor.number] = (spec["listeners"], spec["connections"])


async def _serve(daemon: Daemon, taken: _Taken) -> None:
    """Register the minors and serve the connections received, all at once (the requests
    sent during the hold wait in them), then the listeners."""
    fds = taken.fds
    connections = []
    for minor in taken.minors:
        daemon.minors[minor.number] = minor
        if minor.device is not None:
            for entry in taken.sockets[minor.number][1]:
                connections.append(_serve_connection(minor.device, entry, fds))
    await all_of(connections)
    for minor in taken.minors:
        if minor.device is not None:
            for listener in taken.sockets[minor.number][0]:
                sock = socket.socket(fileno=fds[listener["fd"]])
                await minor.device.server.listen_socket(sock, listener["path"])


async def _serve_connection(device: Device, entry: dict[str, Any], fds: list[int]) -> None:
    """Read on from a connection received, its undecoded bytes first (or continue its
    handshake)."""
    unread = b""
    if entry["unread"] is not None:
        unread = os.pread(fds[entry["unread"]], entry["unread_size"], 0)
        os.close(fds[entry["unread"]])
    direct: DirectAttach | Handshake
    if "handshake" in entry:
        direct = device.server.handshake()
        direct.restore(entry["handshake"], unread)
    else:
        direct = DirectAttach(
            entry["export"],
            TransmissionFlag(entry["flags"]),
            entry["structured"],
            tuple((int(cid), str(name)) for cid, name in entry["contexts"]),
            unread,
        )
    await device.server.serve_socket(socket.socket(fileno=fds[entry["fd"]]), direct)
