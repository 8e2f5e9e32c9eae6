"""Image helpers the tests share: qemu-img/qemu-io, and whole images read or written by drivers."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import nbd
from helpers import require, run
from tapdisk.drivers.registry import OpenOptions, open_image

KiB = 1 << 10
MiB = 1 << 20


def qemu_img(*args: str | Path) -> str:
    return run(require("qemu-img"), *args)


def qemu_io(fmt: str, path: Path, *cmds: str) -> str:
    argv: list[str | Path] = [require("qemu-io"), "-f", fmt]
    for cmd in cmds:
        argv += ["-c", cmd]
    return run(*argv, path)


def read_all(spec: str, **options: object) -> bytes:
    """Every byte of image ``spec`` (``TYPE:PATH``) read by our driver in odd-sized requests.

    The buffer starts full of 0xA5, not zeros: a driver must fill all of it (the server hands
    drivers unzeroed memory), so a hole it skips shows up as bytes no other tool reads there.
    """
    out = bytearray()

    async def go() -> None:
        img = open_image(spec, OpenOptions(read_only=True, **options))  # type: ignore[arg-type]
        try:
            out.extend(b"\xa5" * img.size)
            view = memoryview(out)
            step = 1_000_000 + 4096
            for off in range(0, img.size, step):
                await img.read(off, view[off : off + step])
        finally:
            await img.close()

    # Not returned from the coroutine: asyncio.run on Python 3.11 reprs the
    # task's result (all of it) while restoring the SIGINT handler.
    asyncio.run(go())
    return bytes(out)


def write_all(spec: str, writes: list[tuple[int, bytes]], **options: object) -> None:
    """Make ``writes`` (offset, data) to image ``spec`` through our driver, then close it."""

    async def go() -> None:
        img = open_image(spec, OpenOptions(**options))  # type: ignore[arg-type]
        try:
            for off, data in writes:
                await img.write(off, memoryview(data))
        finally:
            await img.close()

    asyncio.run(go())


def qemu_raw(path: Path, fmt: str, tmp: Path) -> bytes:
    """The image as qemu-img sees it, converted to raw."""
    out = tmp / f"{path.name}.ref.raw"
    qemu_img("convert", "-f", fmt, "-O", "raw", path, out)
    return out.read_bytes()


def workload(uri: str, ref: bytearray, seed: int, ops: int, *, align: int = 1) -> None:
    """Random writes, discards and zeroes over NBD, mirrored into ``ref``."""
    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    size = len(ref)
    for _ in range(ops):
        length = rng.choice([512, 4 * KiB, 64 * KiB, 200 * KiB + 7, 1 * MiB + 3])
        off = rng.randrange(0, size - length) // align * align
        op = rng.random()
        if op < 0.6:
            data = rng.randbytes(length)
            h.pwrite(data, off)
            ref[off : off + length] = data
        elif op < 0.8:
            h.zero(length, off)
            ref[off : off + length] = bytes(length)
        elif h.can_trim():
            h.trim(length, off)  # a hint: contents stay as they are or become zero
            ref[off : off + length] = h.pread(length, off)
    h.flush()
    h.shutdown()


def compare_fmt(path: Path, fmt: str, ref: bytes, tmp: Path) -> None:
    """``qemu-img compare`` of an image with the expected contents."""
    raw = tmp / "expected.raw"
    raw.write_bytes(ref)
    run("qemu-img", "compare", "-f", fmt, "-F", "raw", path, raw)
