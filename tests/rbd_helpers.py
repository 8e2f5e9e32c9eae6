"""A real one-node Ceph cluster for the rbd tests (scripts/ceph-dev.sh) and its tools."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import run

CEPH_DEV = Path(__file__).resolve().parent.parent / "scripts" / "ceph-dev.sh"
#: What the cluster and the driver need; the rbd tests skip, naming them, when one is absent.
CEPH_TOOLS = ("ceph-mon", "ceph-osd", "ceph", "rbd", "rados")


@dataclass
class Cluster:
    """A running cluster: its directory, its ceph.conf, and a counter for image names."""

    directory: Path
    conf: str
    _names: Iterator[int] = field(default_factory=itertools.count)

    def rbd(self, *args: str | os.PathLike[str], timeout: float = 60) -> str:
        """Run the ``rbd`` tool against this cluster; its stdout."""
        return run("rbd", "-c", self.conf, *args, timeout=timeout)

    def create(self, size: str = "64M") -> str:
        """A new, empty image in pool ``rbd``; returns ``rbd/NAME``."""
        name = f"rbd/img{next(self._names)}-{os.getpid()}"
        self.rbd("create", "--size", size, name)
        return name

    def spec(self, name: str) -> str:
        """Our (and qemu's) spec for ``rbd/NAME`` on this cluster."""
        return f"rbd:{name}:conf={self.conf}"

    def allocated(self, name: str) -> list[tuple[int, int]]:
        """(offset, length) of the image's allocated extents, in order (``rbd diff``)."""
        extents = json.loads(self.rbd("diff", "--format", "json", name))
        return sorted((extent["offset"], extent["length"]) for extent in extents)

    def export(self, name: str, dest: Path) -> bytes:
        """The image's bytes as ``rbd export`` writes them."""
        self.rbd("export", "--no-progress", name, dest)
        return dest.read_bytes()

    def restart_osd(
        self,
        down: float = 1.0,
        during: Callable[[], None] | None = None,
        sig: int = signal.SIGTERM,
    ) -> None:
        """Stop the OSD with ``sig`` (SIGTERM: memstore saves itself), wait ``down`` s, start
        it again.  ``during`` is called once the OSD is gone, before the wait.
        """
        pid = int((self.directory / "run" / "osd.0.pid").read_text())
        os.kill(pid, sig)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists():
            assert time.monotonic() < deadline, "the OSD did not stop within 30 s"
            time.sleep(0.05)
        if during is not None:
            during()
        time.sleep(down)
        run("bash", CEPH_DEV, "start", self.directory, timeout=120)


def ceph_missing() -> str | None:
    """Why the rbd tests cannot run here (a Ceph package is not installed), or None."""
    missing = [tool for tool in CEPH_TOOLS if shutil.which(tool) is None]
    try:
        import rbd  # noqa: F401
    except ImportError:
        missing.append("python3-rbd (import rbd)")
    if missing:
        return f"Ceph is not installed ({', '.join(missing)}); scripts/setup.sh installs it"
    return None


def start_cluster(directory: Path, store: str = "memstore") -> Iterator[Cluster]:
    """Start a cluster in ``directory``, yield it, stop it (no daemon is left behind)."""
    reason = ceph_missing()
    if reason is not None:
        pytest.skip(reason)
    try:
        conf = run("bash", CEPH_DEV, "start", directory, store, timeout=180).strip()
        yield Cluster(directory, conf)
    finally:
        subprocess.run(["bash", str(CEPH_DEV), "stop", str(directory)], timeout=120, check=False)
