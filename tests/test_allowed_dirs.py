"""``allowed_dirs`` in real daemons: images, parents and overlays opened through tap-ctl.

Each test starts ``tapdisk daemon`` with ``--allowed-dir`` flags or a configuration file,
builds a real differencing image (a qcow2 overlay made by qemu-img, or a VHD made by
``vhd-util snapshot``) in one directory over a parent in another, and opens it with
``tap-ctl open``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest
from helpers import TAPDISK, require, run

BIN = Path(sys.executable).parent
TAPCTL = str(BIN / "tap-ctl")
VHD_UTIL = str(BIN / "vhd-util")


class Daemon:
    """A ``tapdisk daemon`` process in a private control directory."""

    def __init__(self, directory: Path, *flags: str) -> None:
        self.directory = directory
        self.proc = subprocess.Popen(
            [TAPDISK, "daemon", "--control-dir", str(directory), *flags],
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not (directory / f"ctl{self.proc.pid}").exists():
            assert self.proc.poll() is None, "the daemon exited"
            assert time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.05)

    def tapctl(self, command: str, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [TAPCTL, command, "--control-dir", str(self.directory), "-p", str(self.proc.pid)]
        return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def start(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    started: list[Daemon] = []

    def start_daemon(*flags: str) -> Daemon:
        daemon = Daemon(tmp_path / "run", *flags)
        started.append(daemon)
        return daemon

    yield start_daemon
    for daemon in started:
        daemon.stop()


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """(gold, vms): parents live in gold, the images a VM uses in vms."""
    gold, vms = tmp_path / "gold", tmp_path / "vms"
    gold.mkdir()
    vms.mkdir()
    return gold, vms


def qcow2_overlay(gold: Path, vms: Path) -> Path:
    """vms/disk.qcow2 over gold/base.raw, whose first 4 KiB are 0x5a."""
    base = gold / "base.raw"
    base.write_bytes(b"\x5a" * 4096 + bytes((1 << 20) - 4096))
    overlay = vms / "disk.qcow2"
    qemu_img = require("qemu-img")
    run(qemu_img, "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", overlay)
    return overlay


def vhd_child(gold: Path, vms: Path) -> Path:
    """vms/disk.vhd, a differencing VHD made by vhd-util snapshot over gold/base.vhd."""
    base = gold / "base.vhd"
    run(VHD_UTIL, "create", "-n", base, "-s", "8")
    child = vms / "disk.vhd"
    run(VHD_UTIL, "snapshot", "-n", child, "-p", base)
    return child


def first_block(nbd_socket: str) -> bytes:
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///?socket={nbd_socket}")
    try:
        return h.pread(4096, 0)
    finally:
        h.shutdown()


def test_qcow2_backing_file_outside_the_allowed_dirs_is_refused(start, dirs):
    gold, vms = dirs
    overlay = qcow2_overlay(gold, vms)
    daemon = start("--allowed-dir", str(vms))
    result = daemon.tapctl("open", "-a", f"qcow2:{overlay}")
    assert result.returncode == 1
    assert "outside the allowed directories" in result.stderr
    assert daemon.tapctl("list").stdout == f"pid={daemon.proc.pid}\n"  # idle: nothing half-open


def test_qcow2_backing_file_in_another_allowed_dir_is_opened(start, dirs):
    gold, vms = dirs
    overlay = qcow2_overlay(gold, vms)
    daemon = start("--allowed-dir", str(vms), "--allowed-dir", str(gold))
    result = daemon.tapctl("open", "-a", f"qcow2:{overlay}")
    assert result.returncode == 0, result.stderr
    assert first_block(result.stdout.strip()) == b"\x5a" * 4096


def test_vhd_parent_outside_the_configured_allowed_dirs_is_refused(start, dirs, tmp_path):
    gold, vms = dirs
    child = vhd_child(gold, vms)
    config = tmp_path / "tapdisk.yaml"
    config.write_text(f"allowed_dirs: [{vms}]\n")
    daemon = start("--config", str(config))
    result = daemon.tapctl("open", "-a", f"vhd:{child}")
    assert result.returncode == 1
    assert "escapes the allowed directories" in result.stderr


def test_allowed_dir_flags_replace_the_configured_list(start, dirs, tmp_path):
    gold, vms = dirs
    child = vhd_child(gold, vms)
    config = tmp_path / "tapdisk.yaml"
    config.write_text(f"allowed_dirs: [{vms}]\n")
    daemon = start("--config", str(config), "--allowed-dir", str(vms), "--allowed-dir", str(gold))
    result = daemon.tapctl("open", "-a", f"vhd:{child}")
    assert result.returncode == 0, result.stderr


def test_image_outside_the_allowed_dirs_is_refused(start, dirs, tmp_path):
    _, vms = dirs
    elsewhere = tmp_path / "elsewhere.raw"
    elsewhere.write_bytes(bytes(1 << 20))
    daemon = start("--allowed-dir", str(vms))
    result = daemon.tapctl("open", "-a", f"raw:{elsewhere}")
    assert result.returncode == 1
    assert f"{elsewhere}: the image is outside the allowed directories ({vms})" in result.stderr


def test_snapshot_outside_the_allowed_dirs_is_refused_and_creates_nothing(start, dirs, tmp_path):
    _, vms = dirs
    disk = vms / "disk.raw"
    disk.write_bytes(bytes(1 << 20))
    daemon = start("--allowed-dir", str(vms))
    assert daemon.tapctl("open", "-a", f"raw:{disk}").returncode == 0
    overlay = tmp_path / "overlay.qcow2"
    result = daemon.tapctl("snapshot", "-m", "0", "-a", f"qcow2:{overlay}")
    assert result.returncode == 1
    assert "outside the allowed directories" in result.stderr
    assert not overlay.exists()
    assert "args=raw:" in daemon.tapctl("list").stdout  # still running on its image


def test_allowed_dir_flag_must_be_absolute(tmp_path):
    proc = subprocess.run(
        [TAPDISK, "daemon", "--control-dir", str(tmp_path), "--allowed-dir", "images"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "must be an absolute path" in proc.stderr


def test_unpause_onto_an_image_outside_the_allowed_dirs_is_refused(start, dirs, tmp_path):
    _, vms = dirs
    disk = vms / "disk.raw"
    disk.write_bytes(bytes(1 << 20))
    elsewhere = tmp_path / "elsewhere.raw"
    elsewhere.write_bytes(bytes(1 << 20))
    daemon = start("--allowed-dir", str(vms))
    assert daemon.tapctl("open", "-a", f"raw:{disk}").returncode == 0
    assert daemon.tapctl("pause", "-m", "0").returncode == 0
    result = daemon.tapctl("unpause", "-m", "0", "-a", f"raw:{elsewhere}")
    assert result.returncode == 1
    assert f"{elsewhere}: the image is outside the allowed directories ({vms})" in result.stderr
    assert daemon.tapctl("unpause", "-m", "0").returncode == 0  # still on its own image
    assert f"args=raw:{disk}" in daemon.tapctl("list").stdout


def test_a_symlink_inside_the_allowed_dirs_to_an_image_outside_is_refused(start, dirs, tmp_path):
    _, vms = dirs
    elsewhere = tmp_path / "elsewhere.raw"
    elsewhere.write_bytes(bytes(1 << 20))
    (vms / "disk.raw").symlink_to(elsewhere)
    daemon = start("--allowed-dir", str(vms))
    result = daemon.tapctl("open", "-a", f"raw:{vms / 'disk.raw'}")
    assert result.returncode == 1
    assert "outside the allowed directories" in result.stderr


def test_an_image_under_a_layer_outside_the_allowed_dirs_is_refused(start, dirs, tmp_path):
    _, vms = dirs
    elsewhere = tmp_path / "elsewhere.raw"
    elsewhere.write_bytes(bytes(1 << 20))
    daemon = start("--allowed-dir", str(vms))
    result = daemon.tapctl("open", "-a", f"fault:count=1:raw:{elsewhere}")
    assert result.returncode == 1
    assert "outside the allowed directories" in result.stderr


def test_a_relative_image_path_is_refused_when_allowed_dirs_are_set(start, dirs):
    daemon = start("--allowed-dir", str(dirs[1]))
    result = daemon.tapctl("open", "-a", "raw:disk.raw")
    assert result.returncode == 1
    assert "give an absolute path inside one of them" in result.stderr
