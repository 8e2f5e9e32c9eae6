#!/usr/bin/env python3
"""Benchmark ``tapdisk serve`` against qemu-nbd and nbdkit with fio's nbd ioengine.

Every server serves the same image over a unix socket, all in one run, and fio (one libnbd
connection per fio job) drives each in turn. The image is a fully written 1 GiB raw file: on a
sparse one the servers would answer reads with holes and move no data.

Page cache: the image lives on a real file system and every server opens it through the page
cache, whose state is set before each job so that every server meets the same one. On Linux
6.16 and later ext4 caches files in large folios, and how large they are depends on how the
pages came in; it changes the cost of I/O more than most server differences do (a 4 KiB write
into a cached folio walks all of its buffer heads; reads from the scattered small folios that
random writes leave are slower). So:

- before each write job the file is written back and dropped from the cache: every server
  writes into an image with nothing cached;
- before each read job the whole file is read once, so every server reads a warm image; when
  a write job ran since the last read job, the file is dropped first, so the reads meet the
  large folios of a sequential read-through rather than the scraps the writes left;
- after each write job the image is fdatasync'ed outside the timed part, so dirty pages left
  by one server are not written back during the next server's job.

The comparison is a table of targets: a target is one image format, how to make that image
from the raw one, and the servers that serve it (tapdisk first; the ratios are tapdisk over
each peer). A new format is one more ``Target`` in ``TARGETS``, e.g. VHD: an image made with
``qemu-img convert -O vpc`` and the servers ``tapdisk_server("vhd")`` and
``qemu_nbd_server("vpc")``.

Run it from the checkout's venv: ``.venv/bin/python bench/bench.py --quick``. It is a
measuring tool, not a test; numbers from a busy machine are noise.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import ceph_target

IMAGE_SIZE = 1 << 30
CHUNK = 1 << 20
#: Seconds per job (after the ramp) for --quick and for a normal run.
QUICK_RUNTIME, QUICK_RAMP = 5, 1
NORMAL_RUNTIME, NORMAL_RAMP = 20, 3
#: --quick fits all its fio jobs into this many seconds: each job gets an equal share (at most
#: QUICK_RUNTIME after QUICK_RAMP, at least MIN_RUNTIME), so a new target shortens the jobs
#: instead of lengthening the run past 3 minutes.
QUICK_BUDGET = 150.0
MIN_RUNTIME = 2
#: Time around each job: fio start-up, page-cache warming, sync (about 0.6 s measured here).
JOB_OVERHEAD = 0.8
READY_TIMEOUT = 30.0


@dataclass(frozen=True)
class Workload:
    """One fio job: ``numjobs`` connections, each with ``iodepth`` requests in flight."""

    name: str
    rw: str
    bs: str
    iodepth: int
    numjobs: int = 1

    @property
    def writes(self) -> bool:
        return "write" in self.rw


WORKLOADS: tuple[Workload, ...] = (
    Workload("seqread-1m-qd8", "read", "1m", 8),
    Workload("seqwrite-1m-qd8", "write", "1m", 8),
    Workload("randread-4k-qd1", "randread", "4k", 1),
    Workload("randread-4k-qd16", "randread", "4k", 16),
    Workload("randread-4k-qd64", "randread", "4k", 64),
    Workload("randwrite-4k-qd16", "randwrite", "4k", 16),
    Workload("randread-4k-qd16-2conn", "randread", "4k", 16, numjobs=2),
)


#: (unix socket, image) -> the server's command line, running in the foreground.
Argv = Callable[[Path, Path], list[str]]


@dataclass(frozen=True)
class Server:
    """A server to compare; ``default`` ones run unless ``--only`` names others."""

    name: str
    argv: Argv
    default: bool = True
    #: Serves its own copy of the target's image (see ``on_own_copy``).
    own_copy: bool = False

    def image_for(self, image: Path) -> Path:
        """The file this server serves when the target's image is ``image``."""
        return image.with_name(f"{self.name}-{image.name}") if self.own_copy else image


@dataclass(frozen=True)
class Target:
    """An image format and the servers compared on it; ``make_image`` builds the image to serve
    from the fully written raw image (in the work directory it is given)."""

    name: str
    make_image: Callable[[Path, Path], Path]
    servers: tuple[Server, ...]
    #: The images are files, whose page cache is set before each job (not RBD images).
    files: bool = True
    #: Called with the work directory once the target is done (stops the rbd target's cluster).
    stop: Callable[[Path], None] | None = None
    #: (work directory, workload) -> what the storage alone does (``rbd bench``), a sample per
    #: column; measured in every round after the servers and reported like one.
    ceiling: Callable[[Path, Workload], dict[str, tuple[float, float, float]]] | None = None
    #: Reads slow down where the storage was written (memstore's objects fragment under small
    #: writes): every read workload runs, all its rounds, before the first write workload, so
    #: that each image is read as its import left it, not after its own server's writes.
    reads_first: bool = False


def tapdisk_command() -> str:
    """The tapdisk console script of this interpreter's venv, else the one on PATH."""
    beside = Path(sys.executable).with_name("tapdisk")
    if beside.exists():
        return str(beside)
    found = shutil.which("tapdisk")
    if found is None:
        sys.exit("bench: tapdisk is not installed; run bash scripts/setup.sh")
    return found


def tapdisk_server(spec_type: str) -> Server:
    def argv(sock: Path, image: Path) -> list[str]:
        return [
            tapdisk_command(),
            "--log-level",
            "warning",
            "serve",
            "--unix",
            str(sock),
            f"{spec_type}:{image}",
        ]

    return Server("tapdisk", argv)


def qemu_nbd_server(fmt: str, aio: str = "threads") -> Server:
    """qemu-nbd set up like tapdisk: page cache with writeback (flush on FLUSH), persistent,
    up to 4 clients so the two-connection job can run. Its default AIO is a thread pool; with
    ``aio="io_uring"`` (not run by default) it is faster on this kernel."""

    def argv(sock: Path, image: Path) -> list[str]:
        return [
            "qemu-nbd",
            "-f",
            fmt,
            "-t",
            "-e",
            "4",
            "--cache=writeback",
            f"--aio={aio}",
            "-k",
            str(sock),
            str(image),
        ]

    if aio == "threads":
        return Server("qemu-nbd", argv)
    return Server(f"qemu-nbd-{aio}", argv, default=False)


def nbdkit_file_server(threads: int | None = None) -> Server:
    """nbdkit's file plugin, by default with its defaults (16 worker threads, page cache);
    with ``threads`` (not run by default) more requests are served at once."""

    def argv(sock: Path, image: Path) -> list[str]:
        extra = [f"--threads={threads}"] if threads else []
        return ["nbdkit", "-f", "--exit-with-parent", *extra, "-U", str(sock), "file", str(image)]

    if threads is None:
        return Server("nbdkit", argv)
    return Server(f"nbdkit-t{threads}", argv, default=False)


def same_image(raw: Path, workdir: Path) -> Path:
    return raw


def vhd_image(raw: Path, workdir: Path) -> Path:
    """A fully allocated dynamic VHD with the raw image's contents (exact size: force_size)."""
    out = workdir / "image.vhd"
    subprocess.run(
        [
            "qemu-img",
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            "subformat=dynamic,force_size=on",
            str(raw),
            str(out),
        ],
        check=True,
    )
    return out


def on_own_copy(server: Server) -> Server:
    """``server`` serving its own copy of the image (``NAME-image``), for targets where two
    servers writing one file at once would corrupt it (allocating writes)."""

    def argv(sock: Path, image: Path) -> list[str]:
        return server.argv(sock, copy.image_for(image))

    copy = Server(server.name, argv, server.default, own_copy=True)
    return copy


def empty_vhd_images(raw: Path, workdir: Path) -> Path:
    """Empty dynamic VHDs of the raw image's size, one per server: every first write to a
    2 MiB block allocates it."""
    vhd_util = Path(sys.executable).with_name("vhd-util")
    size_mb = str(raw.stat().st_size >> 20)
    for name in ("image.vhd", "tapdisk-image.vhd", "qemu-nbd-image.vhd"):
        subprocess.run(
            [str(vhd_util), "create", "-n", str(workdir / name), "-s", size_mb], check=True
        )
    return workdir / "image.vhd"


def qcow2_image(raw: Path, workdir: Path) -> Path:
    """A fully allocated qcow2 image (64 KiB clusters) with the raw image's contents."""
    out = workdir / "image.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)], check=True
    )
    return out


def empty_qcow2_images(raw: Path, workdir: Path) -> Path:
    """Empty qcow2 images of the raw image's size, one per server: first writes allocate."""
    for name in ("image.qcow2", "tapdisk-image.qcow2", "qemu-nbd-image.qcow2"):
        subprocess.run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                str(workdir / name),
                str(raw.stat().st_size),
            ],
            check=True,
        )
    return workdir / "image.qcow2"


TARGETS: tuple[Target, ...] = (
    Target(
        "raw",
        same_image,
        (
            tapdisk_server("raw"),
            qemu_nbd_server("raw"),
            nbdkit_file_server(),
            qemu_nbd_server("raw", aio="io_uring"),
            nbdkit_file_server(threads=64),
        ),
    ),
    Target("qcow2", qcow2_image, (tapdisk_server("qcow2"), qemu_nbd_server("qcow2"))),
    Target(
        "qcow2-alloc",
        empty_qcow2_images,
        (on_own_copy(tapdisk_server("qcow2")), on_own_copy(qemu_nbd_server("qcow2"))),
    ),
    Target("vhd", vhd_image, (tapdisk_server("vhd"), qemu_nbd_server("vpc"))),
    Target(
        "rbd",
        lambda raw, workdir: ceph_target.make_images(raw, workdir, ("tapdisk", "qemu-nbd")),
        (
            on_own_copy(Server("tapdisk", ceph_target.tapdisk_argv(tapdisk_command))),
            on_own_copy(Server("qemu-nbd", ceph_target.qemu_nbd_argv)),
        ),
        files=False,
        reads_first=True,
        stop=ceph_target.stop,
        ceiling=lambda workdir, w: ceph_target.ceiling(workdir, w.rw, w.bs, w.iodepth, w.numjobs),
    ),
    Target(
        "vhd-alloc",
        empty_vhd_images,
        (on_own_copy(tapdisk_server("vhd")), on_own_copy(qemu_nbd_server("vpc"))),
    ),
)


# --- the image and the page cache ---------------------------------------------------------


def make_raw_image(path: Path, size: int = IMAGE_SIZE) -> None:
    """Write every byte of ``path`` with non-zero data (no holes, no zero blocks), then sync."""
    block = bytearray(os.urandom(CHUNK))
    with open(path, "wb") as f:
        for index in range(size // CHUNK):
            block[:8] = index.to_bytes(8, "little")  # every MiB differs from the others
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    allocated = os.stat(path).st_blocks * 512
    if allocated < size:
        sys.exit(f"bench: {path} has only {allocated} of {size} bytes allocated (sparse?)")


def warm_page_cache(path: Path) -> None:
    """Read the whole file so the next read job finds it in the page cache."""
    buf = bytearray(8 * CHUNK)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def drop_page_cache(path: Path) -> None:
    """Write the file back and evict it from the page cache, so the next job starts cold."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def write_back(path: Path) -> None:
    """Push the dirty pages a write job left to disk before the next job is timed."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


# --- servers ------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the benchmark dies, so no server outlives it."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def uri_for(sock: Path) -> str:
    return f"nbd+unix:///?socket={sock}"


class RunningServer:
    """A server process on its own unix socket, its output kept in a log file."""

    def __init__(self, server: Server, sock: Path, image: Path, log: Path) -> None:
        self.server = server
        self.sock = sock
        self.log = log
        self.argv = server.argv(sock, image)
        if shutil.which(self.argv[0]) is None:
            raise RuntimeError(f"bench: {self.argv[0]} is not installed; run bash scripts/setup.sh")
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )

    def failure(self, why: str) -> str:
        tail = self.log.read_text(errors="replace")[-2000:]
        return f"bench: {self.server.name} ({' '.join(self.argv)}) {why}\n{tail}"

    def wait_ready(self) -> int:
        """Wait until the server completes an NBD handshake; return the size it serves."""
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self.failure(f"exited with status {self.proc.returncode}"))
            if self.sock.exists():
                probe = subprocess.run(
                    ["nbdinfo", "--size", uri_for(self.sock)], capture_output=True, text=True
                )
                if probe.returncode == 0:
                    return int(probe.stdout)
            time.sleep(0.1)
        raise RuntimeError(self.failure(f"not ready after {READY_TIMEOUT:.0f} s"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def running(servers: Sequence[Server], image: Path, workdir: Path) -> Iterator[list[RunningServer]]:
    """Start every server on ``image`` (each on its own socket); stop them all on exit."""
    started: list[RunningServer] = []
    try:
        for server in servers:
            started.append(
                RunningServer(
                    server,
                    workdir / f"{server.name}.sock",
                    image,
                    workdir / f"{server.name}.log",
                )
            )
        sizes = {each.server.name: each.wait_ready() for each in started}
        if len(set(sizes.values())) > 1:
            raise RuntimeError(f"bench: the servers disagree on the size of {image}: {sizes}")
        yield started
    finally:
        for each in started:
            each.stop()


# --- fio ----------------------------------------------------------------------------------


@dataclass
class Result:
    target: str
    workload: str
    server: str
    mb_per_s: float
    iops: int
    mean_latency_us: float
    iops_per_round: list[int]


def run_fio(
    workload: Workload, uri: str, runtime: int, ramp: int, out: Path
) -> tuple[float, float, float]:
    """Run one fio job against ``uri``; return (bytes/s, IOPS, mean completion latency in µs)."""
    argv = [
        "fio",
        f"--name={workload.name}",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={workload.rw}",
        f"--bs={workload.bs}",
        f"--iodepth={workload.iodepth}",
        f"--numjobs={workload.numjobs}",
        "--group_reporting",
        "--time_based",
        f"--runtime={runtime}",
        f"--ramp_time={ramp}",
        "--norandommap",
        "--randrepeat=0",
        "--output-format=json",
        f"--output={out}",
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=runtime + ramp + 120)
    if proc.returncode != 0:
        raise RuntimeError(f"bench: fio failed ({' '.join(argv)}):\n{proc.stdout}{proc.stderr}")
    report = json.loads(out.read_text())
    (job,) = report["jobs"]
    if job["error"]:
        raise RuntimeError(f"bench: fio job {workload.name} on {uri} reported error {job['error']}")
    bandwidth = job["read"]["bw_bytes"] + job["write"]["bw_bytes"]
    iops = job["read"]["iops"] + job["write"]["iops"]
    side = job["write"] if workload.writes else job["read"]
    if not iops:
        raise RuntimeError(f"bench: fio job {workload.name} on {uri} completed no I/O")
    return bandwidth, iops, side["clat_ns"]["mean"] / 1000


# --- the run ------------------------------------------------------------------------------


def selected_servers(target: Target, only: set[str] | None) -> list[Server]:
    """The servers of ``target`` named by --only, or its default ones."""
    return [s for s in target.servers if (s.default if only is None else s.name in only)]


def quick_timing(jobs: int) -> tuple[int, int]:
    """(runtime, ramp) per job so that ``jobs`` jobs fit into QUICK_BUDGET seconds."""
    share = QUICK_BUDGET / max(jobs, 1) - JOB_OVERHEAD
    ramp = QUICK_RAMP if share >= MIN_RUNTIME + QUICK_RAMP + 1 else 0
    return max(MIN_RUNTIME, min(QUICK_RUNTIME, int(share - ramp))), ramp


def bench_target(
    target: Target,
    raw: Path,
    workdir: Path,
    workloads: Sequence[Workload],
    only: set[str] | None,
    timing: tuple[int, int, int],
) -> list[Result]:
    """Run every workload on every server of ``target``; with several rounds, the servers
    take turns in each round and each result is the round with the median IOPS."""
    servers = selected_servers(target, only)
    if not servers:
        return []
    tdir = workdir / target.name
    tdir.mkdir()
    try:
        measured = measure_target(target, raw, tdir, servers, workloads, timing)
    finally:
        if target.stop is not None:
            target.stop(tdir)
    results: list[Result] = []
    for (workload_name, server_name), samples in measured.items():
        bandwidth, iops, latency = sorted(samples, key=lambda x: x[1])[len(samples) // 2]
        results.append(
            Result(
                target.name,
                workload_name,
                server_name,
                round(bandwidth / 1e6, 1),
                round(iops),
                round(latency, 1),
                [round(x[1]) for x in samples],
            )
        )
    return results


def schedule(
    workloads: Sequence[Workload], rounds: int, reads_first: bool
) -> list[tuple[int, int, Workload]]:
    """(round, index in ``workloads``, workload) in the order they run: round after round,
    or with ``reads_first`` every read workload's rounds before the first write's."""
    numbered = list(enumerate(workloads))
    groups = (
        [[(i, w) for i, w in numbered if not w.writes], [(i, w) for i, w in numbered if w.writes]]
        if reads_first
        else [numbered]
    )
    return [(r, i, w) for group in groups for r in range(1, rounds + 1) for i, w in group]


def measure_target(
    target: Target,
    raw: Path,
    tdir: Path,
    servers: Sequence[Server],
    workloads: Sequence[Workload],
    timing: tuple[int, int, int],
) -> dict[tuple[str, str], list[tuple[float, float, float]]]:
    """(workload, server) -> one (bytes/s, IOPS, latency) sample per round."""
    runtime, ramp, rounds = timing
    image = target.make_image(raw, tdir)
    measured: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    # Files written since their last read-through; each was just made, so all of them.
    written = {each.image_for(image) for each in servers}
    with running(servers, image, tdir) as live:
        for round_no, index, workload in schedule(workloads, rounds, target.reads_first):
            # Servers take turns going first: on storage that slows as it is written
            # (memstore's objects fragment under small writes), the first of each pair
            # would otherwise always find it fresher.
            turns = list(live) if (round_no + index) % 2 else list(live)[::-1]
            for each in turns:
                served = each.server.image_for(image)
                if target.files and (workload.writes or served in written):
                    drop_page_cache(served)
                if workload.writes:
                    written.add(served)
                elif target.files:
                    warm_page_cache(served)
                    written.discard(served)
                turn = f"round {round_no}/{rounds}"
                log(f"{target.name}: {workload.name} on {each.server.name}, {turn}")
                sample = run_fio(workload, uri_for(each.sock), runtime, ramp, tdir / "fio.json")
                if workload.writes and target.files:
                    write_back(served)
                measured.setdefault((workload.name, each.server.name), []).append(sample)
            if target.ceiling is not None:
                log(f"{target.name}: {workload.name} ceiling, {turn}")
                for column, sample in target.ceiling(tdir, workload).items():
                    measured.setdefault((workload.name, column), []).append(sample)
    return measured


def ratios(results: Sequence[Result]) -> list[dict[str, object]]:
    """tapdisk's IOPS over each peer's, per target and workload."""
    table: dict[tuple[str, str], dict[str, float]] = {}
    for r in results:
        table.setdefault((r.target, r.workload), {})[r.server] = r.iops
    out: list[dict[str, object]] = []
    for (target, workload), by_server in table.items():
        if "tapdisk" not in by_server:
            continue
        for peer, iops in by_server.items():
            if peer != "tapdisk":
                ratio = round(by_server["tapdisk"] / iops, 3)
                out.append({"target": target, "workload": workload, "peer": peer, "ratio": ratio})
    return out


def format_table(results: Sequence[Result], runtime: int, ramp: int, rounds: int) -> str:
    lines: list[str] = []
    for target in dict.fromkeys(r.target for r in results):
        rows = [r for r in results if r.target == target]
        servers = list(dict.fromkeys(r.server for r in rows))
        peers = [s for s in servers if s != "tapdisk"] if "tapdisk" in servers else []
        by_key = {(r.workload, r.server): r for r in rows}
        lines.append(
            f"{target}: 1 GiB image, unix socket, fio nbd engine, "
            f"{runtime} s per job after {ramp} s ramp, median of {rounds} round(s); "
            "MB = 10^6 bytes"
        )
        head1 = f"{'workload':<24}" + "".join(f"{s:>20}" for s in servers)
        widths = {p: max(18, len(p) + 10) for p in peers}
        head1 += "".join(f"{'tapdisk/' + p:>{widths[p]}}" for p in peers)
        head2 = f"{'':<24}" + "".join(f"{'MB/s':>10}{'IOPS':>10}" for _ in servers)
        lines += [head1, head2]
        for workload in dict.fromkeys(r.workload for r in rows):
            line = f"{workload:<24}"
            for s in servers:  # a ceiling column may be missing (no cached read ceiling)
                r = by_key.get((workload, s))
                line += f"{r.mb_per_s:>10.1f}{r.iops:>10.0f}" if r else f"{'-':>10}{'-':>10}"
            for p in peers:
                peer = by_key.get((workload, p))
                if peer is None:
                    line += f"{'-':>{widths[p]}}"
                    continue
                line += f"{by_key[(workload, 'tapdisk')].iops / peer.iops:>{widths[p] - 1}.2f}x"
            lines.append(line)
        lines.append("")
    return "\n".join(lines)


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def pick(names: str | None, known: Sequence[str], what: str) -> set[str] | None:
    """Parse a comma-separated --only/--workloads/--targets value against the known names."""
    if names is None:
        return None
    chosen = {n.strip() for n in names.split(",") if n.strip()}
    unknown = chosen - set(known)
    if unknown:
        sys.exit(f"bench: unknown {what}: {', '.join(sorted(unknown))} (known: {', '.join(known)})")
    return chosen


def main(argv: list[str] | None = None) -> int:
    server_names = list(dict.fromkeys(s.name for t in TARGETS for s in t.servers))
    parser = argparse.ArgumentParser(
        description="fio (nbd ioengine) against tapdisk serve, qemu-nbd and nbdkit file, "
        "on the same fully written 1 GiB image over unix sockets.",
        epilog=f"workloads: {', '.join(w.name for w in WORKLOADS)}; "
        f"targets: {', '.join(t.name for t in TARGETS)}; servers: {', '.join(server_names)}",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"the raw target alone (unless --targets) in under 3 minutes: up to "
        f"{QUICK_RUNTIME} s per job after a {QUICK_RAMP} s ramp, shorter (down to "
        f"{MIN_RUNTIME} s) when more targets or servers run; a normal run gives each job "
        f"{NORMAL_RUNTIME} s after {NORMAL_RAMP} s, on every target",
    )
    parser.add_argument("--runtime", type=int, metavar="SECS", help="timed seconds per job")
    parser.add_argument("--ramp", type=int, metavar="SECS", help="untimed seconds before each job")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        metavar="N",
        help="run everything N times, servers taking turns; report the median round",
    )
    defaults = ",".join(dict.fromkeys(s.name for t in TARGETS for s in t.servers if s.default))
    parser.add_argument(
        "--only", metavar="SERVERS", help=f"comma-separated servers to run (default: {defaults})"
    )
    parser.add_argument("--workloads", metavar="NAMES", help="comma-separated workloads to run")
    parser.add_argument("--targets", metavar="NAMES", help="comma-separated targets to run")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument(
        "--dir", type=Path, default=Path(tempfile.gettempdir()), help="where to put the images"
    )
    args = parser.parse_args(argv)

    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.dir is not None and not os.path.isdir(args.dir):
        parser.error(f"--dir {args.dir}: no such directory")
    only = pick(args.only, server_names, "server")
    chosen_workloads = pick(args.workloads, [w.name for w in WORKLOADS], "workload")
    chosen_targets = pick(args.targets, [t.name for t in TARGETS], "target")
    if args.quick and chosen_targets is None:
        chosen_targets = {"raw"}  # every target's jobs at MIN_RUNTIME would not fit
    workloads = [w for w in WORKLOADS if chosen_workloads is None or w.name in chosen_workloads]
    targets = [t for t in TARGETS if chosen_targets is None or t.name in chosen_targets]
    jobs = len(workloads) * args.rounds * sum(len(selected_servers(t, only)) for t in targets)
    runtime, ramp = quick_timing(jobs) if args.quick else (NORMAL_RUNTIME, NORMAL_RAMP)
    runtime = args.runtime or runtime
    ramp = args.ramp if args.ramp is not None else ramp
    for tool in ("fio", "nbdinfo"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} is not installed; run bash scripts/setup.sh")

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tapdisk-bench.", dir=args.dir) as tmp:
        workdir = Path(tmp)
        raw = workdir / "image.raw"
        log(f"writing {IMAGE_SIZE >> 20} MiB of data to {raw}")
        make_raw_image(raw)
        results: list[Result] = []
        try:
            for target in targets:
                results += bench_target(
                    target, raw, workdir, workloads, only, (runtime, ramp, args.rounds)
                )
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
    elapsed = time.monotonic() - started
    log(f"done in {elapsed:.0f} s")

    if args.json:
        document = {
            "runtime_s": runtime,
            "ramp_s": ramp,
            "rounds": args.rounds,
            "image_bytes": IMAGE_SIZE,
            "elapsed_s": round(elapsed, 1),
            "workloads": [asdict(w) for w in workloads],
            "results": [asdict(r) for r in results],
            "ratios": ratios(results),
        }
        json.dump(document, sys.stdout, indent=2)
        print()
    else:
        print(format_table(results, runtime, ramp, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
