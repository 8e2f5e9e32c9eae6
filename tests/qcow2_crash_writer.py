"""Child process of the crash test: writes given slots through the qcow2 driver.

argv: IMAGE SLOT_SIZE SEED SLOT_FILE (slot numbers, one a line); prints
"flushed N" after each flush that covers the first N writes,
so the parent knows which writes must survive.
"""

from __future__ import annotations

import asyncio
import random
import sys
from pathlib import Path

from tapdisk.drivers.registry import OpenOptions, open_image

#: Writes between flushes.
FLUSH_EVERY = 7


def piece(slot: int, seed: int, slot_size: int) -> tuple[int, bytes]:
    """Offset and bytes of the write into ``slot`` (deterministic, partial clusters)."""
    rng = random.Random(seed * 1_000_003 + slot)
    start = rng.randrange(0, slot_size // 2)
    length = rng.randrange(1, slot_size - start)
    return slot * slot_size + start, rng.randbytes(length)


async def main(path: str, slot_size: int, seed: int, slots: list[int]) -> None:
    img = open_image(f"qcow2:{path}", OpenOptions())
    for i, slot in enumerate(slots, 1):
        off, data = piece(slot, seed, slot_size)
        await img.write(off, memoryview(data))
        if i % FLUSH_EVERY == 0:
            await img.flush()
            print(f"flushed {i}", flush=True)
    await img.flush()
    print(f"flushed {len(slots)}", flush=True)
    await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(
        main(
            sys.argv[1],
            int(sys.argv[2]),
            int(sys.argv[3]),
            [int(a) for a in Path(sys.argv[4]).read_text().split()],
        )
    )
