"""The rbd driver against a real Ceph cluster: data through every path, snapshots, block
status, an OSD restart under I/O, and bad input."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
import threading
from pathlib import Path

import nbd
import pytest
from helpers import TAPDISK, require, run
from rbd_helpers import Cluster
from tapdisk.drivers.base import Image
from tapdisk.drivers.registry import OpenOptions, open_image

MiB = 1 << 20


def pattern(size: int, seed: int) -> bytes:
    """Bytes that differ at every offset and between seeds, so a misplaced block shows."""
    block = bytes((seed + i * 7) % 251 for i in range(4096))
    return (block * (size // 4096 + 1))[:size]


def nbd_client(uri: str) -> nbd.NBD:
    handle = nbd.NBD()
    handle.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    handle.connect_uri(uri)
    return handle


def allocation(handle: nbd.NBD, length: int) -> list[tuple[int, int]]:
    """(length, flags) runs of base:allocation over ``[0, length)``."""
    runs: list[tuple[int, int]] = []

    def collect(context: str, offset: int, entries: list[int], err: object) -> int:
        if context == nbd.CONTEXT_BASE_ALLOCATION:
            runs.extend(zip(entries[::2], entries[1::2], strict=True))
        return 0

    pos = 0
    while pos < length:
        before = sum(n for n, _ in runs)
        handle.block_status(length - pos, pos, collect)
        pos += sum(n for n, _ in runs) - before
    return runs


def test_writes_through_tapdisk_read_back_by_rbd_export_and_qemu(
    ceph: Cluster, serve, tmp_path: Path
) -> None:
    name = ceph.create("16M")
    data = pattern(3 * MiB, 1)
    served = serve(ceph.spec(name))
    handle = nbd_client(served.uri(name.split("/")[-1]))  # the export is named for the image
    handle.pwrite(data, 5 * MiB + 512)
    handle.flush()
    handle.shutdown()
    served.stop()
    exported = ceph.export(name, tmp_path / "export.raw")
    assert exported[5 * MiB + 512 : 8 * MiB + 512] == data
    assert exported[: 5 * MiB + 512] == bytes(5 * MiB + 512)
    copy = tmp_path / "qemu.raw"
    run(require("qemu-img"), "convert", "-f", "raw", "-O", "raw", ceph.spec(name), copy)
    assert copy.read_bytes() == exported


def test_images_written_by_rbd_import_and_qemu_read_back_through_tapdisk(
    ceph: Cluster, serve, tmp_path: Path
) -> None:
    source = tmp_path / "source.raw"
    source.write_bytes(pattern(8 * MiB, 2))
    imported = f"rbd/imported-{os.getpid()}"
    ceph.rbd("import", "--no-progress", source, imported)
    name = ceph.create("8M")
    run(require("qemu-img"), "convert", "-n", "-f", "raw", "-O", "raw", source, ceph.spec(name))
    for image in (imported, name):
        served = serve(ceph.spec(image), "--read-only")
        handle = nbd_client(served.uri())
        assert handle.get_size() == 8 * MiB
        assert handle.pread(8 * MiB, 0) == source.read_bytes()
        handle.shutdown()
        served.stop()


def test_fua_write_zeroes_and_discard_reach_the_cluster(
    ceph: Cluster, serve, tmp_path: Path
) -> None:
    name = ceph.create("16M")
    served = serve(ceph.spec(name))
    handle = nbd_client(served.uri())
    handle.pwrite(pattern(12 * MiB, 3), 0, nbd.CMD_FLAG_FUA)
    handle.zero(2 * MiB, MiB)  # count, offset
    handle.trim(4 * MiB, 4 * MiB)  # one whole 4 MiB object: librbd removes it
    handle.flush()
    handle.shutdown()
    exported = ceph.export(name, tmp_path / "export.raw")
    expected = bytearray(pattern(12 * MiB, 3) + bytes(4 * MiB))
    expected[MiB : 3 * MiB] = bytes(2 * MiB)
    expected[4 * MiB : 8 * MiB] = bytes(4 * MiB)
    assert exported == expected


def test_write_zeroes_with_no_hole_leaves_the_objects_allocated(ceph: Cluster, serve) -> None:
    """NBD's NO_HOLE asks for the zeroed range fully provisioned (qemu's rule for librbd:
    thick-provisioned zeroing); without it, whole objects are deallocated."""
    name = ceph.create("16M")
    served = serve(ceph.spec(name))
    handle = nbd_client(served.uri())
    handle.pwrite(pattern(16 * MiB, 6), 0)
    handle.zero(4 * MiB, 0, nbd.CMD_FLAG_NO_HOLE)
    handle.zero(4 * MiB, 8 * MiB)
    handle.flush()
    assert handle.pread(4 * MiB, 0) == handle.pread(4 * MiB, 8 * MiB) == bytes(4 * MiB)
    handle.shutdown()
    assert [offset // MiB for offset, _ in ceph.allocated(name)] == [0, 4, 12]


def test_block_status_reports_allocated_extents_and_holes(ceph: Cluster, serve) -> None:
    name = ceph.create("32M")
    served = serve(ceph.spec(name))
    handle = nbd_client(served.uri())
    assert allocation(handle, 32 * MiB) == [(32 * MiB, 3)]  # a new image is all hole
    handle.pwrite(pattern(64 << 10, 4), 8 * MiB)
    handle.pwrite(pattern(4 * MiB, 5), 16 * MiB)
    handle.trim(4 * MiB, 16 * MiB)
    handle.flush()
    assert allocation(handle, 32 * MiB) == [(8 * MiB, 3), (64 << 10, 0), (24 * MiB - (64 << 10), 3)]


def test_a_clone_serves_its_parent_s_data_as_allocated_and_copies_whole(
    ceph: Cluster, serve, tmp_path: Path
) -> None:
    """A clone of a protected snapshot (how Ceph users make a VM disk from a golden image)
    reads through to its parent, and block status counts the parent's data: a copy that
    skips holes (nbdcopy, a live migration) takes all of it."""
    parent = ceph.create("16M")
    run(require("qemu-io"), "-f", "raw", "-c", "write -P 0x31 0 4M", ceph.spec(parent))
    ceph.rbd("snap", "create", f"{parent}@gold")
    ceph.rbd("snap", "protect", f"{parent}@gold")
    clone = f"{parent}-vm"
    ceph.rbd("clone", f"{parent}@gold", clone)
    served = serve(ceph.spec(clone))
    handle = nbd_client(served.uri())
    handle.pwrite(b"\x32" * MiB, 8 * MiB)
    handle.flush()
    assert allocation(handle, 16 * MiB) == [(4 * MiB, 0), (4 * MiB, 3), (MiB, 0), (7 * MiB, 3)]
    handle.shutdown()
    copy = tmp_path / "copy.raw"
    run(require("nbdcopy"), served.uri(), copy)
    expected = b"\x31" * (4 * MiB) + bytes(4 * MiB) + b"\x32" * MiB + bytes(7 * MiB)
    assert copy.read_bytes() == expected


def test_a_snapshot_serves_its_own_data_read_only(ceph: Cluster, serve) -> None:
    name = ceph.create("8M")
    run(require("qemu-io"), "-f", "raw", "-c", "write -P 0x11 0 1M", ceph.spec(name))
    ceph.rbd("snap", "create", f"{name}@before")
    run(require("qemu-io"), "-f", "raw", "-c", "write -P 0x22 0 1M", ceph.spec(name))
    served = serve(f"rbd:{name}@before:conf={ceph.conf}")
    handle = nbd_client(served.uri())
    assert handle.is_read_only()
    assert handle.pread(MiB, 0) == b"\x11" * MiB
    with pytest.raises(nbd.Error):
        handle.pwrite(b"x" * 512, 0)
    handle.shutdown()
    assert b"\x22" * MiB == nbd_client(serve(ceph.spec(name)).uri()).pread(MiB, 0)


def test_an_osd_restart_during_io_reaches_no_client(ceph: Cluster, serve, tmp_path: Path) -> None:
    name = ceph.create("32M")
    served = serve(ceph.spec(name))
    handle = nbd_client(served.uri())
    errors: list[BaseException] = []
    written = threading.Event()
    stop = threading.Event()

    def writer() -> None:
        # Whole-disk passes of 1 MiB writes, each pass a new pattern, until told to stop.
        try:
            seed = 10
            while not stop.is_set():
                for offset in range(0, 32 * MiB, MiB):
                    handle.pwrite(pattern(MiB, seed), offset)
                handle.flush()
                written.set()
                seed += 1
            last.append(seed - 1)
        except BaseException as exc:
            errors.append(exc)

    last: list[int] = []
    thread = threading.Thread(target=writer)
    thread.start()
    assert written.wait(60)
    ceph.restart_osd()
    written.clear()
    assert written.wait(120), "no whole pass completed after the OSD came back"
    stop.set()
    thread.join(120)
    assert errors == []
    handle.shutdown()
    served.stop()
    assert ceph.export(name, tmp_path / "export.raw") == pattern(MiB, last[0]) * 32


def serve_fails(spec: str, tmp_path: Path) -> str:
    """The stderr of ``tapdisk serve SPEC``, which must exit non-zero (a hang fails at 60 s)."""
    proc = subprocess.run(
        [TAPDISK, "serve", "--unix", str(tmp_path / "nbd.sock"), spec],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0, proc.stdout
    return proc.stderr.strip()


def test_a_missing_pool_or_image_is_a_one_line_error(ceph: Cluster, tmp_path: Path) -> None:
    assert serve_fails(f"rbd:nopool/disk:conf={ceph.conf}", tmp_path) == (
        "tapdisk: rbd:nopool/disk: no pool 'nopool' in the cluster"
    )
    assert serve_fails(f"rbd:rbd/nothere:conf={ceph.conf}", tmp_path) == (
        "tapdisk: rbd:rbd/nothere: no image 'rbd/nothere'"
    )
    name = ceph.create("1M")
    assert serve_fails(f"rbd:{name}@nosnap:conf={ceph.conf}", tmp_path) == (
        f"tapdisk: rbd:{name}@nosnap: no snapshot 'nosnap' of image '{name}'"
    )


def test_a_wrong_key_or_an_absent_cluster_is_a_one_line_error(
    ceph: Cluster, tmp_path: Path
) -> None:
    wrong_key = "AQBVn01mAAAAABAAwjhVC+6gVbDvYcvEGJeANw=="
    error = serve_fails(f"rbd:rbd/disk:conf={ceph.conf}:key={wrong_key}", tmp_path)
    assert "permission denied" in error and len(error.splitlines()) == 1
    # A monitor address where nothing listens: the bounded mount wait, not 300 s.
    absent = serve_fails(rf"rbd:rbd/disk:conf={ceph.conf}:mon_host=127.0.0.1\:9", tmp_path)
    assert "cannot connect" in absent and "no answer" in absent
    assert len(absent.splitlines()) == 1
    error = serve_fails(f"rbd:rbd/disk:conf={tmp_path}/none.conf", tmp_path)
    assert "does not exist" in error and len(error.splitlines()) == 1


@pytest.mark.parametrize(
    "spec", ["rbd:disk", "rbd:a/b/c/d", "rbd:rbd/disk@", "rbd:rbd/disk:conf", "rbd:/abs/path"]
)
def test_a_malformed_spec_is_refused(spec: str, tmp_path: Path) -> None:
    assert serve_fails(spec, tmp_path).startswith(f"tapdisk: bad rbd spec '{spec}'")


@pytest.mark.parametrize(
    "cache",
    [
        "",  # the default: no librbd cache, a write completes once the OSD has it
        # librbd's write-back cache holds acknowledged writes in tapdisk's memory (after
        # the first flush): FUA must flush it
        ":rbd_cache=true:rbd_cache_policy=writeback",
    ],
    ids=["no-cache", "writeback-cache"],
)
def test_fua_and_flushed_writes_survive_kill_9_of_tapdisk(
    ceph: Cluster, serve, tmp_path: Path, cache: str
) -> None:
    name = ceph.create("8M")
    served = serve(ceph.spec(name) + cache)
    handle = nbd_client(served.uri())
    handle.flush()
    handle.pwrite(b"\xf0" * MiB, 2 * MiB)
    handle.flush()
    handle.pwrite(b"\x0f" * MiB, 0, nbd.CMD_FLAG_FUA)  # nothing after it: FUA alone
    served.stop(signal.SIGKILL)
    exported = ceph.export(name, tmp_path / "export.raw")
    assert exported[:MiB] == b"\x0f" * MiB
    assert exported[2 * MiB : 3 * MiB] == b"\xf0" * MiB


def test_an_image_outliving_its_event_loop_serves_the_next_one(ceph: Cluster) -> None:
    """librbd's completions are collected on the loop that used the image; a second loop
    (tap-img's steps each run their own) takes them over, and reads land in the caller's
    buffer."""
    name = ceph.create("8M")
    ceph.rbd("bench", "--io-type", "write", "--io-size", "4M", "--io-total", "8M", name)
    expected = ceph.export(name, Path(ceph.directory) / "outlive.raw")
    image = open_image(ceph.spec(name), OpenOptions())

    async def read(offset: int) -> bytes:
        buf = bytearray(MiB)
        await asyncio.wait_for(image.read(offset, memoryview(buf)), 30)  # a lost completion
        return bytes(buf)

    assert asyncio.run(read(0)) == expected[:MiB]
    assert asyncio.run(read(3 * MiB)) == expected[3 * MiB : 4 * MiB]
    asyncio.run(image.close())


def test_writes_to_a_read_only_image_fail_at_once_and_the_image_still_closes(
    ceph: Cluster,
) -> None:
    """librbd never completes a write, discard or zeroing on a snapshot or an image opened
    read-only; the driver refuses them with EROFS, and the image's close does not wait for
    them."""
    name = ceph.create("8M")
    ceph.rbd("snap", "create", f"{name}@frozen")

    async def refused_then_closed(image: Image) -> None:
        attempts = (
            lambda: image.write(0, memoryview(b"x" * 4096)),
            lambda: image.discard(0, 4096),
            lambda: image.write_zeroes(0, 4096),
        )
        for attempt in attempts:
            with pytest.raises(OSError) as refused:
                await asyncio.wait_for(attempt(), 10)
            assert refused.value.errno == errno.EROFS
        await asyncio.wait_for(image.flush(), 10)  # nothing to flush, and not refused
        with pytest.raises(OSError):  # the flush attached the completions: no task
            image.start_write(0, memoryview(bytearray(4096)), False, lambda _: None)
        await asyncio.wait_for(image.close(), 30)

    for spec in (f"rbd:{name}@frozen:conf={ceph.conf}", ceph.spec(name)):
        asyncio.run(refused_then_closed(open_image(spec, OpenOptions(read_only=True))))


def test_reads_started_without_a_task_land_in_the_buffer_and_respect_the_fault_layer(
    ceph: Cluster,
) -> None:
    """``start_read`` (the VBD's direct reads) fills the caller's buffer and calls back on
    the loop; the fault layer declines it, and ``start_write``, while a fault can come."""
    name = ceph.create("8M")
    ceph.rbd("bench", "--io-type", "write", "--io-size", "4M", "--io-total", "8M", name)
    expected = ceph.export(name, Path(ceph.directory) / "started.raw")
    later = open_image(f"fault:start=600,count=1,ops=read+write:{ceph.spec(name)}", OpenOptions())
    spent = open_image(f"fault:count=1,ops=read:{ceph.spec(name)}", OpenOptions(read_only=True))

    async def go() -> None:
        buf = bytearray(64 * 1024)
        view = memoryview(buf)
        ended: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        await later.read(0, view)  # no fault in its first 600 s; the completions are attached
        assert not later.start_read(0, view, ended.set_result)  # a fault is still to come
        assert not later.start_write(0, view, False, ended.set_result)
        with pytest.raises(OSError):
            await spent.read(0, view)  # its one fault
        await spent.read(0, view)
        assert spent.start_read(3 * MiB, view, ended.set_result)
        assert await asyncio.wait_for(ended, 30) is None
        assert bytes(buf) == expected[3 * MiB : 3 * MiB + len(buf)]
        await later.close()
        await spent.close()

    asyncio.run(go())
