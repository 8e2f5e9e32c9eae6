"""Busy-polling (``--busy-poll``): a quick client is answered without the server sleeping,
a slow one costs no spinning, and several clients polled together keep their data apart.

What the spin saves is a sleep and a wake-up per request, so the tests count what the
server says it caught while spinning (logged at shutdown), its voluntary context switches
(``/proc/PID/status``) and its CPU time instead of timing it.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nbd
import pytest
from helpers import Served, proc_status
from tapctl_helpers import TapCtl, nbd_uri, private_tapctl, wait_gone

KiB = 1 << 10
REQUESTS = 3000
WRITES = 1500


def sleeps(pid: int) -> int:
    """How often the server's event-loop thread has gone to sleep so far."""
    return proc_status(pid, "voluntary_ctxt_switches")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of the whole server process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A 4 MiB raw image of known bytes, just written, so its pages are cached."""
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(range(256)) * (16 * KiB))
    return path


def connect(uri: str) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def read_one_at_a_time(h: nbd.NBD, image: Path, count: int) -> None:
    """``count`` 4 KiB reads at queue depth 1, each checked against the file."""
    data = image.read_bytes()
    for i in range(count):
        offset = (i * 4 * KiB) % len(data)
        assert h.pread(4 * KiB, offset) == data[offset : offset + 4 * KiB]


def caught(log: str) -> int:
    """Receives the spin caught, from the line a server logs when it shuts down."""
    match = re.search(r"busy-poll \(up to \d+ us\): (\d+) receives caught spinning", log)
    assert match, f"no busy-poll summary in the log:\n{log}"
    return int(match.group(1))


def test_queue_depth_one_client_answered_while_spinning(
    serve: Callable[..., Served], image: Path
) -> None:
    served = serve("--busy-poll", "2000", f"raw:{image}")
    h = connect(served.uri())
    read_one_at_a_time(h, image, 100)  # the window grows to its maximum
    before = sleeps(served.proc.pid)
    read_one_at_a_time(h, image, REQUESTS)
    slept = sleeps(served.proc.pid) - before
    h.shutdown()
    assert served.stop() == 0
    assert caught(served.stderr) > REQUESTS / 2
    # One sleep per spin budget (1 ms) at most, plus the odd slow client turn.
    assert slept < REQUESTS / 4, f"slept {slept} times in {REQUESTS} requests"


def test_busy_poll_zero_never_spins(serve: Callable[..., Served], image: Path) -> None:
    served = serve("--busy-poll", "0", f"raw:{image}")
    h = connect(served.uri())
    read_one_at_a_time(h, image, 500)
    h.shutdown()
    assert served.stop() == 0
    assert "busy-poll: off" in served.stderr


@pytest.fixture
def tapctl() -> Iterator[TapCtl]:
    """tap-ctl over a private control directory; its daemons are stopped even on failure."""
    yield from private_tapctl()


@pytest.mark.parametrize("window", [0, 2000])
def test_the_daemon_takes_the_window_from_its_configuration(
    tmp_path: Path, image: Path, tapctl: TapCtl, window: int
) -> None:
    """busy_poll in the file that tap-ctl spawn hands on reaches the daemon's devices."""
    config = tmp_path / "tapdisk.yaml"
    config.write_text(f"busy_poll: {window}\n")
    pid = int(tapctl.out("spawn", "--config", str(config)))
    sock = tapctl.out("open", "-p", str(pid), "-a", f"raw:{image}")
    h = connect(nbd_uri(sock))
    read_one_at_a_time(h, image, 1000)
    h.shutdown()
    os.kill(pid, signal.SIGTERM)
    assert wait_gone(pid)
    log = (tapctl.dir / "tapdisk.log").read_text()
    if window:
        assert caught(log) > 500
    else:
        assert "busy-poll: off" in log


def test_slow_client_stops_the_spin(serve: Callable[..., Served], image: Path) -> None:
    """After a gap longer than the window the server spins no more: 40 requests 20 ms
    apart would cost 200 ms of CPU if each spun for the full 5 ms window."""
    served = serve("--busy-poll", "5000", f"raw:{image}")
    h = connect(served.uri())
    read_one_at_a_time(h, image, 500)  # a quick client first: the window grows
    before = cpu_seconds(served.proc.pid)
    data = image.read_bytes()
    for i in range(40):
        time.sleep(0.02)
        assert h.pread(4 * KiB, i * 4 * KiB) == data[i * 4 * KiB : (i + 1) * 4 * KiB]
    spent = cpu_seconds(served.proc.pid) - before
    h.shutdown()
    assert spent < 0.06, f"the server used {spent:.3f} s of CPU for 40 slow requests"


def test_clients_polled_together_keep_their_data_apart(
    serve: Callable[..., Served], image: Path
) -> None:
    """Two quick clients, each writing and reading back its own half, share one spin."""
    served = serve("--busy-poll", "2000", f"raw:{image}")
    half = image.stat().st_size // 2
    errors: list[BaseException] = []

    def client(index: int) -> None:
        try:
            h = connect(served.uri())
            base = index * half
            for i in range(WRITES):
                offset = base + (i * 4 * KiB) % half
                block = bytes([index + 1, i % 256]) * (2 * KiB)
                h.pwrite(block, offset)
                assert h.pread(4 * KiB, offset) == block
            h.shutdown()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(index,)) for index in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a client never finished"
    assert not errors, errors
    expected = bytearray()
    blocks = half // (4 * KiB)
    for index in (0, 1):
        for block in range(blocks):
            last = max(i for i in range(block, WRITES, blocks))  # its final write
            expected += bytes([index + 1, last % 256]) * (2 * KiB)
    assert image.read_bytes() == expected
