"""tap-img on rbd: images, and qcow2 overlays and VHD children on a golden image in Ceph,
checked with qemu (qcow2), vhd-util (VHD) and ``rbd export``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbd
import pytest
from helpers import require, run
from rbd_helpers import Cluster
from tapctl_helpers import TapCtl, nbd_uri
from tapdisk.drivers.vhd.create import create_vhd

MiB = 1 << 20
TAP_IMG = str(Path(sys.executable).with_name("tap-img"))
VHD_UTIL = str(Path(sys.executable).with_name("vhd-util"))


def test_tap_img_creates_inspects_and_converts_rbd_images(ceph: Cluster, tmp_path: Path) -> None:
    name = f"rbd/tapimg-{tmp_path.name}"
    run(TAP_IMG, "create", "-q", "-f", "raw", ceph.spec(name), "24M")
    info = json.loads(run(TAP_IMG, "info", "--output", "json", ceph.spec(name)))
    assert (info["format"], info["virtual-size"]) == ("rbd", 24 * MiB)
    source = tmp_path / "source.qcow2"
    run(require("qemu-img"), "create", "-q", "-f", "qcow2", source, "20M")
    run(require("qemu-io"), "-c", "write -P 0x61 1M 3M", "-c", "write -P 0x62 17M 64k", source)
    copy = f"rbd/converted-{tmp_path.name}"
    run(TAP_IMG, "convert", "-O", "raw", source, ceph.spec(copy))
    run(require("qemu-img"), "compare", "-f", "qcow2", "-F", "raw", source, ceph.spec(copy))
    back = tmp_path / "back.qcow2"
    run(TAP_IMG, "convert", "-O", "qcow2", ceph.spec(copy), back)
    run(require("qemu-img"), "compare", source, back)
    again = subprocess.run(
        [TAP_IMG, "create", "-f", "raw", ceph.spec(name), "1M"], text=True, capture_output=True
    )
    assert again.returncode == 1 and "already exists" in again.stderr


@pytest.fixture
def golden(ceph: Cluster, tmp_path: Path) -> str:
    """A protected snapshot ``rbd/gold-N@base`` holding 0x61 at 1 MiB..4 MiB."""
    name = ceph.create("16M")
    run(require("qemu-io"), "-f", "raw", "-c", "write -P 0x61 1M 3M", ceph.spec(name))
    ceph.rbd("snap", "create", f"{name}@base")
    ceph.rbd("snap", "protect", f"{name}@base")
    return f"rbd:{name}@base"


def test_a_qcow2_overlay_on_an_rbd_snapshot_is_served_and_qemu_agrees(
    ceph: Cluster, golden: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve
) -> None:
    monkeypatch.setenv("CEPH_CONF", ceph.conf)  # tap-img and serve read no YAML: Ceph's own
    overlay = tmp_path / "vm.qcow2"
    run(TAP_IMG, "create", "-q", "-f", "qcow2", "-b", golden, overlay)
    info = json.loads(run(require("qemu-img"), "info", "--output", "json", overlay))
    assert (info["backing-filename"], info["backing-filename-format"]) == (golden, "raw")
    chain = json.loads(run(TAP_IMG, "info", "--output", "json", "--backing-chain", overlay))
    assert [i["filename"] for i in chain] == [str(overlay), golden]
    served = serve(f"qcow2:{overlay}")
    handle = nbd.NBD()
    handle.connect_uri(served.uri())
    assert handle.get_size() == 16 * MiB
    assert handle.pread(MiB, 2 * MiB) == b"\x61" * MiB
    handle.pwrite(b"\x63" * 65536, 2 * MiB)
    handle.flush()
    handle.shutdown()
    served.stop()
    run(require("qemu-io"), "-c", "read -P 0x63 2M 64k", "-c", "read -P 0x61 3M 1M", overlay)


def test_committing_an_overlay_into_an_rbd_snapshot_fails_in_one_line(
    ceph: Cluster, golden: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot cannot take the overlay's data: tap-img says so at once (librbd never
    completed the first write, and commit waited forever) and the overlay is untouched."""
    monkeypatch.setenv("CEPH_CONF", ceph.conf)
    overlay = tmp_path / "vm.qcow2"
    run(TAP_IMG, "create", "-q", "-f", "qcow2", "-b", golden, overlay)
    run(require("qemu-io"), "-c", "write -P 0x63 2M 64k", overlay)
    failed = subprocess.run(
        [TAP_IMG, "commit", str(overlay)], text=True, capture_output=True, timeout=60
    )
    assert failed.returncode == 1
    (line,) = failed.stderr.splitlines()
    assert "read-only" in line and golden in line
    run(require("qemu-io"), "-c", "read -P 0x63 2M 64k", "-c", "read -P 0x61 3M 1M", overlay)


def overlay_on(golden: str, fmt: str, path: Path) -> None:
    """A 16 MiB ``fmt`` image over ``golden`` at ``path``, made without reaching the cluster
    (so nothing but the daemon's configuration tells where it is)."""
    if fmt == "vhd":
        create_vhd(str(path), 16 * MiB, parent=golden, parent_raw=True)
        return
    qemu_img = require("qemu-img")
    run(qemu_img, "create", "-q", "-u", "-f", fmt, "-F", "raw", "-b", golden, path, "16M")


def spawn_on(ceph: Cluster, tmp_path: Path, tapctl: TapCtl) -> int:
    """A tapdisk whose YAML alone names the cluster (``ceph_conf``) and allows ``tmp_path``."""
    config = tmp_path / "tapdisk.yaml"
    config.write_text(f"ceph_conf: {ceph.conf}\nallowed_dirs: [{tmp_path}]\n")
    return int(tapctl.out("spawn", "--config", str(config)))


@pytest.mark.parametrize("fmt", ["qcow2", "vhd"])
def test_a_tapctl_device_on_an_overlay_uses_the_configuration_s_cluster(
    ceph: Cluster, golden: str, tmp_path: Path, tapctl: TapCtl, fmt: str
) -> None:
    overlay = tmp_path / f"vm.{fmt}"
    overlay_on(golden, fmt, overlay)
    pid = spawn_on(ceph, tmp_path, tapctl)
    sock = tapctl.out("open", "-p", str(pid), "-a", f"{fmt}:{overlay}")
    handle = nbd.NBD()
    handle.connect_uri(nbd_uri(sock))
    assert handle.pread(MiB, MiB) == b"\x61" * MiB
    handle.shutdown()


@pytest.mark.parametrize("fmt", ["qcow2", "vhd"])
def test_a_backing_name_carrying_ceph_options_is_refused(
    ceph: Cluster, golden: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve, fmt: str
) -> None:
    monkeypatch.setenv("CEPH_CONF", ceph.conf)
    overlay = tmp_path / f"hostile.{fmt}"
    overlay_on(f"{golden}:conf={tmp_path}/other.conf", fmt, overlay)
    with pytest.raises(AssertionError, match="carries options"):
        serve(f"{fmt}:{overlay}")
    if fmt == "vhd":  # tap-img does not make such a child
        made = subprocess.run(
            [TAP_IMG, "create", "-f", "vhd", "-b", ceph.spec(golden[4:]), tmp_path / "no.vhd"],
            text=True,
            capture_output=True,
        )
        assert made.returncode == 1 and "carries options" in made.stderr
        assert not (tmp_path / "no.vhd").exists()


def test_a_vhd_child_on_an_rbd_snapshot_is_served_and_vhd_util_follows_it(
    ceph: Cluster, golden: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve
) -> None:
    """tap-img makes the child over the snapshot; reads fall through to Ceph, writes stay in
    the child, the snapshot is untouched; vhd-util checks the child and names its parent."""
    monkeypatch.setenv("CEPH_CONF", ceph.conf)
    child = tmp_path / "vm.vhd"
    run(TAP_IMG, "create", "-q", "-f", "vhd", "-b", golden, child)
    info = json.loads(run(TAP_IMG, "info", "--output", "json", "--backing-chain", child))
    assert [(i["filename"], i["virtual-size"]) for i in info] == [
        (str(child), 16 * MiB),
        (golden, 16 * MiB),
    ]
    assert info[0]["backing-filename"] == golden
    served = serve(f"vhd:{child}")
    handle = nbd.NBD()
    handle.connect_uri(served.uri())
    assert handle.pread(MiB, 2 * MiB) == b"\x61" * MiB
    handle.pwrite(b"\x63" * 65536, 2 * MiB + 4096)
    handle.flush()
    handle.shutdown()
    served.stop()
    again = serve(f"vhd:{child}", "--read-only")
    handle = nbd.NBD()
    handle.connect_uri(again.uri())
    assert handle.pread(8192, 2 * MiB) == b"\x61" * 4096 + b"\x63" * 4096
    assert handle.pread(4096, 2 * MiB + 69632) == b"\x61" * 4096
    assert handle.pread(4096, 8 * MiB) == bytes(4096)
    handle.shutdown()
    assert run(VHD_UTIL, "query", "-n", child, "-p").strip() == golden
    assert run(VHD_UTIL, "query", "-n", child, "-d").strip() == "chain depth: 2"
    assert "is valid" in run(VHD_UTIL, "check", "-n", child)
    scanned = run(VHD_UTIL, "scan", "-f", "-m", str(child), "-v")
    assert f"parent={golden}" in scanned and "not found" not in scanned
    name = golden.removeprefix("rbd:")
    exported = ceph.export(name, tmp_path / "base.raw")
    assert exported[MiB : 4 * MiB] == b"\x61" * (3 * MiB)


def test_a_vhd_child_commits_into_an_rbd_image_but_not_into_a_snapshot(
    ceph: Cluster, golden: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve
) -> None:
    monkeypatch.setenv("CEPH_CONF", ceph.conf)
    on_snapshot = tmp_path / "snap.vhd"
    run(TAP_IMG, "create", "-q", "-f", "vhd", "-b", golden, on_snapshot)
    refused = subprocess.run(
        [TAP_IMG, "commit", str(on_snapshot)], text=True, capture_output=True, timeout=60
    )
    assert refused.returncode == 1
    (line,) = refused.stderr.splitlines()
    assert "read-only" in line and golden in line
    head = golden.removeprefix("rbd:").partition("@")[0]
    child = tmp_path / "head.vhd"
    run(TAP_IMG, "create", "-q", "-f", "vhd", "-b", f"rbd:{head}", child)
    served = serve(f"vhd:{child}")
    handle = nbd.NBD()
    handle.connect_uri(served.uri())
    handle.pwrite(b"\x64" * 8192, 3 * MiB)
    handle.flush()
    handle.shutdown()
    served.stop()
    said = run(TAP_IMG, "commit", child)
    assert said.strip().endswith(f"Image committed into rbd:{head}.")
    exported = ceph.export(head, tmp_path / "head.raw")
    assert exported[3 * MiB : 3 * MiB + 8192] == b"\x64" * 8192
    assert exported[MiB : 3 * MiB] == b"\x61" * (2 * MiB)


def test_a_failed_open_above_an_rbd_image_leaves_no_cluster_connection(
    ceph: Cluster, golden: str, tmp_path: Path, tapctl: TapCtl
) -> None:
    """The child's VHD parent, itself over Ceph, has been replaced by another image: the open
    fails on the UUID after that parent connected to the cluster, and the daemon keeps no
    connection (librados's threads) from it."""
    middle = tmp_path / "middle.vhd"
    create_vhd(str(middle), 16 * MiB, parent=golden, parent_raw=True)
    child = tmp_path / "child.vhd"
    create_vhd(str(child), 0, parent=str(middle))
    middle.unlink()
    create_vhd(str(middle), 16 * MiB, parent=golden, parent_raw=True)
    pid = spawn_on(ceph, tmp_path, tapctl)
    sock = tapctl.out("open", "-p", str(pid), "-a", f"vhd:{middle}")
    tapctl.out("close", "-p", str(pid), "-m", sock.rsplit(".", 1)[1])
    threads = len(os.listdir(f"/proc/{pid}/task"))
    failed = tapctl("open", "-p", str(pid), "-a", f"vhd:{child}", check=False)
    assert failed.returncode != 0 and "does not match the UUID" in failed.stderr
    assert len(os.listdir(f"/proc/{pid}/task")) == threads


def test_sm_s_snapshot_of_a_vhd_device_on_rbd_reopens_the_chain_with_the_daemon_s_cluster(
    ceph: Cluster, golden: str, tmp_path: Path, tapctl: TapCtl
) -> None:
    """SM's way: pause, ``vhd-util snapshot``, unpause on the new leaf: the chain opens again
    down to Ceph with the configuration's cluster, and both layers' data read back."""
    leaf = tmp_path / "vm.vhd"
    create_vhd(str(leaf), 16 * MiB, parent=golden, parent_raw=True)
    pid = spawn_on(ceph, tmp_path, tapctl)
    sock = tapctl.out("open", "-p", str(pid), "-a", f"vhd:{leaf}")
    minor = sock.rsplit(".", 1)[1]
    handle = nbd.NBD()
    handle.connect_uri(nbd_uri(sock))
    handle.pwrite(b"\x65" * 65536, 2 * MiB)
    handle.flush()
    tapctl.out("pause", "-p", str(pid), "-m", minor)
    snap = tmp_path / "snap.vhd"
    run(VHD_UTIL, "snapshot", "-n", snap, "-p", leaf)
    tapctl.out("unpause", "-p", str(pid), "-m", minor, "-a", f"vhd:{snap}")
    handle.pwrite(b"\x66" * 4096, 3 * MiB)
    assert handle.pread(4096, 2 * MiB) == b"\x65" * 4096
    assert handle.pread(8192, 3 * MiB - 4096) == b"\x61" * 4096 + b"\x66" * 4096
    handle.shutdown()
    assert run(VHD_UTIL, "query", "-n", snap, "-d").strip() == "chain depth: 3"


@pytest.mark.parametrize("fmt", ["qcow2", "vhd"])
def test_tap_img_snapshot_puts_an_overlay_on_an_rbd_image(
    ceph: Cluster, golden: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    monkeypatch.setenv("CEPH_CONF", ceph.conf)
    overlay = tmp_path / f"top.{fmt}"
    run(TAP_IMG, "snapshot", "-f", fmt, golden, overlay)
    info = json.loads(run(TAP_IMG, "info", "--output", "json", overlay))
    assert (info["format"], info["backing-filename"], info["virtual-size"]) == (
        fmt,
        golden,
        16 * MiB,
    )


@pytest.mark.parametrize("fmt", ["qcow2", "vhd"])
def test_an_unreachable_cluster_below_an_overlay_is_named_with_the_overlay(
    ceph: Cluster, golden: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve, fmt: str
) -> None:
    overlay = tmp_path / f"vm.{fmt}"
    overlay_on(golden, fmt, overlay)
    monkeypatch.setenv("CEPH_CONF", str(tmp_path / "absent.conf"))
    said = re.escape(f"{overlay}: backing file {golden}: cannot connect")
    with pytest.raises(AssertionError, match=said):
        serve(f"{fmt}:{overlay}")
