"""The VBD as an Image: what it forwards, pause/unpause rules, snapshots, closing."""

from __future__ import annotations

import asyncio
import errno
import json
import os

import pytest
from helpers import require, run
from tapdisk.drivers.base import ExtentFlags
from tapdisk.drivers.registry import open_image

from tapdisk.export import Export
from tapdisk.vbd import VBD, VBDError


def test_an_export_of_a_vbd_advertises_what_the_image_can_do(raw_image):
    path = raw_image("4M")

    async def go():
        image = open_image(f"raw:{path}")
        direct_flags = Export("", image).info.flags
        await image.close()
        dev = VBD.open(f"raw:{path}")
        vbd_flags = Export("", dev).info.flags
        await dev.close()
        return direct_flags, vbd_flags

    direct_flags, vbd_flags = asyncio.run(go())
    assert vbd_flags == direct_flags


def test_page_cache_shortcut_works_while_running_and_not_while_paused(raw_image):
    path = raw_image("4M", "write -P 0x61 0 4k")

    async def go():
        dev = VBD.open(f"raw:{path}")
        buf = bytearray(4096)
        running = dev.read_nowait(0, memoryview(buf))
        await dev.pause()
        paused = dev.read_nowait(0, memoryview(bytearray(4096)))
        await dev.unpause()
        await dev.close()
        return running, paused, bytes(buf), dev.stats.reads

    running, paused, data, reads = asyncio.run(go())
    assert (running, paused) == (True, False)
    assert data == b"\x61" * 4096
    assert reads == 1


def test_unpause_of_a_running_vbd_is_an_error(raw_image):
    async def go():
        dev = VBD.open(f"raw:{raw_image('4M')}")
        try:
            with pytest.raises(VBDError, match="is not paused"):
                await dev.unpause()
        finally:
            await dev.close()

    asyncio.run(go())


def test_pause_closes_the_image_file(raw_image):
    path = raw_image("4M")

    async def go():
        dev = VBD.open(f"raw:{path}")
        fd = dev.scheduler.image.file.fd  # type: ignore[union-attr]
        await dev.pause()
        with pytest.raises(OSError) as info:
            os.fstat(fd)
        await dev.close()
        return info.value.errno

    assert asyncio.run(go()) == errno.EBADF


def test_unpause_with_another_size_keeps_the_vbd_paused(raw_image):
    small, big = raw_image("4M", name="small.raw"), raw_image("8M", name="big.raw")

    async def go():
        dev = VBD.open(f"raw:{small}")
        await dev.pause()
        with pytest.raises(VBDError, match="refusing to change the size"):
            await dev.unpause(f"raw:{big}")
        paused = dev.paused
        await dev.unpause()
        await dev.close()
        return paused

    assert asyncio.run(go())


def test_snapshot_switches_to_a_qcow2_overlay_backed_by_the_old_leaf(raw_image, tmp_path):
    base = raw_image("4M", "write -P 0x33 0 64k")
    overlay = tmp_path / "over.qcow2"

    async def go():
        dev = VBD.open(f"raw:{base}")
        spec = await dev.snapshot(str(overlay))
        await dev.write(65536, memoryview(b"\x44" * 65536))
        buf = bytearray(131072)
        await dev.read(0, memoryview(buf))
        await dev.close()
        return spec, bytes(buf)

    spec, data = asyncio.run(go())
    assert spec == f"qcow2:{overlay}"
    assert data == b"\x33" * 65536 + b"\x44" * 65536
    assert base.read_bytes()[65536:131072] == bytes(65536)  # the old leaf is untouched
    info = json.loads(run(require("qemu-img"), "info", "--output=json", overlay))
    assert info["backing-filename"] == str(base)
    assert info["backing-filename-format"] == "raw"


def test_snapshot_of_a_layered_spec_is_refused(raw_image, tmp_path):
    async def go():
        dev = VBD.open(f"fault:rate=0:raw:{raw_image('4M')}")
        try:
            with pytest.raises(VBDError, match="leaf type 'fault'"):
                await dev.snapshot(str(tmp_path / "x.qcow2"))
        finally:
            await dev.close()

    asyncio.run(go())


def test_zeroes_and_discards_pass_through_and_are_counted(raw_image):
    path = raw_image("4M", "write -P 0x55 0 1M")

    async def go():
        dev = VBD.open(f"raw:{path}")
        await dev.write_zeroes(0, 65536)
        await dev.discard(1 << 20, 65536)
        extents = await dev.extents(2 << 20, 65536)
        stats = dev.stats_dict()
        await dev.close()
        return extents, stats

    extents, stats = asyncio.run(go())
    assert path.read_bytes()[:65536] == bytes(65536)
    assert extents[0].flags & ExtentFlags.ZERO
    assert (stats["write_zeroes"], stats["discards"]) == (1, 1)


def test_requests_after_close_fail_with_eshutdown(raw_image):
    async def go():
        dev = VBD.open(f"raw:{raw_image('4M')}")
        await dev.close()
        await dev.close()  # idempotent
        with pytest.raises(OSError) as info:
            await dev.read(0, memoryview(bytearray(512)))
        return info.value.errno

    assert asyncio.run(go()) == errno.ESHUTDOWN


def test_snapshot_of_a_paused_vbd_leaves_it_paused_on_the_overlay(raw_image, tmp_path):
    base = raw_image("4M", "write -P 0x71 0 4k")
    overlay = tmp_path / "over.qcow2"

    async def go():
        dev = VBD.open(f"raw:{base}")
        await dev.pause()
        await dev.snapshot(str(overlay))
        paused, spec = dev.paused, dev.spec
        await dev.unpause()
        buf = bytearray(4096)
        await dev.read(0, memoryview(buf))
        await dev.close()
        return paused, spec, bytes(buf)

    paused, spec, data = asyncio.run(go())
    assert paused and spec == f"qcow2:{overlay}"
    assert data == b"\x71" * 4096
