"""``tap-ctl restart`` against the real nbd.ko: a new tapdisk takes over /dev/nbdN under load.

The old tapdisk pauses (its image flushed and closed), releases the device
without DISCONNECT and exits; the new one RECONFIGUREs the device with fresh
sockets.  Requests the kernel had sent to the old process are resent once the
kernel's request timeout fires, so the device is created with a short one
(``--kernel-timeout``) to keep the stall, and the test, short.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import sys
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


@pytest.mark.parametrize("connections", [1, 2])
def test_restart_under_fio_load_hands_the_device_over_without_io_errors(
    tapctl: TapCtl, tmp_path: Path, report: Callable[[str, str], None], connections: int
) -> None:
    image = make_image(tmp_path, "vhd", 32 * MiB)
    dev = tapctl.create(
        f"vhd:{image}", "-t", "3", "--kernel-timeout", str(KERNEL_TIMEOUT), "-n", str(connections)
    )
    (old,) = tapctl.pids()
    before = sh("dmesg")
    fio = fio_verify(dev, 16, "--rate_iops=400", "--output-format=json")
    try:
        time.sleep(2)
        assert fio.poll() is None, "fio finished before the restart: the test proves nothing"
        start = time.monotonic()
        new = int(tapctl("restart", "-d", dev).strip())
        took = time.monotonic() - start
        output, _ = fio.communicate(timeout=300)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    assert fio.returncode == 0, output
    (job,) = json.loads(output[output.index("{") :])["jobs"]
    assert job["error"] == 0, job
    assert dmesg_io_errors(dev, before) == []
    assert new != old
    with pytest.raises(ProcessLookupError):
        os.kill(old, 0)
    (row,) = tapctl.listing()["tapdisks"]
    assert (row["pid"], row["device"], row["spec"]) == (new, dev, f"vhd:{image}")
    assert row["timeout"] == 3
    stats = json.loads(tapctl("stats", "-d", dev))
    assert stats["connections"] == connections  # the kernel's sockets, now ours
    what = f"restart, {connections} connection(s)"
    report(f"{what}: tap-ctl restart took", f"{took:.1f} s")
    slowest = max(job[rw]["lat_ns"]["max"] for rw in ("read", "write")) / 1e9
    report(f"{what}: slowest fio request (kernel timeout {KERNEL_TIMEOUT} s)", f"{slowest:.1f} s")
    resent = re.findall(r"Connection timed out, retrying", sh("dmesg")[len(before) :])
    report(f"{what}: requests resent after the kernel timeout", str(len(resent)))
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
