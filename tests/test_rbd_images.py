"""tap-img on rbd: images, and qcow2 overlays on a golden image in Ceph, checked with qemu."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbd
import pytest
from helpers import require, run
from rbd_helpers import Cluster
from tapctl_helpers import TapCtl, nbd_uri

MiB = 1 << 20
TAP_IMG = str(Path(sys.executable).with_name("tap-img"))


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


def test_a_tapctl_device_on_an_overlay_uses_the_configuration_s_cluster(
    ceph: Cluster, golden: str, tmp_path: Path, tapctl: TapCtl
) -> None:
    overlay = tmp_path / "vm.qcow2"
    run(
        require("qemu-img"),
        "create",
        "-q",
        "-u",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        golden,
        overlay,
        "16M",
    )
    config = tmp_path / "tapdisk.yaml"
    config.write_text(f"ceph_conf: {ceph.conf}\nallowed_dirs: [{tmp_path}]\n")
    pid = int(tapctl.out("spawn", "--config", str(config)))
    sock = tapctl.out("open", "-p", str(pid), "-a", f"qcow2:{overlay}")
    handle = nbd.NBD()
    handle.connect_uri(nbd_uri(sock))
    assert handle.pread(MiB, MiB) == b"\x61" * MiB
    handle.shutdown()


def test_a_backing_name_carrying_ceph_options_is_refused(
    ceph: Cluster, golden: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve
) -> None:
    monkeypatch.setenv("CEPH_CONF", ceph.conf)
    overlay = tmp_path / "hostile.qcow2"
    hostile = f"{golden}:conf={tmp_path}/other.conf"
    run(
        require("qemu-img"),
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-F",
        "raw",
        "-b",
        hostile,
        overlay,
        "16M",
    )
    with pytest.raises(AssertionError, match="carries options"):
        serve(f"qcow2:{overlay}")
