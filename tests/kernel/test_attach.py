"""control.kernel against the real nbd.ko: our NBD server behind /dev/nbdX.

Each test serves a raw image with the project's own ``NBDServer`` in
no-handshake mode over socketpairs and attaches them with generic netlink.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from kerneltools import DirectServer, device, sh, sha256_file, sysfs

from tapdisk import kernel
from tapdisk.kernel import KernelAttachError
from tapdisk.nbd.constants import TransmissionFlag

MiB = 1 << 20
KERNELTOOLS = Path(__file__).with_name("kerneltools.py")


def make_raw(tmp_path: Path, size: int = 64 * MiB, name: str = "disk.raw") -> Path:
    path = tmp_path / name
    sh("qemu-img", "create", "-q", "-f", "raw", path, str(size))
    return path


def random_file(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return sha256_file(path)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def test_ensure_module_loads_nbd_after_rmmod() -> None:
    kernel.ensure_module()
    busy = [i for i, up in kernel.status().items() if up]
    assert not busy, f"devices still connected from an earlier test: {busy}"
    sh("rmmod", "nbd")
    with pytest.raises(KernelAttachError) as unloaded:
        kernel.status()
    assert unloaded.value.errno == errno.ENOENT
    assert "modprobe nbd" in str(unloaded.value)

    family = kernel.ensure_module()

    assert family.version == 1
    assert family.maxattr >= 10  # NBD_ATTR_BACKEND_IDENTIFIER is known
    assert "nbd_mc_group" in family.mcast_groups
    assert os.path.exists("/sys/module/nbd")


def test_status_lists_every_idle_device(nbd_module: None) -> None:
    devices = kernel.status()
    assert set(range(16)) <= set(devices)
    assert kernel.status(3) == {3: devices[3]}


def test_status_of_a_missing_index_is_empty(nbd_module: None) -> None:
    assert kernel.status(4000) == {}


def test_dd_through_the_device_reaches_the_image(
    direct_server: Callable[..., DirectServer],
    tmp_path: Path,
    report: Callable[[str, str], None],
) -> None:
    image = make_raw(tmp_path)
    server = direct_server(f"raw:{image}")
    index = server.attach()
    dev = device(index)
    assert int(sh("blockdev", "--getsize64", dev)) == 64 * MiB
    pattern, back = tmp_path / "pattern", tmp_path / "back"
    digest = random_file(pattern, 32 * MiB)

    start = time.monotonic()
    sh("dd", f"if={pattern}", f"of={dev}", "bs=1M", "oflag=direct", "conv=fsync", "status=none")
    write_s = time.monotonic() - start
    start = time.monotonic()
    sh("dd", f"if={dev}", f"of={back}", "bs=1M", "count=32", "iflag=direct", "status=none")
    read_s = time.monotonic() - start

    assert sha256_file(back) == digest
    assert sha256_file(image, 32 * MiB) == digest
    report("dd 32 MiB write, bs=1M O_DIRECT, 1 socket", f"{32 * MiB / write_s / 1e6:.1f} MB/s")
    report("dd 32 MiB read, bs=1M O_DIRECT, 1 socket", f"{32 * MiB / read_s / 1e6:.1f} MB/s")


def test_backend_identifier_shows_in_sysfs(
    direct_server: Callable[..., DirectServer], tmp_path: Path
) -> None:
    server = direct_server(f"raw:{make_raw(tmp_path)}")
    index = server.attach(backend_id="tapdisk-test:42")
    assert sysfs(index, "backend") == "tapdisk-test:42"
    assert kernel.backend(index) == "tapdisk-test:42"


def test_ext4_written_through_the_device_is_intact_in_the_image(
    direct_server: Callable[..., DirectServer], tmp_path: Path
) -> None:
    image = make_raw(tmp_path)
    server = direct_server(f"raw:{image}")
    index = server.attach()
    dev = device(index)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sh("mkfs.ext4", "-q", "-F", dev)
    sh("mount", dev, mnt)
    try:
        (mnt / "dir").mkdir()
        digests = {
            f"dir/f{i}": random_file(mnt / "dir" / f"f{i}", i * 300_000 + 17) for i in range(1, 9)
        }
        sh("sync")
    finally:
        sh("umount", mnt)
    sh("e2fsck", "-fn", dev)
    server.stop()
    assert kernel.status(index) == {index: False}

    # The image itself, read without the kernel: a clean file system with our files.
    sh("e2fsck", "-fn", image)
    for name, digest in digests.items():
        out = tmp_path / "out"
        sh("debugfs", "-R", f"dump /{name} {out}", image)
        assert sha256_file(out) == digest, name


def test_multi_conn_device_spreads_io_over_two_sockets(
    direct_server: Callable[..., DirectServer],
    tmp_path: Path,
    report: Callable[[str, str], None],
) -> None:
    image = make_raw(tmp_path)
    server = direct_server(f"raw:{image}")
    assert server.flags & TransmissionFlag.CAN_MULTI_CONN
    index = server.attach(conns=2)
    dev = device(index)
    assert len(os.listdir(f"/sys/block/nbd{index}/mq")) == 2  # one hw queue per socket
    assert len(server.server.connections) == 2
    halves = [tmp_path / "a", tmp_path / "b"]
    digests = [random_file(half, 16 * MiB) for half in halves]

    # One writer per CPU: blk-mq maps each CPU to its own hardware queue (socket).
    start = time.monotonic()
    writers = [
        subprocess.Popen(
            ["taskset", "-c", str(cpu), "dd", f"if={half}", f"of={dev}", "bs=1M",
             f"seek={16 * cpu}", "oflag=direct", "conv=fsync,notrunc", "status=none"],
        )
        for cpu, half in enumerate(halves)
    ]  # fmt: skip
    assert [w.wait(120) for w in writers] == [0, 0]
    write_s = time.monotonic() - start

    assert sha256_file(dev, 16 * MiB) == digests[0]
    back = tmp_path / "back"
    sh("dd", f"if={dev}", f"of={back}", "bs=1M", "skip=16", "count=16", "iflag=direct")
    assert sha256_file(back) == digests[1]
    assert sha256_file(image, 16 * MiB) == digests[0]
    report(
        "dd 2x16 MiB parallel write, bs=1M O_DIRECT, 2 sockets",
        f"{32 * MiB / write_s / 1e6:.1f} MB/s",
    )


def test_disconnect_detaches_and_closes_every_socket(
    direct_server: Callable[..., DirectServer], tmp_path: Path
) -> None:
    server = direct_server(f"raw:{make_raw(tmp_path)}")
    index = server.attach(conns=2)
    kernel.disconnect(index)
    assert kernel.status(index) == {index: False}
    wait_until(lambda: not server.server.connections, "the server's connections to close")


def test_connect_to_a_busy_index_fails_with_ebusy(
    direct_server: Callable[..., DirectServer], tmp_path: Path
) -> None:
    server = direct_server(f"raw:{make_raw(tmp_path)}")
    index = server.attach()
    with pytest.raises(KernelAttachError) as busy:
        server.attach(index=index)
    assert busy.value.errno == errno.EBUSY
    assert kernel.status(index) == {index: True}


def test_read_only_export_gives_a_read_only_device(
    direct_server: Callable[..., DirectServer], tmp_path: Path
) -> None:
    server = direct_server(f"raw:{make_raw(tmp_path)}", read_only=True)
    assert server.flags & TransmissionFlag.READ_ONLY
    index = server.attach()
    assert sysfs(index, "ro") == "1"
    proc = subprocess.run(
        ["dd", "if=/dev/zero", f"of={device(index)}", "bs=4k", "count=1", "oflag=direct"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "Operation not permitted" in proc.stderr or "Read-only" in proc.stderr


def test_reconfigure_with_another_backend_is_refused(
    direct_server: Callable[..., DirectServer], tmp_path: Path
) -> None:
    server = direct_server(f"raw:{make_raw(tmp_path)}")
    index = server.attach()
    with pytest.raises(KernelAttachError) as refused:
        kernel.reconfigure(index, backend_id="someone-else", timeout=30)
    assert refused.value.errno == errno.EINVAL


def test_reconfigure_refuses_sockets_while_the_old_ones_are_alive(
    direct_server: Callable[..., DirectServer], tmp_path: Path
) -> None:
    server = direct_server(f"raw:{make_raw(tmp_path)}")
    index = server.attach()
    with pytest.raises(KernelAttachError, match="did not take socket") as refused:
        server.take_over(index)
    assert refused.value.errno == errno.EBUSY
    assert kernel.status(index) == {index: True}


def test_reconfigure_resizes_the_device_online(
    direct_server: Callable[..., DirectServer], tmp_path: Path
) -> None:
    server = direct_server(f"raw:{make_raw(tmp_path)}")
    index = server.attach()
    kernel.reconfigure(index, backend_id=server.spec, size=96 * MiB)
    assert int(sh("blockdev", "--getsize64", device(index))) == 96 * MiB


def test_io_fails_once_no_server_takes_over_within_dead_conn_timeout(
    direct_server: Callable[..., DirectServer], tmp_path: Path
) -> None:
    server = direct_server(f"raw:{make_raw(tmp_path)}")
    index = server.attach(timeout=5, dead_conn_timeout=2)
    try:
        with kernel.LinkDeadWatcher() as watcher:
            server.stop(detach=False)
            watcher.wait(index, 1, timeout=30)
        start = time.monotonic()
        proc = subprocess.run(
            ["dd", "if=/dev/zero", f"of={device(index)}", "bs=4k", "count=1", "oflag=direct"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        waited = time.monotonic() - start
    finally:
        kernel.disconnect(index)
    assert proc.returncode != 0
    assert "Input/output error" in proc.stderr
    assert waited >= 1.5  # it did wait for a replacement first


def start_attacher(*args: str) -> tuple[subprocess.Popen[str], int]:
    """``kerneltools.py ARGS`` in its own process; returns it and the device index."""
    proc = subprocess.Popen(
        [sys.executable, str(KERNELTOOLS), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()
    match = re.fullmatch(r"nbd (\d+)\n", line)
    if match is None:
        proc.kill()
        pytest.fail(f"attacher {args} failed: {line}{proc.stderr.read()}")
    return proc, int(match.group(1))


@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
def test_server_restart_under_fio_load_loses_no_io(
    nbd_module: None,
    tmp_path: Path,
    report: Callable[[str, str], None],
    stop_signal: signal.Signals,
) -> None:
    spec = f"raw:{make_raw(tmp_path)}"
    old, index = start_attacher(spec, "--timeout", "10", "--dead-conn-timeout", "60")
    new: subprocess.Popen[str] | None = None
    dev = device(index)
    dmesg_before = sh("dmesg")
    fio = subprocess.Popen(
        ["fio", "--name=restart", f"--filename={dev}", "--ioengine=libaio", "--direct=1",
         "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=16M", "--rate_iops=400",
         "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--output-format=json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(2)
        assert fio.poll() is None, "fio finished before the restart: the test proves nothing"
        with kernel.LinkDeadWatcher() as watcher:
            start = time.monotonic()
            old.send_signal(stop_signal)
            assert old.wait(60) in (0, -signal.SIGKILL)
            watcher.wait(index, 1, timeout=30)
            assert kernel.backend(index) == spec
            new, taken = start_attacher(spec, "--reconfigure", str(index))
            gap = time.monotonic() - start
        assert taken == index
        output, errors = fio.communicate(timeout=240)
        assert fio.returncode == 0, output + errors
        (job,) = json.loads(output)["jobs"]
        assert job["error"] == 0, job
        new_log = sh("dmesg")[len(dmesg_before) :]
        assert f"I/O error, dev nbd{index}" not in new_log, new_log
        report(f"restart ({stop_signal.name}) old exit -> new attached", f"{gap:.1f} s")
        # submission + completion, of the writes and of the verifying reads
        slowest = max(job[rw]["lat_ns"]["max"] for rw in ("read", "write")) / 1e9
        report(f"restart ({stop_signal.name}) slowest fio request", f"{slowest:.1f} s")
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
        if kernel.status(index).get(index):
            kernel.disconnect(index)
        for proc in (old, new):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(30)
