"""Child process of the CBT crash test: random writes, zeroes and trims through the CBT layer.

argv: IMAGE LOG SEED.  Prints "start OFFSET LENGTH" before each request and
"ack OFFSET LENGTH" once it is acknowledged, until it is killed.
"""

from __future__ import annotations

import asyncio
import random
import sys

from tapdisk.drivers.cbtlayer import CbtImage
from tapdisk.drivers.registry import OpenOptions, open_image


async def main(image_path: str, log_path: str, seed: int) -> None:
    img = CbtImage(open_image(f"raw:{image_path}", OpenOptions()), log_path)
    rng = random.Random(seed)
    out = sys.stdout
    while True:
        length = rng.choice([512, 4096, 65536, 200_000, 1 << 20])
        offset = rng.randrange(0, img.size - length)
        out.write(f"start {offset} {length}\n")
        out.flush()
        op = rng.random()
        if op < 0.7:
            data = memoryview(rng.randbytes(length))
            if not img.write_nowait(offset, data):
                await img.write(offset, data)
        elif op < 0.85:
            await img.write_zeroes(offset, length)
        else:
            await img.discard(offset, length)
        out.write(f"ack {offset} {length}\n")
        out.flush()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
