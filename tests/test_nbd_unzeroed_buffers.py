"""Holes read as zeros over NBD though reply buffers are not zeroed before a driver fills them.

The server hands each READ a buffer that may still hold an earlier reply's bytes (glibc gives
a freed megabyte back to the next request of that size). Every driver must fill all of it,
holes included: a driver that skipped one would send another read's data. Each image here
has data at the front and holes behind it made the way its own tools make them; a client
reads data, then a hole of the same size, on one connection, for every hole.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nbd
import pytest
from helpers import Served
from image_helpers import MiB, qemu_img, qemu_io
from nbd_servers import qemu_nbd
from rbd_helpers import Cluster
from tapdisk.drivers.vhd.create import snapshot_vhd

#: Virtual size of every image; data fills [0, DATA), holes follow.
SIZE = 8 * MiB
DATA = 4 * MiB
READ = 1 * MiB


def data_then_hole(tmp: Path, fmt: str, **create: str) -> Path:
    """A ``fmt`` image of SIZE bytes: DATA bytes of 0x77, nothing written after them."""
    path = tmp / f"disk.{fmt}"
    options = [arg for key, value in create.items() for arg in ("-o", f"{key}={value}")]
    qemu_img("create", "-q", "-f", fmt, *options, path, str(SIZE))
    qemu_io(fmt, path, f"write -P 0x77 0 {DATA}")
    return path


def raw(tmp: Path) -> str:
    return f"raw:{data_then_hole(tmp, 'raw')}"


def qcow2_zero_clusters(tmp: Path) -> str:
    """Zero clusters (data qemu-io's write -z then zeroed) and unallocated ones follow the
    data."""
    path = data_then_hole(tmp, "qcow2")
    qemu_io("qcow2", path, f"write -P 0x77 {DATA} {READ}", f"write -z {DATA} {READ}")
    return f"qcow2:{path}"


def qcow2_past_short_backing(tmp: Path) -> str:
    """An overlay over a backing file that ends where the data does."""
    backing = tmp / "backing.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", backing, str(DATA))
    qemu_io("qcow2", backing, f"write -P 0x77 0 {DATA}")
    overlay = tmp / "overlay.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", overlay, str(SIZE))
    return f"qcow2:{overlay}"


def qcow(tmp: Path) -> str:
    return f"qcow:{data_then_hole(tmp, 'qcow')}"


def vhd(tmp: Path) -> str:
    return f"vhd:{data_then_hole(tmp, 'vpc', subformat='dynamic', force_size='on')}"


def vhd_child(tmp: Path) -> str:
    """A differencing VHD (qemu-img makes none: ours) whose parent holds the data: holes in
    both behind it."""
    parent = data_then_hole(tmp, "vpc", subformat="dynamic", force_size="on")
    child = tmp / "child.vhd"
    snapshot_vhd(str(child), str(parent))
    return f"vhd:{child}"


IMAGES: dict[str, Callable[[Path], str]] = {
    "raw": raw,
    "qcow2 zero clusters": qcow2_zero_clusters,
    "qcow2 past a short backing file": qcow2_past_short_backing,
    "qcow": qcow,
    "vhd": vhd,
    "vhd child": vhd_child,
}


def assert_holes_read_as_zeros(served: Served) -> None:
    handle = nbd.NBD()
    handle.connect_uri(served.uri())
    try:
        for hole in range(DATA, SIZE, READ):
            assert handle.pread(READ, 0) == b"\x77" * READ
            assert handle.pread(READ, hole) == bytes(READ), f"hole at {hole}"
    finally:
        handle.shutdown()


@pytest.mark.parametrize("make", IMAGES.values(), ids=IMAGES.keys())
def test_holes_read_as_zeros_after_data(serve, tmp_path: Path, make) -> None:
    assert_holes_read_as_zeros(serve(make(tmp_path)))


def test_holes_of_an_nbd_image_read_as_zeros_after_data(serve, tmp_path: Path) -> None:
    """The nbd: driver reads the holes from qemu-nbd, which answers them as hole chunks."""
    upstream = qemu_nbd(tmp_path / "up.sock", data_then_hole(tmp_path, "raw"))
    try:
        assert_holes_read_as_zeros(serve(f"nbd:{upstream.uri()}"))
    finally:
        upstream.stop()


def test_holes_of_an_rbd_image_read_as_zeros_after_data(serve, ceph: Cluster) -> None:
    name = ceph.create("8M")
    written = nbd.NBD()
    served = serve(ceph.spec(name))
    written.connect_uri(served.uri())
    try:
        written.pwrite(b"\x77" * DATA, 0)
        written.flush()
    finally:
        written.shutdown()
    assert_holes_read_as_zeros(served)
