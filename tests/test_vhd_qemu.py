"""VHD interoperability with qemu-img both ways: qemu's images read through our driver,
our images read by qemu-img convert / compare.

(qemu-img check cannot judge VHDs: it exits 63, "format does not support checks";
our own ``vhd-util check`` runs on everything we write instead.)
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from helpers import require, run
from image_helpers import qemu_raw, read_all, write_all
from tapdisk.drivers.vhd.create import create_vhd

MiB = 1 << 20
VHD_UTIL = str(Path(sys.executable).with_name("vhd-util"))


def qemu_vpc(tmp_path: Path, name: str, size: str, *opts: str, writes: tuple[str, ...] = ()):
    path = tmp_path / name
    run(require("qemu-img"), "create", "-q", "-f", "vpc", "-o", ",".join(opts), path, size)
    args: list[str] = []
    for cmd in writes:
        args += ["-c", cmd]
    if args:
        run(require("qemu-io"), "-f", "vpc", *args, path)
    return path


WRITES = (
    "write -P 0x11 0 4k",
    "write -P 0x22 1000k 3M",
    "write -P 0x33 9M 511",
    "write -P 0x44 20001 777",
)


def random_writes(size: int, count: int, seed: int) -> list[tuple[int, bytes]]:
    rnd = random.Random(seed)
    out = []
    for _ in range(count):
        length = rnd.choice([512, 4096, 65536, 3 * MiB, rnd.randrange(1, 9000)])
        off = rnd.randrange(0, size - length)
        out.append((off, rnd.randbytes(length)))
    return out


def apply(model: bytearray, writes: list[tuple[int, bytes]]) -> None:
    for off, data in writes:
        model[off : off + len(data)] = data


def test_qemu_dynamic_image_reads_identically(tmp_path):
    path = qemu_vpc(tmp_path, "q.vhd", "40M", "subformat=dynamic", writes=WRITES)
    assert read_all(f"vhd:{path}") == qemu_raw(path, "vpc", tmp_path)


def test_qemu_fixed_image_reads_identically(tmp_path):
    path = qemu_vpc(tmp_path, "q.vhd", "24M", "subformat=fixed", writes=WRITES)
    assert read_all(f"vhd:{path}") == qemu_raw(path, "vpc", tmp_path)


def test_qemu_force_size_image_has_exact_size_and_reads_identically(tmp_path):
    path = qemu_vpc(tmp_path, "q.vhd", "33000k", "subformat=dynamic,force_size=on", writes=WRITES)
    data = read_all(f"vhd:{path}")
    assert len(data) == 33000 * 1024
    assert data == qemu_raw(path, "vpc", tmp_path)


def test_qemu_fixed_force_size_image_reads_identically(tmp_path):
    path = qemu_vpc(tmp_path, "q.vhd", "17000k", "subformat=fixed,force_size=on", writes=WRITES)
    data = read_all(f"vhd:{path}")
    assert len(data) == 17000 * 1024
    assert data == qemu_raw(path, "vpc", tmp_path)


def test_our_dynamic_image_reads_identically_in_qemu(tmp_path):
    path = tmp_path / "ours.vhd"
    create_vhd(str(path), 48 * MiB)
    model = bytearray(48 * MiB)
    writes = random_writes(48 * MiB, 60, seed=1)
    write_all(f"vhd:{path}", writes)
    apply(model, writes)
    assert qemu_raw(path, "vpc", tmp_path) == model
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    run(require("qemu-img"), "compare", "-f", "vpc", "-F", "raw", path, raw)


def test_our_fixed_image_reads_identically_in_qemu(tmp_path):
    path = tmp_path / "ours.vhd"
    create_vhd(str(path), 20 * MiB, fixed=True)
    model = bytearray(20 * MiB)
    writes = random_writes(20 * MiB, 30, seed=2)
    write_all(f"vhd:{path}", writes)
    apply(model, writes)
    assert qemu_raw(path, "vpc", tmp_path) == model
    info = run(require("qemu-img"), "info", "-f", "vpc", "--output=json", path)
    assert '"virtual-size": 20971520' in info and '"format": "vpc"' in info


def test_our_writes_into_qemu_image_read_identically_in_qemu(tmp_path):
    path = qemu_vpc(tmp_path, "q.vhd", "40M", "subformat=dynamic", writes=WRITES)
    model = bytearray(qemu_raw(path, "vpc", tmp_path))
    writes = random_writes(len(model), 40, seed=3)
    write_all(f"vhd:{path}", writes)
    apply(model, writes)
    assert qemu_raw(path, "vpc", tmp_path) == model
    assert read_all(f"vhd:{path}") == model


def test_qemu_reads_our_image_after_qemu_writes_into_it(tmp_path):
    path = tmp_path / "ours.vhd"
    create_vhd(str(path), 16 * MiB)
    write_all(f"vhd:{path}", [(5 * MiB + 100, b"\x5a" * 9000)])
    run(require("qemu-io"), "-f", "vpc", "-c", "write -P 0x77 12M 1M", path)
    model = bytearray(16 * MiB)
    apply(model, [(5 * MiB + 100, b"\x5a" * 9000), (12 * MiB, b"\x77" * MiB)])
    assert read_all(f"vhd:{path}") == model
    assert qemu_raw(path, "vpc", tmp_path) == model
    run(VHD_UTIL, "check", "-n", path)


def test_our_image_written_by_qemu_reads_identically(tmp_path):
    # qemu's vpc driver does not know blktap's batmap and puts its first new
    # block where the batmap was; the image must still read back.
    path = tmp_path / "ours-then-qemu.vhd"
    create_vhd(str(path), 8 * MiB)
    run(require("qemu-io"), "-f", "vpc", "-c", "write -P 1 0 3M", "-c", "write -P 2 5M 1M", path)
    assert read_all(f"vhd:{path}") == qemu_raw(path, "vpc", tmp_path)
