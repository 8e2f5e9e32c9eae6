"""A full Ceph pool: Ceph holds writes until space is freed, which librados reports as a
timeout.  tapdisk tells the two apart by asking the monitors: writes fail with ENOSPC and a
warning naming the pool (a tap-ctl device's VBD passes it on without a retry), a read-write
open says the pool is full, reads go on, and writes work again once there is room."""

from __future__ import annotations

import json
import subprocess
import time

import nbd
import pytest
from helpers import TAPDISK, run
from rbd_helpers import Cluster
from tapctl_helpers import TapCtl, nbd_uri

MiB = 1 << 20
#: Ceph's default ratios, in the order they are raised back.
DEFAULT_RATIOS = (("full", "0.95"), ("backfillfull", "0.90"), ("nearfull", "0.85"))
#: Far below what the images already written use: the OSD reports itself full.
TINY_RATIOS = (("nearfull", "0.00001"), ("backfillfull", "0.00002"), ("full", "0.00003"))
#: Operations time out after this many seconds here (15 by default).
OSD_OP_TIMEOUT = 3


def pool_is_full(cluster: Cluster) -> bool:
    osd_map = json.loads(run("ceph", "-c", cluster.conf, "osd", "dump", "--format", "json"))
    return any("full" in pool["flags_names"].split(",") for pool in osd_map["pools"])


def set_ratios(cluster: Cluster, ratios: tuple[tuple[str, str], ...], full: bool) -> None:
    """Set the OSD fullness ratios and wait until the OSD map says the pools are ``full``
    (the OSD reports its use every few seconds)."""
    for kind, ratio in ratios:
        run("ceph", "-c", cluster.conf, "osd", f"set-{kind}-ratio", ratio)
    deadline = time.monotonic() + 60
    while pool_is_full(cluster) != full:
        assert time.monotonic() < deadline, f"the pools are not {'full' if full else 'free'}"
        time.sleep(0.5)


def test_writes_to_a_pool_that_fills_fail_with_enospc_and_resume_once_it_has_room(
    ceph: Cluster, serve
) -> None:
    name = ceph.create("16M")
    served = serve(f"{ceph.spec(name)}:rados_osd_op_timeout={OSD_OP_TIMEOUT}")
    handle = nbd.NBD()
    handle.connect_uri(served.uri(name.split("/")[-1]))
    handle.pwrite(b"\x11" * MiB, 0)
    handle.flush()
    set_ratios(ceph, TINY_RATIOS, full=True)
    try:
        for offset in (2 * MiB, 3 * MiB):  # a direct write, and one after the warning
            with pytest.raises(nbd.Error) as failed:
                handle.pwrite(b"\x22" * 4096, offset)
            assert failed.value.errno == "ENOSPC"
        with pytest.raises(nbd.Error) as failed:
            handle.zero(4096, 0)  # a zeroing runs in a task, not directly
        assert failed.value.errno == "ENOSPC"
        assert handle.pread(4096, 4096) == b"\x11" * 4096  # reads go on
    finally:
        set_ratios(ceph, DEFAULT_RATIOS, full=False)
    handle.pwrite(b"\x33" * 4096, 2 * MiB)
    handle.flush()
    assert handle.pread(4096, 2 * MiB) == b"\x33" * 4096
    handle.shutdown()
    served.stop()
    warnings = [line for line in served.stderr.splitlines() if "is full" in line]
    assert len(warnings) == 1, served.stderr  # once a minute at most
    assert f"rbd:{name}" in warnings[0] and "pool 'rbd' is full" in warnings[0]


def test_a_read_write_open_in_a_full_pool_says_the_pool_is_full(ceph: Cluster, serve) -> None:
    name = ceph.create("4M")  # creating writes too: before the pool fills
    spec = f"{ceph.spec(name)}:rados_osd_op_timeout={OSD_OP_TIMEOUT}"
    set_ratios(ceph, TINY_RATIOS, full=True)
    try:
        proc = subprocess.run(
            [TAPDISK, "serve", "--unix", "/nonexistent/never.sock", spec],
            capture_output=True,
            text=True,
            timeout=60,
        )
        served = serve(spec, "--read-only")
        handle = nbd.NBD()
        handle.connect_uri(served.uri(name.split("/")[-1]))
        assert handle.pread(4096, 0) == bytes(4096)  # a read-only open works
    finally:
        set_ratios(ceph, DEFAULT_RATIOS, full=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"tapdisk: rbd:{name}: cannot open the image: pool 'rbd' is full"
        " (a read-write open writes; read-only opens work)"
    ]


def test_a_tapctl_device_s_write_to_a_full_pool_fails_at_once_without_a_retry(
    ceph: Cluster, tapctl: TapCtl
) -> None:
    """ENOSPC is not transient: the VBD passes it on instead of trying the write again."""
    name = ceph.create("8M")
    pid, minor, sock = tapctl.spawn_open(f"{ceph.spec(name)}:rados_osd_op_timeout={OSD_OP_TIMEOUT}")
    handle = nbd.NBD()
    handle.connect_uri(nbd_uri(sock))
    handle.pwrite(b"\x44" * MiB, 0)  # the device's first request takes the queue
    set_ratios(ceph, TINY_RATIOS, full=True)
    try:
        with pytest.raises(nbd.Error) as failed:
            handle.pwrite(b"\x55" * 4096, MiB)  # started directly (Scheduler.start_write)
        assert failed.value.errno == "ENOSPC"
    finally:
        set_ratios(ceph, DEFAULT_RATIOS, full=False)
    stats = json.loads(tapctl.out("stats", "-p", str(pid), "-m", str(minor)))
    assert stats["vbd"]["retries"] == 0
    handle.shutdown()
