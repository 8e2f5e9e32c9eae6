"""The fault: layer — error episodes over a real raw image, and its spec syntax."""

from __future__ import annotations

import asyncio
import errno
import time

import nbd
import pytest
from helpers import require, run
from tapdisk.drivers.base import ImageError
from tapdisk.drivers.fault import OPERATIONS, FaultImage, FaultPlan
from tapdisk.drivers.registry import open_image


def attempt(image: FaultImage, op: str = "read") -> int:
    """Run one operation; 0 on success, else its errno."""

    async def go() -> None:
        if op == "read":
            await image.read(0, memoryview(bytearray(512)))
        elif op == "write":
            await image.write(0, memoryview(b"x" * 512))
        else:
            await image.flush()

    try:
        asyncio.run(go())
    except OSError as exc:
        return exc.errno or -1
    return 0


def open_fault(spec_options: str, path) -> FaultImage:
    image = open_image(f"fault:{spec_options}:raw:{path}")
    assert isinstance(image, FaultImage)
    return image


def test_spec_opens_the_inner_image_with_its_size(raw_image):
    path = raw_image("8M")
    image = open_fault("rate=0", path)
    assert image.size == 8 << 20
    assert image.spec == f"fault:rate=0:raw:{path}"


def test_burst_fails_that_many_operations_then_one_passes(raw_image):
    image = open_fault("rate=1,burst=3", raw_image("1M"))
    results = [attempt(image) for _ in range(8)]
    assert results == [errno.EIO] * 3 + [0] + [errno.EIO] * 3 + [0]


def test_count_limits_the_number_of_episodes(raw_image):
    image = open_fault("rate=1,burst=2,count=1", raw_image("1M"))
    assert [attempt(image) for _ in range(6)] == [errno.EIO, errno.EIO, 0, 0, 0, 0]
    assert image.exhausted


def test_duration_episode_ends_after_its_seconds(raw_image):
    image = open_fault("rate=1,duration=0.3,count=1", raw_image("1M"))
    assert attempt(image) == errno.EIO
    assert attempt(image) == errno.EIO
    time.sleep(0.35)
    assert attempt(image) == 0


def test_rate_zero_never_fails(raw_image):
    image = open_fault("rate=0,burst=5", raw_image("1M"))
    assert all(attempt(image) == 0 for _ in range(20))


def test_rate_is_a_probability_repeatable_with_a_seed(raw_image):
    path = raw_image("1M")
    image_a = open_fault("rate=0.5,seed=7", path)
    image_b = open_fault("rate=0.5,seed=7", path)
    a = [attempt(image_a) for _ in range(200)]
    b = [attempt(image_b) for _ in range(200)]
    assert a == b
    assert 40 < a.count(errno.EIO) < 160


def test_errno_option_sets_the_error(raw_image):
    image = open_fault("errno=ENOSPC,count=1", raw_image("1M"))
    assert attempt(image, "write") == errno.ENOSPC


def test_ops_option_spares_other_operations(raw_image):
    image = open_fault("ops=write,rate=1,burst=100", raw_image("1M"))
    assert attempt(image, "read") == 0
    assert attempt(image, "flush") == 0
    assert attempt(image, "write") == errno.EIO


@pytest.mark.parametrize("op", OPERATIONS)
def test_ops_option_fails_exactly_the_operation_it_names(raw_image, op):
    image = open_fault(f"ops={op},rate=1,burst=100", raw_image("1M"))
    buf = memoryview(bytearray(512))
    calls = {
        "read": lambda: image.read(0, buf),
        "write": lambda: image.write(0, buf),
        "flush": image.flush,
        "zero": lambda: image.write_zeroes(0, 512),
        "discard": lambda: image.discard(0, 512),
    }

    async def go() -> dict[str, int]:
        results = {}
        for name, call in calls.items():
            try:
                await call()
                results[name] = 0
            except OSError as exc:
                results[name] = exc.errno or -1
        await image.close()
        return results

    assert asyncio.run(go()) == {name: errno.EIO if name == op else 0 for name in OPERATIONS}


def test_start_delays_the_first_episode(raw_image):
    image = open_fault("start=0.3,count=1", raw_image("1M"))
    assert attempt(image) == 0
    time.sleep(0.35)
    assert attempt(image) == errno.EIO


def test_delay_makes_a_failure_slow(raw_image):
    image = open_fault("delay=0.2,count=1", raw_image("1M"))
    t0 = time.monotonic()
    assert attempt(image) == errno.EIO
    assert time.monotonic() - t0 >= 0.2


def test_page_cache_shortcut_is_off_while_faults_can_happen(raw_image):
    image = open_fault("count=1", raw_image("1M"))
    assert not image.read_nowait(0, memoryview(bytearray(512)))
    assert attempt(image) == errno.EIO
    assert attempt(image) == 0  # the episode is over and none is left
    assert image.exhausted


def test_data_passes_through_unchanged(raw_image):
    path = raw_image("1M", "write -P 0x3c 4096 4096")
    image = open_fault("rate=0", path)
    buf = bytearray(4096)
    asyncio.run(image.read(4096, memoryview(buf)))
    assert buf == b"\x3c" * 4096


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("rate=2", "rate=.*between 0 and 1"),
        ("burst=-1", "burst=.*negative"),
        ("errno=ENOTANERRNO", "unknown errno"),
        ("ops=read+explode", "unknown operation.*explode"),
        ("colour=red", "colour=.*unknown option"),
        ("rate", "expected KEY=VALUE"),
    ],
)
def test_bad_option_is_an_error_naming_it(raw_image, options, message):
    with pytest.raises(ImageError, match=message):
        open_image(f"fault:{options}:raw:{raw_image('1M')}")


def test_missing_inner_spec_is_an_error():
    with pytest.raises(ImageError, match="expected fault:OPTIONS:TYPE:PATH"):
        open_image("fault:rate=1")


def test_plan_defaults_fail_every_operation_class():
    plan = FaultPlan.parse("-")
    assert plan.rate == 1.0
    assert plan.ops == frozenset({"read", "write", "flush", "zero", "discard"})


def test_without_a_vbd_an_injected_error_reaches_the_nbd_client(serve, raw_image):
    served = serve(f"fault:count=1:raw:{raw_image('1M')}")
    proc_out = run(
        require("qemu-io"),
        "-f",
        "raw",
        "-c",
        "read 0 4k",
        "-c",
        "read 0 4k",
        served.uri(),
        check=False,
    )
    assert "Input/output error" in proc_out or "I/O error" in proc_out
    assert "read 4096/4096 bytes" in proc_out


def test_an_outage_fails_every_operation_in_its_window_page_cache_hits_included(raw_image):
    image = open_fault("duration=1.5,count=1", raw_image("1M", "write -P 1 0 4k"))
    buf = memoryview(bytearray(4096))

    async def each_operation() -> list[int]:
        results = []
        for call in (
            lambda: image.read(0, buf),
            lambda: image.write(0, buf),
            image.flush,
            lambda: image.write_zeroes(0, 4096),
        ):
            try:
                await call()
                results.append(0)
            except OSError as exc:
                results.append(exc.errno or -1)
        return results

    async def go() -> None:
        assert (await each_operation())[0] == errno.EIO  # the outage begins
        assert not image.read_nowait(0, buf) and not image.write_nowait(0, buf)
        for _ in range(10):
            assert await each_operation() == [errno.EIO] * 4
        await asyncio.sleep(1.55)
        assert await each_operation() == [0] * 4  # the outage is over, the only one
        assert image.exhausted and image.read_nowait(0, buf) and image.write_nowait(0, buf)
        for _ in range(10):
            assert await each_operation() == [0] * 4
        await image.close()

    asyncio.run(go())


def test_count_is_the_number_of_outages(raw_image):
    image = open_fault("burst=2,count=2", raw_image("1M"))
    results = [attempt(image) for _ in range(8)]
    assert results == [errno.EIO, errno.EIO, 0, errno.EIO, errno.EIO, 0, 0, 0]
    assert image.episodes == 2 and image.exhausted


def test_an_outage_fails_cached_reads_of_an_nbd_client(serve, raw_image):
    served = serve(f"fault:duration=1.5,count=1:raw:{raw_image('1M', 'write -P 5 0 4k')}")
    h = nbd.NBD()
    h.connect_uri(served.uri())
    outcomes = []
    started = time.monotonic()
    while time.monotonic() - started < 1.0:  # well inside the outage
        try:
            h.pread(4096, 0)
            outcomes.append("ok")
        except nbd.Error as exc:
            outcomes.append(exc.errno)
    time.sleep(0.6)
    assert set(outcomes) == {"EIO"} and len(outcomes) > 10
    assert h.pread(4096, 0) == b"\x05" * 4096
    h.shutdown()
