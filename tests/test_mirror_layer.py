"""The mirror layer in one event loop, over real raw images: the ordering of a copy
chunk against guest writes, a secondary that hangs or fails a flush, and closing."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from helpers import require, run
from tapdisk.drivers.base import Image
from tapdisk.drivers.fault import FaultImage, FaultPlan
from tapdisk.drivers.mirror import MirrorImage
from tapdisk.drivers.registry import open_image

SIZE = 4 << 20
CHUNK = 1 << 20


def raw(path: Path, fill: int) -> Path:
    run(require("qemu-img"), "create", "-q", "-f", "raw", path, str(SIZE))
    run(require("qemu-io"), "-f", "raw", "-c", f"write -P {fill} 0 {SIZE}", path)
    return path


def mirror_of(tmp_path: Path, **options: float) -> MirrorImage:
    primary = open_image(f"raw:{raw(tmp_path / 'p.img', 0x11)}")
    secondary = open_image(f"raw:{raw(tmp_path / 's.img', 0x99)}")
    return MirrorImage(primary, secondary, **options)  # type: ignore[arg-type]


def test_a_guest_write_during_a_copy_chunk_lands_after_it(tmp_path):
    mirror = mirror_of(tmp_path)
    secondary = tmp_path / "s.img"

    async def go() -> bool:
        read_done, proceed = asyncio.Event(), asyncio.Event()

        async def copy(source: Image, target: Image) -> int:
            buf = bytearray(CHUNK)
            await source.read(0, memoryview(buf))  # the old data
            read_done.set()
            await proceed.wait()
            await target.write(0, memoryview(buf))
            return CHUNK

        chunk = asyncio.ensure_future(mirror.copy_range(0, CHUNK, copy))
        await read_done.wait()
        guest = asyncio.ensure_future(mirror.write(4096, memoryview(b"\x22" * 4096)))
        await asyncio.sleep(0.1)
        waited = not guest.done()
        proceed.set()
        await asyncio.gather(chunk, guest)
        await mirror.flush()
        await mirror.close()
        return waited

    assert asyncio.run(go())
    data = secondary.read_bytes()
    assert data[4096:8192] == b"\x22" * 4096  # the newer write, not the chunk's old data
    assert data[:4096] == b"\x11" * 4096 and data[CHUNK : CHUNK + 1] == b"\x99"


def test_a_copy_chunk_waits_for_the_guest_writes_in_flight_on_its_bytes(tmp_path):
    primary = open_image(f"raw:{raw(tmp_path / 'p.img', 0x11)}")
    slow = FaultImage(
        open_image(f"raw:{raw(tmp_path / 's.img', 0x99)}"),
        FaultPlan(rate=0.0),  # healthy; a slow secondary is what the test makes it
    )
    mirror = MirrorImage(primary, slow)
    order: list[str] = []

    async def go() -> None:
        gate = asyncio.Event()
        inner_write = slow.write

        async def slow_write(offset: int, data: memoryview, fua: bool = False) -> None:
            await gate.wait()
            await inner_write(offset, data, fua)
            order.append("guest")

        slow.write = slow_write  # type: ignore[method-assign]
        guest = asyncio.ensure_future(mirror.write(0, memoryview(b"\x22" * 4096)))
        await asyncio.sleep(0.01)

        async def copy(source: Image, target: Image) -> int:
            order.append("chunk")
            return CHUNK

        chunk = asyncio.ensure_future(mirror.copy_range(0, CHUNK, copy))
        await asyncio.sleep(0.1)
        assert not chunk.done()
        gate.set()
        await asyncio.gather(guest, chunk)
        await mirror.close()

    asyncio.run(go())
    assert order == ["guest", "chunk"]


def test_a_secondary_that_hangs_is_dropped_after_the_timeout(tmp_path):
    primary = open_image(f"raw:{raw(tmp_path / 'p.img', 0x11)}")
    hanging = FaultImage(
        open_image(f"raw:{raw(tmp_path / 's.img', 0x99)}"),
        FaultPlan(ops=frozenset({"write"}), delay=30),
    )
    mirror = MirrorImage(primary, hanging, timeout=0.2)

    async def go() -> None:
        await asyncio.wait_for(mirror.write(0, memoryview(b"\x22" * 4096)), 5)
        await mirror.close()

    asyncio.run(go())
    assert mirror.failed and mirror.secondary is None
    assert mirror.failure == "write took more than 0.2 s"
    assert (tmp_path / "p.img").read_bytes()[:4096] == b"\x22" * 4096


def open_files() -> set[str]:
    """The files this process holds open."""
    paths = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the directory's own descriptor is gone by now
            paths.add(os.readlink(f"/proc/self/fd/{fd}"))
    return paths


def test_a_flush_goes_to_the_secondary_too(tmp_path):
    primary = open_image(f"raw:{raw(tmp_path / 'p.img', 0x11)}")
    secondary = FaultImage(
        open_image(f"raw:{raw(tmp_path / 's.img', 0x99)}"), FaultPlan(ops=frozenset({"flush"}))
    )
    mirror = MirrorImage(primary, secondary)

    async def go() -> None:
        await mirror.write(0, memoryview(b"\x22" * 4096))
        assert not mirror.failed
        await mirror.flush()  # the primary's flush succeeds; the secondary's fails
        await mirror.close()

    asyncio.run(go())
    assert mirror.failed and mirror.failure == "flush failed: Input/output error (injected)"


def test_closing_the_layer_closes_the_primary_and_the_secondary(tmp_path):
    mirror = mirror_of(tmp_path)
    images = {os.path.realpath(tmp_path / name) for name in ("p.img", "s.img")}
    assert images <= open_files()
    asyncio.run(mirror.close())
    assert not images & open_files()
