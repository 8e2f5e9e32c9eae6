"""``vhd-util``: blktap's subcommands, flags, output formats and exit codes."""

from __future__ import annotations

import errno
import os
import sys

from helpers import require, run
from image_helpers import read_all, write_all
from tapdisk.drivers.vhd.format import FOOTER_SIZE
from vhdutil_helpers import VHD_UTIL, MiB, ok, our_vhd, vhd_util


def test_create_makes_tap_style_dynamic_image(tmp_path):
    path = tmp_path / "d.vhd"
    ok("create", "-n", path, "-s", "100")
    out = ok("read", "-n", path, "-p")
    assert "Creator Application : 'tap'" in out
    assert "Creator version     : Major: 1, Minor: 3" in out
    assert "Disk type           : Dynamic hard disk" in out
    assert "Table offset        : 1536" in out
    assert "Block size          : 2097152 (2 MB)" in out
    assert "VHD Batmap Summary:" in out and "(Good!)" in out
    assert os.path.getsize(path) < 8192


def test_create_reserve_makes_fixed_image(tmp_path):
    path = tmp_path / "f.vhd"
    ok("create", "-n", path, "-s", "8", "-r")
    assert os.path.getsize(path) == 8 * MiB + FOOTER_SIZE
    assert "Fixed hard disk" in ok("read", "-n", path, "-p")


def test_create_refuses_existing_file_with_eexist(tmp_path):
    path = tmp_path / "d.vhd"
    ok("create", "-n", path, "-s", "8")
    proc = vhd_util("create", "-n", path, "-s", "8")
    assert proc.returncode == errno.EEXIST
    assert "already exists" in proc.stderr


def test_missing_size_is_a_usage_error(tmp_path):
    proc = vhd_util("create", "-n", tmp_path / "d.vhd")
    assert proc.returncode == errno.EINVAL
    assert "options:" in proc.stderr


def test_query_prints_fields_in_blktaps_order(tmp_path):
    base = tmp_path / "base.vhd"
    child = tmp_path / "child.vhd"
    ok("create", "-n", base, "-s", "64", "-S", "128")
    write_all(f"vhd:{base}", [(0, b"\x01" * 4096)])
    ok("snapshot", "-n", child, "-p", base)
    write_all(f"vhd:{child}", [(4 * MiB, b"\x02" * 4096), (9 * MiB, b"\x03" * 512)])
    lines = ok("query", "-n", child, "-a", "-d", "-m", "-f", "-p", "-s", "-v").splitlines()
    phys = int(lines[1])
    assert lines == [
        "64",
        str(phys),
        str(base),
        "hidden: 0",
        "marker: 0",
        "chain depth: 2",
        "2",
    ]
    assert phys == os.path.getsize(child)
    assert ok("query", "-n", base, "-p", "-S").splitlines() == [f"{base} has no parent", "128"]


def test_query_missing_file_fails_with_enoent(tmp_path):
    proc = vhd_util("query", "-n", tmp_path / "nope.vhd", "-v")
    assert proc.returncode == errno.ENOENT
    assert "nope.vhd" in proc.stderr


def test_snapshot_depth_limit(tmp_path):
    base = tmp_path / "base.vhd"
    ok("create", "-n", base, "-s", "8")
    write_all(f"vhd:{base}", [(0, b"\x01" * 512)])
    ok("snapshot", "-n", tmp_path / "s1.vhd", "-p", base, "-l", "2")
    write_all(f"vhd:{tmp_path / 's1.vhd'}", [(0, b"\x02" * 512)])
    proc = vhd_util("snapshot", "-n", tmp_path / "s2.vhd", "-p", tmp_path / "s1.vhd", "-l", "2")
    assert proc.returncode == errno.ENOSPC
    assert "snapshot depth exceeded: current depth: 2, limit: 2" in proc.stdout


def test_snapshot_skips_empty_parent_unless_e(tmp_path):
    base = tmp_path / "base.vhd"
    empty = tmp_path / "empty.vhd"
    ok("create", "-n", base, "-s", "8")
    write_all(f"vhd:{base}", [(0, b"\x01" * 512)])
    ok("snapshot", "-n", empty, "-p", base)
    ok("snapshot", "-n", tmp_path / "a.vhd", "-p", empty)
    ok("snapshot", "-n", tmp_path / "b.vhd", "-p", empty, "-e")
    assert ok("query", "-n", tmp_path / "a.vhd", "-p").strip() == str(base)
    assert ok("query", "-n", tmp_path / "b.vhd", "-p").strip() == str(empty)


def test_snapshot_of_raw_parent(tmp_path):
    raw = tmp_path / "base.raw"
    raw.write_bytes(b"\x07" * 4 * MiB)
    child = tmp_path / "c.vhd"
    ok("snapshot", "-n", child, "-p", raw, "-m")
    assert read_all(f"vhd:{child}") == b"\x07" * 4 * MiB


def test_check_reports_valid_image(tmp_path):
    path = tmp_path / "d.vhd"
    ok("create", "-n", path, "-s", "8")
    assert ok("check", "-n", path, "-b", "-p") == f"{path} is valid\n"


def test_check_names_what_is_wrong(tmp_path):
    path = tmp_path / "d.vhd"
    ok("create", "-n", path, "-s", "8")
    with open(path, "r+b") as f:
        f.seek(1536 + 1024)  # the batmap: claims block 0 is full, but it is not allocated
        f.write(b"\x80")
        f.seek(1536 + 512 + 24)
        f.write((0xFFFFFFFF - (sum(b"\x80") & 0xFFFFFFFF)).to_bytes(4, "big"))
    proc = vhd_util("check", "-n", path)
    assert proc.returncode == errno.EINVAL
    assert "batmap" in proc.stdout
    assert "appears invalid" in proc.stderr


def test_check_with_parents_finds_a_broken_parent(tmp_path):
    base = tmp_path / "base.vhd"
    child = tmp_path / "c.vhd"
    ok("create", "-n", base, "-s", "8")
    ok("snapshot", "-n", child, "-p", base)
    with open(base, "r+b") as f:
        f.seek(512 + 28)
        f.write(b"\x00\x00\x00\x09")  # header.max_table_entries, checksum now wrong
    proc = vhd_util("check", "-n", child, "-p")
    assert proc.returncode == errno.EINVAL
    assert "header.checksum" in proc.stdout


def test_set_hidden_and_marker_show_in_query_and_scan(tmp_path):
    path = tmp_path / "d.vhd"
    ok("create", "-n", path, "-s", "8")
    ok("set", "-n", path, "-f", "hidden", "-v", "1")
    ok("set", "-n", path, "-f", "marker", "-v", "1")
    assert ok("query", "-n", path, "-f", "-m").splitlines() == ["hidden: 1", "marker: 1"]
    assert "hidden=1 marker=1 keyhash= parent=none" in ok("scan", "-M", "-m", path)
    ok("check", "-n", path)


def test_set_unknown_field_is_refused(tmp_path):
    path = tmp_path / "d.vhd"
    ok("create", "-n", path, "-s", "8")
    assert vhd_util("set", "-n", path, "-f", "colour", "-v", "1").returncode == errno.EINVAL


def test_scan_lines_and_tree(tmp_path):
    base = tmp_path / "base.vhd"
    ok("create", "-n", base, "-s", "8")
    ok("snapshot", "-n", tmp_path / "c1.vhd", "-p", base, "-e")
    ok("snapshot", "-n", tmp_path / "c2.vhd", "-p", base, "-e")
    ok("set", "-n", base, "-f", "hidden", "-v", "1")
    size = os.path.getsize(tmp_path / "c1.vhd")
    lines = ok("scan", "-m", tmp_path / "*.vhd").splitlines()
    assert lines == [
        f"vhd=base.vhd capacity={8 * MiB} size={os.path.getsize(base)} hidden=1 parent=none",
        f"vhd=c1.vhd capacity={8 * MiB} size={size} hidden=0 parent=base.vhd",
        f"vhd=c2.vhd capacity={8 * MiB} size={size} hidden=0 parent=base.vhd",
    ]
    tree = ok("scan", "-p", "-m", tmp_path / "*.vhd").splitlines()
    assert tree[0].startswith("vhd=base.vhd ")
    assert tree[1].startswith("   vhd=c1.vhd ") and tree[2].startswith("   vhd=c2.vhd ")
    verbose = ok("scan", "-v", "-m", tmp_path / "c1.vhd")
    assert f"vhd={tmp_path / 'c1.vhd'} " in verbose and f"parent={base}" in verbose


def test_scan_reports_broken_image_and_fails_unless_c(tmp_path):
    bad = tmp_path / "bad.vhd"
    bad.write_bytes(bytes(4096))
    proc = vhd_util("scan", "-m", tmp_path / "*.vhd")
    assert proc.returncode == errno.EINVAL
    assert f"vhd={bad} scan-error=" in proc.stdout and "footer.cookie" in proc.stdout
    assert vhd_util("scan", "-c", "-m", tmp_path / "*.vhd").returncode == 0


def test_coalesce_copies_child_sectors_into_parent(tmp_path):
    base = tmp_path / "base.vhd"
    child = tmp_path / "c.vhd"
    ok("create", "-n", base, "-s", "8")
    write_all(f"vhd:{base}", [(0, b"\x01" * 3 * MiB)])
    ok("snapshot", "-n", child, "-p", base)
    write_all(f"vhd:{child}", [(MiB + 3, b"\x02" * 1000), (6 * MiB, b"\x03" * 4096)])
    expected = read_all(f"vhd:{child}")
    assert ok("coalesce", "-n", child) == "Coalesced 10 sectors\n"
    assert read_all(f"vhd:{base}") == expected
    ok("check", "-n", base, "-b")


def test_coalesce_of_non_differencing_image_fails(tmp_path):
    path = tmp_path / "d.vhd"
    ok("create", "-n", path, "-s", "8")
    proc = vhd_util("coalesce", "-n", path)
    assert proc.returncode == errno.EINVAL
    assert "not a differencing VHD" in proc.stderr


def test_coalesce_shows_progress_only_on_a_terminal(tmp_path):
    base = tmp_path / "base.vhd"
    child = tmp_path / "c.vhd"
    ok("create", "-n", base, "-s", "8")
    ok("snapshot", "-n", child, "-p", base)
    write_all(f"vhd:{child}", [(0, b"\x02" * 512)])
    script = (
        "import os, pty, sys; pid, fd = pty.fork()\n"
        "if pid == 0: os.execv(sys.argv[1], sys.argv[1:])\n"
        "out = b''\n"
        "while True:\n"
        "    try: chunk = os.read(fd, 4096)\n"
        "    except OSError: break\n"
        "    if not chunk: break\n"
        "    out += chunk\n"
        "os.waitpid(pid, 0); sys.stdout.write(out.decode())\n"
    )
    out = run(sys.executable, "-c", script, VHD_UTIL, "coalesce", "-n", child)
    assert "100.00%" in out and "Coalesced 1 sectors" in out


def test_repair_restores_torn_trailing_footer(tmp_path):
    path = tmp_path / "d.vhd"
    ok("create", "-n", path, "-s", "8")
    write_all(f"vhd:{path}", [(0, b"\x01" * 4096)])
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size - 512)
        f.write(b"\xc7" * 512)
    assert vhd_util("check", "-n", path).returncode == errno.EINVAL
    assert ok("check", "-n", path, "-i") == f"{path} is valid\n"
    assert "primary footer" in ok("repair", "-n", path)
    ok("check", "-n", path)
    assert read_all(f"vhd:{path}")[:4096] == b"\x01" * 4096


def test_resize_grows_within_preallocated_bat(tmp_path):
    path = tmp_path / "d.vhd"
    ok("create", "-n", path, "-s", "8", "-S", "64")
    write_all(f"vhd:{path}", [(0, b"\x01" * 512)])
    ok("resize", "-n", path, "-s", "40", "-f")
    assert ok("query", "-n", path, "-v") == "40\n"
    write_all(f"vhd:{path}", [(39 * MiB, b"\x02" * 512)])
    ok("check", "-n", path)
    data = read_all(f"vhd:{path}")
    assert data[:512] == b"\x01" * 512 and data[39 * MiB : 39 * MiB + 512] == b"\x02" * 512


def test_resize_beyond_preallocated_bat_is_refused(tmp_path):
    path = tmp_path / "d.vhd"
    ok("create", "-n", path, "-s", "8")
    proc = vhd_util("resize", "-n", path, "-s", "40", "-f")
    assert proc.returncode == errno.EINVAL
    assert "BAT entries" in proc.stderr


def test_resize_fixed_image(tmp_path):
    path = tmp_path / "f.vhd"
    ok("create", "-n", path, "-s", "4", "-r")
    ok("resize", "-n", path, "-s", "6", "-f")
    assert os.path.getsize(path) == 6 * MiB + FOOTER_SIZE
    ok("check", "-n", path)


def test_modify_sets_new_parent(tmp_path):
    a = tmp_path / "a.vhd"
    b = tmp_path / "b.vhd"
    child = tmp_path / "c.vhd"
    ok("create", "-n", a, "-s", "8")
    run(require("cp"), "--sparse=always", a, b)  # same UUID, different content
    write_all(f"vhd:{b}", [(0, b"\x05" * 512)])
    ok("snapshot", "-n", child, "-p", a)
    ok("modify", "-n", child, "-p", b)
    assert ok("query", "-n", child, "-p").strip() == str(b)
    assert read_all(f"vhd:{child}")[:512] == b"\x05" * 512
    ok("check", "-n", child, "-p")


def test_modify_sets_physical_size(tmp_path):
    path = tmp_path / "d.vhd"
    ok("create", "-n", path, "-s", "8")
    ok("modify", "-n", path, "-s", str(1 * MiB))
    assert os.path.getsize(path) == MiB
    ok("check", "-n", path)
    write_all(f"vhd:{path}", [(0, b"\x01" * 512)])
    assert read_all(f"vhd:{path}")[:512] == b"\x01" * 512
    assert vhd_util("modify", "-n", path, "-s", "1024").returncode == errno.EINVAL


def test_fill_allocates_every_block_keeping_contents(tmp_path):
    base = tmp_path / "base.vhd"
    child = tmp_path / "c.vhd"
    ok("create", "-n", base, "-s", "9")
    write_all(f"vhd:{base}", [(MiB, b"\x01" * MiB)])
    ok("snapshot", "-n", child, "-p", base)
    write_all(f"vhd:{child}", [(3 * MiB, b"\x02" * 512)])
    before = read_all(f"vhd:{child}")
    ok("fill", "-n", child)
    assert ok("query", "-n", child, "-a") == "5\n"
    assert read_all(f"vhd:{child}") == before
    ok("check", "-n", child)


def test_read_prints_parent_locators(tmp_path):
    base = tmp_path / "base.vhd"
    child = tmp_path / "c.vhd"
    ok("create", "-n", base, "-s", "8")
    ok("snapshot", "-n", child, "-p", base)
    out = ok("read", "-n", child, "-p")
    for code in ("PLAT_CODE_MACX", "PLAT_CODE_W2KU", "PLAT_CODE_W2RU"):
        assert f"       code         : {code}" in out
    assert "       decoded name : ./base.vhd" in out
    assert "Parent name         : base.vhd" in out


def test_scan_with_a_adds_parents_outside_the_filter(tmp_path):
    (tmp_path / "gold").mkdir()
    base = tmp_path / "gold" / "base.vhd"
    child = tmp_path / "c.vhd"
    ok("create", "-n", base, "-s", "8")
    ok("snapshot", "-n", child, "-p", base, "-e")
    plain = ok("scan", "-m", tmp_path / "*.vhd").splitlines()
    assert [line.split()[0] for line in plain] == ["vhd=c.vhd"]
    tree = ok("scan", "-a", "-p", "-m", tmp_path / "*.vhd").splitlines()
    assert [line.split()[0] for line in tree] == ["vhd=base.vhd", "vhd=c.vhd"]
    assert tree[1].startswith("   ")
    missing = ok("scan", "-p", "-m", tmp_path / "*.vhd")
    assert missing.rstrip().endswith("parent=base.vhd (not found in scan)")


def test_query_u_prints_the_parent_as_stored(tmp_path):
    base = tmp_path / "base.vhd"
    child = tmp_path / "c.vhd"
    ok("create", "-n", base, "-s", "8")
    ok("snapshot", "-n", child, "-p", base)
    assert ok("query", "-n", child, "-p", "-u") == "./base.vhd\n"


def test_repair_b_copies_the_backup_footer_over_the_trailing_one(tmp_path):
    path = tmp_path / "d.vhd"
    ok("create", "-n", path, "-s", "8")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size - 512)
        f.write(b"\x00" * 512)
    ok("repair", "-n", path, "-b")
    ok("check", "-n", path)
    with open(path, "rb") as f:
        head = f.read(512)
        f.seek(size - 512)
        assert f.read(512) == head


def test_debug_is_dropped_wherever_it_stands(tmp_path):
    """SM passes ``--debug`` to nearly every call; blktap's vhd-util drops it."""
    path = our_vhd(tmp_path / "d.vhd", 8, [])
    assert ok("query", "--debug", "-v", "-n", path) == "8\n"
    assert ok("query", "-v", "--debug", "-n", path, "--debug") == "8\n"


def test_options_may_follow_operands_but_stray_words_are_refused(tmp_path):
    """GNU getopt, as blktap's: options in any order; a word that is no option fails."""
    path = our_vhd(tmp_path / "d.vhd", 8, [])
    assert ok("query", "-n", path, "-v", "-s").splitlines()[0] == "8"
    proc = vhd_util("query", "-n", path, "stray", "-v")
    assert proc.returncode == errno.EINVAL and "unexpected argument 'stray'" in proc.stderr
    assert proc.stdout == ""


def test_unknown_command(tmp_path):
    proc = vhd_util("frobnicate")
    assert proc.returncode == errno.EINVAL
    assert "invalid COMMAND frobnicate" in proc.stderr
    assert "COMMAND := { create | snapshot | query | read | set | repair | resize | fill | " in (
        proc.stdout
    )


def test_query_a_of_a_fixed_vhd_fails_as_blktaps_does(tmp_path):
    path = tmp_path / "f.vhd"
    ok("create", "-n", path, "-s", "2", "-r")
    proc = vhd_util("query", "-n", path, "-v", "-a", "-S")
    assert proc.returncode == errno.EINVAL
    assert proc.stdout == "2\nerror reading bat: -22\n0\n"
    assert "a fixed VHD has no BAT" in proc.stderr


def test_query_of_an_orphan_says_why_and_exits_enoent(tmp_path):
    base = our_vhd(tmp_path / "base.vhd", 8, [])
    child = tmp_path / "c.vhd"
    ok("snapshot", "-n", child, "-p", base, "-e")
    os.unlink(base)
    proc = vhd_util("query", "-n", child, "-v", "-p", "-d")
    assert proc.returncode == errno.ENOENT
    assert proc.stdout == "8\nquery failed\nerror checking chain depth: -2\n"
    assert "not found" in proc.stderr
