"""Logging of tapdisk processes: journald priority prefixes, device names, rate limiting.

Each test runs a real Python process that sets up tapdisk's logging and reads what it
wrote on its stderr, which is a pipe whose device and inode the test can name in
``$JOURNAL_STREAM`` exactly as systemd does for a service.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nbd
from helpers import TAPDISK, run

from tapdisk.logs import BURST, RateLimit, priority


def run_logging(code: str, journal: bool | str = False, level: str = "debug") -> list[str]:
    """Run ``code`` after ``logs.setup(level)`` in a new process; its stderr lines."""
    script = "import logging\nfrom tapdisk import logs\n"
    script += f"logs.setup({level!r})\nlog = logging.getLogger('tapdisk')\n"
    script += textwrap.dedent(code)
    read_end, write_end = os.pipe()
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    if journal is True:
        st = os.fstat(write_end)
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    elif journal:
        env["JOURNAL_STREAM"] = journal
    with os.fdopen(read_end, "rb") as reader:
        proc = subprocess.Popen([sys.executable, "-c", script], stderr=write_end, env=env)
        os.close(write_end)
        output = reader.read().decode()
    assert proc.wait(30) == 0, output
    return output.splitlines()


def test_journal_stream_gets_syslog_priority_prefixes():
    lines = run_logging(
        """\
        log.debug("d"); log.info("i"); log.warning("w"); log.error("e"); log.critical("c")
        """,
        journal=True,
    )
    assert lines == ["<7>d", "<6>i", "<4>w", "<3>e", "<2>c"]


def test_every_line_of_a_traceback_carries_the_prefix():
    lines = run_logging(
        """\
        try:
            1 / 0
        except ZeroDivisionError:
            log.exception("boom")
        """,
        journal=True,
    )
    assert lines[0] == "<3>boom"
    assert len(lines) > 3
    assert all(line.startswith("<3>") for line in lines)
    assert lines[-1] == "<3>ZeroDivisionError: division by zero"


def test_journal_stream_of_another_file_means_plain_lines():
    # A child whose stderr was redirected inherits JOURNAL_STREAM but is not the journal.
    lines = run_logging('log.error("e")\n', journal="1:2")
    assert len(lines) == 1
    assert not lines[0].startswith("<")
    assert lines[0].endswith(": error: e")


def test_plain_lines_name_the_program_and_pid():
    lines = run_logging('import os; log.warning("pid %d", os.getpid())\n')
    (line,) = lines
    pid = line.rpartition(" ")[2]
    assert line == f"tapdisk[{pid}]: warning: pid {pid}"


def test_log_level_hides_lower_levels():
    lines = run_logging('log.debug("d"); log.info("i"); log.error("e")\n', level="warning")
    assert [line.rpartition(": ")[2] for line in lines] == ["e"]


def test_device_logger_names_the_device():
    lines = run_logging(
        """\
        dev = logs.device_logger("nbd3")
        dev.error("read at %d failed: %s", 4096, "EIO")
        """,
        journal=True,
    )
    assert lines == ["<3>nbd3: read at 4096 failed: EIO"]


def test_identical_errors_are_rate_limited_and_counted_at_exit():
    lines = run_logging(
        """\
        dev = logs.device_logger("nbd0")
        for offset in range(1000):
            dev.error("read at %d failed: EIO", offset * 4096)
        """,
        journal=True,
    )
    assert len(lines) == BURST + 1
    assert lines[0] == "<3>nbd0: read at 0 failed: EIO"
    assert "identical messages suppressed for" in lines[BURST - 1]
    summary = f"({1000 - BURST} identical messages suppressed)"
    assert lines[-1] == f"<3>nbd0: read at {999 * 4096} failed: EIO {summary}"


def test_rate_limit_is_per_device():
    lines = run_logging(
        """\
        for i in range(100):
            for name in ("nbd0", "nbd1"):
                logs.device_logger(name).error("flush failed")
        """,
        journal=True,
    )
    for name in ("nbd0", "nbd1"):
        mine = [line for line in lines if line.startswith(f"<3>{name}: ")]
        assert len(mine) == BURST + 1
        assert mine[-1].endswith(f"({100 - BURST} identical messages suppressed)")


def test_rate_limit_keys_on_the_first_argument_as_the_subject():
    # The VBD logs "%s: ..." with the device name first; minors differ, so all get through.
    lines = run_logging(
        """\
        for minor in range(3 * logs.BURST):
            log.info("minor %d: opened", minor)
        """,
        journal=True,
    )
    assert len(lines) == 3 * BURST


def test_debug_messages_are_never_rate_limited():
    lines = run_logging('for i in range(50): log.debug("tick")\n', journal=True)
    assert lines == ["<7>tick"] * 50


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def record(msg: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord("tapdisk", level, __file__, 1, msg, args, None)


def test_messages_get_through_again_after_the_interval_with_the_count():
    clock = Clock()
    limit = RateLimit(burst=2, interval=10, clock=clock)
    passed = [limit.filter(record("%s: failed", "nbd0")) for _ in range(5)]
    assert passed == [True, True, False, False, False]
    clock.now = 10.0
    again = record("%s: failed", "nbd0")
    assert limit.filter(again)
    assert again.getMessage() == "nbd0: failed (3 identical messages suppressed before this one)"
    assert limit.drain() == []


def test_rate_limit_memory_is_bounded():
    limit = RateLimit(burst=1, interval=60, max_keys=8, clock=Clock())
    for i in range(1000):
        limit.filter(record(f"message {i}"))
    assert len(limit._windows) == 8


def test_priorities_follow_sd_daemon():
    assert [priority(n) for n in (50, 40, 30, 20, 10, 25, 5)] == [2, 3, 4, 6, 7, 6, 7]


def test_failing_disk_in_a_real_daemon_cannot_flood_the_journal(tmp_path):
    """32 requests on a disk that always fails with EIO: retried, logged a few times only."""
    directory = tmp_path / "run"
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\0" * (4 << 20))
    read_end, write_end = os.pipe()
    st = os.fstat(write_end)
    env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    daemon = subprocess.Popen(
        [TAPDISK, "daemon", "--control-dir", str(directory)], stderr=write_end, env=env
    )
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        try:
            deadline = time.monotonic() + 30
            while not (directory / f"ctl{daemon.pid}").exists():
                assert time.monotonic() < deadline, "the daemon did not start"
                time.sleep(0.05)
            tapctl = Path(sys.executable).with_name("tap-ctl")
            spec = f"fault:duration=600,ops=write:raw:{image}"
            opened = run(
                tapctl, "open", "--control-dir", directory, "-p", str(daemon.pid), "-t", "1",
                "-a", spec,
            )  # fmt: skip
            h = nbd.NBD()
            h.connect_uri(f"nbd+unix:///?socket={opened.strip()}")
            for i in range(32):
                h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(4096)), i * 65536)  # not merged
            while h.aio_in_flight() > 0:
                h.poll(-1)
            h.shutdown()
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)
        lines = reader.read().decode().splitlines()
    assert all(line[:3] in ("<3>", "<4>", "<6>", "<7>") for line in lines), lines
    retrying = [line for line in lines if line.endswith(", retrying")]
    assert len(retrying) == BURST - 1  # the BURST-th carries the "suppressed" note
    assert all(line.startswith("<6>minor 0: write of 4096 bytes at offset ") for line in retrying)
    summary = [line for line in lines if "identical messages suppressed)" in line]
    assert len(summary) == 1
    assert summary[0].startswith("<6>minor 0: write of 4096 bytes at offset ")
    assert summary[0].endswith(f"({32 - BURST} identical messages suppressed)")
