"""Shared fixtures: real ``tapdisk serve`` processes and real images made by qemu-img."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import Served, require, run, start_tapdisk
from rbd_helpers import Cluster, start_cluster
from tapctl_helpers import TapCtl, private_tapctl


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """Factory: ``serve("raw:/path", "--read-only")`` -> a running server, stopped afterwards."""
    started: list[Served] = []

    def factory(*args: str) -> Served:
        served = start_tapdisk(tmp_path / f"nbd{len(started)}.sock", *args)
        started.append(served)
        return served

    yield factory
    for served in started:
        if served.proc.poll() is None:
            served.stop()


@pytest.fixture
def raw_image(tmp_path: Path) -> Callable[..., Path]:
    """Factory: a raw image of ``size`` bytes, optionally filled by qemu-io commands."""

    def factory(size: str = "64M", *qemu_io: str, name: str = "disk.raw") -> Path:
        path = tmp_path / name
        run(require("qemu-img"), "create", "-q", "-f", "raw", path, size)
        if qemu_io:
            args: list[str] = []
            for cmd in qemu_io:
                args += ["-c", cmd]
            run(require("qemu-io"), "-f", "raw", *args, path)
        return path

    return factory


@pytest.fixture
def tapctl() -> Iterator[TapCtl]:
    """A tap-ctl over a fresh private control directory; its tapdisks are stopped afterwards."""
    yield from private_tapctl()


@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A one-node Ceph cluster shared by the rbd tests; they skip when Ceph is not installed."""
    yield from start_cluster(tmp_path_factory.mktemp("ceph"))


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: images on it run out of space."""
    path = tmp_path / "tiny"
    path.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", path)
    yield path
    run("umount", "-l", path)
