"""The changed blocks over NBD: the meta context ``qemu:dirty-bitmap:cbt`` of a VBD with a CBT log.

Real tapdisk daemons (tap-ctl), real clients: nbdinfo, qemu-img and libnbd.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import nbd
import pytest
from cbt_helpers import BLOCK, new_log, ok, write_blocks
from helpers import require, run
from tapctl_helpers import nbd_uri

CBT = "qemu:dirty-bitmap:cbt"
SIZE = 64 << 20


@pytest.fixture
def disk(raw_image) -> Path:
    return raw_image(str(SIZE))


def runs_of(blocks: set[int], size: int) -> list[tuple[int, int, int]]:
    """(offset, length, flag) runs a server must report for ``blocks`` changed: 1 changed."""
    out: list[tuple[int, int, int]] = []
    for block in range(-(-size // BLOCK)):
        flag = int(block in blocks)
        length = min(BLOCK, size - block * BLOCK)
        if out and out[-1][2] == flag:
            out[-1] = (out[-1][0], out[-1][1] + length, flag)
        else:
            out.append((block * BLOCK, length, flag))
    return out


def nbdinfo_map(sock: str) -> list[tuple[int, int, int]]:
    lines = run(require("nbdinfo"), f"--map={CBT}", nbd_uri(sock)).splitlines()
    rows = [line.split() for line in lines]
    assert all(desc == ("dirty" if flag == "1" else "clean") for _, _, flag, desc in rows)
    return [(int(offset), int(length), int(flag)) for offset, length, flag, _ in rows]


def connect(sock: str, *contexts: str) -> nbd.NBD:
    h = nbd.NBD()
    for context in contexts:
        h.add_meta_context(context)
    h.connect_uri(nbd_uri(sock))
    return h


def block_status(h: nbd.NBD, length: int, offset: int, flags: int = 0) -> dict[str, list[int]]:
    """{context: [length, flags, ...]} from one BLOCK_STATUS reply."""
    seen: dict[str, list[int]] = {}

    def extent(context: str, _offset: int, entries: list[int], _error: object) -> int:
        assert context not in seen, "two chunks for one context"
        seen[context] = entries
        return 0

    h.block_status(length, offset, extent, flags)
    return seen


CHANGED = [0, 1, 2, 9, 500, 1023]


def test_nbdinfo_map_lists_exactly_the_changed_blocks(tapctl, disk, tmp_path):
    log = new_log(tmp_path / "disk.cbtlog", SIZE)
    _, _, sock = tapctl.spawn_open(f"raw:{disk}", "-C", str(log))
    assert nbdinfo_map(sock) == [(0, SIZE, 0)]
    write_blocks(sock, CHANGED)
    assert nbdinfo_map(sock) == runs_of(set(CHANGED), SIZE)


def test_qemu_img_map_with_x_dirty_bitmap_lists_exactly_the_changed_blocks(tapctl, disk, tmp_path):
    log = new_log(tmp_path / "disk.cbtlog", SIZE)
    _, _, sock = tapctl.spawn_open(f"raw:{disk}", "-C", str(log))
    write_blocks(sock, CHANGED)
    opts = f"driver=nbd,server.type=unix,server.path={sock},x-dirty-bitmap={CBT}"
    out = run(require("qemu-img"), "map", "--output=json", "--image-opts", opts)
    # qemu reads the bitmap's flag as base:allocation's HOLE bit: a changed block is "no data".
    found = [(e["start"], e["length"], int(not e["data"])) for e in json.loads(out)]
    assert found == runs_of(set(CHANGED), SIZE)


def test_one_block_status_reply_answers_both_contexts(tapctl, raw_image, tmp_path):
    disk = raw_image(str(SIZE), f"write -P 1 {4 * BLOCK} {BLOCK}")
    log = new_log(tmp_path / "disk.cbtlog", SIZE, {3})
    _, _, sock = tapctl.spawn_open(f"raw:{disk}", "-C", str(log))
    h = connect(sock, nbd.CONTEXT_BASE_ALLOCATION, CBT)
    assert h.can_meta_context(CBT) and h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.pwrite(b"x" * 4096, 5 * BLOCK)
    seen = block_status(h, 8 * BLOCK, 2 * BLOCK)
    assert seen[CBT] == [BLOCK, 0, BLOCK, 1, BLOCK, 0, BLOCK, 1, 4 * BLOCK, 0]
    allocation = seen[nbd.CONTEXT_BASE_ALLOCATION]
    assert allocation[:2] == [2 * BLOCK, nbd.STATE_HOLE | nbd.STATE_ZERO]  # blocks 2 and 3
    assert allocation[2:4] == [BLOCK + 4096, 0]  # block 4, and the write into block 5
    # REQ_ONE: one extent per context, inside the request.
    seen = block_status(h, 2 * BLOCK, 3 * BLOCK + 512, nbd.CMD_FLAG_REQ_ONE)
    assert seen[CBT] == [BLOCK - 512, 1]
    assert seen[nbd.CONTEXT_BASE_ALLOCATION] == [BLOCK - 512, nbd.STATE_HOLE | nbd.STATE_ZERO]
    h.shutdown()


def listed(sock: str, *queries: str) -> list[str]:
    """The contexts LIST_META_CONTEXT names for ``queries``."""
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(nbd_uri(sock))
    for query in queries:
        h.add_meta_context(query)
    names: list[str] = []
    h.opt_list_meta_context(lambda name: names.append(name) or 0)
    h.opt_abort()
    return names


def test_the_context_is_listed_for_its_namespaces_only_while_the_device_tracks(
    tapctl, disk, tmp_path
):
    log = new_log(tmp_path / "disk.cbtlog", SIZE)
    pid, minor, sock = tapctl.spawn_open(f"raw:{disk}", "-C", str(log))
    assert listed(sock) == [nbd.CONTEXT_BASE_ALLOCATION, CBT]
    assert listed(sock, "qemu:") == [CBT]
    assert listed(sock, "qemu:dirty-bitmap:") == [CBT]
    assert listed(sock, CBT) == [CBT]
    assert listed(sock, "base:") == [nbd.CONTEXT_BASE_ALLOCATION]
    assert listed(sock, "qemu:dirty-bitmap:other", "qemu:dirty") == []
    tapctl("pause", "-p", str(pid), "-m", str(minor))
    tapctl("unpause", "-p", str(pid), "-m", str(minor))
    assert listed(sock) == [nbd.CONTEXT_BASE_ALLOCATION]
    assert not connect(sock, CBT).can_meta_context(CBT)


def test_a_device_without_a_log_offers_no_cbt_context(tapctl, disk):
    _, _, sock = tapctl.spawn_open(f"raw:{disk}")
    assert listed(sock) == [nbd.CONTEXT_BASE_ALLOCATION]
    proc = subprocess.run(
        [require("nbdinfo"), f"--map={CBT}", nbd_uri(sock)], capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert f'server does not support metadata context "{CBT}"' in proc.stderr


def test_changed_blocks_past_the_first_4_gib_are_listed(tapctl, raw_image, tmp_path):
    size = 8 << 30  # the layer answers 4 GiB of disk at a time; clients ask on
    disk = raw_image(str(size))
    log = new_log(tmp_path / "disk.cbtlog", size)
    _, _, sock = tapctl.spawn_open(f"raw:{disk}", "-C", str(log))
    changed = {1, 65535, 65536, 100_000, size // BLOCK - 1}
    write_blocks(sock, sorted(changed))
    assert nbdinfo_map(sock) == runs_of(changed, size)


def test_block_status_waits_for_a_paused_device_and_answers_from_the_log_it_resumes_on(
    tapctl, disk, tmp_path
):
    log = new_log(tmp_path / "disk.cbtlog", SIZE, {4})
    parent = new_log(tmp_path / "parent.cbtlog", SIZE, {7, 8})
    pid, minor, sock = tapctl.spawn_open(f"raw:{disk}", "-C", str(log))
    h = connect(sock, CBT)
    tapctl("pause", "-p", str(pid), "-m", str(minor))
    seen: list[list[int]] = []
    h.aio_block_status(SIZE, 0, lambda _c, _o, entries, _e: seen.append(entries) or 0)
    deadline = time.monotonic() + 10
    while json.loads(tapctl.out("stats", "-p", str(pid), "-m", str(minor)))["queued"] != 1:
        h.poll(0)
        assert time.monotonic() < deadline, "the request never reached the paused device"
    assert seen == []
    ok("coalesce", "-p", parent, "-c", log)
    tapctl("unpause", "-p", str(pid), "-m", str(minor), "-c", str(log))
    while h.aio_in_flight():
        h.poll(-1)
    assert seen == [[4 * BLOCK, 0, BLOCK, 1, 2 * BLOCK, 0, 2 * BLOCK, 1, SIZE - 9 * BLOCK, 0]]


def test_a_connection_whose_device_stopped_tracking_gets_enotsup(tapctl, disk, tmp_path):
    log = new_log(tmp_path / "disk.cbtlog", SIZE)
    pid, minor, sock = tapctl.spawn_open(f"raw:{disk}", "-C", str(log))
    h = connect(sock, nbd.CONTEXT_BASE_ALLOCATION, CBT)
    tapctl("pause", "-p", str(pid), "-m", str(minor))
    tapctl("unpause", "-p", str(pid), "-m", str(minor))
    with pytest.raises(nbd.Error) as failure:
        block_status(h, BLOCK, 0)
    assert failure.value.errno == "ENOTSUP"
    h.pwrite(b"y" * 512, 0)  # the connection goes on
    h.shutdown()
