"""``vhd-util`` called the way SM's ``libs/sm/vhdutil.py`` calls it, its output parsed the
way SM parses it: argument lists (``--debug`` included, where SM puts it), output
lines and exit statuses."""

from __future__ import annotations

import errno
import os
import re

from image_helpers import read_all, write_all
from vhdutil_helpers import (
    MiB,
    ok,
    our_vhd,
    qemu_vhd,
    read_prefix,
    vhd_util,
    vhd_util_bytes,
)

DEBUG = "--debug"  # SM's OPT_LOG_ERR, passed to almost every call


def vhd_info(path, include_parent=True):
    """SM's getVHDInfo: query -vsaf[p], one value per line."""
    opts = "-vsafp" if include_parent else "-vsaf"
    fields = ok("query", DEBUG, opts, "-n", path).strip().split("\n")
    info = {"size_virt": int(fields[0]) * MiB, "size_phys": int(fields[1])}
    i = 2
    if include_parent:
        info["parent"] = None if "no parent" in fields[i] else fields[i]
        i += 1
    info["hidden"] = int(fields[i].replace("hidden: ", ""))
    info["allocated"] = int(fields[i + 1]) * 2 * MiB
    return info


def test_query_vsafp_gives_sm_its_five_fields(tmp_path):
    base = our_vhd(tmp_path / "base.vhd", 20, [(0, b"\x01" * 4096), (5 * MiB, b"\x02" * 512)])
    child = tmp_path / "child.vhd"
    ok("snapshot", DEBUG, "-n", child, "-p", base)
    assert vhd_info(base) == {
        "size_virt": 20 * MiB,
        "size_phys": os.path.getsize(base),
        "parent": None,
        "hidden": 0,
        "allocated": 2 * 2 * MiB,
    }
    assert vhd_info(child)["parent"] == str(base)
    assert vhd_info(child, include_parent=False)["allocated"] == 0


def test_query_of_a_qemu_image(tmp_path):
    path = qemu_vhd(tmp_path / "q.vhd", "20M", "write -P 0x11 0 4k", "write -P 0x22 5M 1M")
    info = vhd_info(path)
    assert info["parent"] is None and info["hidden"] == 0
    assert info["allocated"] == 2 * 2 * MiB
    assert info["size_phys"] == os.path.getsize(path)


def test_parent_queries_sm_uses(tmp_path):
    base = our_vhd(tmp_path / "base.vhd", 8, [(0, b"\x01" * 512)])
    child = tmp_path / "child.vhd"
    ok("snapshot", DEBUG, "-n", child, "-p", base)
    # getParent, hasParent, _getVHDParentNoCheck
    assert ok("query", DEBUG, "-p", "-n", child).strip() == str(base)
    assert "no parent" in ok("query", DEBUG, "-p", "-n", base)
    for path, kind in ((child, "Differencing"), (base, "Dynamic")):
        text = ok("read", DEBUG, "-p", "-n", path)
        assert re.match(r".*Disk type\s+: (\S+) hard disk.*", text, flags=re.S).group(1) == kind
    names = [ln for ln in ok("read", "-p", "-n", child).splitlines() if "decoded name :" in ln]
    assert names and all(n.split(":")[1].strip() == "./base.vhd" for n in names)
    assert ok("query", DEBUG, "-d", "-n", child) == "chain depth: 2\n"


def test_sm_setters(tmp_path):
    a = our_vhd(tmp_path / "a.vhd", 8, [(0, b"\x0a" * 512)])
    b = our_vhd(tmp_path / "b.vhd", 8, [(0, b"\x0b" * 512)])
    child = tmp_path / "child.vhd"
    ok("snapshot", DEBUG, "-n", child, "-p", a, "-S", "64")
    ok("modify", DEBUG, "-p", os.path.normpath(b), "-n", child)  # setParent
    assert read_all(f"vhd:{child}")[:512] == b"\x0b" * 512
    ok("set", DEBUG, "-n", child, "-f", "hidden", "-v", "1")  # setHidden
    assert int(ok("query", DEBUG, "-f", "-n", child).split(":")[-1].strip()) == 1
    assert int(ok("query", DEBUG, "-S", "-n", child)) == 64  # getMaxResizeSize
    ok("resize", DEBUG, "-s", "40", "-n", child, "-f")  # setSizeVirtFast
    assert int(ok("query", DEBUG, "-v", "-n", child)) * MiB == 40 * MiB  # getSizeVirt
    phys = int(ok("query", DEBUG, "-s", "-n", child))  # getSizePhys
    ok("modify", DEBUG, "-s", phys + 4 * MiB, "-n", child)  # setSizePhys
    ok("modify", "-s", phys + 8 * MiB, "-n", child)
    assert os.path.getsize(child) == phys + 8 * MiB
    assert vhd_util("check", DEBUG, "-n", child).returncode == 0


def test_create_and_snapshot_as_sm_calls_them(tmp_path):
    dyn, fixed = tmp_path / "d.vhd", tmp_path / "f.vhd"
    ok("create", DEBUG, "-n", dyn, "-s", "30", "-S", "2097152")  # LVHD passes MSIZE_MB
    ok("create", DEBUG, "-n", fixed, "-s", "30", "-r")
    assert int(ok("query", DEBUG, "-v", "-n", dyn)) == 30
    assert int(ok("query", DEBUG, "-S", "-n", dyn)) == 2097152
    raw = tmp_path / "r.raw"
    raw.write_bytes(b"\x05" * 4 * MiB)
    snap = tmp_path / "s.vhd"
    ok("snapshot", DEBUG, "-n", snap, "-p", raw, "-m", "-S", "2097152")
    assert read_all(f"vhd:{snap}") == b"\x05" * 4 * MiB
    empty = tmp_path / "e.vhd"
    ok("snapshot", DEBUG, "-n", empty, "-p", dyn, "-e")
    assert ok("query", DEBUG, "-p", "-n", empty).strip() == str(dyn)


def test_check_as_sm_calls_it(tmp_path):
    path = our_vhd(tmp_path / "d.vhd", 8, [(0, b"\x01" * 4096)])
    for extra in ((), ("-i",), ("-B",), ("-i", "-B")):
        assert vhd_util("check", DEBUG, "-n", path, *extra).returncode == 0
    with open(path, "r+b") as f:  # tear the trailing footer: only -i accepts it
        f.seek(-512, os.SEEK_END)
        f.write(b"\x00" * 512)
    assert vhd_util("check", DEBUG, "-n", path).returncode == errno.EINVAL
    assert vhd_util("check", DEBUG, "-n", path, "-i").returncode == 0
    ok("repair", "-n", path)
    assert vhd_util("check", DEBUG, "-n", path, "-B").returncode == 0


def test_block_bitmap_as_sm_reads_it(tmp_path):
    """getBlockBitmap: one bit per whole block, most significant bit first, raw on stdout."""
    path = our_vhd(
        tmp_path / "d.vhd",
        40,
        [(0, b"\x01"), (2 * MiB * 9, b"\x02" * 512), (2 * MiB * 19 + 7, b"\x03")],
    )
    proc = vhd_util_bytes("read", DEBUG, "-B", "-n", path)
    assert proc.returncode == 0
    assert proc.stdout == bytes([0b1000_0000, 0b0100_0000, 0b0001_0000])
    qemu = qemu_vhd(tmp_path / "q.vhd", "16M", "write 2M 512")
    assert vhd_util_bytes("read", DEBUG, "-B", "-n", qemu).stdout == b"\x40"


def test_kill_data_then_coalesce(tmp_path):
    base = our_vhd(tmp_path / "base.vhd", 8, [(0, b"\x01" * MiB)])
    child = tmp_path / "c.vhd"
    ok("snapshot", DEBUG, "-n", child, "-p", base)
    write_all(f"vhd:{child}", [(0, b"\x02" * 4096)])
    ok("modify", DEBUG, "-z", "-n", child)  # killData: the child shows its parent again
    assert int(ok("query", DEBUG, "-a", "-n", child)) == 0
    assert read_all(f"vhd:{child}")[:4096] == b"\x01" * 4096
    write_all(f"vhd:{child}", [(512, b"\x03" * 1024)])
    text = ok("coalesce", DEBUG, "-n", child)
    assert int(re.match(r"^Coalesced (\d+) sectors", text).group(1)) == 2


def test_resize_with_journal_then_revert_as_sm_does(tmp_path):
    """FileSR's resize: ``resize -j``; on failure ``revert`` with the same journal."""
    path = our_vhd(tmp_path / "d.vhd", 20, [(0, b"\x01" * 4096), (3 * MiB, b"\x02" * MiB)])
    before = read_all(f"vhd:{path}")
    journal = tmp_path / "journal.d"
    ok("resize", DEBUG, "-s", "30000", "-n", path, "-j", journal)
    assert int(ok("query", DEBUG, "-v", "-n", path)) == 30000
    assert not journal.exists()
    assert read_prefix(path, len(before)) == before
    # Shrinking fails as blktap's does (ENOSYS); SM then reverts, and the journal is gone.
    assert vhd_util("resize", DEBUG, "-s", "10", "-n", path, "-j", journal).returncode == 38
    assert vhd_util("revert", DEBUG, "-n", path, "-j", journal).returncode == errno.ENOENT
    assert vhd_util("check", "-n", path).returncode == 0


def test_scan_lines_sm_parses(tmp_path):
    base = our_vhd(tmp_path / "base.vhd", 8, [(0, b"\x01" * 512)])
    ok("snapshot", "-n", tmp_path / "c.vhd", "-p", base)
    lines = ok("scan", "-f", "-m", tmp_path / "*.vhd").split("\n")
    parsed = {}
    for line in filter(str.strip, lines):
        info = dict(kv.split("=") for kv in line.split())
        parsed[info["vhd"]] = info
    assert parsed["c.vhd"]["parent"] == "base.vhd"
    assert parsed["base.vhd"]["parent"] == "none"
    assert int(parsed["c.vhd"]["capacity"]) == 8 * MiB


def test_key_hash_calls(tmp_path):
    """FileSR prints the key hash of every VHD it scans, and sets it on VHDs it creates."""
    ours = our_vhd(tmp_path / "d.vhd", 8, [])
    qemu = qemu_vhd(tmp_path / "q.vhd", "8M")
    fixed = tmp_path / "f.vhd"
    ok("create", "-n", fixed, "-s", "2", "-r")
    for path in (ours, qemu, fixed):
        assert ok("key", "-p", "-n", path) == "none\n"
    digest = "ab" * 32
    ok("key", "-s", "-n", ours, "-H", digest)
    nonce, key_hash = ok("key", "-p", "-n", ours).split()
    assert (nonce, key_hash) == ("00" * 32, digest)
