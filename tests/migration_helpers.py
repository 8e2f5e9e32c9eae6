"""Live-migration test helpers: libnbd writers that keep a model of the disk, sources,
targets, and the checks the migration tests share."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import nbd
from helpers import require, run
from tapctl_helpers import nbd_uri

SIZE = 64 << 20
MiB = 1 << 20


class Writer(threading.Thread):
    """Writes, zeroes, trims and reads back at random in ``[lo, hi)`` over NBD, keeping the
    expected contents in ``ref``."""

    def __init__(self, sock: str, ref: bytearray, seed: int, lo: int, hi: int) -> None:
        super().__init__(daemon=True)
        self.uri = nbd_uri(sock)
        self.ref = ref
        self.lo, self.hi = lo, hi
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.ops = 0
        self.started_ops = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            h = nbd.NBD()
            h.connect_uri(self.uri)
            while not self.stop.is_set():
                self.step(h)
                self.ops += 1
                if self.ops == 20:
                    self.started_ops.set()
            h.flush()
            h.shutdown()
        except BaseException as exc:  # reported by finish()
            self.error = exc
            self.started_ops.set()

    def step(self, h: nbd.NBD) -> None:
        rng, ref = self.rng, self.ref
        length = rng.choice([4096, 65536, 300 * 1024, MiB])
        offset = rng.randrange(self.lo, self.hi - length) // 512 * 512
        kind = rng.random()
        if kind < 0.7:
            data = rng.randbytes(length)
            h.pwrite(data, offset)
            ref[offset : offset + length] = data
        elif kind < 0.85:
            h.zero(length, offset)
            ref[offset : offset + length] = bytes(length)
        else:  # a hint: the range then reads as zeros or as before, as the format trims
            h.trim(length, offset)
            ref[offset : offset + length] = h.pread(length, offset)
        offset = rng.randrange(self.lo, self.hi - MiB)
        if h.pread(MiB, offset) != ref[offset : offset + MiB]:
            raise AssertionError(f"read at {offset} differs from what was written")

    def finish(self) -> None:
        self.stop.set()
        self.join(60)
        assert not self.is_alive(), "the writer hung"
        if self.error is not None:
            raise self.error
        assert self.ops >= 20


class Writers:
    """One ``Writer`` per quarter of the disk, each on its own connection."""

    def __init__(self, sock: str, ref: bytearray, seed: int) -> None:
        quarter = SIZE // 4
        self.writers = [
            Writer(sock, ref, seed * 10 + i, i * quarter, (i + 1) * quarter) for i in range(4)
        ]
        for writer in self.writers:
            writer.start()
        for writer in self.writers:
            assert writer.started_ops.wait(60)

    @property
    def ops(self) -> int:
        return sum(writer.ops for writer in self.writers)

    def go_on(self, ops: int) -> None:
        """Wait for ``ops`` more operations of every writer."""
        goal = [writer.ops + ops for writer in self.writers]
        for writer, target in zip(self.writers, goal, strict=True):
            while writer.ops < target:
                assert writer.is_alive(), writer.error
                time.sleep(0.005)

    def finish(self) -> None:
        for writer in self.writers:
            writer.finish()


def source_qcow2(tmp_path: Path) -> tuple[Path, bytearray]:
    """A sparse qcow2 source with 48 MiB of data in three runs, and its contents."""
    path = tmp_path / "source.qcow2"
    run(require("qemu-img"), "create", "-q", "-f", "qcow2", path, str(SIZE))
    ref = bytearray(SIZE)
    commands = []
    for i, start in enumerate((0, 20 * MiB, 44 * MiB)):
        commands += ["-c", f"write -P {0x30 + i} {start} {16 * MiB}"]
        ref[start : start + 16 * MiB] = bytes([0x30 + i]) * (16 * MiB)
    run(require("qemu-io"), "-f", "qcow2", *commands, path)
    return path, ref


def old_target(path: Path, size: int = SIZE) -> Path:
    """A raw target full of old data, which must all be gone after the copy."""
    run(require("qemu-img"), "create", "-q", "-f", "raw", path, str(size))
    run(require("qemu-io"), "-f", "raw", "-c", f"write -P 0x99 0 {size}", path)
    return path


def holds_open(pid: int, path: Path) -> bool:
    fds = Path(f"/proc/{pid}/fd")
    return any(str(path) == str(fd.readlink()) for fd in fds.iterdir())


def compare_with(ref: bytearray, image: Path, fmt: str, tmp_path: Path) -> None:
    expected = tmp_path / "expected.img"
    expected.write_bytes(ref)
    result = run(
        require("qemu-img"), "compare", "-f", fmt, "-F", "raw", image, expected, check=False
    )
    assert result.startswith("Images are identical"), result
