"""``cbt-util``: blktap's CBT log layout byte for byte, its commands and output, bad input.

The expected files are packed by hand (``cbt_helpers``), never through the code under test.
"""

from __future__ import annotations

import errno
import os
import subprocess
import uuid
from pathlib import Path

import pytest
from cbt_helpers import BLOCK, CBT_UTIL, bitmap_bytes, bitmap_of, cbt_util, header, ok, write_log

P = uuid.UUID("0d5cbfa6-0f53-4d0c-8f4b-16eef6e3b1a4")
C = uuid.UUID("e2b7b5a1-9c1e-4a7d-b2a5-6b1f0c3d4e5f")


def log_file(
    tmp_path: Path,
    size: int,
    blocks: set[int] = frozenset(),
    name: str = "d.cbtlog",
    **fields: object,
) -> Path:
    return write_log(tmp_path / name, size, blocks, **fields)


# -- create -------------------------------------------------------------------


@pytest.mark.parametrize(
    "size", [1, BLOCK, BLOCK + 1, 8 * BLOCK, 8 * BLOCK + 1, 4194304, 10 * 1024**3]
)
def test_create_writes_header_and_zero_bitmap_exactly(tmp_path, size):
    path = tmp_path / "new.cbtlog"
    assert ok("create", "-n", path, "-s", size) == ""
    assert path.read_bytes() == header(size) + bytes(bitmap_bytes(size))


def test_create_overwrites_an_existing_log_in_place(tmp_path):
    path = log_file(tmp_path, 4 * BLOCK * 8, {1, 2, 3}, parent=P, consistent=1)
    inode = path.stat().st_ino
    ok("create", "-n", path, "-s", 8 * BLOCK)
    assert path.read_bytes() == header(8 * BLOCK) + b"\0"
    assert path.stat().st_ino == inode


# -- get ----------------------------------------------------------------------


def test_get_prints_each_field_of_a_hand_made_log(tmp_path):
    path = log_file(tmp_path, 4194304, {0, 9, 63}, parent=P, child=C, consistent=1)
    assert ok("get", "-n", path, "-p") == f"{P}\n"
    assert ok("get", "-n", path, "-c") == f"{C}\n"
    assert ok("get", "-n", path, "-f") == "1\n"
    assert ok("get", "-n", path, "-s") == "4194304\n"
    bitmap = cbt_util("get", "-n", path, "-b", text=False)
    assert bitmap.returncode == 0
    assert bitmap.stdout == bytes([0x01, 0x02, 0, 0, 0, 0, 0, 0x80])


def test_get_prints_null_uuids_and_the_flag_as_a_signed_int(tmp_path):
    path = log_file(tmp_path, BLOCK, consistent=-1)
    assert ok("get", "-n", path, "-p") == "00000000-0000-0000-0000-000000000000\n"
    assert ok("get", "-n", path, "-c") == "00000000-0000-0000-0000-000000000000\n"
    assert ok("get", "-n", path, "-f") == "-1\n"


def test_get_takes_options_in_any_order(tmp_path):
    path = log_file(tmp_path, BLOCK, parent=P)
    assert ok("get", "-p", "-n", path) == f"{P}\n"
    assert ok("get", f"-n{path}", "-p") == f"{P}\n"


def test_nothing_after_the_bitmap_is_read_or_changed(tmp_path):
    """On LVM the log is a volume larger than the log: the file's length means nothing."""
    size = 20 * BLOCK
    tail = b"\xa5" * 4096
    path = tmp_path / "lv"
    path.write_bytes(header(size) + bitmap_of(size, {3, 17}) + tail)
    bitmap = cbt_util("get", "-n", path, "-b", text=False).stdout
    assert bitmap == bitmap_of(size, {3, 17})
    ok("set", "-n", path, "-p", P, "-f", "1")
    other = log_file(tmp_path, size, {0}, name="parent")
    ok("coalesce", "-p", other, "-c", path)
    assert path.read_bytes() == header(size, P, None, 1) + bitmap_of(size, {0, 3, 17}) + tail


# -- set ----------------------------------------------------------------------


def test_set_round_trips_every_field(tmp_path):
    path = log_file(tmp_path, 16 * BLOCK, {5})
    inode = path.stat().st_ino
    ok("set", "-n", path, "-p", P)
    ok("set", "-n", path, "-c", str(C).upper())
    ok("set", "-n", path, "-f", "1")
    assert ok("get", "-n", path, "-p") == f"{P}\n"
    assert ok("get", "-n", path, "-c") == f"{C}\n"
    assert ok("get", "-n", path, "-f") == "1\n"
    assert path.read_bytes() == header(16 * BLOCK, P, C, 1) + bitmap_of(16 * BLOCK, {5})
    ok("set", "-n", path, "-f", "0", "-p", "00000000-0000-0000-0000-000000000000")
    assert path.read_bytes() == header(16 * BLOCK, None, C, 0) + bitmap_of(16 * BLOCK, {5})
    assert path.stat().st_ino == inode


def test_set_size_grows_the_bitmap_with_zeros_and_keeps_its_bits(tmp_path):
    old, new = 9 * BLOCK, 100 * BLOCK + 1
    path = log_file(tmp_path, old, {0, 8}, child=C)
    inode = path.stat().st_ino
    ok("set", "-n", path, "-s", new)
    assert ok("get", "-n", path, "-s") == f"{new}\n"
    assert path.read_bytes() == header(new, None, C) + bitmap_of(new, {0, 8})
    assert path.stat().st_ino == inode


def test_set_size_to_the_same_size_changes_nothing(tmp_path):
    path = log_file(tmp_path, 9 * BLOCK, {8})
    before = path.read_bytes()
    ok("set", "-n", path, "-s", 9 * BLOCK)
    assert path.read_bytes() == before


def test_set_size_smaller_is_an_error_and_writes_nothing(tmp_path):
    path = log_file(tmp_path, 9 * BLOCK, {8}, parent=P)
    before = path.read_bytes()
    proc = cbt_util("set", "-n", path, "-s", 8 * BLOCK, "-f", "1")
    assert proc.returncode == errno.EINVAL
    assert proc.stderr.count("\n") == 1 and "shrink" in proc.stderr and str(path) in proc.stderr
    assert path.read_bytes() == before


# -- coalesce -----------------------------------------------------------------


def test_coalesce_ors_the_parent_bitmap_into_the_child(tmp_path):
    size = 32 * BLOCK
    parent = log_file(tmp_path, size, {0, 7, 8, 31}, name="p", child=C, consistent=1)
    child = log_file(tmp_path, size, {7, 20}, name="c", parent=P)
    parent_before = parent.read_bytes()
    assert ok("coalesce", "-p", parent, "-c", child) == ""
    assert child.read_bytes() == header(size, P) + bitmap_of(size, {0, 7, 8, 20, 31})
    assert parent.read_bytes() == parent_before


def test_coalesce_into_a_longer_child_keeps_its_tail(tmp_path):
    parent = log_file(tmp_path, 8 * BLOCK, {1}, name="p")
    child = log_file(tmp_path, 64 * BLOCK, {2, 63}, name="c")
    ok("coalesce", "-p", parent, "-c", child)
    assert child.read_bytes() == header(64 * BLOCK) + bitmap_of(64 * BLOCK, {1, 2, 63})


def test_coalesce_refuses_a_parent_longer_than_the_child(tmp_path):
    parent = log_file(tmp_path, 64 * BLOCK, {1}, name="p")
    child = log_file(tmp_path, 8 * BLOCK, {2}, name="c")
    before = child.read_bytes()
    proc = cbt_util("coalesce", "-p", parent, "-c", child)
    assert proc.returncode == errno.EINVAL
    assert proc.stderr.count("\n") == 1 and "longer" in proc.stderr
    assert child.read_bytes() == before


# -- bad input ----------------------------------------------------------------

SIZE = 16 * BLOCK


def bad_cases() -> list[tuple[str, list[str], int]]:
    """(name, argv with LOG/SHORT/HEAD/MISSING/NEW placeholders, expected exit code)."""
    return [
        ("no command", [], errno.EINVAL),
        ("unknown command", ["frobnicate", "-n", "LOG"], errno.EINVAL),
        ("get missing file", ["get", "-n", "MISSING", "-p"], errno.ENOENT),
        ("set missing file", ["set", "-n", "MISSING", "-f", "1"], errno.ENOENT),
        ("coalesce missing parent", ["coalesce", "-p", "MISSING", "-c", "LOG"], errno.ENOENT),
        ("coalesce missing child", ["coalesce", "-p", "LOG", "-c", "MISSING"], errno.ENOENT),
        ("get short header", ["get", "-n", "HEAD", "-s"], errno.EIO),
        ("get short bitmap", ["get", "-n", "SHORT", "-b"], errno.EIO),
        ("get exabyte header", ["get", "-n", "HUGE", "-s"], errno.EIO),
        ("get flag of short bitmap", ["get", "-n", "SHORT", "-f"], errno.EIO),
        ("set on short bitmap", ["set", "-n", "SHORT", "-f", "1"], errno.EIO),
        ("grow short bitmap", ["set", "-n", "SHORT", "-s", str(2 * SIZE)], errno.EIO),
        ("coalesce short parent", ["coalesce", "-p", "SHORT", "-c", "LOG"], errno.EIO),
        ("coalesce short child", ["coalesce", "-p", "LOG", "-c", "SHORT"], errno.EIO),
        ("create size 0", ["create", "-n", "NEW", "-s", "0"], errno.EINVAL),
        ("create size not a number", ["create", "-n", "NEW", "-s", "10G"], errno.EINVAL),
        ("create size negative", ["create", "-n", "NEW", "-s", "-5"], errno.EINVAL),
        ("create size too large", ["create", "-n", "NEW", "-s", str(1 << 64)], errno.EINVAL),
        ("create without size", ["create", "-n", "NEW"], errno.EINVAL),
        ("set size 0", ["set", "-n", "LOG", "-s", "0"], errno.EINVAL),
        ("set size not a number", ["set", "-n", "LOG", "-s", "abc"], errno.EINVAL),
        ("set parent garbage", ["set", "-n", "LOG", "-p", "garbage"], errno.EINVAL),
        ("set child braces", ["set", "-n", "LOG", "-c", "{" + str(C) + "}"], errno.EINVAL),
        ("set child no dashes", ["set", "-n", "LOG", "-c", C.hex], errno.EINVAL),
        ("set good then bad", ["set", "-n", "LOG", "-f", "1", "-p", str(P)[:-1]], errno.EINVAL),
        ("set flag 2", ["set", "-n", "LOG", "-f", "2"], errno.EINVAL),
        ("set flag word", ["set", "-n", "LOG", "-f", "yes"], errno.EINVAL),
        ("set nothing", ["set", "-n", "LOG"], errno.EINVAL),
        ("get two fields", ["get", "-n", "LOG", "-p", "-c"], errno.EINVAL),
        ("get no field", ["get", "-n", "LOG"], errno.EINVAL),
        ("get no name", ["get", "-p"], errno.EINVAL),
        ("unknown option", ["get", "-n", "LOG", "-x"], errno.EINVAL),
        ("option without value", ["set", "-n", "LOG", "-p"], errno.EINVAL),
        ("extra argument", ["set", "-n", "LOG", "-f", "1", "LOG"], errno.EINVAL),
        ("coalesce without child", ["coalesce", "-p", "LOG"], errno.EINVAL),
    ]


@pytest.mark.parametrize(
    ("argv", "code"), [c[1:] for c in bad_cases()], ids=[c[0] for c in bad_cases()]
)
def test_bad_input_fails_with_one_line_and_touches_nothing(tmp_path, argv, code):
    files = {
        "LOG": log_file(tmp_path, SIZE, {1, 4}, name="log", parent=P),
        "SHORT": tmp_path / "short",
        "HEAD": tmp_path / "head",
        "HUGE": tmp_path / "huge",
    }
    files["SHORT"].write_bytes(header(SIZE) + bytes(bitmap_bytes(SIZE) - 1))
    files["HEAD"].write_bytes(header(SIZE)[:47])
    files["HUGE"].write_bytes(header(1 << 63) + bytes(SIZE))
    names = {
        **{k: str(v) for k, v in files.items()},
        "MISSING": str(tmp_path / "missing"),
        "NEW": str(tmp_path / "new"),
    }
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files.values()}
    proc = cbt_util(*(names.get(a, a) for a in argv))
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("cbt-util"), proc.stderr
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files.values()} == before
    assert sorted(os.listdir(tmp_path)) == ["head", "huge", "log", "short"]


def test_a_short_log_is_named_in_the_error(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(header(SIZE) + bytes(1))
    proc = cbt_util("get", "-n", path, "-b")
    assert str(path) in proc.stderr and "bitmap" in proc.stderr


def test_help_has_examples():
    proc = cbt_util("--help")
    assert proc.returncode == 0
    assert "examples:" in proc.stdout and "cbt-util coalesce" in proc.stdout


@pytest.mark.parametrize("command", ["create", "get", "set", "coalesce"])
def test_command_help_lists_its_options(command):
    proc = cbt_util(command, "-h")
    assert proc.returncode == 0
    assert proc.stdout.startswith(f"usage: cbt-util {command} ")
    assert "  -" in proc.stdout


# -- as SM uses it (libs/sm/cbtutil.py, VDI.py) -------------------------------


def sm_call(*args: object, text: bool = True) -> str | bytes:
    """SM's util.pread: run, raise on a non-zero exit, return stdout (str, or bytes)."""
    proc = subprocess.run(
        [CBT_UTIL, *map(str, args)],
        capture_output=True,
        text=text,
        check=False,
        stdin=subprocess.PIPE,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"rc {proc.returncode}: {proc.stderr}")
    return proc.stdout


def sm_bits(bitmap: bytes) -> list[int]:
    """SM's bitarray().frombytes(bitmap) then bytereverse(): bit b of the disk at index b."""
    return [(byte >> k) & 1 for byte in bitmap for k in range(8)]


def test_sm_reads_what_it_wrote(tmp_path):
    """Each cbtutil.py call, parsed the way cbtutil.py parses it."""
    log = str(tmp_path / "vdi.cbtlog")
    size = 3 * 1024**3 + 5
    sm_call("create", "-n", log, "-s", str(size))
    sm_call("set", "-n", log, "-p", str(P))
    sm_call("set", "-n", log, "-c", str(C))
    sm_call("set", "-n", log, "-f", str(1))
    assert str(uuid.UUID(sm_call("get", "-n", log, "-p").strip())) == str(P)
    assert str(uuid.UUID(sm_call("get", "-n", log, "-c").strip())) == str(C)
    assert bool(int(sm_call("get", "-n", log, "-f").strip())) is True
    assert int(sm_call("get", "-n", log, "-s").strip()) == size
    sm_call("set", "-n", log, "-s", str(size + 1024**3))
    assert int(sm_call("get", "-n", log, "-s").strip()) == size + 1024**3
    bitmap = sm_call("get", "-n", log, "-b", text=False)
    assert isinstance(bitmap, bytes) and len(sm_bits(bitmap)) >= (size + 1024**3) // BLOCK


def test_sm_snapshot_chain_lists_the_changed_blocks(tmp_path):
    """VDI._cbt_snapshot twice, then VDI.list_changed_blocks from the first snapshot."""
    size = 64 * BLOCK
    vdi, snap1, snap2 = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()

    def path(u: uuid.UUID) -> str:
        return str(tmp_path / f"{u}.cbtlog")

    def mark(u: uuid.UUID, *blocks: int) -> None:  # what tapdisk does while attached
        with open(path(u), "r+b") as f:
            for b in blocks:
                f.seek(48 + b // 8)
                byte = f.read(1)[0]
                f.seek(48 + b // 8)
                f.write(bytes([byte | 1 << (b % 8)]))

    def snapshot(snap: uuid.UUID) -> None:
        os.rename(path(vdi), path(snap))
        sm_call("set", "-n", path(snap), "-f", "1")
        parent = sm_call("get", "-n", path(snap), "-p").strip()
        if os.path.exists(path(uuid.UUID(parent))):
            sm_call("set", "-n", path(uuid.UUID(parent)), "-c", str(snap))
        sm_call("create", "-n", path(vdi), "-s", str(size))
        child = sm_call("get", "-n", path(snap), "-c").strip()
        sm_call("set", "-n", path(vdi), "-p", str(snap))
        sm_call("set", "-n", path(vdi), "-c", child)
        sm_call("set", "-n", path(snap), "-c", str(vdi))

    sm_call("create", "-n", path(vdi), "-s", str(size))
    mark(vdi, 0, 1)
    snapshot(snap1)
    mark(vdi, 5, 63)
    snapshot(snap2)
    mark(vdi, 5, 40)

    merged: list[int] | None = None
    current = snap1
    while True:
        nxt = uuid.UUID(sm_call("get", "-n", path(current), "-c").strip())
        if not os.path.exists(path(nxt)):
            break
        current = nxt
        bits = sm_bits(sm_call("get", "-n", path(current), "-b", text=False))  # type: ignore[arg-type]
        merged = bits if merged is None else [a | b for a, b in zip(merged, bits, strict=True)]
        if current == vdi:
            break
    assert current == vdi and merged is not None
    assert [b for b, bit in enumerate(merged) if bit] == [5, 40, 63]


@pytest.mark.parametrize("command", [["create", "-s", "65536"], ["get", "-s"], ["set", "-f", "1"]])
def test_a_fifo_named_as_the_log_is_refused_without_blocking(tmp_path, command):
    fifo = tmp_path / "log"
    os.mkfifo(fifo)
    proc = subprocess.run(
        [CBT_UTIL, command[0], "-n", str(fifo), *command[1:]],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and "FIFO" in proc.stderr
