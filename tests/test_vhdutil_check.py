"""``vhd-util check``: one verdict per image of the chain, blktap's exit statuses, its
options (``-p -i -I -t -B -b -s``) and its ``-s`` report (``vhd-util-check.c``;
outputs compared by hand with blktap 4.0.8 on the same images)."""

from __future__ import annotations

import errno
import os
import time

from image_helpers import write_all
from tapdisk.drivers.vhd.format import VHD_EPOCH, Footer
from vhdutil_helpers import MiB, ok, our_vhd, qemu_vhd, vhd_util


def chain(tmp_path):
    """base <- c <- d, each holding some sectors; returned relative to ``tmp_path``."""
    our_vhd(tmp_path / "base.vhd", 20, [(0, b"\x01" * 4096), (4 * MiB + 1536, b"\x02" * 512)])
    ok("snapshot", "-n", tmp_path / "c.vhd", "-p", tmp_path / "base.vhd")
    write_all(f"vhd:{tmp_path / 'c.vhd'}", [(0, b"\x03" * 1024), (10 * MiB, b"\x04" * 512)])
    ok("snapshot", "-n", tmp_path / "d.vhd", "-p", tmp_path / "c.vhd")
    write_all(f"vhd:{tmp_path / 'd.vhd'}", [(0, b"\x05" * 8192), (10 * MiB, b"\x06" * MiB)])


def test_p_reports_every_image_of_the_chain(tmp_path):
    chain(tmp_path)
    proc = vhd_util("check", "-p", "-n", "d.vhd", cwd=tmp_path)
    assert proc.returncode == 0
    assert proc.stdout == (
        f"d.vhd is valid\n{tmp_path / 'c.vhd'} is valid\n{tmp_path / 'base.vhd'} is valid\n"
    )
    assert ok("check", "-n", tmp_path / "d.vhd") == f"{tmp_path / 'd.vhd'} is valid\n"


def test_missing_parent_exits_enoent(tmp_path):
    chain(tmp_path)
    os.unlink(tmp_path / "base.vhd")
    proc = vhd_util("check", "-n", "c.vhd", cwd=tmp_path)
    assert proc.returncode == errno.ENOENT
    assert "parent 'base.vhd' not found" in proc.stdout
    assert "c.vhd appears invalid" in proc.stderr
    proc = vhd_util("check", "-p", "-n", "d.vhd", cwd=tmp_path)
    assert proc.returncode == errno.ENOENT
    assert proc.stdout.startswith("d.vhd is valid\n")
    assert "parent 'base.vhd' not found" in proc.stdout
    assert f"{tmp_path / 'c.vhd'} appears invalid" in proc.stderr


def test_a_broken_parent_exits_einval(tmp_path):
    chain(tmp_path)
    with open(tmp_path / "base.vhd", "r+b") as f:
        f.seek(512 + 28)  # header.max_table_entries: its checksum no longer matches
        f.write(b"\x00\x00\x00\x09")
    proc = vhd_util("check", "-p", "-n", tmp_path / "d.vhd")
    assert proc.returncode == errno.EINVAL
    assert "header.checksum" in proc.stdout


def test_fixed_vhd_is_checked_silently_as_blktap_does(tmp_path):
    path = tmp_path / "f.vhd"
    ok("create", "-n", path, "-s", "4", "-r")
    proc = vhd_util("check", "-p", "-n", path)
    assert (proc.returncode, proc.stdout) == (0, "")


def test_raw_parent_ends_the_walk(tmp_path):
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(4 * MiB))
    ok("snapshot", "-n", tmp_path / "c.vhd", "-p", raw, "-m")
    assert ok("check", "-p", "-n", tmp_path / "c.vhd") == f"{tmp_path / 'c.vhd'} is valid\n"
    assert ok("query", "-d", "-n", tmp_path / "c.vhd") == "chain depth: 2\n"


def test_qemu_images_check_valid(tmp_path):
    path = qemu_vhd(tmp_path / "q.vhd", "20M", "write -P 0x11 0 4k", "write -P 0x22 5M 1M")
    assert ok("check", "-b", "-p", "-n", path) == f"{path} is valid\n"


def test_s_reports_sectors_per_image(tmp_path):
    chain(tmp_path)
    assert ok("check", "-s", "-p", "-n", tmp_path / "d.vhd") == (
        "base.vhd: secs allocated: 0x2000 secs written: 0x9 (0.11%)\n"
        "c.vhd: secs allocated: 0x2000 secs written: 0x3 (0.04%) "
        "secs not in parent: 0x1 (33.33%) secs not in ancestors: 0x1 (33.33%)\n"
        "d.vhd: secs allocated: 0x2000 secs written: 0x810 (25.20%) "
        "secs not in parent: 0x80d (99.85%) secs not in ancestors: 0x807 (99.56%)\n"
    )
    assert ok("check", "-s", "-n", tmp_path / "c.vhd") == (
        "c.vhd: secs allocated: 0x2000 secs written: 0x3 (0.04%)\n"
    )


def test_B_excludes_s_and_b(tmp_path):
    path = our_vhd(tmp_path / "d.vhd", 8, [])
    assert vhd_util("check", "-B", "-n", path).returncode == 0
    for flag in ("-s", "-b"):
        proc = vhd_util("check", "-B", flag, "-n", path)
        assert proc.returncode == errno.EINVAL and "options:" in proc.stderr


def test_t_ignores_timestamps_in_the_future(tmp_path):
    path = our_vhd(tmp_path / "d.vhd", 8, [])
    with open(path, "r+b") as f:
        footer = Footer.unpack(f.read(512), str(path))
        footer.timestamp = int(time.time()) - VHD_EPOCH + 7200  # blktap allows 1800 s of skew
        f.seek(0)
        f.write(footer.pack())
        f.seek(-512, os.SEEK_END)
        f.write(footer.pack())
    proc = vhd_util("check", "-n", path)
    assert proc.returncode == errno.EINVAL and "timestamp is in the future" in proc.stdout
    assert ok("check", "-t", "-n", path) == f"{path} is valid\n"


def test_I_ignores_a_parent_uuid_mismatch(tmp_path):
    a = our_vhd(tmp_path / "a.vhd", 8, [])
    child = tmp_path / "c.vhd"
    ok("snapshot", "-n", child, "-p", a)
    os.unlink(a)
    ok("create", "-n", a, "-s", "8")  # same name, new UUID
    proc = vhd_util("check", "-n", child)
    assert proc.returncode == errno.EINVAL and "parent_uuid" in proc.stdout
    assert ok("check", "-I", "-n", child) == f"{child} is valid\n"
