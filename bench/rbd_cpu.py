#!/usr/bin/env python3
"""CPU seconds per GB on the rbd target: where a 2-core machine's time goes.

For each workload, ``tapdisk serve rbd:...`` and ``qemu-nbd ... rbd:...`` (each on its own
image, driven by fio's nbd engine) and ``rbd bench`` (librbd alone, no NBD) move data while
the CPU time of each process involved is read from ``/proc``: the server, the client (fio,
or ``rbd bench`` itself) and the Ceph daemons (OSD and monitor).  On a machine with fewer
cores than that path keeps busy, throughput is bounded by cores / (CPU seconds per GB): the
share of a gap that the extra CPU of the NBD hop and client explains is the ratio of these
sums.  Numbers are per GB moved (MB = 10^6 bytes) and per 100k requests.

Run it from the checkout's venv: ``.venv/bin/python bench/rbd_cpu.py``.  It is a measuring
tool, not a test; on a shared machine other processes' load changes the throughput, less so
the CPU per GB.  The server's CPU is split into its main thread (the event loop: for
tapdisk its Python and, with ``rbd_non_blocking_aio`` off, librbd's dispatch) and its
other threads (librbd's and librados's, and qemu-nbd's own).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import ceph_target

from bench import (
    WORKLOADS,
    RunningServer,
    Server,
    Workload,
    make_raw_image,
    on_own_copy,
    pick,
    run_fio,
    tapdisk_command,
    uri_for,
)

#: A timed run: -> (bytes moved, requests done).
Job = Callable[[], tuple[float, float]]

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, task: int | None = None) -> float:
    """User plus system CPU seconds so far of process ``pid`` (all its threads), or of its
    thread ``task`` alone."""
    where = f"/proc/{pid}" + (f"/task/{task}" if task is not None else "")
    fields = Path(f"{where}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def children_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def ceph_pids(workdir: Path) -> list[int]:
    run = workdir / "ceph" / "run"
    return [int((run / name).read_text()) for name in ("osd.0.pid", "mon.a.pid")]


def measure(workdir: Path, server_pid: int | None, job: Job) -> dict[str, float]:
    """Run ``job()`` -> (bytes moved, requests); CPU seconds of server, client, Ceph."""
    daemons = ceph_pids(workdir)
    before_ceph = sum(cpu_seconds(p) for p in daemons)
    before_server = cpu_seconds(server_pid) if server_pid else 0.0
    # The main thread runs the event loop (tapdisk's Python, and librbd's dispatch on it);
    # the others are librbd's and librados's own.
    before_main = cpu_seconds(server_pid, server_pid) if server_pid else 0.0
    before_client = children_seconds()
    started = time.monotonic()
    moved, requests = job()
    elapsed = time.monotonic() - started
    return {
        "bytes": moved,
        "requests": requests,
        "elapsed": elapsed,
        "server": (cpu_seconds(server_pid) - before_server) if server_pid else 0.0,
        "main": (cpu_seconds(server_pid, server_pid) - before_main) if server_pid else 0.0,
        "client": children_seconds() - before_client,
        "ceph": sum(cpu_seconds(p) for p in daemons) - before_ceph,
    }


def fio_job(sock: Path, workload: Workload, runtime: int, out: Path) -> Job:
    def job() -> tuple[float, float]:
        bandwidth, iops, _ = run_fio(workload, uri_for(sock), runtime, 0, out)
        return bandwidth * runtime, iops * runtime

    return job


def rbd_bench_job(workdir: Path, w: Workload) -> Job:
    """``rbd bench`` with the workload's shape, without librbd's cache as tapdisk runs."""

    def job() -> tuple[float, float]:
        ceph_target.rbd_bench(workdir, w.rw, w.bs, w.iodepth * w.numjobs, cached=False)
        total = ceph_target.VOLUMES[w.bs]
        return float(total), total / ceph_target.BLOCK_SIZES[w.bs]

    return job


def row(name: str, m: dict[str, float]) -> str:
    gb = m["bytes"] / 1e9
    per_100k = m["requests"] / 1e5
    total = m["server"] + m["client"] + m["ceph"]
    cells = [m["server"], m["client"], m["ceph"], total]
    per_gb = "".join(f"{c / gb:>9.1f}" for c in cells)
    per_req = "".join(f"{c / per_100k:>9.2f}" for c in cells)
    rate = m["requests"] / m["elapsed"]
    split = f"{m['main'] / per_100k:>9.2f}{(m['server'] - m['main']) / per_100k:>9.2f}"
    return f"  {name:<10}{rate:>9.0f}{per_gb}  {per_req}  {split}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", type=int, default=8, help="seconds per fio job")
    parser.add_argument("--workloads", default="seqread-1m-qd8,randread-4k-qd16,randwrite-4k-qd16")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    if not args.dir.is_dir():
        parser.error(f"--dir {args.dir}: no such directory")
    names = pick(args.workloads, [w.name for w in WORKLOADS], "workload") or set()
    chosen = [w for w in WORKLOADS if w.name in names]
    with tempfile.TemporaryDirectory(prefix="tapdisk-rbdcpu.", dir=args.dir) as tmp:
        workdir = Path(tmp)
        raw = workdir / "image.raw"
        make_raw_image(raw)
        servers = (
            on_own_copy(Server("tapdisk", ceph_target.tapdisk_argv(tapdisk_command))),
            on_own_copy(Server("qemu-nbd", ceph_target.qemu_nbd_argv)),
        )
        image = ceph_target.make_images(raw, workdir, tuple(s.name for s in servers))
        raw.unlink()
        live = [
            RunningServer(s, workdir / f"{s.name}.sock", image, workdir / f"{s.name}.log")
            for s in servers
        ]
        try:
            for each in live:
                each.wait_ready()
            print(
                "CPU seconds per GB (server, client, Ceph, sum), the same per 100k requests, "
                "and the server's per 100k split into its main thread and the others"
            )
            head = "".join(f"{h:>9}" for h in ("server", "client", "ceph", "sum"))
            threads = "".join(f"{h:>9}" for h in ("main", "others"))
            print(f"  {'':<10}{'req/s':>9}{head}  {head}  {threads}")
            for w in chosen:
                print(w.name)
                for each in live:
                    job = fio_job(each.sock, w, args.runtime, workdir / "fio.json")
                    print(row(each.server.name, measure(workdir, each.proc.pid, job)), flush=True)
                job = rbd_bench_job(workdir, w)
                print(row("rbd bench", measure(workdir, None, job)), flush=True)
        finally:
            for each in live:
                each.stop()
            ceph_target.stop(workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
