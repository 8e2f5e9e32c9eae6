"""The spawner's rehearsal: one whole tapdisk life, run once before the first fork.

CPython 3.11 rewrites a function's bytecode in place during its first calls, and a
daemon creates some objects (logger caches, enum and struct lookups) on first use.
Whatever a forked tapdisk does first for itself lands in pages of its own.  So the
spawner plays the part once, as SM drives a tapdisk: a daemon on a private control
directory, ``open`` of a small VHD, an NBD client (a thread of the spawner speaking the
protocol with our own codec's structs) that writes, reads and flushes, and shutdown.
The code on that path is then specialized in the spawner, shared by every child.

Nothing of it may outlive the rehearsal: its loop is closed, the I/O pool's threads are
joined (``fileio.shutdown_io_pool``), and no thread may be alive at a fork.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator

from tapdisk.ctl.client import Client
from tapdisk.drivers import fileio
from tapdisk.drivers.imageops import create_image
from tapdisk.nbd.constants import (
    CLIENT_FLAGS,
    GREETING,
    IHAVEOPT,
    OPTION_HEADER,
    OPTION_REPLY_HEADER,
    REPLY_FLAG_DONE,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_HEADER,
    U16,
    U32,
    ClientFlag,
    Command,
    Info,
    Option,
    Reply,
)

from ..loop import run_loop
from .operations import Daemon

log = logging.getLogger("tapdisk.spawner")

#: Size of the VHD the rehearsal serves.
IMAGE_SIZE = 1024 * 1024
#: Bytes per request and requests of each kind (the bench's 4 KiB; enough calls for
#: CPython to specialize the request path).
BLOCK = 4096
ROUNDS = 64
#: Seconds any step of the client may take.
STEP_TIMEOUT = 10.0


def rehearse() -> None:
    """Run one tapdisk life in this process; a failure costs memory only, and is logged.

    Raises RuntimeError if a thread is alive afterwards: a fork would then be unsafe.
    """
    try:
        with tempfile.TemporaryDirectory(prefix="tapdisk-rehearsal-") as tmp:
            image = os.path.join(tmp, "rehearsal.vhd")
            create_image("vhd", image, IMAGE_SIZE)
            control = os.path.join(tmp, "ctl")
            os.mkdir(control, 0o700)
            with _stderr_discarded():  # logged as by a tapdisk, but no line is a real one's
                try:
                    run_loop(_daemon(control, image))
                finally:
                    fileio.shutdown_io_pool()
    except Exception as exc:
        log.warning("spawner: rehearsal failed, tapdisks will use more memory: %s", exc)
    if threading.active_count() != 1:
        raise RuntimeError("a thread of the rehearsal outlived it; forking is unsafe")


@contextlib.contextmanager
def _stderr_discarded() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


async def _daemon(control: str, image: str) -> int:
    daemon = Daemon(control, exit_when_idle=True)
    await daemon.start()
    try:
        await asyncio.to_thread(_client, control, daemon.pid, image)
    finally:
        await daemon.shutdown()
    return 0


def _client(control: str, pid: int, image: str) -> None:
    """What SM and a VM do to a tapdisk: open, requests over NBD, close."""
    with Client.connect(control, pid, STEP_TIMEOUT) as daemon:
        info = daemon.call("open", spec=f"vhd:{image}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as nbd:
            nbd.settimeout(STEP_TIMEOUT)
            nbd.connect(info["nbd_socket"])
            _handshake(nbd)
            data = os.urandom(BLOCK)
            for i in range(ROUNDS):
                _request(nbd, Command.WRITE, i * BLOCK, data)
                _request(nbd, Command.READ, i * BLOCK)
            _request(nbd, Command.FLUSH, 0)
            nbd.sendall(REQUEST.pack(REQUEST_MAGIC, 0, Command.DISC, 0, 0, 0))
        daemon.call("close", minor=info["minor"])


def _handshake(nbd: socket.socket) -> None:
    """libnbd's negotiation: structured replies, then GO asking for the block sizes."""
    _receive(nbd, GREETING.size)
    nbd.sendall(CLIENT_FLAGS.pack(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES))
    _option(nbd, Option.STRUCTURED_REPLY, b"")
    _option(nbd, Option.GO, U32.pack(0) + U16.pack(1) + U16.pack(Info.BLOCK_SIZE))


def _option(nbd: socket.socket, option: Option, data: bytes) -> None:
    nbd.sendall(OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data)
    while True:
        _, _, reply, length = OPTION_REPLY_HEADER.unpack(_receive(nbd, OPTION_REPLY_HEADER.size))
        _receive(nbd, length)
        if reply == Reply.ACK:
            return
        if reply != Reply.INFO:
            raise ConnectionError(f"NBD option {option.name} refused ({reply:#x})")


def _request(nbd: socket.socket, command: Command, offset: int, data: bytes = b"") -> None:
    """One request and its reply, simple or structured (a READ's data comes in chunks)."""
    length = BLOCK if command in (Command.READ, Command.WRITE) else 0
    nbd.sendall(REQUEST.pack(REQUEST_MAGIC, 0, command, offset, offset, length) + data)
    (magic,) = U32.unpack(_receive(nbd, U32.size))
    if magic == SIMPLE_REPLY_MAGIC:
        rest = _receive(nbd, SIMPLE_REPLY.size - U32.size)
        _, error, _ = SIMPLE_REPLY.unpack(U32.pack(magic) + rest)
        if error:
            raise OSError(error, f"NBD {command.name} failed")
        if command == Command.READ:
            _receive(nbd, length)
        return
    flags = 0
    while not flags & REPLY_FLAG_DONE:
        if magic is None:
            (magic,) = U32.unpack(_receive(nbd, U32.size))
        rest = _receive(nbd, STRUCTURED_HEADER.size - U32.size)
        _, flags, kind, _, size = STRUCTURED_HEADER.unpack(U32.pack(magic) + rest)
        if kind & 0x8000:
            raise OSError(f"NBD {command.name} failed")
        _receive(nbd, size)
        magic = None


def _receive(nbd: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = nbd.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the rehearsal's tapdisk hung up")
        data += chunk
    return data
