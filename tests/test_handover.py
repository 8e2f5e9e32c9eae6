"""tap-ctl restart as a live hand-over, with a libnbd client connected over the unix socket.

The old tapdisk passes its listening and client sockets to the new one (see
tapdisk/daemon/handover.py): the client keeps its connection, its negotiated
state (structured replies, base:allocation) and every acknowledged write, and
never notices the restart.  Each failure of the new tapdisk leaves the old one
serving.  The kernel path is tested in tests/kernel/test_tapctl_restart.py.
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import threading
import time

import nbd
import pytest
from tapctl_helpers import connect as tapctl_connect
from tapctl_helpers import receive, wait_gone

from tapdisk.ctl.protocol import Decoder, Request, encode
from tapdisk.nbd.constants import (
    GREETING,
    IHAVEOPT,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    ClientFlag,
    Command,
    Option,
)
from tapdisk.nbd.transmission import RequestReader

MiB = 1 << 20
BLOCK = 64 * 1024


def connect(socket_path: str) -> nbd.NBD:
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(f"nbd+unix:///?socket={socket_path}")
    assert h.get_structured_replies_negotiated()
    return h


class Writer(threading.Thread):
    """Verified I/O from one libnbd handle until stopped: writes with many in flight, each
    block read back once acknowledged; an error or a mismatch is kept for ``finish``."""

    def __init__(self, h: nbd.NBD, size: int) -> None:
        super().__init__(name="libnbd-writer")
        self.h = h
        self.blocks = size // BLOCK
        self.expected: dict[int, bytes] = {}
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.rounds = 0

    def run(self) -> None:
        rng = random.Random(1)
        try:
            while not self.stop.is_set():
                offsets = [rng.randrange(self.blocks) * BLOCK for _ in range(16)]
                batch = {offset: rng.randbytes(BLOCK) for offset in offsets}
                for offset, data in batch.items():
                    self.h.aio_pwrite(data, offset)
                while self.h.aio_in_flight() > 0:
                    self.h.poll(-1)
                self.expected.update(batch)
                for offset, data in batch.items():
                    assert self.h.pread(BLOCK, offset) == data, f"other data at {offset}"
                self.rounds += 1
        except BaseException as exc:
            self.error = exc

    def finish(self) -> None:
        self.stop.set()
        self.join(60)
        if self.error is not None:
            raise self.error
        for offset, data in self.expected.items():
            assert self.h.pread(BLOCK, offset) == data, f"lost an acknowledged write at {offset}"


def restart(tapctl, pid: int) -> int:
    new = int(tapctl.out("restart", "-p", str(pid)))
    assert wait_gone(pid), f"the old tapdisk {pid} did not exit"
    return new


def test_restart_twice_keeps_a_libnbd_client_doing_verified_io(tapctl, raw_image):
    pid, _, path = tapctl.spawn_open(f"raw:{raw_image('16M')}")
    h = connect(path)
    writer = Writer(h, 16 * MiB)
    writer.start()
    try:
        for _ in range(2):
            rounds = writer.rounds
            while writer.rounds < rounds + 5 and writer.is_alive():
                writer.stop.wait(0.01)
            pid = restart(tapctl, pid)
    finally:
        writer.finish()
    assert writer.rounds > 10
    assert tapctl.pids() == [pid]
    extents: list[int] = []
    h.block_status(BLOCK, 0, lambda context, offset, entries, err: extents.extend(entries) or 0)
    assert extents, "base:allocation no longer answered after the hand-over"
    h.shutdown()


def test_restart_keeps_the_listing_but_the_pid_and_keeps_accepting_on_the_nbd_socket(
    tapctl, raw_image
):
    pid, _, path = tapctl.spawn_open(f"raw:{raw_image('16M')}")
    connect(path).pwrite(b"x" * 4096, 0)
    [before] = tapctl.listing()
    new = restart(tapctl, pid)
    [after] = tapctl.listing()
    assert after == {**before, "pid": new}
    h = connect(path)  # the listening socket moved too
    assert h.pread(4096, 0) == b"x" * 4096
    h.shutdown()


def test_restart_carries_the_statistics_and_the_pause_over(tapctl, raw_image):
    pid, minor, path = tapctl.spawn_open(f"raw:{raw_image('16M')}")
    h = connect(path)
    for i in range(7):
        h.pwrite(b"s" * 4096, i * 4096)
    tapctl("pause", "-p", str(pid), "-m", str(minor))
    new = restart(tapctl, pid)
    [info] = tapctl.listing()
    assert (info["pid"], info["state"]) == (new, 0x2A)
    stats = tapctl.out("stats", "-p", str(new), "-m", str(minor))
    assert '"writes": 7' in stats and '"paused": true' in stats
    cookie = h.aio_pread(nbd.Buffer(4096), 0)  # waits, as on any paused device
    tapctl("unpause", "-p", str(new), "-m", str(minor))
    while not h.aio_command_completed(cookie):
        h.poll(-1)
    assert '"writes": 7' in tapctl.out("stats", "-p", str(new), "-m", str(minor))
    h.shutdown()


def test_restart_moves_every_vbd_of_the_tapdisk(tapctl, raw_image):
    pid = int(tapctl.out("spawn"))
    paths = [
        tapctl.out("open", "-p", str(pid), "-a", f"raw:{raw_image('8M', name=f'd{i}.raw')}")
        for i in range(2)
    ]
    handles = [connect(path) for path in paths]
    for i, h in enumerate(handles):
        h.pwrite(bytes([65 + i]) * 4096, 0)
    new = restart(tapctl, pid)
    assert {row["pid"] for row in tapctl.listing()} == {new}
    for i, h in enumerate(handles):
        assert h.pread(4096, 0) == bytes([65 + i]) * 4096
        h.shutdown()


def test_a_new_tapdisk_that_cannot_open_the_image_leaves_the_old_one_serving(
    tapctl, raw_image, tmp_path
):
    pid, _, path = tapctl.spawn_open(f"raw:{raw_image('16M')}")
    h = connect(path)
    writer = Writer(h, 16 * MiB)
    writer.start()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    config = tmp_path / "tapdisk.yaml"
    config.write_text(f"allowed_dirs: [{elsewhere}]\n")
    try:
        proc = tapctl("restart", "--config", str(config), "-p", str(pid), check=False)
    finally:
        writer.finish()
    assert proc.returncode != 0
    assert proc.stdout == ""
    [line] = proc.stderr.splitlines()
    assert f"tapdisk {pid} serves on" in line and "outside the allowed directories" in line
    assert tapctl.pids() == [pid]
    [info] = tapctl.listing()
    assert (info["pid"], info["state"]) == (pid, 0)
    assert h.pread(4096, 0) is not None
    writer = Writer(h, 16 * MiB)
    writer.start()
    writer.stop.wait(0.5)
    writer.finish()
    assert writer.rounds > 0
    assert restart(tapctl, pid) != pid  # and the next restart works
    h.shutdown()


def test_a_new_tapdisk_that_opens_one_vbd_of_two_leaves_the_old_one_serving_both(
    tapctl, raw_image, tmp_path
):
    """The images open concurrently in the new tapdisk: the one it could open is closed
    again, and the old tapdisk serves both VBDs on."""
    allowed, elsewhere = tmp_path / "allowed", tmp_path / "elsewhere"
    allowed.mkdir()
    elsewhere.mkdir()
    pid = int(tapctl.out("spawn"))
    paths = [
        tapctl.out("open", "-p", str(pid), "-a", f"raw:{raw_image('8M', name=name)}")
        for name in ("elsewhere/d0.raw", "allowed/d1.raw")
    ]
    handles = [connect(path) for path in paths]
    config = tmp_path / "tapdisk.yaml"
    config.write_text(f"allowed_dirs: [{allowed}]\n")
    proc = tapctl("restart", "--config", str(config), "-p", str(pid), check=False)
    assert proc.returncode != 0 and "outside the allowed directories" in proc.stderr
    assert tapctl.pids() == [pid]
    assert [(row["pid"], row["state"]) for row in tapctl.listing()] == [(pid, 0), (pid, 0)]
    for i, h in enumerate(handles):
        h.pwrite(bytes([65 + i]) * 4096, 0)
        assert h.pread(4096, 0) == bytes([65 + i]) * 4096
    new = restart(tapctl, pid)
    for i, h in enumerate(handles):
        assert h.pread(4096, 0) == bytes([65 + i]) * 4096
        h.shutdown()
    assert tapctl.pids() == [new]


@pytest.mark.parametrize("successor_says", [b"", b"garbage"])
def test_a_successor_that_vanishes_before_it_confirms_leaves_the_old_one_serving(
    tapctl, raw_image, successor_says
):
    """This test plays the new tapdisk: it takes the old one's state and descriptors, then
    hangs up (it died) or sends something other than ``confirm``."""
    pid, _, path = tapctl.spawn_open(f"raw:{raw_image('16M')}")
    h = connect(path)
    h.pwrite(b"k" * 4096, 0)
    with tapctl_connect(tapctl, pid) as sock:
        sock.sendall(encode(Request(1, "handover", {"pid": 1})))
        decoder, fds, messages = Decoder(), [], []
        while not messages:
            data, received, _, _ = socket.recv_fds(sock, 1 << 16, 250)
            fds += received
            messages = decoder.feed(data)
        [minor_state] = messages[0]["result"]["minors"]
        assert minor_state["device"]["paused"] is False  # it was running: the old resumes it
        assert len(fds) == 3  # the minor's marker, the listener, the libnbd connection
        for fd in fds:
            os.close(fd)
        if successor_says:
            sock.sendall(encode(Request(2, "adopt", {"pid": 1})))
            [answer] = receive(sock, 1)
            assert not answer.ok and "did not confirm" in answer.message
    assert h.pread(4096, 0) == b"k" * 4096
    h.pwrite(b"l" * 4096, 4096)
    assert h.pread(4096, 4096) == b"l" * 4096
    assert tapctl.pids() == [pid]
    [info] = tapctl.listing()
    assert (info["pid"], info["state"]) == (pid, 0)
    connect(path).shutdown()  # it accepts again
    h.shutdown()


def raw_client(path: str) -> socket.socket:
    """A client in transmission the way the kernel's is: no structured replies, and
    requests written in pieces (a WRITE's header, then its payload page by page)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(path)
    sock.recv(GREETING.size, socket.MSG_WAITALL)
    flags = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES
    sock.sendall(struct.pack(">IQII", flags, IHAVEOPT, Option.EXPORT_NAME, 0))
    sock.recv(10, socket.MSG_WAITALL)  # size and transmission flags
    return sock


def reply(sock: socket.socket, cookie: int, length: int = 0) -> bytes:
    magic, error, got = SIMPLE_REPLY.unpack(sock.recv(SIMPLE_REPLY.size, socket.MSG_WAITALL))
    assert (magic, error, got) == (SIMPLE_REPLY_MAGIC, 0, cookie)
    return sock.recv(length, socket.MSG_WAITALL) if length else b""


def test_restarts_in_the_middle_of_requests_lose_no_byte(tapctl, raw_image):
    """Each restart comes while the old tapdisk has read part of a request (a WRITE's
    payload, then a header): the new one decodes the rest from the same socket, answers
    each request once, and the connection stays open and counted."""
    pid, minor, path = tapctl.spawn_open(f"raw:{raw_image('16M')}")
    sock = raw_client(path)
    payload = os.urandom(BLOCK)
    sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, Command.WRITE, 1, 0, BLOCK) + payload[:10000])
    time.sleep(0.2)  # read by the old tapdisk: a WRITE waiting for its payload
    pid = restart(tapctl, pid)
    sock.sendall(payload[10000:])
    reply(sock, 1)
    read = REQUEST.pack(REQUEST_MAGIC, 0, Command.READ, 2, 0, BLOCK)
    sock.sendall(read[:10])
    time.sleep(0.2)  # read by the old tapdisk: a header cut short
    pid = restart(tapctl, pid)
    sock.sendall(read[10:])
    assert reply(sock, 2, BLOCK) == payload
    stats = json.loads(tapctl.out("stats", "-p", str(pid), "-m", str(minor)))["vbd"]
    assert (stats["connections"], stats["writes"], stats["reads"]) == (1, 1, 1)
    sock.close()


@pytest.mark.parametrize("cut", [0, 5, 28, 28 + 1000, 28 + 4096])
def test_unread_bytes_decode_to_the_same_requests_in_a_new_reader(cut: int) -> None:
    """A reader's undecoded bytes, fed to a fresh reader with the rest of the stream,
    give the requests the first reader would have given (a hand-over mid-request)."""
    payload = os.urandom(4096)
    stream = REQUEST.pack(REQUEST_MAGIC, 0, Command.WRITE, 7, 0, 4096) + payload
    stream += REQUEST.pack(REQUEST_MAGIC, 0, Command.READ, 8, 4096, 512)
    first = RequestReader(1 << 20)
    first.get_buffer()[:cut] = stream[:cut]
    decoded = [(r.cookie, bytes(r.payload or b"")) for r in first.buffer_updated(cut)]
    rest = first.unread() + stream[cut:]
    second = RequestReader(1 << 20)
    buf = second.get_buffer()
    buf[: len(rest)] = rest
    decoded += [(r.cookie, bytes(r.payload or b"")) for r in second.buffer_updated(len(rest))]
    assert decoded == [(7, payload), (8, b"")]


def test_restart_keeps_mirroring_to_the_secondary(tapctl, raw_image):
    secondary = raw_image("16M", name="secondary.raw")
    pid = int(tapctl.out("spawn"))
    path = tapctl.out(
        "open", "-p", str(pid), "-a", f"raw:{raw_image('16M')}", "-2", f"raw:{secondary}"
    )
    h = connect(path)
    restart(tapctl, pid)
    h.pwrite(b"m" * 4096, 8192)
    h.flush()
    with open(secondary, "rb") as f:
        f.seek(8192)
        assert f.read(4096) == b"m" * 4096
    h.shutdown()
