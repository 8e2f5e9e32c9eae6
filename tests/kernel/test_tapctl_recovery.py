"""``tap-ctl restart`` of a dead or wedged tapdisk under a mounted /dev/nbdN.

The old tapdisk cannot hand its sockets over: it was killed (kill -9), or is stopped
(SIGSTOP) and is killed by restart.  The kernel keeps the device and its requests
while no server is connected (the device's dead-connection timeout, 60 s); the new
tapdisk opens the image from its record and takes the device over with RECONFIGURE
(control/tapctl/recovery.py), and the kernel resends what it lost once its request
timeout fires.  The guest sees a stall of about that timeout and no I/O error.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kerneltools import sh
from test_tapctl import MiB, TapCtl, dmesg_io_errors, make_image
from test_tapctl_restart import fio_in, slowest_during

#: The kernel's request timeout of the device, in seconds: the expected stall.
KERNEL_TIMEOUT = 5
#: The kernel gives up on a device without a server after this (handoff.py's
#: KERNEL_DEAD_CONN_TIMEOUT): a request slower than this would have failed.
DEAD_CONN_TIMEOUT = 60


class Prober(threading.Thread):
    """O_DIRECT reads of one block past the file system, one every 20 ms, until stopped:
    the longest one is the stall the device showed, whatever fio was doing then."""

    def __init__(self, dev: str) -> None:
        super().__init__(name="prober")
        self.dev = dev
        self.stop = threading.Event()
        self.slowest = 0.0
        self.reads = 0

    def run(self) -> None:
        fd = os.open(self.dev, os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, 4096)
        try:
            while not self.stop.wait(0.02):
                start = time.monotonic()
                os.preadv(fd, [buf], 60 * MiB)
                self.slowest = max(self.slowest, time.monotonic() - start)
                self.reads += 1
        finally:
            os.close(fd)


@pytest.fixture
def tapctl(nbd_module: None, tmp_path: Path) -> Iterator[TapCtl]:
    ctl = TapCtl(tmp_path / "run")
    yield ctl
    ctl.cleanup()


@pytest.mark.parametrize("old_tapdisk", ["killed", "stopped"])
def test_restart_of_a_dead_or_wedged_tapdisk_under_ext4_and_fio(
    tapctl: TapCtl, tmp_path: Path, report: Callable[[str, str], None], old_tapdisk: str
) -> None:
    image = make_image(tmp_path, "vhd", 64 * MiB)
    dev = tapctl.create(f"vhd:{image}", "--kernel-timeout", str(KERNEL_TIMEOUT))
    (old,) = tapctl.pids()
    (row_before,) = tapctl.listing()["tapdisks"]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sh("mkfs.ext4", "-q", "-F", dev, "48M")
    sh("mount", dev, mnt)
    before = sh("dmesg")
    log = tmp_path / "fio"
    fio = fio_in(mnt, log)
    prober = Prober(dev)
    prober.start()
    try:
        time.sleep(3)
        assert fio.poll() is None, "fio finished before the restart"
        start = time.time()
        os.kill(old, signal.SIGKILL if old_tapdisk == "killed" else signal.SIGSTOP)
        new = int(tapctl("restart", "-d", dev).strip())
        took = time.time() - start
        output = fio.communicate(timeout=300)[0]
    finally:
        prober.stop.set()
        prober.join(120)
        if fio.poll() is None:
            fio.kill()
            fio.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(old, signal.SIGKILL)  # a stopped one left by a failed restart
        sh("umount", mnt)
    with pytest.raises(ProcessLookupError):
        os.kill(old, 0)
    assert fio.returncode == 0, output
    (job,) = json.loads(output[output.index("{") :])["jobs"]
    assert job["error"] == 0, job
    stall = slowest_during(log, [(start, start + DEAD_CONN_TIMEOUT)])
    whole_run = max(job[rw]["lat_ns"]["max"] / 1e9 for rw in ("read", "write"))
    assert prober.reads > 10
    assert dmesg_io_errors(dev, before) == []
    sh("e2fsck", "-fn", dev)
    (row_after,) = tapctl.listing()["tapdisks"]
    assert row_after == {**row_before, "pid": new}
    what = f"restart of a {old_tapdisk} tapdisk under ext4 + fio verify"
    report(f"{what}: tap-ctl restart took", f"{took:.2f} s")
    report(f"{what} (kernel timeout {KERNEL_TIMEOUT} s): slowest fio request", f"{stall:.3f} s")
    report(f"{what}: slowest fio request of the whole run", f"{whole_run:.3f} s")
    report(f"{what}: slowest O_DIRECT read of a prober, every 20 ms", f"{prober.slowest:.3f} s")
    assert stall < DEAD_CONN_TIMEOUT
    tapctl.destroy(dev)
