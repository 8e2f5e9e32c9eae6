"""The CBT layer over a real raw image: exactly which bits each request sets in the log file.

The log is read back from the file with plain reads (what SM and cbt-util see),
and compared with files packed by hand (``cbt_helpers``).
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from cbt_helpers import BLOCK, bitmap_bytes, bitmap_of, blocks_in, header, ok, write_log
from tapdisk.drivers.base import Image, ImageError
from tapdisk.drivers.cbtlayer import QUERY_BLOCKS, CbtImage
from tapdisk.drivers.fault import FaultImage, FaultPlan
from tapdisk.drivers.registry import OpenOptions, open_image

WRITER = str(Path(__file__).with_name("cbt_crash_writer.py"))
P = uuid.UUID("0d5cbfa6-0f53-4d0c-8f4b-16eef6e3b1a4")
C = uuid.UUID("e2b7b5a1-9c1e-4a7d-b2a5-6b1f0c3d4e5f")
#: 256 whole blocks and a last one of 1000 bytes (qemu-img rounds raw sizes to 512).
SIZE = 256 * BLOCK + 1024
LAST = SIZE // BLOCK


@pytest.fixture
def disk(raw_image) -> Path:
    return raw_image(str(SIZE))


def layer(disk: Path, log: Path, inner: Image | None = None) -> CbtImage:
    return CbtImage(inner or open_image(f"raw:{disk}", OpenOptions()), str(log))


def run(coro) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(coro)


def logged(log: Path, size: int = SIZE) -> set[int]:
    """Blocks set in the log file, read with plain reads."""
    return blocks_in(log.read_bytes()[48 : 48 + bitmap_bytes(size)])


async def request(img: CbtImage, op: str, offset: int, length: int) -> None:
    if op == "write":
        await img.write(offset, memoryview(b"w" * length))
    elif op == "write-fua":
        await img.write(offset, memoryview(b"f" * length), fua=True)
    elif op == "write_nowait":
        if not img.write_nowait(offset, memoryview(b"n" * length)):
            await img.write(offset, memoryview(b"n" * length))
    elif op == "zero":
        await img.write_zeroes(offset, length)
    elif op == "trim":
        await img.discard(offset, length)
    elif op == "read":
        await img.read(offset, memoryview(bytearray(length)))
    elif op == "read_nowait":
        img.read_nowait(offset, memoryview(bytearray(length)))
    elif op == "flush":
        await img.flush()
    elif op == "cache":
        await img.cache(offset, length)
    elif op == "extents":
        await img.extents(offset, length)
    else:
        raise AssertionError(op)


CASES = [
    ("write", 0, 1, {0}),
    ("write", BLOCK - 1, 2, {0, 1}),
    ("write", 10 * BLOCK, BLOCK, {10}),
    ("write", 20 * BLOCK - 1, BLOCK + 2, {19, 20, 21}),
    ("write", 7 * BLOCK + 512, 3 * BLOCK, {7, 8, 9, 10}),
    ("write", SIZE - 1, 1, {LAST}),
    ("write", 0, SIZE, set(range(LAST + 1))),
    ("write-fua", 33 * BLOCK, 4096, {33}),
    ("write_nowait", 30 * BLOCK + 4096, 4096, {30}),
    ("write_nowait", 15 * BLOCK + 4096, 2 * BLOCK, {15, 16, 17}),
    ("zero", 100 * BLOCK + 5, 3 * BLOCK, {100, 101, 102, 103}),
    ("zero", 8 * BLOCK + 3, 64 * BLOCK, set(range(8, 73))),
    ("trim", 200 * BLOCK, 17 * BLOCK, set(range(200, 217))),
    ("trim", 250 * BLOCK, SIZE - 250 * BLOCK, set(range(250, LAST + 1))),
    ("read", 0, SIZE, set()),
    ("read_nowait", 0, 4096, set()),
    ("flush", 0, 0, set()),
    ("cache", 0, SIZE, set()),
    ("extents", 0, SIZE, set()),
]


@pytest.mark.parametrize(("op", "offset", "length", "blocks"), CASES)
def test_each_request_marks_exactly_the_blocks_it_touches(
    disk, tmp_path, op, offset, length, blocks
):
    log = write_log(tmp_path / "d.cbtlog", SIZE, (), parent=P, child=C)
    img = layer(disk, log)

    async def go() -> None:
        await request(img, op, offset, length)
        # In the file (page cache) as soon as the request returns, before any flush.
        assert log.read_bytes() == header(SIZE, P, C) + bitmap_of(SIZE, blocks)
        await img.close()

    run(go())
    assert log.read_bytes() == header(SIZE, P, C) + bitmap_of(SIZE, blocks)


def test_the_layer_looks_like_the_image_below(disk, tmp_path):
    log = write_log(tmp_path / "d.cbtlog", SIZE)
    inner = open_image(f"raw:{disk}", OpenOptions())
    img = layer(disk, log, inner)
    assert (img.spec, img.size, img.format_name) == (inner.spec, SIZE, "raw")
    assert img.capabilities == inner.capabilities
    assert img.log_path == str(log)
    run(img.close())


def test_marks_accumulate_and_marked_blocks_stay_marked(disk, tmp_path):
    log = write_log(tmp_path / "d.cbtlog", SIZE, {3, 200})
    img = layer(disk, log)

    async def go() -> None:
        for offset in (3 * BLOCK, 4 * BLOCK + 17, 3 * BLOCK + 9, 64 * BLOCK):
            await img.write(offset, memoryview(b"x" * 4096))
        await img.flush()
        await img.close()

    run(go())
    assert log.read_bytes() == header(SIZE) + bitmap_of(SIZE, {3, 4, 64, 200})


def test_a_failing_request_is_marked_all_the_same(disk, tmp_path):
    log = write_log(tmp_path / "d.cbtlog", SIZE)
    faulty = FaultImage(
        open_image(f"raw:{disk}", OpenOptions()),
        FaultPlan(rate=1.0, duration=3600.0, ops=frozenset({"write", "zero", "discard"})),
    )
    img = layer(disk, log, faulty)

    async def go() -> None:
        for op, offset in (("write", 5 * BLOCK), ("zero", 9 * BLOCK), ("trim", 11 * BLOCK)):
            with pytest.raises(OSError):
                await request(img, op, offset, 512)
        await img.close()

    run(go())
    assert logged(log) == {5, 9, 11}


def test_the_header_belongs_to_sm(disk, tmp_path):
    """Header edits made by cbt-util while the log is attached survive later marks."""
    log = write_log(tmp_path / "d.cbtlog", SIZE, (), parent=P)
    img = layer(disk, log)

    async def go() -> None:
        await img.write(0, memoryview(b"a" * 512))
        ok("set", "-n", log, "-c", C, "-f", "1")
        await img.write(LAST * BLOCK, memoryview(b"b" * 512))
        await img.flush()
        await img.close()

    run(go())
    assert log.read_bytes() == header(SIZE, P, C, 1) + bitmap_of(SIZE, {0, LAST})


def test_the_mapping_is_the_file(disk, tmp_path):
    """A coalesce into the live log and the layer's marks meet in one bitmap, none lost."""
    log = write_log(tmp_path / "d.cbtlog", SIZE)
    parent = write_log(tmp_path / "parent.cbtlog", SIZE, {2, 100})
    img = layer(disk, log)

    async def go() -> None:
        await img.write(BLOCK, memoryview(b"a" * 512))
        ok("coalesce", "-p", parent, "-c", log)
        await img.write(9 * BLOCK, memoryview(b"b" * 512))
        assert img.changed_extents(0, 3 * BLOCK) == [(BLOCK, False), (2 * BLOCK, True)]
        await img.close()

    run(go())
    assert logged(log) == {1, 2, 9, 100}


def mapping_of(path: Path) -> dict[str, int] | None:
    """This process's mapping of ``path`` as /proc/self/smaps counts it (KiB), if mapped."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    name = os.path.realpath(path)
    for i, line in enumerate(lines):
        if line.endswith(" " + name):
            fields = {}
            for row in lines[i + 1 :]:
                key, _, value = row.partition(":")
                if not value.strip().endswith("kB"):
                    break
                fields[key] = int(value.split()[0])
            return fields
    return None


def dirty_kib(path: Path) -> int:
    """KiB of the mapping of ``path`` that are changed in memory and not yet on disk."""
    fields = mapping_of(path)
    assert fields is not None, f"{path} is not mapped"
    return fields["Shared_Dirty"] + fields["Private_Dirty"]


@pytest.mark.parametrize("op", ["flush", "write-fua"])
def test_flush_and_fua_write_the_marks_to_disk(disk, tmp_path, op):
    log = write_log(tmp_path / "d.cbtlog", SIZE)
    img = layer(disk, log)

    async def go() -> None:
        await img.write(3 * BLOCK, memoryview(b"a" * 512))
        assert dirty_kib(log) > 0  # marked in the page cache only
        await request(img, op, 40 * BLOCK, 512)
        assert dirty_kib(log) == 0
        await img.close()

    run(go())
    assert logged(log) == ({3, 40} if op == "write-fua" else {3})


def test_closing_the_layer_unmaps_the_log(disk, tmp_path):
    log = write_log(tmp_path / "d.cbtlog", SIZE)
    img = layer(disk, log)
    assert mapping_of(log) is not None
    run(img.close())
    assert mapping_of(log) is None and img.log_path is None


def test_a_missing_log_fails_the_open_and_is_not_created(disk, tmp_path):
    missing = tmp_path / "missing.cbtlog"
    with pytest.raises(ImageError, match=re.escape(str(missing))):
        layer(disk, missing)
    assert not missing.exists()


def test_a_log_too_short_for_the_disk_fails_the_open_naming_it(disk, tmp_path):
    log = write_log(tmp_path / "small.cbtlog", SIZE - 8 * BLOCK)
    before = log.read_bytes()
    with pytest.raises(ImageError, match=f"{re.escape(str(log))}.*bitmap"):
        layer(disk, log)
    assert log.read_bytes() == before


def test_the_bitmap_extent_comes_from_the_disk_not_the_header(disk, tmp_path):
    """blktap maps header + bitmap_size(virtual size), whatever size the header holds."""
    log = tmp_path / "lv"
    log.write_bytes(header(BLOCK) + bytes(4096))  # a log volume longer than its log
    img = layer(disk, log)
    run(img.write(LAST * BLOCK, memoryview(b"z" * 512)))
    run(img.close())
    assert log.read_bytes() == header(BLOCK) + bitmap_of(SIZE, {LAST}).ljust(4096, b"\0")


def test_released_log_refuses_writes_and_reopens_after_a_snapshot(disk, tmp_path):
    """SM's snapshot while paused: the live log becomes the snapshot's, a new one is made."""
    log = write_log(tmp_path / "vdi.cbtlog", SIZE)
    snap = tmp_path / "snap.cbtlog"
    img = layer(disk, log)

    async def go() -> None:
        await img.write(4 * BLOCK, memoryview(b"a" * 512))
        await img.flush()
        img.release_log()
        assert img.log_path is None
        with pytest.raises(OSError) as exc:
            await img.write(6 * BLOCK, memoryview(b"b" * 512))
        assert exc.value.errno == errno.EIO
        with pytest.raises(OSError):
            img.write_nowait(6 * BLOCK, memoryview(b"b" * 512))
        os.rename(log, snap)
        ok("create", "-n", log, "-s", SIZE)
        ok("set", "-n", log, "-p", P)
        img.open_log(str(log))
        await img.write(7 * BLOCK, memoryview(b"c" * 512))
        await img.close()

    run(go())
    assert logged(snap) == {4}
    assert log.read_bytes() == header(SIZE, P) + bitmap_of(SIZE, {7})


def test_reopen_reads_what_was_coalesced_while_released(disk, tmp_path):
    log = write_log(tmp_path / "vdi.cbtlog", SIZE, {1})
    parent = write_log(tmp_path / "parent.cbtlog", SIZE, {50, 51})
    img = layer(disk, log)
    img.release_log()
    ok("coalesce", "-p", parent, "-c", log)
    img.open_log(str(log))
    assert img.changed_extents(0, SIZE) == [
        (BLOCK, False),
        (BLOCK, True),
        (48 * BLOCK, False),
        (2 * BLOCK, True),
        (SIZE - 52 * BLOCK, False),
    ]
    run(img.close())


def test_changed_extents_are_the_runs_of_set_bits(disk, tmp_path):
    marked = {0, 1, 2, 9, 15, 16, 17, 100, LAST - 1, LAST}
    log = write_log(tmp_path / "d.cbtlog", SIZE, marked)
    img = layer(disk, log)
    rng = random.Random(3)
    queries = [(0, SIZE), (1, 5), (BLOCK + 7, 10 * BLOCK), (SIZE - 10, 10), (SIZE - 1, 100)]
    queries += [(o, rng.randrange(1, SIZE - o + 1)) for o in rng.sample(range(SIZE), 200)]
    for offset, length in queries:
        end = min(offset + length, SIZE)
        expected: list[tuple[int, bool]] = []
        for block in range(offset // BLOCK, (end - 1) // BLOCK + 1):  # block by block
            span = min(end, (block + 1) * BLOCK) - max(offset, block * BLOCK)
            dirty = block in marked
            if expected and expected[-1][1] == dirty:
                expected[-1] = (expected[-1][0] + span, dirty)
            else:
                expected.append((span, dirty))
        assert img.changed_extents(offset, length) == expected, (offset, length)
    run(img.close())


def test_changed_extents_answer_at_most_query_blocks_at_once(raw_image, tmp_path):
    size = 3 * QUERY_BLOCKS * BLOCK
    disk = raw_image(str(size), name="big.raw")
    log = write_log(tmp_path / "big.cbtlog", size, {QUERY_BLOCKS + 3})
    img = layer(disk, log)
    assert img.changed_extents(BLOCK, size) == [(QUERY_BLOCKS * BLOCK, False)]
    assert img.changed_extents((QUERY_BLOCKS + 1) * BLOCK, size)[:3] == [
        (2 * BLOCK, False),
        (BLOCK, True),
        ((QUERY_BLOCKS - 3) * BLOCK, False),
    ]
    run(img.close())


def test_kill_9_keeps_the_mark_of_every_acknowledged_write(disk, tmp_path):
    """A writer killed at random moments: each acknowledged request's blocks are in the log,
    and nothing is marked that no request touched."""
    rng = random.Random(12)
    for round_ in range(6):
        log = write_log(tmp_path / f"crash{round_}.cbtlog", SIZE)
        proc = subprocess.Popen(
            [sys.executable, WRITER, str(disk), str(log), str(round_)],
            stdout=subprocess.PIPE,
            text=True,
        )
        lines: list[str] = []

        def reader(p: subprocess.Popen[str] = proc, out: list[str] = lines) -> None:
            assert p.stdout is not None
            out.extend(line for line in p.stdout if line.endswith("\n"))

        thread = threading.Thread(target=reader)
        thread.start()
        # The kill comes at a random moment once the writer is writing (under load its
        # start-up alone can take longer than the old fixed 0.5-1.5 s).
        deadline = time.monotonic() + 60
        while len(lines) <= 20 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        thread.join()
        acked: set[int] = set()
        touched: set[int] = set()
        for line in lines:
            what, offset, length = line.split()
            blocks = range(int(offset) // BLOCK, (int(offset) + int(length) - 1) // BLOCK + 1)
            (acked if what == "ack" else touched).update(blocks)
        assert len(lines) > 20, lines
        assert acked <= logged(log), f"round {round_}: acknowledged blocks not marked"
        assert logged(log) <= touched
