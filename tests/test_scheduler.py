"""The VBD's scheduler over real image files: queueing, merging, ordering, retries."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tapdisk.scheduler import SchedulerLimits
from tapdisk.vbd import VBD

SECTOR = 512


def make_file(path: Path, size: int, fill: bytes = b"") -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        if fill:
            f.write(fill)
    return path


def vbd(spec: str, **limits) -> VBD:
    return VBD.open(spec, limits=SchedulerLimits(**limits))


def test_adjacent_reads_submitted_together_become_one_io(tmp_path):
    data = os.urandom(64 * 1024)
    path = make_file(tmp_path / "d.raw", 1 << 20, data)

    async def go():
        dev = vbd(f"raw:{path}")
        bufs = [bytearray(4096) for _ in range(16)]
        await asyncio.gather(*(dev.read(i * 4096, memoryview(b)) for i, b in enumerate(bufs)))
        await dev.close()
        return dev, bufs

    dev, bufs = asyncio.run(go())
    assert b"".join(bufs) == data
    assert dev.stats.merges == 15
    assert dev.stats.reads == 16


def test_merged_io_never_exceeds_max_merge(tmp_path):
    path = make_file(tmp_path / "d.raw", 1 << 20)

    async def go():
        dev = vbd(f"raw:{path}", max_merge=16 * 1024)
        chunks = [memoryview(bytes([i]) * 4096) for i in range(16)]
        await asyncio.gather(*(dev.write(i * 4096, c) for i, c in enumerate(chunks)))
        await dev.close()
        return dev

    dev = asyncio.run(go())
    assert dev.stats.merges == 12  # four groups of four
    data = path.read_bytes()[: 16 * 4096]
    assert data == b"".join(bytes([i]) * 4096 for i in range(16))


def test_max_merge_zero_disables_merging(tmp_path):
    path = make_file(tmp_path / "d.raw", 1 << 20)

    async def go():
        dev = vbd(f"raw:{path}", max_merge=0)
        bufs = [bytearray(4096) for _ in range(8)]
        await asyncio.gather(*(dev.read(i * 4096, memoryview(b)) for i, b in enumerate(bufs)))
        await dev.close()
        return dev

    assert asyncio.run(go()).stats.merges == 0


def test_reads_and_writes_are_not_merged_together(tmp_path):
    path = make_file(tmp_path / "d.raw", 1 << 20)

    async def go():
        dev = vbd(f"raw:{path}")
        await asyncio.gather(
            dev.write(0, memoryview(b"a" * 4096)),
            dev.read(4096, memoryview(bytearray(4096))),
            dev.write(8192, memoryview(b"b" * 4096)),
        )
        await dev.close()
        return dev

    assert asyncio.run(go()).stats.merges == 0


# Non-overlapping requests: concurrent overlapping writes have no defined result in NBD.
requests = st.lists(
    st.tuples(st.integers(0, 63), st.integers(1, 8), st.booleans(), st.integers(0, 255)),
    min_size=1,
    max_size=40,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(requests, st.sampled_from([0, 4096, 1 << 20]))
def test_merged_io_produces_the_same_bytes_as_unmerged(tmp_path, reqs, max_merge):
    size = 64 * SECTOR * 2
    initial = os.urandom(size)
    merged_path = make_file(tmp_path / f"m{max_merge}.raw", size, initial)
    expected = bytearray(initial)
    taken: set[int] = set()
    plan = []
    for start, length, is_write, seed in reqs:
        sectors = set(range(start, min(start + length, 128)))
        if sectors & taken:
            continue
        taken |= sectors
        offset, n = start * SECTOR, len(sectors) * SECTOR
        payload = bytes([seed]) * n
        plan.append((offset, n, is_write, payload))
        if is_write:
            expected[offset : offset + n] = payload

    async def go():
        dev = vbd(f"raw:{merged_path}", max_merge=max_merge)
        bufs = {}
        calls = []
        for offset, n, is_write, payload in plan:
            if is_write:
                calls.append(dev.write(offset, memoryview(payload)))
            else:
                bufs[offset] = bytearray(n)
                calls.append(dev.read(offset, memoryview(bufs[offset])))
        await asyncio.gather(*calls)
        await dev.close()
        return bufs

    bufs = asyncio.run(go())
    assert merged_path.read_bytes() == bytes(expected)
    for offset, buf in bufs.items():
        assert buf == initial[offset : offset + len(buf)]


def test_queue_depth_bounds_requests_and_the_rest_wait_for_a_slot(tmp_path):
    path = make_file(tmp_path / "d.raw", 1 << 20)

    async def go():
        dev = vbd(f"raw:{path}", queue_depth=4)
        await dev.pause()
        tasks = [
            asyncio.ensure_future(dev.write(i * 512, memoryview(b"q" * 512))) for i in range(10)
        ]
        await asyncio.sleep(0.05)
        held = (dev.scheduler.in_flight, dev.scheduler.queued, sum(t.done() for t in tasks))
        await dev.unpause()
        await asyncio.gather(*tasks)
        after = dev.scheduler.in_flight
        await dev.close()
        return held, after

    (in_flight, queued, done), after = asyncio.run(go())
    assert (in_flight, queued, done) == (4, 4, 0)
    assert after == 0
    assert path.read_bytes()[: 10 * 512] == b"q" * 5120


def test_flush_completes_after_writes_submitted_before_it(tmp_path):
    path = make_file(tmp_path / "d.raw", 1 << 20)
    order: list[str] = []

    async def go():
        # The write's first attempt fails slowly, so it is still running when the flush starts.
        dev = vbd(f"fault:ops=write,delay=0.2,count=1:raw:{path}", backoff_initial=0.01)

        async def write():
            await dev.write(0, memoryview(b"w" * 4096))
            order.append("write")

        async def flush():
            await dev.flush()
            order.append("flush")

        await asyncio.gather(write(), flush())
        await dev.close()

    asyncio.run(go())
    assert order == ["write", "flush"]


def test_transient_errors_shorter_than_the_deadline_never_reach_the_caller(tmp_path):
    path = make_file(tmp_path / "d.raw", 1 << 20, b"z" * 4096)

    async def go():
        dev = vbd(f"fault:duration=0.5,count=1:raw:{path}", timeout=5)
        buf = bytearray(4096)
        t0 = time.monotonic()
        await dev.read(0, memoryview(buf))
        elapsed = time.monotonic() - t0
        await dev.close()
        return dev, buf, elapsed

    dev, buf, elapsed = asyncio.run(go())
    assert buf == b"z" * 4096
    assert dev.stats.retries > 0
    assert dev.stats.errors == {}
    assert 0.5 <= elapsed < 3


def test_errors_longer_than_the_deadline_reach_the_caller_with_their_errno(tmp_path):
    path = make_file(tmp_path / "d.raw", 1 << 20)

    async def go():
        dev = vbd(f"fault:duration=30,errno=ETIMEDOUT:raw:{path}", timeout=0.5)
        t0 = time.monotonic()
        with pytest.raises(OSError) as info:
            await dev.read(0, memoryview(bytearray(512)))
        elapsed = time.monotonic() - t0
        await dev.close()
        return dev, info.value, elapsed

    dev, exc, elapsed = asyncio.run(go())
    assert exc.errno == errno.ETIMEDOUT
    assert 0.5 <= elapsed < 2
    assert dev.stats.errors == {("read", "ETIMEDOUT"): 1}


def test_permanent_errors_are_not_retried(tmp_path):
    path = make_file(tmp_path / "d.raw", 1 << 20)

    async def go():
        dev = vbd(f"fault:errno=ENOSPC,ops=write,count=1:raw:{path}")
        with pytest.raises(OSError) as info:
            await dev.write(0, memoryview(b"x" * 512))
        await dev.close()
        return dev, info.value

    dev, exc = asyncio.run(go())
    assert exc.errno == errno.ENOSPC
    assert dev.stats.retries == 0


def test_merged_group_with_a_permanent_error_is_retried_request_by_request(tmp_path):
    path = make_file(tmp_path / "d.raw", 1 << 20)

    async def go():
        # One ENOSPC: the merged write fails, then each request alone succeeds.
        dev = vbd(f"fault:errno=ENOSPC,ops=write,count=1:raw:{path}")
        chunks = [memoryview(bytes([65 + i]) * 4096) for i in range(4)]
        await asyncio.gather(*(dev.write(i * 4096, c) for i, c in enumerate(chunks)))
        await dev.close()
        return dev

    dev = asyncio.run(go())
    assert path.read_bytes()[: 4 * 4096] == b"A" * 4096 + b"B" * 4096 + b"C" * 4096 + b"D" * 4096
    assert dev.stats.errors == {}


def test_requests_during_pause_wait_and_run_after_unpause(tmp_path):
    path = make_file(tmp_path / "d.raw", 1 << 20)

    async def go():
        dev = vbd(f"raw:{path}")
        await dev.pause()
        write = asyncio.ensure_future(dev.write(0, memoryview(b"p" * 512)))
        await asyncio.sleep(0.1)
        waited = not write.done()
        await dev.unpause()
        await write
        await dev.close()
        return waited

    assert asyncio.run(go())
    assert path.read_bytes()[:512] == b"p" * 512


def test_pause_does_not_wait_for_a_retrying_request(tmp_path):
    faulty = make_file(tmp_path / "d.raw", 1 << 20, b"r" * 512)

    async def go():
        dev = vbd(f"fault:ops=read,duration=60:raw:{faulty}", timeout=120)
        buf = bytearray(512)
        read = asyncio.ensure_future(dev.read(0, memoryview(buf)))
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        await dev.pause()
        pause_time = time.monotonic() - t0
        await dev.unpause(f"raw:{faulty}")  # the same file without the fault layer
        await read
        await dev.close()
        return pause_time, buf

    pause_time, buf = asyncio.run(go())
    assert pause_time < 2
    assert buf == b"r" * 512


def test_watchdog_logs_a_request_without_progress(tmp_path, caplog):
    path = make_file(tmp_path / "d.raw", 1 << 20)

    async def go():
        dev = vbd(f"fault:duration=0.6,count=1:raw:{path}", watchdog=0.2, timeout=10)
        await dev.read(0, memoryview(bytearray(512)))
        await dev.close()

    with caplog.at_level(logging.WARNING, logger="tapdisk.scheduler"):
        asyncio.run(go())
    assert any(
        "read of 512 bytes at offset 0 has made no progress" in r.message for r in caplog.records
    )


def test_pause_fails_and_the_device_keeps_running_when_the_flush_fails(tmp_path):
    path = make_file(tmp_path / "d.raw", 1 << 20)

    async def go():
        dev = vbd(f"fault:ops=flush,errno=ENOSPC,count=1:raw:{path}")
        with pytest.raises(OSError):
            await dev.pause()
        running = not dev.paused
        await dev.write(0, memoryview(b"k" * 512))
        await dev.close()
        return running

    assert asyncio.run(go())
    assert path.read_bytes()[:512] == b"k" * 512


def test_close_fails_requests_queued_by_a_pause(tmp_path):
    path = make_file(tmp_path / "d.raw", 1 << 20)

    async def go():
        dev = vbd(f"raw:{path}")
        await dev.pause()
        read = asyncio.ensure_future(dev.read(0, memoryview(bytearray(512))))
        await asyncio.sleep(0.05)
        await dev.close()
        with pytest.raises(OSError) as info:
            await read
        return info.value.errno

    assert asyncio.run(go()) == errno.ESHUTDOWN


def test_latency_histogram_counts_every_request(tmp_path):
    path = make_file(tmp_path / "d.raw", 1 << 20)

    async def go():
        dev = vbd(f"raw:{path}")
        for i in range(5):
            await dev.write(i * 512, memoryview(b"l" * 512), fua=True)
        await dev.flush()
        stats = dev.stats_dict()
        await dev.close()
        return stats

    stats = asyncio.run(go())
    assert stats["latency_us"]["count"] == 6
    assert stats["latency_us"]["buckets"][-1] == ["+Inf", 6]
    assert stats["writes"] == 5 and stats["flushes"] == 1 and stats["bytes_written"] == 2560
