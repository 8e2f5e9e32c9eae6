"""``tap-ctl restart`` against the real nbd.ko: a new tapdisk takes /dev/nbdN over under load.

The old tapdisk hands its live sockets (the kernel's and an NBD client's) to the
new one (tapdisk/daemon/handover.py): no socket closes, the kernel resends nothing,
and no request waits for the kernel's request timeout, so the default timeouts
are kept and the longest request is measured.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kerneltools import sh
from test_tapctl import MiB, TapCtl, dmesg_io_errors, fio_verify, make_image

#: The kernel's request timeout of the restarted device, in seconds.
KERNEL_TIMEOUT = 5


@pytest.fixture
def tapctl(nbd_module: None, tmp_path: Path) -> Iterator[TapCtl]:
    ctl = TapCtl(tmp_path / "run")
    yield ctl
    ctl.cleanup()


#: Size of each image; ext4 takes the first FS_SIZE of it, a libnbd client the rest.
#: Seconds well under the kernel request timeout this test runs with (tap-ctl's default: the
#: retry deadline plus 60 s, 180 s): a request slower than this was resent after a timeout.
KERNEL_TIMEOUT_FLOOR = 10.0
IMAGE_SIZE = 64 * MiB
FS_SIZE = 48 * MiB
#: Block a libnbd client writes and reads back.
BLOCK = 64 * 1024


class NbdClient(threading.Thread):
    """A libnbd client on a VBD's unix socket: verified writes after FS_SIZE until stopped."""

    def __init__(self, socket_path: str) -> None:
        super().__init__(name="libnbd-client")
        import nbd

        self.handle = nbd.NBD()
        self.handle.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        self.handle.connect_uri(f"nbd+unix:///?socket={socket_path}")
        self.stop = threading.Event()
        self.written: dict[int, bytes] = {}
        self.slowest = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        rng = random.Random(7)
        blocks = (IMAGE_SIZE - FS_SIZE) // BLOCK
        try:
            while not self.stop.is_set():
                offset = FS_SIZE + rng.randrange(blocks) * BLOCK
                data = rng.randbytes(BLOCK)
                start = time.monotonic()
                self.handle.pwrite(data, offset)
                got = self.handle.pread(BLOCK, offset)
                self.slowest = max(self.slowest, time.monotonic() - start)
                assert got == data, f"libnbd read back other data at {offset}"
                self.written[offset] = data
                time.sleep(0.01)
            for offset, data in self.written.items():
                assert self.handle.pread(BLOCK, offset) == data, f"lost write at {offset}"
        except BaseException as exc:
            self.error = exc
        finally:
            self.handle.shutdown()

    def finish(self) -> None:
        self.stop.set()
        self.join(120)
        if self.error is not None:
            raise self.error
        assert len(self.written) > 10, "the libnbd client hardly ran: the test proves nothing"


def fio_in(mnt: Path, log: Path) -> subprocess.Popen[str]:
    """fio verify on a file of the mounted ext4, slow enough to run across both restarts;
    each request's completion time (Unix ms) and latency (ns) go to ``<log>_lat.1.log``."""
    return fio_verify(
        str(mnt / "fio.dat"), 16, "--rate_iops=300", "--output-format=json",
        f"--write_lat_log={log}", "--log_unix_epoch=1",
    )  # fmt: skip


def slowest_during(log: Path, windows: list[tuple[float, float]]) -> float:
    """Seconds of the longest request that completed within one of ``windows`` (Unix s)."""
    slowest = 0.0
    for line in Path(f"{log}_lat.1.log").read_text().splitlines():
        when_ms, latency_ns = (int(field) for field in line.split(",")[:2])
        if any(start <= when_ms / 1000 <= end for start, end in windows):
            slowest = max(slowest, latency_ns / 1e9)
    return slowest


@pytest.mark.parametrize("vbds", [1, 2])
def test_restart_twice_under_ext4_and_fio_without_a_stall(
    tapctl: TapCtl, tmp_path: Path, report: Callable[[str, str], None], vbds: int
) -> None:
    """Default timeouts; one VBD with two kernel connections, or two VBDs in one tapdisk;
    a libnbd client on the first VBD's unix socket throughout."""
    images = [make_image(tmp_path, "vhd", IMAGE_SIZE, name=f"disk{i}") for i in range(vbds)]
    if vbds == 1:
        devs = [tapctl.create(f"vhd:{images[0]}", "-n", "2")]
    else:
        pid = tapctl("spawn").strip()
        devs = []
        for image in images:
            socket_path = tapctl("open", "-p", pid, "-a", f"vhd:{image}").strip()
            minor = socket_path.rsplit(".", 1)[1]
            devs.append(tapctl("connect", "-p", pid, "-m", minor).strip())
            tapctl.devices.append(devs[-1])
    (old,) = tapctl.pids()
    rows_before = {row["minor"]: row for row in tapctl.listing()["tapdisks"]}
    mounts = []
    for index, dev in enumerate(devs):
        mnt = tmp_path / f"mnt{index}"
        mnt.mkdir()
        sh("mkfs.ext4", "-q", "-F", dev, f"{FS_SIZE // MiB}M")
        sh("mount", dev, mnt)
        mounts.append(mnt)
    before = sh("dmesg")
    first = rows_before[min(rows_before)]
    client = NbdClient(first["nbd_socket"])
    client.start()
    logs = [tmp_path / f"fio{index}" for index in range(vbds)]
    fios = [fio_in(mnt, log) for mnt, log in zip(mounts, logs, strict=True)]
    windows = []
    pids = [old]
    took = []
    try:
        time.sleep(3)
        connections = (2 if vbds == 1 else 1) + 1  # the kernel's and libnbd's
        stats = json.loads(tapctl("stats", "-d", first["device"]))["vbd"]
        assert stats["connections"] == connections, sh("dmesg")[len(before) :]
        writes_before = stats["writes"]
        for _ in range(2):
            assert all(fio.poll() is None for fio in fios), "fio finished before the restart"
            start = time.time()
            pids.append(int(tapctl("restart", "-p", str(pids[-1])).strip()))
            took.append(time.time() - start)
            windows.append((start, time.time() + 1))
            time.sleep(3)
        stats = json.loads(tapctl("stats", "-d", first["device"]))["vbd"]
        log = (tapctl.directory / "tapdisk.log").read_text()
        assert stats["connections"] == connections, log + sh("dmesg")[len(before) :]
        assert stats["writes"] > writes_before > 0  # counted on across both restarts
        outputs = [fio.communicate(timeout=300)[0] for fio in fios]
    finally:
        for fio in fios:
            if fio.poll() is None:
                fio.kill()
                fio.wait()
        client.finish()
        for mnt in mounts:
            sh("umount", mnt)
    slowest = during = 0.0
    for fio, output, log in zip(fios, outputs, logs, strict=True):
        assert fio.returncode == 0, output
        (job,) = json.loads(output[output.index("{") :])["jobs"]
        assert job["error"] == 0, job
        slowest = max(slowest, *(job[rw]["lat_ns"]["max"] / 1e9 for rw in ("read", "write")))
        during = max(during, slowest_during(log, windows))
    for dev in devs:
        assert dmesg_io_errors(dev, before) == []
        sh("e2fsck", "-fn", dev)
    assert len(set(pids)) == 3
    for pid in pids[:2]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    rows_after = {row["minor"]: row for row in tapctl.listing()["tapdisks"]}
    assert rows_after == {minor: {**row, "pid": pids[-1]} for minor, row in rows_before.items()}
    what = f"restart, {vbds} VBD(s) under ext4 + fio verify + a libnbd client"
    report(f"{what}: tap-ctl restart took", ", ".join(f"{t:.2f} s" for t in took))
    report(f"{what}: slowest fio request completed during the restarts", f"{during:.3f} s")
    report(f"{what}: slowest fio request of the whole run", f"{slowest:.3f} s")
    report(f"{what}: slowest libnbd write + read", f"{client.slowest:.3f} s")
    log = (tapctl.directory / "tapdisk.log").read_text()
    holds = re.findall(r"after a (\d+) ms hold", log)
    report(f"{what}: the old tapdisks held their sockets for", ", ".join(f"{h} ms" for h in holds))
    for phases in re.findall(r"its sockets were held (\d+ ms \([^)]*\))", log):
        report(f"{what}: hold until the new tapdisk served, by phase", phases)
    assert len(holds) == 2
    # The stall itself is a measurement (reported above; under 1 s in the VM harness, see
    # the README); what this test asserts is that no request waited for the kernel's request
    # timeout, as every request does when the sockets are not handed over.
    assert during < KERNEL_TIMEOUT_FLOOR, f"a fio request waited {during:.3f} s: a kernel timeout"
    for dev in devs:
        tapctl.destroy(dev)


def test_restart_keeps_marking_the_cbt_log(tapctl: TapCtl, tmp_path: Path) -> None:
    block = 64 * 1024
    image = make_image(tmp_path, "raw", 16 * MiB)
    log = tmp_path / "disk.cbtlog"
    sh(Path(sys.executable).with_name("cbt-util"), "create", "-n", log, "-s", str(16 * MiB))
    dev = tapctl.create(f"raw:{image}", "-C", str(log), "--kernel-timeout", str(KERNEL_TIMEOUT))

    def write_block(number: int) -> None:
        fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, 4096)
            buf.write(b"c" * 4096)
            os.pwrite(fd, buf, number * block)
        finally:
            os.close(fd)

    write_block(3)
    new = int(tapctl("restart", "-d", dev).strip())
    (row,) = tapctl.listing()["tapdisks"]
    assert (row["pid"], row["cbt_log"]) == (new, str(log))
    write_block(7)
    bitmap = log.read_bytes()[48:]
    assert bitmap == bytes([1 << 3 | 1 << 7]) + bytes(len(bitmap) - 1)
    tapctl.destroy(dev)
