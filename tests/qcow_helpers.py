"""Helpers shared by the qcow/qcow2 tests: qemu-img built images and whole-image reads."""

from __future__ import annotations

import asyncio
from pathlib import Path

from conftest import require, run
from tapdisk.drivers.registry import OpenOptions, open_image


def qemu_img(*args: str | Path) -> str:
    return run(require("qemu-img"), *args)


def qemu_io(fmt: str, path: Path, *cmds: str) -> str:
    argv: list[str | Path] = [require("qemu-io"), "-f", fmt]
    for cmd in cmds:
        argv += ["-c", cmd]
    return run(*argv, path)


def read_all(spec: str, **options: object) -> bytes:
    """Every byte of an image read through our driver, in odd-sized requests."""

    async def go() -> bytes:
        img = open_image(spec, OpenOptions(read_only=True, **options))  # type: ignore[arg-type]
        try:
            out = bytearray(img.size)
            view = memoryview(out)
            step = 1_000_000 + 4096
            for off in range(0, img.size, step):
                await img.read(off, view[off : off + step])
            return bytes(out)
        finally:
            await img.close()

    return asyncio.run(go())


def qemu_raw(path: Path, fmt: str, tmp: Path) -> bytes:
    """The image as qemu-img sees it, converted to raw."""
    out = tmp / f"{path.name}.ref.raw"
    qemu_img("convert", "-f", fmt, "-O", "raw", path, out)
    return out.read_bytes()
