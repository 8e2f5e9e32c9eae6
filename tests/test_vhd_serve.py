"""VHDs served by ``tapdisk serve vhd:/path`` to real NBD clients (qemu-io, nbdcopy, nbdinfo),
including a snapshot -> write -> coalesce round trip checked at every step."""

from __future__ import annotations

import sys
from pathlib import Path

from helpers import require, run

MiB = 1 << 20
VHD_UTIL = str(Path(sys.executable).with_name("vhd-util"))


def qemu_io(uri: str, *cmds: str) -> str:
    args: list[str] = []
    for cmd in cmds:
        args += ["-c", cmd]
    out = run(require("qemu-io"), "-f", "raw", *args, uri)
    assert "failed" not in out and "Pattern verification" not in out, out
    return out


def copy_out(uri: str, dest: Path) -> bytes:
    run(require("nbdcopy"), uri, dest)
    return dest.read_bytes()


def put(model: bytearray, off: int, length: int, byte: int) -> None:
    model[off : off + length] = bytes([byte]) * length


def test_qemu_io_reads_back_writes_and_zeroes(tmp_path, serve):
    path = tmp_path / "d.vhd"
    run(VHD_UTIL, "create", "-n", path, "-s", "32")
    served = serve(f"vhd:{path}")
    qemu_io(
        served.uri(),
        "write -P 0x61 1000 70000",
        "write -P 0x62 5M 3M",
        "write -z 5M 4096",
        "read -P 0x61 1000 70000",
        "read -P 0 5M 4096",
        "read -P 0x62 5246976 3141632",
    )
    served.stop()
    run(VHD_UTIL, "check", "-n", path)


def test_nbdcopy_round_trip_matches_qemu_img(tmp_path, serve):
    src = tmp_path / "src.raw"
    data = bytes(range(256)) * (12 * MiB // 256)
    src.write_bytes(data)
    path = tmp_path / "d.vhd"
    run(VHD_UTIL, "create", "-n", path, "-s", "12")
    served = serve(f"vhd:{path}")
    run(require("nbdcopy"), src, served.uri())
    assert copy_out(served.uri(), tmp_path / "back.raw") == data
    served.stop()
    run(require("qemu-img"), "compare", "-f", "vpc", "-F", "raw", path, src)


def test_block_status_reports_allocated_ranges(tmp_path, serve):
    path = tmp_path / "d.vhd"
    run(VHD_UTIL, "create", "-n", path, "-s", "16")
    served = serve(f"vhd:{path}")
    qemu_io(served.uri(), "write -P 1 4M 1M")
    out = run(require("nbdinfo"), "--map", served.uri())
    rows = [line.split()[:3] for line in out.splitlines()]
    assert rows == [
        ["0", str(4 * MiB), "3"],
        [str(4 * MiB), str(MiB), "0"],
        [str(5 * MiB), str(11 * MiB), "3"],
    ]


def test_snapshot_write_coalesce_round_trip(tmp_path, serve):
    base = tmp_path / "base.vhd"
    child = tmp_path / "child.vhd"
    model = bytearray(24 * MiB)
    run(VHD_UTIL, "create", "-n", base, "-s", "24")

    served = serve(f"vhd:{base}")
    qemu_io(served.uri(), "write -P 0x41 0 6M", "write -P 0x42 10M 100k")
    put(model, 0, 6 * MiB, 0x41)
    put(model, 10 * MiB, 100 * 1024, 0x42)
    served.stop()
    base_before = bytes(model)

    run(VHD_UTIL, "snapshot", "-n", child, "-p", base)
    served = serve(f"vhd:{child}")
    assert copy_out(served.uri(), tmp_path / "s1.raw") == model
    qemu_io(served.uri(), "write -P 0x43 1M 4097", "write -P 0x44 20M 1M", "write -z 10M 512")
    put(model, MiB, 4097, 0x43)
    put(model, 20 * MiB, MiB, 0x44)
    put(model, 10 * MiB, 512, 0)
    assert copy_out(served.uri(), tmp_path / "s2.raw") == model
    served.stop()
    run(VHD_UTIL, "check", "-n", child, "-p")

    served = serve("--read-only", f"vhd:{base}")
    assert copy_out(served.uri(), tmp_path / "s3.raw") == base_before
    served.stop()

    out = run(VHD_UTIL, "coalesce", "-n", child)
    assert out.startswith("Coalesced ")
    run(VHD_UTIL, "check", "-n", base)
    served = serve(f"vhd:{base}")
    assert copy_out(served.uri(), tmp_path / "s4.raw") == model
    served.stop()
    served = serve(f"vhd:{child}")
    assert copy_out(served.uri(), tmp_path / "s5.raw") == model
