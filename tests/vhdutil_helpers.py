"""Helpers the ``vhd-util`` tests share: running the tool, and images with known data."""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import require, run
from image_helpers import write_all
from tapdisk.drivers.vhd.image import VhdImage

MiB = 1 << 20
VHD_UTIL = str(Path(sys.executable).with_name("vhd-util"))


def vhd_util(*args: object, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run vhd-util; the completed process, whatever its status."""
    return subprocess.run(
        [VHD_UTIL, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        **kwargs,  # type: ignore[arg-type]
    )


def vhd_util_bytes(*args: object) -> subprocess.CompletedProcess[bytes]:
    """Run vhd-util for raw output (``read -B``, ``-m``, ``-r``...)."""
    return subprocess.run(
        [VHD_UTIL, *map(str, args)], capture_output=True, timeout=120, check=False
    )


def file_size_limit(limit: int):  # type: ignore[no-untyped-def]
    """A ``preexec_fn`` that caps the size of any file the child writes (RLIMIT_FSIZE): past
    it a write fails with EFBIG, as on a full disk (Python ignores SIGXFSZ)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def ok(*args: object) -> str:
    """vhd-util's stdout; fails the test unless it exits 0."""
    proc = vhd_util(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def our_vhd(path: Path, size_mb: int, writes: list[tuple[int, bytes]], *create: str) -> Path:
    """A VHD made by ``vhd-util create`` holding ``writes`` (written through our driver)."""
    ok("create", "-n", path, "-s", size_mb, *create)
    if writes:
        write_all(f"vhd:{path}", writes)
    return path


def qemu_vhd(path: Path, size: str, *io_cmds: str) -> Path:
    """A dynamic VHD made by ``qemu-img create -f vpc``, then written by ``qemu-io``."""
    run(require("qemu-img"), "create", "-q", "-f", "vpc", path, size)
    if io_cmds:
        argv: list[str | Path] = [require("qemu-io"), "-f", "vpc"]
        for cmd in io_cmds:
            argv += ["-c", cmd]
        run(*argv, path)
    return path


def read_prefix(path: Path, length: int) -> bytes:
    """The first ``length`` bytes of a VHD as our driver reads them (through its chain)."""
    buf = bytearray(length)

    async def go() -> None:
        image = VhdImage(str(path), read_only=True, allowed_dirs=("/",))
        try:
            await image.read(0, memoryview(buf))
        finally:
            await image.close()

    asyncio.run(go())
    return bytes(buf)


#: The system calls by which vhd-util changes files; a kill before any one of them
#: reaches every state a crash can leave.
MUTATING = ("pwrite64", "fsync", "ftruncate", "fallocate", "unlink")


def _strace(*options: str) -> list[str]:
    return [require("strace"), "-f", "-qq", *options]


def traced_calls(source: Path, workdir: Path, *args: object) -> list[str]:
    """The mutating system calls (strace lines) of ``vhd-util ARGS``, run in a copy of the
    directory ``source`` made at ``workdir`` (``ARGS`` name its files relative to it)."""
    shutil.copytree(source, workdir)
    log = workdir.parent / f"{workdir.name}.strace"
    argv = [*_strace("-o", str(log), "-e", f"trace={','.join(MUTATING)}"), VHD_UTIL]
    proc = subprocess.run(
        [*argv, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
        cwd=workdir,
    )
    assert proc.returncode == 0, proc.stderr
    return [line.split(None, 1)[1] for line in log.read_text().splitlines()]


def killed_at(
    call: str, nth: int, *args: object, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``vhd-util ARGS`` SIGKILLed as it enters its ``nth`` ``call`` (strace fault injection)."""
    argv = [*_strace("-o", os.devnull, "-e", f"trace={call}")]
    argv += ["-e", f"inject={call}:signal=KILL:when={nth}", VHD_UTIL, *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=_env(), cwd=cwd)


def _env() -> dict[str, str]:
    # No bytecode written on the way: the only files touched are the ones under test.
    return {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
