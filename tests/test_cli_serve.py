"""The ``tapdisk serve`` command: start-up errors, socket handling, signals, listeners."""

from __future__ import annotations

import signal
import socket
import subprocess
import time

import nbd
import pytest
from helpers import TAPDISK, require, run, start_tapdisk

MiB = 1 << 20


def serve_fails(*args: str) -> tuple[int, str]:
    """Run ``tapdisk serve ARGS`` expecting it to give up; returns (exit status, stderr)."""
    proc = subprocess.run([TAPDISK, "serve", *args], capture_output=True, text=True, timeout=20)
    assert proc.stdout == "", "a failing server must not print a URI"
    return proc.returncode, proc.stderr


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.raw"
    path.write_bytes(b"\x5a" * 4 * MiB)
    return path


def test_missing_file_is_a_clear_error(tmp_path):
    status, err = serve_fails("--unix", str(tmp_path / "s.sock"), f"raw:{tmp_path}/absent.raw")
    assert status != 0
    assert "absent.raw" in err and "no such file" in err
    assert "Traceback" not in err
    assert not (tmp_path / "s.sock").exists()


def test_unknown_image_type_is_a_clear_error(tmp_path, image):
    status, err = serve_fails("--unix", str(tmp_path / "s.sock"), f"floppy:{image}")
    assert status != 0
    assert "unknown image type 'floppy'" in err and "raw" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("spec", ["disk.raw", "raw:", ":disk.raw"])
def test_bad_spec_is_a_clear_error(tmp_path, spec):
    status, err = serve_fails("--unix", str(tmp_path / "s.sock"), spec)
    assert status != 0
    assert "bad image spec" in err and "TYPE:PATH" in err
    assert "Traceback" not in err


def test_bad_tcp_address_is_a_usage_error(tmp_path, image):
    status, err = serve_fails("--tcp", "localhost:http", f"raw:{image}")
    assert status == 2
    assert "argument --tcp: expected HOST:PORT" in err


@pytest.mark.parametrize("fmt", ["qcow2", "vhd"])
def test_direct_is_refused_for_formats_that_cannot_bypass_the_page_cache(tmp_path, fmt):
    path = tmp_path / f"disk.{fmt}"
    run(require("qemu-img"), "create", "-q", "-f", "vpc" if fmt == "vhd" else fmt, path, "4M")
    status, err = serve_fails("--unix", str(tmp_path / "s.sock"), "--direct", f"{fmt}:{path}")
    assert status != 0
    assert f"{fmt} images cannot bypass the page cache" in err
    assert "Traceback" not in err


def test_duplicate_export_names_are_refused(tmp_path, image):
    status, err = serve_fails("--unix", str(tmp_path / "s.sock"), f"raw:{image}", f"raw:{image}")
    assert status != 0
    assert "two exports named 'disk.raw'" in err


def test_busy_socket_path_is_refused_and_the_owner_keeps_serving(tmp_path, image):
    sock = tmp_path / "s.sock"
    owner = start_tapdisk(sock, f"raw:{image}")
    try:
        status, err = serve_fails("--unix", str(sock), f"raw:{image}")
        assert status != 0
        assert "in use" in err and str(sock) in err
        assert sock.exists()
        size = run(require("nbdinfo"), "--size", f"nbd+unix:///?socket={sock}")
        assert size.strip() == str(4 * MiB)
    finally:
        assert owner.stop() == 0


def test_stale_socket_file_is_replaced(tmp_path, image):
    sock = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))  # a socket file nobody listens on, as a crashed server leaves
    stale.close()
    assert sock.exists()
    served = start_tapdisk(sock, f"raw:{image}")
    try:
        out = run(require("nbdinfo"), "--size", served.uri())
        assert out.strip() == str(4 * MiB)
    finally:
        assert served.stop() == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly_and_removes_the_socket(tmp_path, image, signum):
    served = start_tapdisk(tmp_path / "s.sock", f"raw:{image}")
    h = nbd.NBD()
    h.connect_uri(served.uri())  # an idle client must not hold the shutdown up
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stalled.connect(str(served.socket))  # nor one that never finishes its handshake
    stalled.recv(18)
    start = time.monotonic()
    assert served.stop(signum) == 0
    assert time.monotonic() - start < 5
    assert not served.socket.exists()
    assert "Traceback" not in served.stderr
    stalled.close()


def test_sigterm_lets_in_flight_requests_finish(tmp_path, image):
    served = start_tapdisk(tmp_path / "s.sock", f"raw:{image}")
    h = nbd.NBD()
    h.connect_uri(served.uri())
    count = 8
    buffers = [nbd.Buffer.from_bytearray(bytearray([i + 1]) * 2 * MiB) for i in range(count)]
    cookies = [
        h.aio_pwrite(buf, (i % 2) * 2 * MiB, flags=nbd.CMD_FLAG_FUA)
        for i, buf in enumerate(buffers)
    ]
    # A cached read behind them: its reply means the server has taken every write.
    barrier = nbd.Buffer(4)
    barrier_cookie = h.aio_pread(barrier, 0)
    while not h.aio_command_completed(barrier_cookie):
        h.poll(-1)
    served.proc.send_signal(signal.SIGTERM)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for cookie in cookies:
        assert h.aio_command_completed(cookie)  # raises if the write failed or was dropped
    assert served.proc.wait(20) == 0
    assert not served.socket.exists()


def test_tcp_port_zero_prints_the_bound_port(tmp_path, image):
    proc = subprocess.Popen(
        [TAPDISK, "serve", "--tcp", "127.0.0.1:0", f"raw:{image}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        assert uri.startswith("nbd://127.0.0.1:") and uri.endswith("/")
        port = int(uri.removeprefix("nbd://127.0.0.1:").rstrip("/"))
        assert port > 0
        assert run(require("nbdinfo"), "--size", uri).strip() == str(4 * MiB)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_unix_and_tcp_listeners_serve_the_same_image(tmp_path, image):
    served = start_tapdisk(tmp_path / "s.sock", "--tcp", "127.0.0.1:0", f"raw:{image}")
    assert served.proc.stdout is not None
    tcp_uri = served.proc.stdout.readline().strip()
    assert tcp_uri.startswith("nbd://127.0.0.1:")
    run(require("qemu-io"), "-f", "raw", "-c", "write -P 0x21 0 4k", tcp_uri)
    run(require("qemu-io"), "-f", "raw", "-c", "read -P 0x21 0 4k", served.uri())
    assert served.stop() == 0


def test_clients_past_max_connections_are_closed_and_the_others_keep_working(tmp_path, image):
    served = start_tapdisk(tmp_path / "s.sock", "--max-connections", "2", f"raw:{image}")
    first, second = nbd.NBD(), nbd.NBD()
    first.connect_uri(served.uri())
    second.connect_uri(served.uri())
    third = nbd.NBD()
    with pytest.raises(nbd.Error):
        third.connect_uri(served.uri())
    first.pwrite(b"\x01" * 4096, 0)
    assert second.pread(4096, 0) == b"\x01" * 4096
    first.shutdown()
    fourth = nbd.NBD()
    for _ in range(100):  # the server notices the first client's goodbye shortly after
        try:
            fourth.connect_uri(served.uri())
            break
        except nbd.Error:
            fourth = nbd.NBD()
            time.sleep(0.05)
    assert fourth.pread(4096, 0) == b"\x01" * 4096
    fourth.shutdown()
    second.shutdown()
    assert served.stop() == 0
    assert "refusing a connection: 2 clients are connected, the most allowed" in served.stderr


def test_direct_mode_serves_aligned_and_unaligned_io(tmp_path, image):
    served = start_tapdisk(tmp_path / "s.sock", "--direct", f"raw:{image}")
    h = nbd.NBD()
    h.set_strict_mode(0)  # send unaligned requests despite the advertised 4096 minimum
    h.connect_uri(served.uri())
    assert h.get_block_size(nbd.SIZE_MINIMUM) == 4096
    h.pwrite(b"\x01" * 8192, 8192)
    h.pwrite(b"\x02" * 100, 4000)
    assert h.pread(8192, 8192) == b"\x01" * 8192
    assert h.pread(200, 3950) == b"\x5a" * 50 + b"\x02" * 100 + b"\x5a" * 50
    h.shutdown()
    assert served.stop() == 0
    data = image.read_bytes()
    assert data[3999:4101] == b"\x5a" + b"\x02" * 100 + b"\x5a"
    assert data[8192:16384] == b"\x01" * 8192
    assert len(data) == 4 * MiB


def test_socket_path_that_is_a_regular_file_is_left_alone(tmp_path, image):
    # A slip such as "--unix disk.raw" must not delete the image.
    status, err = serve_fails("--unix", str(image), f"raw:{image}")
    assert status != 0
    assert "not a socket" in err
    assert image.read_bytes() == b"\x5a" * 4 * MiB
