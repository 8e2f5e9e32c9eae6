"""Metadata errors found while serving become EIO replies; the connection and server live on."""

from __future__ import annotations

import struct
from pathlib import Path

import nbd
import pytest
from image_helpers import qemu_img, qemu_io

L1_TABLE_OFFSET = 40  # qcow2 header field, u64 big-endian
L2_OFFSET_MASK = 0x00FFFFFFFFFFFE00


def qcow2_with_cluster0_mapped_onto_its_l1_table(tmp_path: Path) -> Path:
    """A qcow2 whose guest cluster 0 claims to live on top of the L1 table."""
    path = tmp_path / "bad.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "4M")
    qemu_io("qcow2", path, "write -P 7 0 128k", "write -P 9 1M 64k")
    with path.open("r+b") as f:
        f.seek(L1_TABLE_OFFSET)
        (l1,) = struct.unpack(">Q", f.read(8))
        f.seek(l1)
        (l2,) = struct.unpack(">Q", f.read(8))
        f.seek(l2 & L2_OFFSET_MASK)
        f.write(struct.pack(">Q", l1 | (1 << 63)))
    return path


@pytest.fixture
def handle(serve, tmp_path):
    image = qcow2_with_cluster0_mapped_onto_its_l1_table(tmp_path)
    served = serve(f"qcow2:{image}")
    h = nbd.NBD()
    h.connect_uri(served.uri())
    yield h, image, served
    h.shutdown()


def test_write_onto_metadata_gets_eio_and_changes_nothing_but_the_corrupt_bit(handle):
    h, image, _ = handle
    before = image.read_bytes()
    with pytest.raises(nbd.Error) as info:
        h.pwrite(b"x" * 512, 0)
    assert info.value.errno == "EIO"
    after = image.read_bytes()
    assert after[72:80] == (2).to_bytes(8, "big")  # incompatible_features: corrupt
    assert after[:72] + after[80:] == before[:72] + before[80:]


def test_connection_keeps_working_after_a_metadata_error(handle):
    h, _, served = handle
    with pytest.raises(nbd.Error):
        h.pwrite(b"x" * 512, 0)
    assert h.pread(65536, 1 << 20) == b"\x09" * 65536
    assert served.proc.poll() is None
