"""SIGKILL during writes never corrupts a qcow2 image and never loses a flushed write."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from helpers import run
from image_helpers import qemu_img
from qcow2_crash_writer import FLUSH_EVERY, piece

WRITER = str(Path(__file__).with_name("qcow2_crash_writer.py"))
SLOT = 8 * 1024
SIZE = 64 * 1024 * 1024


def test_sigkill_at_random_moments_keeps_flushed_writes(tmp_path: Path) -> None:
    path = tmp_path / "crash.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=16k", path, str(SIZE))
    rng = random.Random(7)
    expected: dict[int, int] = {}  # slot -> round whose write to it was flushed
    deadline = time.monotonic() + 30
    rounds = 0
    while time.monotonic() < deadline:
        rounds += 1
        slots = list(range(SIZE // SLOT))
        rng.shuffle(slots)
        slot_file = tmp_path / "slots"
        slot_file.write_text("\n".join(map(str, slots)))
        proc = subprocess.Popen(
            [sys.executable, WRITER, str(path), str(SLOT), str(rounds), str(slot_file)],
            stdout=subprocess.PIPE,
            text=True,
        )
        flushed = [0]

        def reader(p: subprocess.Popen[str] = proc, box: list[int] = flushed) -> None:
            assert p.stdout is not None
            for line in p.stdout:
                box[0] = int(line.split()[1])

        t = threading.Thread(target=reader)
        t.start()
        time.sleep(rng.uniform(0.2, 0.7))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        t.join()
        n = flushed[0]
        for slot in slots[:n]:
            expected[slot] = rounds
        for slot in slots[n : n + FLUSH_EVERY]:  # maybe written, never flushed
            expected.pop(slot, None)
        check = subprocess.run(
            ["qemu-img", "check", "-f", "qcow2", str(path)], capture_output=True, text=True
        )
        assert check.returncode in (0, 3), f"round {rounds}:\n{check.stdout}{check.stderr}"
    raw = tmp_path / "crash.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", path, raw)
    data = raw.read_bytes()
    for slot, seed in expected.items():
        off, expect = piece(slot, seed, SLOT)
        assert data[off : off + len(expect)] == expect, f"lost flushed write to slot {slot}"
    assert rounds >= 10 and expected
