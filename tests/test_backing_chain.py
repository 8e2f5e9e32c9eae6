"""The one backing-chain guard (``drivers/backing.chain_guard``): loops and depth, every format.

QCOW2, QCOW v1 and VHD open the image below through the same guard, so a chain
is refused for the same reasons whatever formats it mixes: a file met twice
(by device and inode, so no hard link hides it) or more than MAX_CHAIN_DEPTH
images.
"""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run
from image_helpers import qemu_img
from tapdisk.drivers.backing import MAX_CHAIN_DEPTH
from tapdisk.drivers.base import ImageFormatError
from tapdisk.drivers.imageops import create_image
from tapdisk.drivers.registry import OpenOptions, open_image
from tapdisk.drivers.vhd.create import create_vhd, snapshot_vhd

SIZE = 4 << 20
VHD_UTIL = str(Path(sys.executable).with_name("vhd-util"))


def opens(spec: str) -> None:
    image = open_image(spec, OpenOptions(read_only=True))
    asyncio.run(image.close())


def qcow2_chain(tmp_path: Path, images: int) -> Path:
    """``images`` qcow2 files, each over the one before; returns the top."""
    create_image("qcow2", str(tmp_path / "0.qcow2"), SIZE)
    for i in range(1, images):
        create_image("qcow2", str(tmp_path / f"{i}.qcow2"), None, backing=f"{i - 1}.qcow2")
    return tmp_path / f"{images - 1}.qcow2"


def vhd_chain(tmp_path: Path, images: int) -> Path:
    create_vhd(str(tmp_path / "0.vhd"), SIZE)
    for i in range(1, images):
        snapshot_vhd(str(tmp_path / f"{i}.vhd"), str(tmp_path / f"{i - 1}.vhd"))
    return tmp_path / f"{images - 1}.vhd"


def test_qcow2_chain_of_the_greatest_depth_opens(tmp_path: Path) -> None:
    opens(f"qcow2:{qcow2_chain(tmp_path, MAX_CHAIN_DEPTH)}")


def test_qcow2_chain_one_deeper_is_refused(tmp_path: Path) -> None:
    top = qcow2_chain(tmp_path, MAX_CHAIN_DEPTH + 1)
    with pytest.raises(ImageFormatError, match=f"deeper than {MAX_CHAIN_DEPTH}"):
        opens(f"qcow2:{top}")


def test_vhd_chain_of_the_greatest_depth_opens(tmp_path: Path) -> None:
    opens(f"vhd:{vhd_chain(tmp_path, MAX_CHAIN_DEPTH)}")


def test_vhd_chain_one_deeper_is_refused(tmp_path: Path) -> None:
    top = vhd_chain(tmp_path, MAX_CHAIN_DEPTH + 1)
    with pytest.raises(ImageFormatError, match="parent would make the chain deeper than"):
        opens(f"vhd:{top}")


def test_depth_counts_every_format_of_a_mixed_chain(tmp_path: Path) -> None:
    vhd_top = vhd_chain(tmp_path, MAX_CHAIN_DEPTH)
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", vhd_top.name, "-F", "vpc", top)
    with pytest.raises(ImageFormatError, match="deeper than"):
        opens(f"qcow2:{top}")


def test_a_hard_link_back_up_the_chain_is_a_loop(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    create_image("qcow2", str(base), SIZE, backing=None)
    os.link(base, tmp_path / "link.qcow2")
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", "link.qcow2", "-F", "qcow2", base)
    with pytest.raises(ImageFormatError, match=r"backing_file 'link\.qcow2' loops back"):
        opens(f"qcow2:{base}")


def test_vhd_util_walks_chains_under_the_same_guard(tmp_path: Path) -> None:
    """vhd-util follows a chain step by step (query -d, check -p) and stops where opens do."""
    top = vhd_chain(tmp_path, MAX_CHAIN_DEPTH + 1)
    deepest = tmp_path / f"{MAX_CHAIN_DEPTH - 1}.vhd"
    assert run(VHD_UTIL, "query", "-d", "-n", deepest).strip() == f"chain depth: {MAX_CHAIN_DEPTH}"
    assert "is valid" in run(VHD_UTIL, "check", "-p", "-n", deepest)
    query = subprocess.run([VHD_UTIL, "query", "-d", "-n", top], capture_output=True, text=True)
    assert query.returncode == errno.EINVAL
    check = subprocess.run([VHD_UTIL, "check", "-p", "-n", top], capture_output=True, text=True)
    assert check.returncode == errno.EINVAL
    assert f"would make the chain deeper than {MAX_CHAIN_DEPTH}" in check.stdout + check.stderr
