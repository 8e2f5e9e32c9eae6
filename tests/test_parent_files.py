"""Files named inside images (backing files, VHD parent locators) and on the command line
are opened only when they are regular files or block devices, and a refused file's contents
never reach a message.

Every check runs the real tools in a subprocess with a timeout: a FIFO opened for reading
would block forever, and the test must fail rather than hang.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from image_helpers import qemu_img
from tapdisk.drivers.base import ImageError
from tapdisk.drivers.registry import OpenOptions, open_image
from tapdisk.drivers.vhd import edit
from tapdisk.drivers.vhd.create import create_vhd, snapshot_vhd
from tapdisk.drivers.vhd.format import Header

BIN = Path(sys.executable).parent
MiB = 1 << 20
#: What the refused file holds: no 4-byte window of it may appear in any output.
SECRET = b"Zq!x" * 300


def tool(*argv: str | Path) -> str:
    """stdout + stderr of a console script of this venv; fails the test after 30 s."""
    proc = subprocess.run(
        [str(BIN / str(argv[0])), *map(str, argv[1:])], capture_output=True, text=True, timeout=30
    )
    return proc.stdout + proc.stderr


def assert_no_secret(text: str) -> None:
    for i in range(4):
        window = SECRET[i : i + 4]
        assert window.decode() not in text, text
        assert window.hex() not in text, text
        assert repr(window)[2:-1] not in text, text


def secret_file(directory: Path) -> Path:
    directory.mkdir(exist_ok=True)
    path = directory / "shadow"
    path.write_bytes(SECRET)
    path.chmod(0o600)
    return path


def fifo(directory: Path, name: str = "parent.fifo") -> Path:
    path = directory / name
    os.mkfifo(path)
    return path


def vhd_child_of(tmp_path: Path, parent: Path) -> Path:
    """A differencing VHD whose locators name ``parent`` and which expects a parent UUID."""
    base = tmp_path / "base.vhd"
    create_vhd(str(base), 16 * MiB)
    child = tmp_path / "child.vhd"
    snapshot_vhd(str(child), str(base))
    edit.set_parent(str(child), str(parent), parent_raw=True)
    with child.open("r+b") as f:
        f.seek(512)
        header = Header.unpack(f.read(1024), str(child))
        header.parent_uuid = bytes(range(16))  # so that vhd-util check reads the parent
        f.seek(512)
        f.write(header.pack())
    base.unlink()
    return child


def qcow2_child_of(tmp_path: Path, backing: str, fmt: str = "raw") -> Path:
    child = tmp_path / "child.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", fmt, child, "16M")
    return child


@pytest.mark.parametrize(
    "argv",
    [
        ("vhd-util", "check", "-n"),
        ("vhd-util", "check", "-p", "-n"),
        ("vhd-util", "query", "-d", "-n"),
        ("vhd-util", "scan", "-f", "-a"),
    ],
)
def test_vhd_util_never_prints_a_parent_file_it_cannot_read_as_a_vhd(tmp_path, argv):
    secret = secret_file(tmp_path / "etc")
    child = vhd_child_of(tmp_path, secret)
    out = tool(*argv, child)
    assert_no_secret(out)
    assert "conectix" in out or "error" in out  # the parent was looked at and refused


def test_qcow2_backing_file_that_is_no_qcow2_is_refused_without_its_bytes(tmp_path):
    secret = secret_file(tmp_path / "vms")
    child = qcow2_child_of(tmp_path / "vms", "shadow", "qcow2")
    out = tool("tap-img", "info", "--backing-chain", child)
    assert "not a qcow2 image" in out
    assert_no_secret(out)
    assert secret.read_bytes() == SECRET


def test_vhd_parent_that_is_a_fifo_is_refused_at_once(tmp_path):
    child = vhd_child_of(tmp_path, fifo(tmp_path))
    out = tool("vhd-util", "check", "-n", child)
    assert "parent.fifo, a FIFO" in out and "not a regular file or block device" in out
    assert "error checking chain depth" in tool("vhd-util", "query", "-d", "-n", child)
    with pytest.raises(ImageError, match="FIFO"):
        open_image(f"vhd:{child}", OpenOptions(read_only=True))


def test_vhd_parent_that_is_a_character_device_is_refused(tmp_path):
    child = vhd_child_of(tmp_path, Path("/dev/zero"))
    out = tool("vhd-util", "check", "-n", child)
    assert "/dev/zero, a character device" in out


def test_qcow2_backing_file_that_is_a_fifo_is_refused_at_once(tmp_path):
    fifo(tmp_path, "base.raw")
    child = qcow2_child_of(tmp_path, "base.raw")
    assert "is a FIFO, not a regular file or block device" in tool("tap-img", "info", child)
    child.unlink()
    child = qcow2_child_of(tmp_path, "base.raw", "qcow2")  # a format named: no probing first
    assert "is a FIFO" in tool("tap-img", "info", child)


def test_qcow2_backing_file_that_is_a_socket_is_refused(tmp_path):
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "base.raw"))
    try:
        child = qcow2_child_of(tmp_path, "base.raw")
        assert "is a socket" in tool("tap-img", "info", child)
    finally:
        listener.close()


def test_raw_character_device_is_refused(tmp_path):
    with pytest.raises(ImageError, match="/dev/zero is a character device"):
        open_image("raw:/dev/zero", OpenOptions(read_only=True))
    out = tool("tapdisk", "serve", "--unix", tmp_path / "s.sock", "raw:/dev/zero")
    assert "/dev/zero is a character device, not a regular file or block device" in out


def test_raw_fifo_is_refused_at_once(tmp_path):
    out = tool("tapdisk", "serve", "--unix", tmp_path / "s.sock", f"raw:{fifo(tmp_path)}")
    assert "is a FIFO" in out
