"""CBT helpers the tests share: blktap's log layout packed by hand, the cbt-util command,
and writes into given blocks through a tapdisk's NBD socket.

The expected files are packed here from blktap 4.0.8's layout (48-byte
little-endian header: parent, child, consistent, 4 bytes padding, size; then
one bit per 64 KiB block, least significant first), never through the code
under test.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import uuid
from collections.abc import Iterable
from pathlib import Path

import nbd
from tapctl_helpers import nbd_uri

CBT_UTIL = str(Path(sys.executable).with_name("cbt-util"))
BLOCK = 64 * 1024


def header(
    size: int,
    parent: uuid.UUID | None = None,
    child: uuid.UUID | None = None,
    consistent: int = 0,
) -> bytes:
    """blktap's struct cbt_log_metadata on x86-64, packed field by field."""
    return (
        (parent.bytes if parent else bytes(16))
        + (child.bytes if child else bytes(16))
        + struct.pack("<i", consistent)
        + bytes(4)
        + struct.pack("<Q", size)
    )


def bitmap_bytes(size: int) -> int:
    return ((size + BLOCK - 1) // BLOCK + 7) // 8


def bitmap_of(size: int, blocks: Iterable[int]) -> bytes:
    out = bytearray(bitmap_bytes(size))
    for b in blocks:
        out[b // 8] |= 1 << (b % 8)
    return bytes(out)


def blocks_in(bitmap: bytes) -> set[int]:
    """The blocks whose bits are set."""
    return {i * 8 + k for i, byte in enumerate(bitmap) if byte for k in range(8) if byte >> k & 1}


def write_log(path: Path, size: int, blocks: Iterable[int] = (), **fields: object) -> Path:
    """A log as blktap writes it: header then bitmap."""
    path.write_bytes(header(size, **fields) + bitmap_of(size, blocks))  # type: ignore[arg-type]
    return path


def cbt_util(*args: object, text: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CBT_UTIL, *map(str, args)], capture_output=True, text=text, timeout=60, check=False
    )


def ok(*args: object) -> str:
    """cbt-util's stdout; fails the test unless it exits 0 with nothing on stderr."""
    proc = cbt_util(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""
    return proc.stdout


def new_log(path: Path, size: int, blocks: Iterable[int] = ()) -> Path:
    """A log made by ``cbt-util create`` (as SM makes them), with ``blocks`` then marked."""
    ok("create", "-n", path, "-s", size)
    blocks = set(blocks)
    if blocks:
        data = bytearray(path.read_bytes())
        data[48:] = bitmap_of(size, blocks)
        path.write_bytes(data)
    return path


def marked(log: Path) -> set[int]:
    """Blocks set in the log, from the bitmap ``cbt-util get -b`` prints."""
    proc = cbt_util("get", "-n", log, "-b", text=False)
    assert proc.returncode == 0, proc.stderr
    return blocks_in(proc.stdout)


def write_blocks(sock: str, blocks: Iterable[int], fill: bytes = b"w") -> None:
    """A 4 KiB write inside each of ``blocks``, through the NBD socket ``sock``."""
    h = nbd.NBD()
    h.connect_uri(nbd_uri(sock))
    for block in blocks:
        h.pwrite(fill * 4096, block * BLOCK + 8192)
    h.shutdown()
