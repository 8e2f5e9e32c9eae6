"""``vhd-util`` commands that change images without a journal: create's sizes and
preallocation, ``modify -z``, ``fill -b -f -t -B``, ``copy`` and ``key``, as blktap 4.0.8
defines them (``vhd-util-{create,modify,fill,copy,key}.c``), and where this differs."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest
from image_helpers import qemu_raw, read_all, write_all
from tapdisk.drivers.base import ImageFormatError
from tapdisk.drivers.vhd.image import VhdImage
from vhdutil_helpers import MiB, file_size_limit, ok, our_vhd, qemu_vhd, vhd_util


def test_create_rounds_up_to_whole_blocks(tmp_path):
    """blktap makes a 10 MiB disk of ``-s 9``: its sizes are whole 2 MiB blocks."""
    for args, size, max_mb in ((["-s", "9"], 10, 10), (["-s", "9", "-S", "31"], 10, 32)):
        path = tmp_path / f"d{size}-{max_mb}.vhd"
        ok("create", "-n", path, *args)
        assert ok("query", "-n", path, "-v", "-S") == f"{size}\n{max_mb}\n"


def test_create_r_preallocates_the_data(tmp_path):
    path = tmp_path / "f.vhd"
    ok("create", "-n", path, "-s", "9", "-r")
    st = os.stat(path)
    assert st.st_size == 10 * MiB + 512
    assert st.st_blocks * 512 >= 10 * MiB  # allocated, not sparse: no ENOSPC later
    assert ok("query", "-n", path, "-v", "-s") == f"10\n{10 * MiB + 512}\n"
    assert qemu_raw(path, "vpc", tmp_path) == bytes(10 * MiB)


def test_create_r_fails_cleanly_without_space(tmp_path):
    """Preallocation fails up front (here EFBIG: a file size limit stands for a full disk)
    and leaves no file behind."""
    path = tmp_path / "f.vhd"
    proc = vhd_util("create", "-n", path, "-s", "8", "-r", preexec_fn=file_size_limit(4 * MiB))
    assert proc.returncode == errno.EFBIG
    assert not path.exists()


def test_modify_z_drops_every_block(tmp_path):
    path = our_vhd(tmp_path / "d.vhd", 20, [(0, b"\x01" * 4096), (5 * MiB, b"\x02" * 2 * MiB)])
    ok("modify", "-z", "-n", path)
    assert ok("query", "-n", path, "-a", "-s") == f"{os.path.getsize(path)}\n0\n"
    assert os.path.getsize(path) == 3584  # footer copy, header, BAT, batmap, footer
    ok("check", "-b", "-n", path)
    assert read_all(f"vhd:{path}") == bytes(20 * MiB)


def test_modify_z_on_a_qemu_vhd(tmp_path):
    """blktap crashes here (no batmap); the BAT is emptied all the same."""
    path = qemu_vhd(tmp_path / "q.vhd", "8M", "write -P 0x11 0 4k")
    ok("modify", "-z", "-n", path)
    assert qemu_raw(path, "vpc", tmp_path) == bytes(os.path.getsize(tmp_path / "q.vhd.ref.raw"))
    ok("check", "-n", path)


def test_modify_z_on_a_fixed_vhd_is_enosys(tmp_path):
    path = tmp_path / "f.vhd"
    ok("create", "-n", path, "-s", "2", "-r")
    proc = vhd_util("modify", "-z", "-n", path)
    assert proc.returncode == errno.ENOSYS and "fixed" in proc.stderr


def test_fill_b_allocates_blocks_without_writing_them(tmp_path):
    """New blocks get full bitmaps over zeros.  blktap also moves the blocks already
    there to fresh zeroed space, losing their data; here they are left as they are."""
    path = our_vhd(tmp_path / "d.vhd", 20, [(2 * MiB, b"\x07" * 512)])
    before = read_all(f"vhd:{path}")
    ok("fill", "-b", "-n", path)
    assert ok("query", "-n", path, "-a") == "10\n"
    assert read_all(f"vhd:{path}") == before
    assert ok("read", "-n", path, "-e", "0", "-c", "40960") == "0 4097\n8192 32768\n"
    ok("check", "-b", "-n", path)
    assert qemu_raw(path, "vpc", tmp_path) == before


def test_fill_b_f_t_take_an_inclusive_sector_range(tmp_path):
    path = our_vhd(tmp_path / "d.vhd", 20, [])
    ok("fill", "-b", "-f", "4096", "-t", "12288", "-n", path)  # blocks 1 to 3
    assert ok("read", "-n", path, "-e", "0", "-c", "40960") == "4096 12288\n"
    ok("fill", "-b", "-B", "-t", "0", "-n", path)  # block 0; -B: nothing near 2 TiB here
    assert ok("query", "-n", path, "-a") == "4\n"
    ok("check", "-n", path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["-f", "3"], "-f/-t can only be used with -b"),
        (["-B"], "-B can only be used with -b"),
        (["-b", "-f", "9", "-t", "3"], "invalid sector range 9-3"),
        (["-b", "-t", "40960"], "past the end of the disk"),
    ],
)
def test_fill_refuses_bad_flag_combinations(tmp_path, args, message):
    path = our_vhd(tmp_path / "d.vhd", 20, [])
    proc = vhd_util("fill", "-n", path, *args)
    assert proc.returncode == errno.EINVAL and message in proc.stderr
    assert ok("query", "-n", path, "-a") == "0\n"


def test_fill_without_b_keeps_what_the_chain_shows(tmp_path):
    base = our_vhd(tmp_path / "base.vhd", 8, [(MiB, b"\x01" * MiB)])
    child = tmp_path / "c.vhd"
    ok("snapshot", "-n", child, "-p", base)
    before = read_all(f"vhd:{child}")
    ok("fill", "-n", child)
    assert ok("query", "-n", child, "-a") == "4\n"
    assert read_all(f"vhd:{child}") == before


def test_copy_of_dynamic_and_fixed_vhds(tmp_path):
    path = our_vhd(tmp_path / "d.vhd", 20, [(0, b"\x01" * 4096), (9 * MiB, b"\x02" * MiB)])
    ok("copy", "-n", path, "-N", tmp_path / "copy.vhd")
    assert read_all(f"vhd:{tmp_path / 'copy.vhd'}") == read_all(f"vhd:{path}")
    assert ok("query", "-n", tmp_path / "copy.vhd", "-v", "-a") == "20\n2\n"
    fixed = tmp_path / "f.vhd"
    ok("create", "-n", fixed, "-s", "4", "-r")
    write_all(f"vhd:{fixed}", [(MiB, b"\x03" * 512)])
    ok("copy", "-n", fixed, "-N", tmp_path / "fcopy.vhd")
    assert "Fixed hard disk" in ok("read", "-p", "-n", tmp_path / "fcopy.vhd")
    assert read_all(f"vhd:{tmp_path / 'fcopy.vhd'}") == read_all(f"vhd:{fixed}")
    qemu = qemu_vhd(tmp_path / "q.vhd", "8M", "write -P 0x11 4k 4k")
    ok("copy", "-n", qemu, "-N", tmp_path / "qcopy.vhd")
    assert read_all(f"vhd:{tmp_path / 'qcopy.vhd'}") == read_all(f"vhd:{qemu}")


@pytest.mark.parametrize(
    "args, message",
    [
        (["-N", "EXISTING"], "already exists, chose a different name"),
        (["-N", "new.vhd", "-k", "key"], "block crypto"),
        (["-N", "new.vhd", "-E"], "block crypto"),
        ([], "Must supply both existing and new VHD names"),
    ],
)
def test_copy_refusals(tmp_path, args, message):
    path = our_vhd(tmp_path / "d.vhd", 4, [])
    args = [str(path) if a == "EXISTING" else a for a in args]
    proc = vhd_util("copy", "-n", path, *args, cwd=tmp_path)
    assert proc.returncode == errno.EINVAL and message in proc.stderr
    assert not (tmp_path / "new.vhd").exists()


def test_copy_of_a_differencing_vhd_is_refused(tmp_path):
    base = our_vhd(tmp_path / "base.vhd", 4, [])
    ok("snapshot", "-n", tmp_path / "c.vhd", "-p", base)
    proc = vhd_util("copy", "-n", tmp_path / "c.vhd", "-N", tmp_path / "new.vhd")
    assert proc.returncode == errno.EINVAL and "differencing" in proc.stderr


def key_file(directory, vhd_name, bits):
    path = directory / f"{vhd_name.removesuffix('.vhd')},aes-xts-plain,{bits}.key"
    path.write_bytes(bytes(range(bits // 8)))
    return path


def test_key_set_from_a_key_file_then_check(tmp_path):
    path = our_vhd(tmp_path / "disk.vhd", 8, [])
    key = key_file(tmp_path, "disk.vhd", 512)
    nonce = "07".rjust(64, "0")
    ok("key", "-s", "-n", path, "-k", key, "-N", nonce)
    expected = hashlib.sha256(bytes.fromhex(nonce) + bytes(range(64))).hexdigest()
    assert ok("key", "-p", "-n", path) == f"{nonce} {expected}\n"
    assert ok("key", "-C", "-k", key, "-N", nonce) == f"{expected}\n"
    ok("key", "-c", "-n", path, "-k", key)
    other = key_file(tmp_path, "disk.vhd", 256)
    proc = vhd_util("key", "-c", "-n", path, "-k", other)
    assert proc.returncode == errno.EINVAL and "does not match" in proc.stderr


def test_key_refusals(tmp_path):
    empty = our_vhd(tmp_path / "e.vhd", 8, [])
    full = our_vhd(tmp_path / "d.vhd", 8, [(0, b"\x01")])
    fixed = tmp_path / "f.vhd"
    ok("create", "-n", fixed, "-s", "2", "-r")
    digest = "ab" * 32
    assert vhd_util("key", "-s", "-n", full, "-H", digest).returncode == errno.EINVAL
    assert vhd_util("key", "-s", "-n", fixed, "-H", digest).returncode == errno.EINVAL
    assert vhd_util("key", "-s", "-n", empty, "-H", "abc").returncode == errno.EINVAL
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(bytes(64))
    proc = vhd_util("key", "-s", "-n", empty, "-k", wrong)
    assert proc.returncode == errno.EPERM and "invalid key name" in proc.stderr  # blktap: -1
    assert vhd_util("key", "-p").returncode == errno.EINVAL  # no -n
    assert ok("key", "-p", "-n", empty) == "none\n"


def test_key_hash_of_a_vhd_without_batmap_is_an_xattr(tmp_path):
    path = qemu_vhd(tmp_path / "q.vhd", "8M")
    digest = "cd" * 32
    ok("key", "-s", "-n", path, "-H", digest)
    assert ok("key", "-p", "-n", path) == f"{'00' * 32} {digest}\n"
    raw = os.getxattr(path, "user.com.citrix.xenclient.backend.keyhash")
    assert raw == b"\x01" + bytes(32) + bytes.fromhex(digest)


def test_snapshot_inherits_the_key_hash_and_the_driver_refuses_encrypted_vhds(tmp_path):
    base = our_vhd(tmp_path / "base.vhd", 8, [])
    ok("key", "-s", "-n", base, "-H", "ef" * 32)
    ok("snapshot", "-n", tmp_path / "c.vhd", "-p", base, "-e")
    assert ok("key", "-p", "-n", tmp_path / "c.vhd").split()[1] == "ef" * 32
    for path in (base, tmp_path / "c.vhd"):
        with pytest.raises(ImageFormatError, match="encrypted"):
            VhdImage(str(path), read_only=True)
