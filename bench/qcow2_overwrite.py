#!/usr/bin/env python3
"""Time the qcow2 driver's hot write path: 4 KiB overwrites of allocated clusters.

Drives ``Qcow2Image.write`` directly (no server, no socket) on a fully allocated
image in the page cache, so what is measured is the driver's own cost per write:
the L2 lookup, the checks on the host offset, and the copy into the page cache.
Prints the best and the median of several rounds in microseconds per write, for
the whole write and for its lookup alone (``_overwrite_at``: where the write goes
and whether it may go there, without the copy). A measuring tool, not a test:
numbers from a busy machine are noise; the best round is the least disturbed.

Run it from the checkout's venv: ``.venv/bin/python bench/qcow2_overwrite.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from tapdisk.drivers.registry import OpenOptions, open_image

SIZE = 256 << 20
BLOCK = 4096


async def rounds(path: Path, writes: int, count: int) -> tuple[list[float], list[float]]:
    image = open_image(f"qcow2:{path}", OpenOptions())
    rng = random.Random(1)
    offsets = [rng.randrange(SIZE // BLOCK) * BLOCK for _ in range(writes)]
    data = memoryview(bytes(range(256)) * (BLOCK // 256))
    for off in offsets:  # warm the L2 cache and the page cache
        await image.write(off, data)
    whole, lookup = [], []
    overwrite_at = image._overwrite_at  # type: ignore[attr-defined]
    try:
        for _ in range(count):
            start = time.perf_counter()
            for off in offsets:
                await image.write(off, data)
            whole.append((time.perf_counter() - start) / writes * 1e6)
            start = time.perf_counter()
            for off in offsets:
                overwrite_at(off, BLOCK)
            lookup.append((time.perf_counter() - start) / writes * 1e6)
    finally:
        await image.close()
    return whole, lookup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=20000, help="writes per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(SIZE)], check=True
        )
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", f"write -P 1 0 {SIZE}", str(path)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        whole, lookup = asyncio.run(rounds(path, args.writes, args.rounds))
    for name, times in (("write", whole), ("lookup", lookup)):
        print(
            f"4 KiB overwrite of an allocated qcow2 cluster, {name}: best {min(times):.2f} us, "
            f"median {statistics.median(times):.2f} us"
        )


if __name__ == "__main__":
    main()
