"""Crash safety: a writer process is SIGKILLed at random moments, over and over.

After every kill the image must pass ``vhd-util check`` and hold every write
acknowledged before the last FLUSH; sectors touched after it may hold the old
or any later value, nothing else.  Runs on a dynamic image and on a
differencing child over a filled parent.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import require, run
from image_helpers import read_all
from tapdisk.drivers.vhd.create import create_vhd, snapshot_vhd
from tapdisk.drivers.vhd.image import VhdImage

MiB = 1 << 20
#: Large enough (64 blocks) that allocations keep happening in later rounds.
SIZE = 128 * MiB
SECTOR = 512
WRITES_PER_FLUSH = 6
VHD_UTIL = str(Path(sys.executable).with_name("vhd-util"))

WRITER = r"""
import asyncio, random, sys
from tapdisk.drivers.vhd.image import VhdImage

def gen(seed, k, size):
    rnd = random.Random(seed * 1000003 + k)
    length = rnd.choice([512, 4096, 65536, 300 * 1024, rnd.randrange(1, 9000)])
    reach = min(size, (seed + 1) * 4 * 1024 * 1024)  # two blocks further each round
    return rnd.randrange(0, reach - length), rnd.randbytes(length), rnd.random() < 0.1

async def main(path, seed, per_flush):
    image = VhdImage(path)
    print("ready", flush=True)
    k = 0
    while True:
        off, data, fua = gen(seed, k, image.size)
        await image.write(off, memoryview(data), fua=fua)
        if fua:
            print(f"A {k}", flush=True)
        if (k + 1) % per_flush == 0:
            await image.flush()
            print(f"F {k}", flush=True)
        k += 1

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


def gen(seed: int, k: int, size: int) -> tuple[int, bytes, bool]:
    """The same writes as the writer process makes."""
    rnd = random.Random(seed * 1000003 + k)
    length = rnd.choice([512, 4096, 65536, 300 * 1024, rnd.randrange(1, 9000)])
    reach = min(size, (seed + 1) * 4 * 1024 * 1024)  # two blocks further each round
    return rnd.randrange(0, reach - length), rnd.randbytes(length), rnd.random() < 0.1


def crash_once(path: Path, seed: int, delay: float) -> tuple[int, int, set[int]]:
    """Run the writer, kill it after ``delay`` s.

    Returns (last write made durable by a FLUSH, last write that may have
    started, FUA writes acknowledged after that FLUSH).
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(seed), str(WRITES_PER_FLUSH)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err
    durable = -1
    acked: set[int] = set()
    for line in out.splitlines():
        kind, k = line.split()
        if kind == "F":
            durable = max(durable, int(k))
        else:
            acked.add(int(k))
    # Writes after the last reported flush may have started, up to the next flush.
    return durable, durable + WRITES_PER_FLUSH, {k for k in acked if k > durable}


def verify(
    model: bytearray, actual: bytes, seed: int, durable: int, issued: int, acked: set[int]
) -> None:
    """Each sector holds its value after the last FLUSH, or after a later write covering it;
    a sector covered by an acknowledged FUA write holds that write's value or a later one."""
    state = bytearray(model)
    for k in range(durable + 1):
        off, data, _ = gen(seed, k, SIZE)
        state[off : off + len(data)] = data
    durable_state = bytes(state)
    later: dict[int, list[tuple[int, bytes]]] = {}
    for k in range(durable + 1, issued + 1):
        off, data, _ = gen(seed, k, SIZE)
        state[off : off + len(data)] = data
        for s in range(off // SECTOR, -(-(off + len(data)) // SECTOR)):
            later.setdefault(s, []).append((k, bytes(state[s * SECTOR : (s + 1) * SECTOR])))
    floor: dict[int, int] = {}
    for k in sorted(acked):
        off, data, _ = gen(seed, k, SIZE)
        for s in range(off // SECTOR, -(-(off + len(data)) // SECTOR)):
            floor[s] = k
    suspect = set(floor)
    chunk = 64 * 1024
    for c in range(0, SIZE, chunk):
        if actual[c : c + chunk] != durable_state[c : c + chunk]:
            suspect.update(range(c // SECTOR, (c + chunk) // SECTOR))
    for s in sorted(suspect):
        got = actual[s * SECTOR : (s + 1) * SECTOR]
        least = floor.get(s, durable)
        allowed = [value for k, value in later.get(s, []) if k >= least]
        if least == durable:
            allowed.append(durable_state[s * SECTOR : (s + 1) * SECTOR])
        if got not in allowed:
            pytest.fail(f"sector {s:#x} holds neither its acknowledged value nor a later write")


@pytest.mark.parametrize("kind", ["dynamic", "differencing"])
def test_sigkill_at_random_moments_leaves_valid_image_with_flushed_writes(tmp_path, kind):
    rnd = random.Random(kind)
    path = tmp_path / "crash.vhd"
    if kind == "dynamic":
        create_vhd(str(path), SIZE)
        model = bytearray(SIZE)
    else:
        base = tmp_path / "base.vhd"
        create_vhd(str(base), SIZE)
        fill = rnd.randbytes(SIZE)

        async def fill_base() -> None:
            image = VhdImage(str(base))
            await image.write(0, memoryview(fill))
            await image.close()

        asyncio.run(fill_base())
        snapshot_vhd(str(path), str(base))
        model = bytearray(fill)
    deadline = time.monotonic() + 12
    rounds = 0
    while time.monotonic() < deadline or rounds < 5:
        seed = rounds + 1
        durable, issued, acked = crash_once(path, seed, rnd.uniform(0.05, 0.4))
        run(VHD_UTIL, "check", "-n", path)
        actual = read_all(f"vhd:{path}")
        verify(model, actual, seed, durable, issued, acked)
        model = bytearray(actual)
        rounds += 1
    assert os.path.getsize(path) < 2 * SIZE


def test_block_leaked_by_a_crash_is_zeroed_when_its_space_is_reused(tmp_path):
    """The state a kill leaves between extending the file and writing the BAT entry:
    stale bytes past the last referenced block, then a valid footer.  The next
    allocation reuses that space; qemu, which ignores bitmaps, must read zeros there."""
    path = tmp_path / "leak.vhd"
    create_vhd(str(path), SIZE)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size - 512)
        footer = f.read(512)
        f.seek(size - 512)
        f.write(b"\xee" * (2 * MiB + 8192))
        f.write(footer)
    run(VHD_UTIL, "check", "-n", path)

    async def write_one() -> None:
        image = VhdImage(str(path))
        await image.write(MiB, memoryview(b"\x11" * 512))
        await image.close()

    asyncio.run(write_one())
    run(VHD_UTIL, "check", "-n", path, "-b")
    out = tmp_path / "out.raw"
    run(require("qemu-img"), "convert", "-f", "vpc", "-O", "raw", path, out)
    expected = bytearray(SIZE)
    expected[MiB : MiB + 512] = b"\x11" * 512
    assert out.read_bytes() == expected
