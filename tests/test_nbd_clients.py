"""tapdisk serve driven by the real NBD clients: qemu-io, qemu-img, nbdinfo and nbdcopy."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from helpers import require, run

MiB = 1 << 20


def qemu_io(uri: str, *commands: str) -> str:
    args: list[str] = []
    for command in commands:
        args += ["-c", command]
    out = run(require("qemu-io"), "-f", "raw", *args, uri)
    assert "failed" not in out.lower(), out
    return out


def allocated(path: os.PathLike[str]) -> int:
    return os.stat(path).st_blocks * 512


def nbdinfo_status(*args: str) -> int:
    proc = subprocess.run([require("nbdinfo"), *args], capture_output=True, timeout=60)
    return proc.returncode


# -- qemu-io -------------------------------------------------------------------------


def test_qemu_io_writes_reads_and_flushes(serve, raw_image):
    image = raw_image("16M")
    served = serve(f"raw:{image}")
    qemu_io(
        served.uri(),
        "write -P 0x11 0 64k",
        "write -P 0x22 1000 3000",
        "flush",
        "read -P 0x11 0 1000",
        "read -P 0x22 1000 3000",
        "read -P 0x11 4000 61536",
    )
    data = image.read_bytes()
    assert data[:1000] == b"\x11" * 1000 and data[1000:4000] == b"\x22" * 3000


def test_qemu_io_discard_punches_a_hole(serve, raw_image):
    image = raw_image("16M", "write -P 0x33 0 8M")
    served = serve(f"raw:{image}")
    before = allocated(image)
    qemu_io(served.uri(), "discard 0 4M", "read -P 0 0 4M", "read -P 0x33 4M 4M")
    assert allocated(image) <= before - 4 * MiB


def test_qemu_io_write_zeroes_with_unmap_deallocates(serve, raw_image):
    image = raw_image("16M", "write -P 0x44 0 8M")
    served = serve(f"raw:{image}")
    qemu_io(served.uri(), "write -z -u 0 4M", "read -P 0 0 4M", "read -P 0x44 4M 4M")
    assert allocated(image) <= 4 * MiB + 65536


def test_qemu_io_write_zeroes_without_unmap_keeps_allocation(serve, raw_image):
    image = raw_image("16M", "write -P 0x44 0 8M")
    served = serve(f"raw:{image}")
    qemu_io(served.uri(), "write -z 0 4M", "read -P 0 0 4M", "read -P 0x44 4M 4M")
    assert allocated(image) >= 8 * MiB
    assert image.read_bytes()[: 4 * MiB] == bytes(4 * MiB)


# -- qemu-img ------------------------------------------------------------------------


def test_qemu_img_convert_from_nbd_copies_the_image(serve, raw_image, tmp_path):
    image = raw_image("32M", "write -P 0x55 1M 3M", "write -P 0x66 20M 1M")
    served = serve(f"raw:{image}", "--read-only")
    copy = tmp_path / "copy.qcow2"
    run(require("qemu-img"), "convert", "-f", "raw", "-O", "qcow2", served.uri(), copy)
    run(require("qemu-img"), "compare", "-f", "raw", "-F", "qcow2", image, copy)


def test_qemu_img_convert_into_nbd_writes_the_image(serve, raw_image, tmp_path):
    source = tmp_path / "src.qcow2"
    run(require("qemu-img"), "create", "-q", "-f", "qcow2", source, "32M")
    run(require("qemu-io"), "-f", "qcow2", "-c", "write -P 0x77 5M 2M", source)
    target = raw_image("32M", "write -P 0x99 0 32M", name="target.raw")
    served = serve(f"raw:{target}")
    run(require("qemu-img"), "convert", "-n", "-f", "qcow2", "-O", "raw", source, served.uri())
    run(require("qemu-img"), "compare", "-f", "qcow2", "-F", "raw", source, served.uri())
    data = target.read_bytes()
    assert data[5 * MiB : 7 * MiB] == b"\x77" * (2 * MiB)
    assert data[: 5 * MiB] == bytes(5 * MiB)


def test_qemu_img_compare_through_nbd_sees_a_difference(serve, raw_image, tmp_path):
    image = raw_image("8M", "write -P 0x12 0 1M")
    other = tmp_path / "other.raw"
    other.write_bytes(image.read_bytes())
    with open(other, "r+b") as f:
        f.seek(6 * MiB + 17)
        f.write(b"!")
    served = serve(f"raw:{image}")
    proc = subprocess.run(
        [require("qemu-img"), "compare", "-f", "raw", "-F", "raw", served.uri(), str(other)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "offset 6291456" in proc.stdout


# -- nbdinfo -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "feature", ["flush", "fua", "trim", "zero", "fast-zero", "df", "multi-conn", "cache"]
)
def test_nbdinfo_can_reports_advertised_feature(serve, raw_image, feature):
    served = serve(f"raw:{raw_image('1M')}")
    assert nbdinfo_status("--can", feature, served.uri()) == 0


def test_nbdinfo_read_only_export_refuses_write_trim_and_zero(serve, raw_image):
    served = serve(f"raw:{raw_image('1M')}", "--read-only")
    assert nbdinfo_status("--is", "read-only", served.uri()) == 0
    for feature in ("write", "trim", "zero", "fast-zero"):
        assert nbdinfo_status("--can", feature, served.uri()) == 2, feature
    assert nbdinfo_status("--can", "flush", served.uri()) == 0


def test_nbdinfo_map_matches_the_sparse_layout_of_the_file(serve, tmp_path):
    image = tmp_path / "sparse.raw"
    with open(image, "wb") as f:  # not qemu-img create, which allocates the first block
        f.truncate(8 * MiB)
        f.seek(MiB)
        f.write(b"\1" * MiB)
        f.seek(5 * MiB)
        f.write(b"\2" * 512 * 1024)
    served = serve(f"raw:{image}")
    extents = json.loads(run(require("nbdinfo"), "--map", "--json", served.uri()))
    layout = [(e["offset"], e["length"], e["type"]) for e in extents]
    assert layout == [
        (0, MiB, 3),
        (MiB, MiB, 0),
        (2 * MiB, 3 * MiB, 3),
        (5 * MiB, 512 * 1024, 0),
        (5 * MiB + 512 * 1024, 3 * MiB - 512 * 1024, 3),
    ]


def test_nbdinfo_list_shows_every_export(serve, raw_image):
    a = raw_image("1M", name="a.raw")
    b = raw_image("2M", name="b.raw")
    served = serve(f"first=raw:{a}", f"second=raw:{b}")
    listing = json.loads(run(require("nbdinfo"), "--list", "--json", served.uri()))
    sizes = {e["export-name"]: e["export-size"] for e in listing["exports"]}
    assert sizes == {"first": MiB, "second": 2 * MiB}


def test_clients_learn_no_server_path_unless_a_description_is_given(serve, raw_image):
    image = raw_image("1M")
    listing = run(require("nbdinfo"), "--list", "--json", serve(f"raw:{image}").uri())
    assert str(image) not in listing
    assert "description" not in json.loads(listing)["exports"][0]
    described = serve("--description", "boot disk", f"raw:{image}")
    listing = json.loads(run(require("nbdinfo"), "--list", "--json", described.uri()))
    assert listing["exports"][0]["description"] == "boot disk"


def test_single_image_is_also_the_default_export(serve, raw_image):
    served = serve(f"disk=raw:{raw_image('3M')}")
    assert run(require("nbdinfo"), "--size", served.uri("")).strip() == str(3 * MiB)
    assert run(require("nbdinfo"), "--size", served.uri("disk")).strip() == str(3 * MiB)


def test_unknown_export_name_is_refused(serve, raw_image):
    served = serve(f"disk=raw:{raw_image('1M')}")
    proc = subprocess.run(
        [require("nbdinfo"), "--size", served.uri("nope")], capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "nope" in proc.stderr


def test_several_exports_have_no_default(serve, raw_image):
    a = raw_image("1M", name="a.raw")
    b = raw_image("1M", name="b.raw")
    served = serve(f"raw:{a}", f"raw:{b}")
    assert nbdinfo_status("--size", served.uri("")) != 0
    assert run(require("nbdinfo"), "--size", served.uri("b.raw")).strip() == str(MiB)


# -- nbdcopy -------------------------------------------------------------------------


def test_nbdcopy_from_server_to_file(serve, raw_image, tmp_path):
    image = raw_image("16M", "write -P 0xa1 0 2M", "write -P 0xa2 9M 3M")
    served = serve(f"raw:{image}", "--read-only")
    out = tmp_path / "out.raw"
    run(require("nbdcopy"), served.uri(), out)
    assert out.read_bytes() == image.read_bytes()


def test_nbdcopy_from_file_to_server(serve, raw_image, tmp_path):
    source = tmp_path / "in.raw"
    source.write_bytes(os.urandom(3 * MiB) + bytes(2 * MiB) + os.urandom(3 * MiB))
    image = raw_image("8M", "write -P 0xee 0 8M")
    served = serve(f"raw:{image}")
    run(require("nbdcopy"), source, served.uri())
    assert image.read_bytes() == source.read_bytes()
