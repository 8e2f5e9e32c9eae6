"""The rbd target of bench.py: images in a one-node Ceph cluster (scripts/ceph-dev.sh).

``tapdisk serve rbd:...`` and ``qemu-nbd -f raw --discard=unmap rbd:...`` each serve their own
RBD image (a read-write librbd client takes the image's exclusive lock, so two servers on one
image would measure the lock going back and forth), both imported from bench.py's raw image.
The OSD keeps its data in memory (memstore): there is no page cache to set before a job, and
the numbers are librbd's and the servers', not a disk's.  ``rbd bench`` on a third copy, with
the workloads' pattern, size and depth, is printed as the ceiling: librbd with no NBD and no
server in the way (for writes with librbd's cache on and off), taken in every round beside
the servers.

The cluster lives in the target's work directory (``ceph/``) and is stopped by ``stop``.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

CEPH_DEV = Path(__file__).resolve().parent.parent / "scripts" / "ceph-dev.sh"
#: The RBD image of the target (bench.py's ``Server.image_for`` derives each server's from it).
IMAGE = Path("rbd/image")


def conf_of(workdir: Path) -> Path:
    return workdir / "ceph" / "ceph.conf"


def spec(image: Path, sock: Path) -> str:
    """qemu's (and tapdisk's) spec of ``image`` in the cluster of the target beside ``sock``."""
    return f"rbd:{image}:conf={conf_of(sock.parent)}"


def tapdisk_argv(tapdisk: Callable[[], str]) -> Callable[[Path, Path], list[str]]:
    """``tapdisk serve`` of the image; ``tapdisk()`` finds the command when a run starts."""

    def argv(sock: Path, image: Path) -> list[str]:
        return [
            tapdisk(),
            "--log-level",
            "warning",
            "serve",
            "--unix",
            str(sock),
            spec(image, sock),
        ]

    return argv


def qemu_nbd_argv(sock: Path, image: Path) -> list[str]:
    """qemu-nbd as it serves RBD in production: format raw over the rbd protocol, discards
    passed down, up to 4 clients for the two-connection job."""
    return [
        "qemu-nbd",
        "-f",
        "raw",
        "--discard=unmap",
        "-t",
        "-e",
        "4",
        "-k",
        str(sock),
        spec(image, sock),
    ]


def make_images(raw: Path, workdir: Path, servers: tuple[str, ...]) -> Path:
    """Start the cluster and import ``raw`` as ``rbd/image`` and ``rbd/SERVER-image`` each."""
    subprocess.run(
        ["bash", str(CEPH_DEV), "start", str(workdir / "ceph")],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    for name in ("", *(f"{server}-" for server in servers)):
        rbd(workdir, "import", "--no-progress", str(raw), f"rbd/{name}image")
    return IMAGE


def rbd(workdir: Path, *args: str) -> str:
    proc = subprocess.run(
        ["rbd", "-c", str(conf_of(workdir)), *args], check=True, capture_output=True, text=True
    )
    return proc.stdout


#: What ``ceiling`` measures, as bench.py's samples: (bytes/s, IOPS, 0: no latency).
Sample = tuple[float, float, float]
#: The ceiling's columns: librbd as tapdisk runs it (no cache), and with its cache.
UNCACHED, CACHED = "rbd bench", "rbd bench cached"
#: Bytes per request of the workloads' block sizes.
BLOCK_SIZES = {"4k": 4096, "1m": 1 << 20}
#: Bytes one ``rbd bench`` run moves, by block size.
VOLUMES = {"4k": 256 << 20, "1m": 4 << 30}


def ceiling(workdir: Path, rw: str, bs: str, iodepth: int, numjobs: int) -> dict[str, Sample]:
    """``rbd bench`` with a fio workload's shape, on ``rbd/image``: column name -> sample.

    ``UNCACHED`` is librbd without its cache, as tapdisk runs it (a write is acknowledged
    once it is in the cluster; reads, which the cache's default write-around mode does not
    serve, are measured this way only).  A write workload is measured with the cache on too
    (``CACHED``: Ceph's default, and what qemu-nbd's default writeback mode asks for).
    """
    uncached = rbd_bench(workdir, rw, bs, iodepth * numjobs, cached=False)
    if "write" not in rw:
        return {UNCACHED: uncached}
    return {UNCACHED: uncached, CACHED: rbd_bench(workdir, rw, bs, iodepth * numjobs, cached=True)}


def rbd_bench(workdir: Path, rw: str, bs: str, threads: int, *, cached: bool) -> Sample:
    """One ``rbd bench`` run of ``VOLUMES[bs]`` bytes in a fio workload's pattern."""
    pattern = "rand" if rw.startswith("rand") else "seq"
    io_type = "write" if "write" in rw else "read"
    out = rbd(
        workdir,
        *(() if cached else ("--rbd-cache=false",)),
        "bench",
        "--io-type",
        io_type,
        "--io-pattern",
        pattern,
        "--io-size",
        str(BLOCK_SIZES[bs]),
        "--io-threads",
        str(threads),
        "--io-total",
        str(VOLUMES[bs]),
        str(IMAGE),
    )
    match = re.search(r"ops/sec:\s*(\S+)", out)
    if match is None:
        raise RuntimeError(f"bench: rbd bench printed no summary: {out.strip()[-200:]}")
    iops = float(match[1])
    return iops * BLOCK_SIZES[bs], iops, 0.0


def stop(workdir: Path) -> None:
    subprocess.run(["bash", str(CEPH_DEV), "stop", str(workdir / "ceph")], check=False)
