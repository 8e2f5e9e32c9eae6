"""rbd images as tap-ctl devices: the YAML's Ceph defaults, allowed_dirs, and the VBD's retry
across an OSD outage longer than librbd's own operation timeout."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest
from cbt_helpers import BLOCK, marked, write_log
from migration_helpers import SIZE, Writers
from rbd_helpers import Cluster
from tapctl_helpers import TapCtl, nbd_uri, wait_gone

from tapdisk.config import ConfigError, parse

MiB = 1 << 20


def write_config(path: Path, ceph: Cluster, extra: str = "") -> Path:
    """A tapdisk.yaml whose ceph_conf and ceph_id name the test cluster."""
    path.write_text(f"ceph_conf: {ceph.conf}\nceph_id: admin\n{extra}")
    return path


def test_an_rbd_spec_without_conf_uses_the_configuration_s_cluster(
    ceph: Cluster, tapctl: TapCtl, tmp_path: Path
) -> None:
    name = ceph.create("8M")
    config = write_config(tmp_path / "tapdisk.yaml", ceph, f"allowed_dirs: [{tmp_path}]\n")
    pid = int(tapctl.out("spawn", "--config", str(config)))
    sock = tapctl.out("open", "-p", str(pid), "-a", f"rbd:{name}")
    handle = nbd.NBD()
    handle.connect_uri(nbd_uri(sock))
    handle.pwrite(b"\x5a" * MiB, 2 * MiB)
    handle.flush()
    handle.shutdown()
    assert ceph.export(name, tmp_path / "export.raw")[2 * MiB : 3 * MiB] == b"\x5a" * MiB


def test_an_rbd_spec_with_no_cluster_configured_fails_in_one_line(
    ceph: Cluster, tapctl: TapCtl, tmp_path: Path
) -> None:
    # No ceph_conf and no /etc/ceph/ceph.conf on a test host: Ceph's default finds nothing.
    pid = int(tapctl.out("spawn"))
    proc = tapctl("open", "-p", str(pid), "-a", "rbd:rbd/disk:conf=/nonexistent.conf", check=False)
    assert proc.returncode != 0
    assert "cannot connect to the Ceph cluster" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("during", ["write", "read"])
def test_an_osd_outage_longer_than_the_op_timeout_is_retried_by_the_vbd(
    ceph: Cluster, tapctl: TapCtl, tmp_path: Path, during: str
) -> None:
    """A write takes the VBD's queue; a read, after the first request, is started at once
    (``Scheduler.start_read``) and goes through the queue only once it has failed."""
    name = ceph.create("8M")
    pid = int(tapctl.out("spawn"))
    # librbd gives up on the OSD after 2 s: the request fails with ETIMEDOUT and the VBD
    # retries it until the OSD is back (the device's deadline is the default 120 s).
    spec = f"{ceph.spec(name)}:rados_osd_op_timeout=2"
    sock = tapctl.out("open", "-p", str(pid), "-a", spec)
    handle = nbd.NBD()
    handle.connect_uri(nbd_uri(sock))
    handle.pwrite(b"\x01" * MiB, 0)
    errors: list[BaseException] = []
    got: list[bytes] = []
    done = threading.Event()

    def io_while_down() -> None:
        try:
            if during == "write":
                handle.pwrite(b"\x02" * MiB, 0)
                handle.flush()
            else:
                got.append(handle.pread(MiB, 0))
        except BaseException as exc:
            errors.append(exc)
        done.set()

    thread = threading.Thread(target=io_while_down)
    ceph.restart_osd(down=5.0, during=thread.start)
    assert done.wait(120)
    thread.join()
    assert errors == []
    stats = json.loads(tapctl.out("stats", "-p", str(pid), "-m", sock.rsplit(".", 1)[1]))
    assert stats["vbd"]["retries"] >= 1  # librbd did fail it: the retry is what saved it
    handle.shutdown()
    if during == "read":
        assert got == [b"\x01" * MiB]
    else:
        assert ceph.export(name, tmp_path / "export.raw")[:MiB] == b"\x02" * MiB


def test_tapctl_snapshot_of_an_rbd_device_takes_an_rbd_snapshot_in_place(
    ceph: Cluster, tapctl: TapCtl
) -> None:
    name = ceph.create("8M")
    pid, minor, sock = tapctl.spawn_open(ceph.spec(name))
    handle = nbd.NBD()
    handle.connect_uri(nbd_uri(sock))
    handle.pwrite(b"\x11" * MiB, 0)
    snapshot = tapctl.out("snapshot", "-p", str(pid), "-m", str(minor), "-a", "rbd:before")
    assert snapshot == f"rbd:{name}@before:conf={ceph.conf}"
    handle.pwrite(b"\x22" * MiB, 0)  # the same connection, the same device, after the pause
    handle.flush()
    assert handle.pread(MiB, 0) == b"\x22" * MiB
    assert "before" in ceph.rbd("snap", "ls", name)
    with nbd_served_snapshot(tapctl, snapshot) as frozen:
        assert frozen.pread(MiB, 0) == b"\x11" * MiB
    again = tapctl("snapshot", "-p", str(pid), "-m", str(minor), "-a", "rbd:before", check=False)
    assert again.returncode != 0 and "already exists" in again.stderr
    [device] = [info for info in tapctl.listing() if info["minor"] == minor]
    assert device["spec"] == ceph.spec(name)


@contextlib.contextmanager
def nbd_served_snapshot(tapctl: TapCtl, spec: str) -> Iterator[nbd.NBD]:
    """The snapshot ``spec`` opened read-only in a tapdisk of its own, over NBD."""
    _, _, sock = tapctl.spawn_open(spec)
    handle = nbd.NBD()
    handle.connect_uri(nbd_uri(sock))
    assert handle.is_read_only()
    yield handle
    handle.shutdown()


def test_the_configuration_takes_rbd_devices_whatever_allowed_dirs_says() -> None:
    config = parse(
        "ceph_conf: /etc/ceph/other.conf\nceph_id: tapdisk\nallowed_dirs: [/srv/images]\n"
        "devices:\n  - spec: rbd:rbd/vm1\n  - spec: raw:/srv/images/a.img\n"
    )
    assert (config.ceph_conf, config.ceph_id) == ("/etc/ceph/other.conf", "tapdisk")
    assert [d.spec for d in config.devices] == ["rbd:rbd/vm1", "raw:/srv/images/a.img"]
    with pytest.raises(ConfigError, match="ceph_conf: expected an absolute file path"):
        parse("ceph_conf: ceph.conf\n")


def test_writes_librbd_starts_itself_are_marked_in_the_cbt_log(
    ceph: Cluster, tapctl: TapCtl, tmp_path: Path
) -> None:
    """After the first request, a write to an rbd device skips the VBD's queue
    (``start_write``): the CBT layer marks it all the same, before it starts."""
    name = ceph.create("64M")
    log = write_log(tmp_path / "disk.cbtlog", 64 * MiB, ())
    _, _, sock = tapctl.spawn_open(ceph.spec(name), "-C", str(log))
    handle = nbd.NBD()
    handle.connect_uri(nbd_uri(sock))
    handle.pwrite(b"a" * 512, 0)  # the first request takes the queue
    handle.pwrite(b"b" * BLOCK, 7 * BLOCK)
    handle.pwrite(b"c" * 2, 21 * BLOCK - 1)
    handle.pwrite(b"d" * 4096, 40 * BLOCK, nbd.CMD_FLAG_FUA)
    handle.flush()
    assert marked(log) == {0, 7, 20, 21, 40}
    handle.shutdown()


def test_writes_to_a_mirrored_rbd_device_reach_the_secondary(
    ceph: Cluster, tapctl: TapCtl, tmp_path: Path
) -> None:
    """The mirror layer keeps every write of an rbd primary to itself (no ``start_write``),
    so each reaches the secondary too."""
    name = ceph.create("16M")
    secondary = tmp_path / "s.img"
    secondary.write_bytes(bytes(16 * MiB))
    _, _, sock = tapctl.spawn_open(ceph.spec(name), "-2", f"raw:{secondary}")
    handle = nbd.NBD()
    handle.connect_uri(nbd_uri(sock))
    for i in range(8):
        handle.pwrite(bytes([i + 1]) * MiB, i * MiB)
    handle.flush()
    handle.shutdown()
    expected = b"".join(bytes([i + 1]) * MiB for i in range(8))
    assert secondary.read_bytes()[: 8 * MiB] == expected
    assert ceph.export(name, tmp_path / "export.raw")[: 8 * MiB] == expected


def test_a_restart_hands_an_rbd_device_over_under_verifying_writers(
    ceph: Cluster, tapctl: TapCtl, tmp_path: Path
) -> None:
    """``tap-ctl restart`` (an upgrade under running VMs): the old tapdisk closes the image
    in the hold, so its librbd lets go of the exclusive lock and the watch, and the new one
    opens it with the same configuration; no write is lost and one client holds the image."""
    name = ceph.create(f"{SIZE}B")
    config = write_config(tmp_path / "tapdisk.yaml", ceph)
    pid = int(tapctl.out("spawn", "--config", str(config)))
    sock = tapctl.out("open", "-p", str(pid), "-a", f"rbd:{name}")
    ref = bytearray(SIZE)  # a new image reads as zeroes
    writers = Writers(sock, ref, seed=71)
    for _ in range(2):
        writers.go_on(5)
        old, pid = pid, int(tapctl.out("restart", "-p", str(pid)))
        assert wait_gone(old), f"the old tapdisk {old} did not exit"
    writers.go_on(5)
    writers.finish()
    assert tapctl.pids() == [pid]
    assert ceph.rbd("status", name).count("watcher=") == 1
    handle = nbd.NBD()
    handle.connect_uri(nbd_uri(sock))
    step = 16 * MiB
    assert b"".join(handle.pread(step, start) for start in range(0, SIZE, step)) == ref
    handle.shutdown()
