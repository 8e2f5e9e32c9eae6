"""``tap-img`` against qemu-img as the oracle."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run
from image_helpers import qemu_img, qemu_io
from tapdisk.drivers.registry import OpenOptions, open_image

TAPIMG = str(Path(sys.executable).with_name("tap-img"))
QEMU_FMT = {"raw": "raw", "qcow2": "qcow2", "qcow": "qcow", "vhd": "vpc"}


def tapimg(*args: str | Path, code: int = 0) -> str:
    proc = subprocess.run([TAPIMG, *map(str, args)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    """base.qcow2 (data) <- top.qcow2 (more data, a zeroed range)."""
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "16M")
    qemu_io("qcow2", base, "write -P 1 0 6M")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    qemu_io("qcow2", top, "write -P 2 3M 4M", "write -z 1M 64k", "write -P 3 15M 5k")
    return top


@pytest.mark.parametrize("opts", ["", "compat=0.10", "cluster_size=4k,refcount_bits=8"])
def test_create_qcow2_passes_qemu_check(tmp_path: Path, opts: str) -> None:
    path = tmp_path / "new.qcow2"
    tapimg("create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), path, "5G")
    run("qemu-img", "check", path)
    info = json.loads(qemu_img("info", "--output=json", path))
    assert info["virtual-size"] == 5 << 30
    qemu_io("qcow2", path, "write -P 9 4G 1M")
    run("qemu-img", "check", path)


def test_create_with_backing_takes_its_size(tmp_path: Path) -> None:
    qemu_img("create", "-q", "-f", "raw", tmp_path / "b.raw", "3M")
    tapimg("create", "-q", "-f", "qcow2", "-b", "b.raw", "-F", "raw", tmp_path / "o.qcow2")
    info = json.loads(qemu_img("info", "--output=json", tmp_path / "o.qcow2"))
    assert info["virtual-size"] == 3 << 20
    assert info["backing-filename"] == "b.raw"
    assert info["backing-filename-format"] == "raw"


def test_info_json_matches_qemu_img(chain: Path) -> None:
    ours = json.loads(tapimg("info", "--output=json", chain))
    theirs = json.loads(qemu_img("info", "--output=json", chain))
    for key in ("virtual-size", "cluster-size", "backing-filename", "backing-filename-format"):
        assert ours[key] == theirs[key], key
    assert ours["format-specific"]["data"]["compat"] == theirs["format-specific"]["data"]["compat"]


def test_info_backing_chain_lists_every_image(chain: Path) -> None:
    ours = json.loads(tapimg("info", "--output=json", "--backing-chain", chain))
    assert [Path(d["filename"]).name for d in ours] == ["top.qcow2", "base.qcow2"]


def test_info_lists_internal_snapshots(tmp_path: Path) -> None:
    path = tmp_path / "s.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "1M")
    qemu_img("snapshot", "-c", "snap1", path)
    assert "snap1" in tapimg("info", path)


def test_map_json_matches_qemu_img(chain: Path) -> None:
    ours = json.loads(tapimg("map", "--output=json", chain))
    theirs = json.loads(qemu_img("map", "--output=json", chain))
    assert ours == theirs


def test_check_reports_leaks_with_exit_code_3(tmp_path: Path) -> None:
    path = tmp_path / "leak.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "1M")
    raw = bytearray(path.read_bytes())
    # Count cluster 4 (past the L1 table) as used although nothing references it.
    block = int.from_bytes(raw[65536 : 65536 + 8], "big")
    raw[block + 8 : block + 10] = (1).to_bytes(2, "big")
    path.write_bytes(bytes(raw) + bytes(65536))
    assert "Leaked" in tapimg("check", path, code=3)
    assert subprocess.run(["qemu-img", "check", path], capture_output=True).returncode == 3
    tapimg("check", "-r", "all", path)
    tapimg("check", path)
    run("qemu-img", "check", path)


def test_check_reports_corruption_with_exit_code_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "1M")
    qemu_io("qcow2", path, "write -P 1 0 64k")
    raw = bytearray(path.read_bytes())
    block = int.from_bytes(raw[65536 : 65536 + 8], "big")
    raw[block + 8 : block + 10] = bytes(2)  # refcount block no longer counts itself
    path.write_bytes(bytes(raw))
    assert "ERROR" in tapimg("check", path, code=2)


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "qcow", "vhd"])
def test_convert_to_each_format_matches(tmp_path: Path, chain: Path, fmt: str) -> None:
    target = tmp_path / f"out.{fmt}"
    tapimg("convert", "-O", fmt, chain, target)
    run("qemu-img", "compare", "-f", "qcow2", "-F", QEMU_FMT[fmt], chain, target)


def test_convert_keeps_holes_unallocated(tmp_path: Path) -> None:
    src = tmp_path / "sparse.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, "1G")
    qemu_io("qcow2", src, "write -P 4 512M 64k")
    target = tmp_path / "copy.qcow2"
    tapimg("convert", "-O", "qcow2", src, target)
    run("qemu-img", "compare", src, target)
    assert target.stat().st_size < 2 << 20


def test_convert_from_vhd_to_qcow(tmp_path: Path) -> None:
    vhd = tmp_path / "d.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=dynamic", vhd, "8M")
    qemu_io("vpc", vhd, "write -P 6 1M 1M")
    target = tmp_path / "d.qcow"
    tapimg("convert", "-f", "vhd", "-O", "qcow", vhd, target)
    run("qemu-img", "compare", "-f", "vpc", "-F", "qcow", vhd, target)


def test_snapshot_creates_overlay_reading_like_base(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "4M")
    qemu_io("qcow2", base, "write -P 8 0 4M")
    overlay = tmp_path / "snap.qcow2"
    tapimg("snapshot", base, overlay)
    run("qemu-img", "check", overlay)
    run("qemu-img", "compare", base, overlay)
    info = json.loads(qemu_img("info", "--output=json", overlay))
    assert info["backing-filename"] == "base.qcow2"


def test_commit_merges_leaf_into_backing(tmp_path: Path, chain: Path) -> None:
    expected = tmp_path / "expected.raw"
    qemu_img("convert", "-O", "raw", chain, expected)
    tapimg("commit", chain)
    base = tmp_path / "base.qcow2"
    run("qemu-img", "check", base)
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", expected, base)


def test_commit_into_vhd_parent_uses_vhd_coalesce(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(b"\x01" * (8 << 20))
    parent = tmp_path / "p.vhd"
    tapimg("convert", "-f", "raw", "-O", "vhd", src, parent)
    child = tmp_path / "c.vhd"
    tapimg("snapshot", "-f", "vhd", parent, child)

    async def write_child() -> None:
        img = open_image(f"vhd:{child}", OpenOptions())
        await img.write(2 << 20, memoryview(b"\x02" * (2 << 20)))
        await img.close()

    asyncio.run(write_child())
    tapimg("commit", "-f", "vhd", child)
    expected = tmp_path / "expected.raw"
    expected.write_bytes(b"\x01" * (2 << 20) + b"\x02" * (2 << 20) + b"\x01" * (4 << 20))
    run("qemu-img", "compare", "-f", "raw", "-F", "vpc", expected, parent)


def test_commit_qcow_leaf_into_qcow2_backing(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "4M")
    qemu_io("qcow2", base, "write -P 1 0 4M")
    leaf = tmp_path / "leaf.qcow"
    qemu_img("create", "-q", "-f", "qcow", "-b", "base.qcow2", "-F", "qcow2", leaf)
    qemu_io("qcow", leaf, "write -P 2 1M 5k", "write -P 3 3M 512")
    expected = tmp_path / "expected.raw"
    qemu_img("convert", "-O", "raw", leaf, expected)
    tapimg("commit", leaf)
    run("qemu-img", "check", base)
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", expected, base)


def test_progress_bar_only_on_a_terminal(tmp_path: Path, chain: Path) -> None:
    import os
    import pty

    piped = subprocess.run(
        [TAPIMG, "convert", "-O", "raw", str(chain), str(tmp_path / "a.raw")],
        capture_output=True,
        text=True,
    )
    assert piped.returncode == 0 and piped.stderr == ""
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(
            [TAPIMG, "convert", "-O", "raw", str(chain), str(tmp_path / "b.raw")],
            stdout=subprocess.DEVNULL,
            stderr=slave,
        )
        os.close(slave)
        shown = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(master)
    assert proc.returncode == 0
    assert b"(100.00/100%)" in shown
