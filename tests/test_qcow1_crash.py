"""QCOW v1 crash safety: a SIGKILLed writer leaves an image qemu-img reads, flushes kept."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from image_helpers import qemu_img, qemu_raw, read_all

BLOCK = 4096
SECTOR = 512  # the unit a crash may tear an unflushed write at: one cluster here
BLOCKS = 2048  # an 8 MiB disk
OPS_PER_ROUND = 1_000_000  # op ids of round r are r * OPS_PER_ROUND + 1, 2, ...


def schedule(seed: int, first_op: int) -> Iterator[tuple[int, int, bool]]:
    """(op id, block, flush after this op) for one writer run, endless."""
    rng = random.Random(seed)
    op = first_op
    while True:
        burst = rng.randrange(1, 20)
        for i in range(burst):
            op += 1
            yield op, rng.randrange(BLOCKS), i == burst - 1


def block_bytes(value: int) -> bytes:
    return value.to_bytes(8, "big") * (BLOCK // 8)


async def writer(path: str, seed: int, first_op: int) -> None:
    """Write blocks of ``schedule``; print each op id once the flush after it returned."""
    from tapdisk.drivers.registry import OpenOptions, open_image

    img = open_image(f"qcow:{path}", OpenOptions())
    for op, block, flush in schedule(seed, first_op):
        await img.write(block * BLOCK, memoryview(block_bytes(op)))
        if flush:
            await img.flush()
            print(op, flush=True)


def run_writer_and_kill(path: Path, seed: int, first_op: int, rng: random.Random) -> int:
    """Start a writer, SIGKILL it at a random moment; the last op id it saw flushed."""
    code = (
        "import asyncio, sys; sys.path.insert(0, sys.argv[1]);"
        "from test_qcow1_crash import writer;"
        "asyncio.run(writer(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))"
    )
    here = os.path.dirname(__file__)
    proc = subprocess.Popen(
        [sys.executable, "-c", code, here, str(path), str(seed), str(first_op)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()  # the writer is running and has flushed once
    assert first, "writer exited before its first flush"
    time.sleep(rng.uniform(0.0, 0.4))
    proc.send_signal(signal.SIGKILL)
    rest = proc.stdout.read()
    proc.wait()
    return int((first + rest).split()[-1])


def test_sigkilled_writer_keeps_flushed_writes(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"".join(block_bytes(0xFFFF0000 + b) for b in range(BLOCKS)))
    path = tmp_path / "crash.qcow"  # 512-byte clusters: each 4 KiB write allocates eight
    qemu_img("create", "-q", "-f", "qcow", "-b", "base.raw", "-F", "raw", path)
    # Per sector: an unflushed 4 KiB write allocates eight clusters, and a kill in the middle
    # may leave some of them pointing at its data and the rest at the older data.
    known = [[0xFFFF0000 + b] * (BLOCK // SECTOR) for b in range(BLOCKS)]
    rng = random.Random(2024)
    for rnd in range(1, 7):
        first_op = rnd * OPS_PER_ROUND
        last_flushed = run_writer_and_kill(path, rnd, first_op, rng)
        allowed: list[set[int]] = [set() for _ in range(BLOCKS)]
        for op, block, _ in schedule(rnd, first_op):
            if op <= last_flushed:
                known[block] = [op] * (BLOCK // SECTOR)
            elif op > last_flushed + 20_000:
                break
            else:
                allowed[block].add(op)  # unflushed: may or may not have landed
        image = qemu_raw(path, "qcow", tmp_path)
        for b in range(BLOCKS):
            for s in range(BLOCK // SECTOR):
                start = b * BLOCK + s * SECTOR
                got = image[start : start + SECTOR]
                value = int.from_bytes(got[:8], "big")
                where = f"round {rnd}: block {b} sector {s}"
                assert got == block_bytes(value)[:SECTOR], f"{where} is torn"
                assert value == known[b][s] or value in allowed[b], (
                    f"{where} holds {value}, flushed value was {known[b][s]}"
                )
                known[b][s] = value
        assert read_all(f"qcow:{path}") == image
