"""The NBD client driver (``nbd:``): remote exports of qemu-nbd, nbdkit and tapdisk as images.

Each test starts a real upstream server, serves ``nbd:UPSTREAM`` with ``tapdisk serve``
and checks with real clients (nbdcopy, nbdinfo, qemu-io) that the bytes both ways, the
block status and the failures are what the upstream server holds and says.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import nbd
import pytest
from helpers import Served, require, run
from nbd_servers import Upstream, make_certificates, nbdkit, qemu_nbd, random_file
from tapctl_helpers import alive

SIZE = 16 << 20


def upstream_of(kind: str, tmp_path: Path) -> Upstream:
    """An empty writable SIZE-byte export of the kind of server named."""
    sock = tmp_path / "up.sock"
    if kind == "nbdkit-memory":
        return nbdkit(sock, "memory", str(SIZE))
    disk = tmp_path / "up.raw"
    disk.write_bytes(b"")
    with disk.open("r+b") as f:
        f.truncate(SIZE)
    if kind == "nbdkit-file":
        return nbdkit(sock, "file", str(disk))
    if kind == "qemu-nbd":
        return qemu_nbd(sock, disk)
    raise AssertionError(kind)


@pytest.fixture(params=["nbdkit-memory", "nbdkit-file", "qemu-nbd", "tapdisk"])
def upstream(request, tmp_path: Path, serve) -> Callable[[], str]:
    """The URI of an empty SIZE-byte export on each kind of upstream server."""
    if request.param == "tapdisk":
        disk = tmp_path / "up.raw"
        disk.write_bytes(bytes(0))
        with disk.open("r+b") as f:
            f.truncate(SIZE)
        served = serve(f"raw:{disk}")
        return served.uri
    server = upstream_of(request.param, tmp_path)
    request.addfinalizer(server.stop)
    return server.uri


def nbdcopy(src: str | Path, dst: str | Path) -> None:
    run(require("nbdcopy"), "--", str(src), str(dst))


def test_data_round_trips_byte_for_byte(upstream, serve, tmp_path: Path) -> None:
    """What is written through ``nbd:`` lands upstream, and what upstream holds reads back."""
    ours = serve(f"nbd:{upstream()}")
    data = random_file(tmp_path / "in.bin", SIZE, seed=2)
    nbdcopy(data, ours.uri())
    nbdcopy(upstream(), tmp_path / "upstream.bin")
    assert (tmp_path / "upstream.bin").read_bytes() == data.read_bytes()

    other = random_file(tmp_path / "other.bin", SIZE, seed=3)
    nbdcopy(other, upstream())
    nbdcopy(ours.uri(), tmp_path / "ours.bin")
    assert (tmp_path / "ours.bin").read_bytes() == other.read_bytes()


def test_flush_fua_trim_and_zeroes_pass_through(upstream, serve) -> None:
    """FUA writes, flush, trim and write-zeroes reach the upstream export."""
    ours = serve(f"nbd:{upstream()}")
    qemu_io = require("qemu-io")
    out = run(
        qemu_io, "-f", "raw",
        "-c", "write -P 0x5a 0 4M", "-c", "write -f -P 0x33 4M 1M", "-c", "flush",
        "-c", "write -z 1M 1M", "-c", "discard 2M 1M", "-c", "write -z -u 3M 512k",
        ours.uri(),
    )  # fmt: skip
    assert "error" not in out.lower()
    check = run(
        qemu_io, "-f", "raw", "-r",
        "-c", "read -P 0x5a 0 1M", "-c", "read -P 0 1M 1M", "-c", "read -P 0 3M 512k",
        "-c", "read -P 0x5a 3584k 512k", "-c", "read -P 0x33 4M 1M",
        upstream(),
    )  # fmt: skip
    assert "Pattern verification failed" not in check, check


def test_emulates_what_the_server_lacks(serve, tmp_path: Path) -> None:
    """Without zeroing upstream, write-zeroes still works (zero buffers are written), and
    fast zero is not advertised."""
    plain = nbdkit(tmp_path / "plain.sock", "--filter=nozero", "memory", "1M")
    try:
        assert "can_zero: false" in run(require("nbdinfo"), plain.uri())
        ours = serve(f"nbd:{plain.uri()}")
        info = run(require("nbdinfo"), ours.uri())
        assert "can_fast_zero: false" in info
        assert "can_zero: true" in info and "can_fua: true" in info
        qemu_io = require("qemu-io")
        run(qemu_io, "-f", "raw", "-c", "write -P 0x11 0 1M", plain.uri())
        run(qemu_io, "-f", "raw", "-c", "write -z 64k 64k", "-c", "write -f -P 2 0 4k", ours.uri())
        check = run(
            qemu_io, "-f", "raw", "-r", "-c", "read -P 0 64k 64k", "-c", "read -P 2 0 4k",
            "-c", "read -P 0x11 128k 64k", plain.uri(),
        )  # fmt: skip
        assert "Pattern verification failed" not in check
    finally:
        plain.stop()
    full = nbdkit(tmp_path / "full.sock", "memory", "1M")
    try:
        info = run(require("nbdinfo"), serve(f"nbd:{full.uri()}").uri())
        assert "can_trim: true" in info
        assert "can_fast_zero: true" in info
    finally:
        full.stop()


def test_block_status_is_upstreams(serve, tmp_path: Path) -> None:
    """``nbdinfo --map`` through ``nbd:`` shows upstream's holes and data."""
    disk = tmp_path / "sparse.raw"
    run(require("qemu-img"), "create", "-q", "-f", "raw", disk, "16M")
    run(require("qemu-io"), "-f", "raw", "-c", "write -P 1 1M 2M", "-c", "write -P 2 9M 64k", disk)
    up = qemu_nbd(tmp_path / "up.sock", disk)
    try:
        ours = serve(f"nbd:{up.uri()}")
        theirs = run(require("nbdinfo"), "--map", up.uri())
        assert run(require("nbdinfo"), "--map", ours.uri()) == theirs
        assert "hole" in theirs and "data" in theirs
    finally:
        up.stop()


def test_blktap_socket_path_form(serve, tmp_path: Path) -> None:
    """``nbd:/path/to/socket`` connects to the default export on that Unix socket."""
    up = nbdkit(tmp_path / "up.sock", "memory", "4M")
    try:
        run(require("qemu-io"), "-f", "raw", "-c", "write -P 0x77 0 4M", up.uri())
        ours = serve(f"nbd:{up.socket}")
        out = run(require("qemu-io"), "-f", "raw", "-r", "-c", "read -P 0x77 0 4M", ours.uri())
        assert "Pattern verification failed" not in out
    finally:
        up.stop()


@pytest.mark.parametrize("server", ["nbdkit", "qemu-nbd"])
def test_tls_upstream(server: str, serve, tmp_path: Path) -> None:
    """``nbds+unix://…?tls-certificates=DIR`` reaches a server that requires TLS."""
    pki = make_certificates(tmp_path / "pki")
    sock = tmp_path / "up.sock"
    if server == "nbdkit":
        up = nbdkit(sock, "memory", "4M", tls_dir=pki)
    else:
        disk = tmp_path / "up.raw"
        disk.write_bytes(bytes(4 << 20))
        creds = f"tls-creds-x509,id=tls0,dir={pki},endpoint=server"
        argv = [require("qemu-nbd"), "-f", "raw", "-k", str(sock), "--persistent", "--shared=4"]
        up = Upstream([*argv, "--object", creds, "--tls-creds", "tls0", str(disk)], sock).start()
    try:
        tls_uri = f"nbds+unix:///?socket={up.socket}&tls-certificates={pki}"
        ours = serve(f"nbd:{tls_uri}")
        run(require("qemu-io"), "-f", "raw", "-c", "write -P 0x42 0 4M", ours.uri())
        copy = tmp_path / "copy.bin"
        nbdcopy(tls_uri, copy)
        assert copy.read_bytes() == b"\x42" * (4 << 20)
        # Without TLS the same server refuses the connection: the image cannot open.
        assert "cannot connect" in serve_fails(f"nbd:{up.uri()}")
    finally:
        up.stop()


def serve_fails(spec: str) -> str:
    """``tapdisk serve SPEC`` exits non-zero; its stderr."""
    from helpers import TAPDISK

    proc = subprocess.run(
        [TAPDISK, "serve", "--unix", "/nonexistent-dir/x.sock", spec],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    return proc.stderr


def test_server_not_there_is_one_line(tmp_path: Path) -> None:
    """A server that is not listening fails the open with one line naming the export."""
    missing = f"nbd+unix:///?socket={tmp_path}/absent.sock"
    err = serve_fails(f"nbd:{missing}")
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "cannot connect" in lines[0] and missing in lines[0]
    assert "Traceback" not in err
    refused = serve_fails("nbd:nbd://127.0.0.1:1/")
    assert len(refused.strip().splitlines()) == 1 and "cannot connect" in refused


def test_reconnects_when_the_server_restarts_during_io(tapctl, tmp_path: Path) -> None:
    """A server killed and restarted mid-write: the VBD retries while the driver reconnects,
    and the client of our export sees no error."""
    disk = tmp_path / "up.raw"
    disk.write_bytes(bytes(SIZE))
    up = nbdkit(tmp_path / "up.sock", "file", str(disk))
    try:
        _pid, _minor, sock = tapctl.spawn_open(f"nbd:{up.uri()}")
        client = nbd.NBD()
        client.connect_uri(f"nbd+unix:///?socket={sock}")
        errors: list[BaseException] = []
        block = 64 << 10

        def writer() -> None:
            try:
                for i in range(SIZE // block):
                    client.pwrite(bytes([i % 251 + 1]) * block, i * block)
                    time.sleep(0.002)
                client.flush()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=writer)
        thread.start()
        time.sleep(0.2)
        up.kill()
        time.sleep(1.0)
        up.start()
        thread.join(120)
        assert not thread.is_alive()
        assert errors == []
        expected = b"".join(bytes([i % 251 + 1]) * block for i in range(SIZE // block))
        assert client.pread(SIZE, 0) == expected
        client.shutdown()
        assert disk.read_bytes() == expected
    finally:
        up.stop()


def test_a_server_gone_before_the_first_request_is_reconnected_to(tapctl, tmp_path: Path) -> None:
    """The connection made at open dies before any request used it: libnbd closes its socket
    inside the first write, which must not leave the event loop watching a closed descriptor
    (uvloop aborted the whole tapdisk); the write is retried once the server is back."""
    up = nbdkit(tmp_path / "up.sock", "memory", "4M")
    try:
        pid, _minor, sock = tapctl.spawn_open(f"nbd:{up.uri()}")
        up.kill()
        client = nbd.NBD()
        client.connect_uri(f"nbd+unix:///?socket={sock}")
        errors: list[BaseException] = []

        def write() -> None:
            try:
                client.pwrite(b"\x05" * 4096, 8192)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=write)
        thread.start()
        time.sleep(1.0)
        assert alive(pid)  # the write waits for the server, the tapdisk with it
        up.start()
        thread.join(60)
        assert not thread.is_alive() and errors == []
        assert client.pread(4096, 8192) == b"\x05" * 4096
        client.shutdown()
        assert alive(pid)
    finally:
        up.stop()


def test_server_gone_past_the_deadline_fails_the_request_and_recovers(
    tapctl, tmp_path: Path
) -> None:
    """Past the VBD's retry deadline the error reaches the client; the tapdisk stays up, and
    once the server is back the same export works again."""
    up = nbdkit(tmp_path / "up.sock", "memory", "4M")
    try:
        pid, _minor, sock = tapctl.spawn_open(f"nbd:{up.uri()}", "-t", "2")
        client = nbd.NBD()
        client.connect_uri(f"nbd+unix:///?socket={sock}")
        client.pwrite(b"\x01" * 4096, 0)
        up.kill()
        with pytest.raises(nbd.Error):
            client.pwrite(b"\x02" * 4096, 0)
        assert alive(pid)
        up.start()  # a new, empty memory export of the same size
        deadline = time.monotonic() + 30
        while True:
            try:
                client.pwrite(b"\x03" * 4096, 0)
                break
            except nbd.Error:
                assert time.monotonic() < deadline, "never reconnected"
                time.sleep(0.2)
        assert client.pread(4096, 0) == b"\x03" * 4096
    finally:
        up.stop()


def test_nbd_export_as_mirror_secondary(tapctl, tmp_path: Path) -> None:
    """blktap's ``-2 nbd:…``: every write reaches the remote export as well as the primary."""
    import json

    primary = tmp_path / "primary.raw"
    primary.write_bytes(bytes(4 << 20))
    up = nbdkit(tmp_path / "up.sock", "memory", "4M")
    try:
        pid, minor, sock = tapctl.spawn_open(f"raw:{primary}", "-2", f"nbd:{up.uri()}")
        run(require("qemu-io"), "-f", "raw", "-c", "write -P 0x4d 1M 1M",
            f"nbd+unix:///?socket={sock}")  # fmt: skip
        stats = json.loads(tapctl.out("stats", "-p", str(pid), "-m", str(minor)))
        assert stats["nbd_mirror_failed"] == 0
        out = run(require("qemu-io"), "-f", "raw", "-r", "-c", "read -P 0x4d 1M 1M", up.uri())
        assert "Pattern verification failed" not in out
        assert primary.read_bytes()[1 << 20 : 2 << 20] == b"\x4d" * (1 << 20)
    finally:
        up.stop()


def test_a_flush_with_nothing_new_to_cover_stays_in_tapdisk(tapctl, tmp_path: Path) -> None:
    """The first flush always reaches the server (it may cover a previous tapdisk's writes),
    later ones only when a write, trim or zeroing ended since the last; so a tapdisk whose
    server is gone, with everything flushed, stops at once on SIGTERM."""
    log = tmp_path / "up.log"
    up = nbdkit(tmp_path / "up.sock", "--filter=log", "memory", "8M", f"logfile={log}")

    def flushes() -> int:
        return log.read_text().count(" Flush id=")

    try:
        pid, _minor, sock = tapctl.spawn_open(f"nbd:{up.uri()}")
        client = nbd.NBD()
        client.connect_uri(f"nbd+unix:///?socket={sock}")
        client.flush()
        assert flushes() == 1
        client.flush()
        assert flushes() == 1
        client.pwrite(b"\x07" * 4096, 0)
        client.flush()
        client.flush()
        assert flushes() == 2
        client.trim(4096, 8192)
        client.flush()
        client.zero(4096, 16384)
        client.flush()
        assert flushes() == 4
        client.shutdown()
        up.stop()
        started = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        while alive(pid):
            assert time.monotonic() - started < 5, "tapdisk kept flushing to a server gone"
            time.sleep(0.05)
    finally:
        up.stop()


def test_tapctl_opens_nbd_images(tapctl, tmp_path: Path) -> None:
    """``tap-ctl create -a nbd:URI`` serves the remote export on its minor's socket."""
    up = nbdkit(tmp_path / "up.sock", "memory", "8M")
    try:
        run(require("qemu-io"), "-f", "raw", "-c", "write -P 0x61 0 8M", up.uri())
        pid, _minor, sock = tapctl.spawn_open(f"nbd:{up.uri()}")
        out = run(
            require("qemu-io"), "-f", "raw", "-c", "read -P 0x61 0 8M", "-c",
            "write -P 0x62 1M 1M", f"nbd+unix:///?socket={sock}",
        )  # fmt: skip
        assert "Pattern verification failed" not in out
        check = run(require("qemu-io"), "-f", "raw", "-r", "-c", "read -P 0x62 1M 1M", up.uri())
        assert "Pattern verification failed" not in check
        assert alive(pid)
    finally:
        up.stop()


def test_descriptor_passed_over_nbdclient_socket(tapctl, tmp_path: Path) -> None:
    """xapi's way: a connected socket sent over ``nbdclient<pid>`` opens as ``nbd:NAME``."""
    import socket as sockets

    up = nbdkit(tmp_path / "up.sock", "memory", "8M")
    try:
        run(require("qemu-io"), "-f", "raw", "-c", "write -P 0x6b 0 8M", up.uri())
        pid = int(tapctl.out("spawn"))
        conn = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
        conn.connect(str(up.socket))
        sender = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
        sender.connect(str(tapctl.dir / f"nbdclient{pid}"))
        sockets.send_fds(sender, [b"xapi-vdi-1\0"], [conn.fileno()])
        sender.close()
        conn.close()
        time.sleep(0.2)
        sock = tapctl.out("open", "-p", str(pid), "-a", "nbd:xapi-vdi-1")
        out = run(require("qemu-io"), "-f", "raw", "-r", "-c", "read -P 0x6b 0 8M",
                  f"nbd+unix:///?socket={sock}")  # fmt: skip
        assert "Pattern verification failed" not in out
        # A name nobody passed is a clear error, and the tapdisk stays up.
        bad = tapctl("open", "-p", str(pid), "-a", "nbd:nobody-sent-this", check=False)
        assert bad.returncode != 0 and "no descriptor was passed" in bad.stderr
        assert alive(pid)
    finally:
        up.stop()


def test_blktap_host_port_form(serve, tmp_path: Path) -> None:
    """``nbd:HOST:PORT`` connects over TCP to the default export."""
    disk = tmp_path / "up.raw"
    disk.write_bytes(b"\x5c" * (1 << 20))
    up: Served = serve("--tcp", "127.0.0.1:0", f"raw:{disk}")
    assert up.proc.stdout is not None
    tcp = up.proc.stdout.readline().strip()  # the unix URI came first, then this one
    assert tcp.startswith("nbd://127.0.0.1:")
    host_port = tcp.removeprefix("nbd://").rstrip("/")
    ours = serve(f"nbd:{host_port}")
    nbdcopy(ours.uri(), tmp_path / "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == disk.read_bytes()


def test_server_without_block_status_reads_as_data(serve, tmp_path: Path) -> None:
    """An upstream without base:allocation: everything is reported as data, reads still work."""
    up = nbdkit(tmp_path / "up.sock", "--filter=noextents", "memory", "2M")
    try:
        ours = serve(f"nbd:{up.uri()}")
        assert run(require("nbdinfo"), "--map", ours.uri()).split() == ["0", "2097152", "0", "data"]
        out = run(require("qemu-io"), "-f", "raw", "-r", "-c", "read -P 0 0 2M", ours.uri())
        assert "Pattern verification failed" not in out
    finally:
        up.stop()


def test_chain_of_servers(serve, tmp_path: Path) -> None:
    """tapdisk serving ``nbd:`` of tapdisk serving ``nbd:`` of qemu-nbd: block status too."""
    disk = tmp_path / "base.raw"
    run(require("qemu-img"), "create", "-q", "-f", "raw", disk, "8M")
    run(require("qemu-io"), "-f", "raw", "-c", "write -P 9 2M 1M", disk)
    up = qemu_nbd(tmp_path / "up.sock", disk)
    try:
        middle: Served = serve(f"nbd:{up.uri()}")
        top = serve(f"nbd:{middle.uri()}")
        assert run(require("nbdinfo"), "--map", top.uri()) == run(
            require("nbdinfo"), "--map", up.uri()
        )
        nbdcopy(top.uri(), tmp_path / "copy.bin")
        assert (tmp_path / "copy.bin").read_bytes() == disk.read_bytes()
    finally:
        up.stop()
