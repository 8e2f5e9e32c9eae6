"""Crash safety of ``vhd-util resize -j`` and ``revert``: SIGKILLed as they enter a system
call that changes a file (strace fault injection), one call after the other.

After every kill the image is either disabled (nothing opens it) or valid with all its
data; ``revert`` with the journal left behind gives back a valid image with the data of
before, at the old size (at the new one only when the resize had finished), that qemu
reads too; and a revert killed at any point finishes when run again.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers import require, run
from image_helpers import write_all
from tapdisk.drivers.base import ImageFormatError
from tapdisk.drivers.vhd.check import check_vhd
from tapdisk.drivers.vhd.image import VhdImage
from tapdisk.drivers.vhd.meta import load
from vhdutil_helpers import MiB, killed_at, ok, read_prefix, traced_calls

SIZE_MB = 20
#: A BAT of 550000 entries and its batmap end past 2 MiB: two of the child's blocks move.
NEW_MB = 1_100_000


def images(directory: Path) -> tuple[Path, Path]:
    """base <- child, the child holding blocks 0, 1 and 5 (its locators move too)."""
    directory.mkdir()
    base = directory / "base.vhd"
    ok("create", "-n", base, "-s", SIZE_MB)
    write_all(f"vhd:{base}", [(0, b"\x09" * MiB), (14 * MiB, b"\x08" * 4096)])
    child = directory / "child.vhd"
    ok("snapshot", "-n", child, "-p", base)
    write_all(
        f"vhd:{child}",
        [(2 * MiB + 512, b"\x02" * MiB), (10 * MiB, b"\x03" * 700), (0, b"\x01" * 4096)],
    )
    return base, child


def size_mb(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return load(fd, str(path)).footer.current_size // MiB
    finally:
        os.close(fd)


def fd_of(calls: list[str], marker: str) -> str:
    """``pwrite64(FD,``: the start of the writes to the file the first write of ``marker``
    went to."""
    return next(c for c in calls if marker in c).split(" ", 1)[0]


def kill_points(calls: list[str]) -> list[tuple[str, int]]:
    """(system call, its nth use) before each call, except inside runs of journal appends,
    whose states are all alike (a journal being written, the image untouched): only the
    first and last of each run."""
    journal = fd_of(calls, '"vjournal')
    points, seen = [], {}
    for i, call in enumerate(calls):
        name = call.split("(")[0]
        seen[name] = seen.get(name, 0) + 1
        inside = 0 < i < len(calls) - 1 and all(c.startswith(journal) for c in calls[i - 1 : i + 2])
        if not inside:
            points.append((name, seen[name]))
    return points


def assert_restored(child: Path, before: bytes, sizes: tuple[int, ...]) -> None:
    assert check_vhd(str(child), parents=True, bitmaps=True, allowed_dirs=("/",)) == []
    assert size_mb(child) in sizes
    assert read_prefix(child, len(before)) == before
    out = run(
        require("qemu-io"),
        "-f",
        "vpc",
        "-c",
        "read -P 0x01 0 4k",
        "-c",
        "read -P 3 10M 700",
        child,
    )
    assert "verification failed" not in out


RESIZE = ("resize", "-n", "child.vhd", "-s", NEW_MB, "-j", "journal")


def test_kill_anywhere_in_a_journaled_resize(tmp_path):
    images(tmp_path / "orig")
    before = read_prefix(tmp_path / "orig" / "child.vhd", SIZE_MB * MiB)
    points = kill_points(traced_calls(tmp_path / "orig", tmp_path / "trace", *RESIZE))
    assert len(points) > 25
    disabled = 0
    for n, (call, nth) in enumerate(points):
        work = tmp_path / f"kill{n}"
        shutil.copytree(tmp_path / "orig", work)
        assert killed_at(call, nth, *RESIZE, cwd=work).returncode == -9, (call, nth)
        child, journal = work / "child.vhd", work / "journal"
        problems = check_vhd(str(child), allowed_dirs=("/",))
        if problems:  # mid-edit: disabled, so nothing opens it
            with pytest.raises(ImageFormatError, match="v_poison"):
                VhdImage(str(child), read_only=True)
            assert journal.exists()
            disabled += 1
        else:
            assert read_prefix(child, len(before)) == before
        if journal.exists():
            ok("revert", "-n", child, "-j", journal)
            assert not journal.exists()
        assert_restored(child, before, (SIZE_MB,) if problems else (SIZE_MB, NEW_MB))
        shutil.rmtree(work)
    assert disabled > 10


def test_kill_anywhere_in_a_revert(tmp_path):
    """A resize killed once its first block has moved; then its revert killed at each step
    in turn: the next revert finishes the job."""
    images(tmp_path / "orig")
    before = read_prefix(tmp_path / "orig" / "child.vhd", SIZE_MB * MiB)
    writes = [
        c
        for c in traced_calls(tmp_path / "orig", tmp_path / "trace", *RESIZE)
        if c.startswith("pwrite64")
    ]
    image_fd = fd_of(writes, '"v_poison')
    block = f", {2 * MiB + 512}, "  # a block's bitmap and data, copied in one write
    copied = next(i for i, c in enumerate(writes, 1) if c.startswith(image_fd) and block in c)
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "orig", crashed)
    assert killed_at("pwrite64", copied + 1, *RESIZE, cwd=crashed).returncode == -9
    assert (crashed / "journal").exists()
    revert = ("revert", "-n", "child.vhd", "-j", "journal")
    calls = traced_calls(crashed, tmp_path / "rtrace", *revert)
    seen: dict[str, int] = {}
    for n, call in enumerate(calls):
        name = call.split("(")[0]
        seen[name] = seen.get(name, 0) + 1
        work = tmp_path / f"kill{n}"
        shutil.copytree(crashed, work)
        assert killed_at(name, seen[name], *revert, cwd=work).returncode == -9, call
        child = work / "child.vhd"
        if check_vhd(str(child), allowed_dirs=("/",)):
            with pytest.raises(ImageFormatError, match="v_poison"):
                VhdImage(str(child), read_only=True)
        if (work / "journal").exists():
            ok(*revert[:2], child, "-j", work / "journal")
        assert_restored(child, before, (SIZE_MB,))
        shutil.rmtree(work)


def test_kill_anywhere_in_a_journaled_resize_of_a_fixed_vhd(tmp_path):
    (tmp_path / "orig").mkdir()
    path = tmp_path / "orig" / "f.vhd"
    ok("create", "-n", path, "-s", 4, "-r")
    write_all(f"vhd:{path}", [(0, b"\x01" * 4096), (3 * MiB, b"\x03" * 700)])
    before = read_prefix(path, 4 * MiB)
    args = ("resize", "-n", "f.vhd", "-s", 12, "-j", "journal")
    calls = traced_calls(tmp_path / "orig", tmp_path / "trace", *args)
    seen: dict[str, int] = {}
    for n, call in enumerate(calls):
        name = call.split("(")[0]
        seen[name] = seen.get(name, 0) + 1
        work = tmp_path / f"kill{n}"
        shutil.copytree(tmp_path / "orig", work)
        assert killed_at(name, seen[name], *args, cwd=work).returncode == -9, call
        if (work / "journal").exists():
            ok("revert", "-n", work / "f.vhd", "-j", work / "journal")
        assert check_vhd(str(work / "f.vhd")) == []
        assert size_mb(work / "f.vhd") in (4, 12)
        assert read_prefix(work / "f.vhd", 4 * MiB) == before
        shutil.rmtree(work)
