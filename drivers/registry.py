"""Image specs (``type:path``) and the table of drivers: what each type can do.

Each spec type registers a ``Driver``: how to open it and, where the format
can, how to create one, commit one into its backing file, or say which host
clusters hold its data.  Tools ask this table what a type can do instead of
switching on format names, so ``imageops`` never imports a format package.

Drivers are imported lazily so that a tool that only touches raw images does
not pay for importing the qcow2 code, and so that a driver module is only ever
imported through this one table.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .base import Image, ImageError

#: ``progress(done, total)`` in bytes.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Driver:
    """What one spec type can do.

    Functions are ``"module:function"`` names relative to this package, imported
    on first use; None means the type cannot do it.
    """

    #: ``open(path, options) -> Image`` (``Opener``).
    open: str
    #: ``create(path, size, backing, options)`` (``Creator``): a new, empty image.
    create: str | None = None
    #: ``commit(spec, progress, allowed_dirs)`` (``Committer``): merge into the backing file.
    commit: str | None = None
    #: ``block_status(image, offset, length)`` (``BlockStatus``): which host bytes hold a range.
    block_status: str | None = None
    #: A stackable layer: its argument is ``OPTIONS:INNER-SPEC``, not a path.
    layer: bool = False
    #: Can bypass the page cache (``OpenOptions.direct``).  The others do small, unaligned
    #: metadata I/O, which O_DIRECT refuses; asking them for it is an error, not a no-op.
    direct_io: bool = False
    #: Guest offset N is file offset N and every byte is present (``tap-img map`` says so).
    flat: bool = False
    #: A converted image's size is rounded up to a multiple of this.
    size_unit: int = 1
    #: ``snapshot(spec, name, options) -> spec`` (``Snapshotter``): a snapshot kept inside the
    #: image's own store (an RBD snapshot), returning the snapshot's read-only spec.
    snapshot: str | None = None
    #: Its argument names no local image file but a remote export (a URI, socket, HOST:PORT or
    #: passed descriptor) or an image in a cluster: it is neither made absolute nor subject to
    #: ``allowed_dirs`` (the server's or the cluster's own authentication governs it).
    remote: bool = False


#: Spec type -> its driver.  Creatable types come first, in the order error messages list them.
DRIVERS: dict[str, Driver] = {
    "raw": Driver("raw:open_raw", create="raw:create_raw", direct_io=True, flat=True),
    "qcow2": Driver(
        "qcow2.image:open_qcow2",
        create="qcow2.create:create_from_options",
        commit="qcow2.image:commit",
        block_status="qcow2.image:block_status",
    ),
    "qcow": Driver(
        "qcow:open_qcow", create="qcow.format:create_from_options", commit="qcow.image:commit"
    ),
    # VHD data blocks are 2 MiB.
    "vhd": Driver(
        "vhd.image:open_vhd",
        create="vhd.create:create_from_options",
        commit="vhd.coalesce:commit",
        size_unit=2 << 20,
    ),
    "aio": Driver("raw:open_raw", direct_io=True, flat=True),
    "fault": Driver("fault:open_fault", layer=True),
    "nbd": Driver("nbdclient:open_nbd", remote=True),
    "rbd": Driver(
        "rbd:open_rbd", create="rbd:create_rbd", snapshot="rbd:create_snapshot", remote=True
    ),
}

#: Types ``create_image`` can make, for tools and their error messages.
FORMATS: tuple[str, ...] = tuple(kind for kind, driver in DRIVERS.items() if driver.create)
#: Layer types: their argument is ``OPTIONS:INNER-SPEC``, not a path.
LAYERS: frozenset[str] = frozenset(kind for kind, driver in DRIVERS.items() if driver.layer)
#: Most layers one spec may stack (each is a Python call deep, and none needs more).
MAX_LAYERS = 8
#: Types that can bypass the page cache (``OpenOptions.direct``).
DIRECT_IO: frozenset[str] = frozenset(kind for kind, driver in DRIVERS.items() if driver.direct_io)
#: Types whose argument names an image in a cluster, not a file.
REMOTE: frozenset[str] = frozenset(kind for kind, driver in DRIVERS.items() if driver.remote)
#: qemu format names -> our spec types.
FORMAT_ALIASES = {"vpc": "vhd", "file": "raw", "host_device": "raw"}


@dataclass(frozen=True)
class OpenOptions:
    """How to open an image (and, for chains, its parents).

    ``allowed_dirs``: directories a parent or backing file may live in; empty
    means only the child's own directory.  ``direct``: bypass the page cache.
    ``remote_backing``: a backing file named by an NBD URI may be opened (``backing``).
    ``ceph_conf``/``ceph_id``: the Ceph cluster and identity of ``rbd:`` images
    whose spec names none (None: Ceph's own defaults).
    """

    read_only: bool = False
    direct: bool = False
    allowed_dirs: tuple[str, ...] = field(default_factory=tuple)
    remote_backing: bool = False
    ceph_conf: str | None = None
    ceph_id: str | None = None


@dataclass(frozen=True)
class NewBacking:
    """The backing file of an image being created.

    ``name`` is what the new image records (relative to its directory, or
    absolute), ``path`` the file itself, ``format`` its spec type.
    """

    name: str
    path: str
    format: str


class Opener(Protocol):
    def __call__(self, path: str, options: OpenOptions) -> Image: ...


class Creator(Protocol):
    """Creates ``path``; takes the ``options`` it knows out of the dict (the rest are errors)."""

    def __call__(
        self, path: str, size: int, backing: NewBacking | None, options: dict[str, str]
    ) -> None: ...


class Committer(Protocol):
    """Merges the image ``spec`` into its backing file; returns the backing file's spec."""

    def __call__(
        self, spec: str, progress: Progress | None, allowed_dirs: tuple[str, ...]
    ) -> str: ...


class Snapshotter(Protocol):
    """Snapshots the image ``spec`` as ``name`` in its own store; the snapshot's spec.

    Blocking; the caller has paused any device on the image (it is flushed and closed).
    """

    def __call__(self, spec: str, name: str, options: OpenOptions) -> str: ...


class BlockStatus(Protocol):
    """(kind, host offset, run) at guest ``offset`` of the image itself (``l2tables`` kinds).

    Blocking, for tools such as ``tap-img map``.
    """

    def __call__(self, image: Image, offset: int, length: int) -> tuple[int, int, int]: ...


def parse_spec(spec: str) -> tuple[str, str]:
    """Split ``type:path`` into its parts; raise ImageError naming what is wrong."""
    kind, sep, path = spec.partition(":")
    if not sep or not kind or not path:
        raise ImageError(f"bad image spec {spec!r}: expected TYPE:PATH, e.g. raw:/path/disk.img")
    if kind not in DRIVERS:
        known = ", ".join(sorted(DRIVERS))
        raise ImageError(f"unknown image type {kind!r} in {spec!r} (known: {known})")
    if "\0" in spec:
        raise ImageError(f"bad image spec {spec[:200]!r}: it contains a NUL byte")
    if _layer_depth(spec) > MAX_LAYERS:
        raise ImageError(f"bad image spec {spec[:200]!r}: more than {MAX_LAYERS} layers stacked")
    return kind, path


def _layer_depth(spec: str) -> int:
    """How many ``layer:OPTIONS:`` prefixes stand before the image's own ``TYPE:PATH``."""
    depth = 0
    kind, _, rest = spec.partition(":")
    while kind in LAYERS:
        depth += 1
        kind, _, rest = rest.partition(":")[2].partition(":")
    return depth


def _function(name: str) -> Any:
    module_name, _, func = name.partition(":")
    return getattr(importlib.import_module(f"{__package__}.{module_name}"), func)


def opener_for(kind: str) -> Opener:
    """The open function registered for a spec type."""
    opener: Opener = _function(DRIVERS[kind].open)
    return opener


def creator_for(kind: str) -> Creator:
    """The create function of a type in ``FORMATS``."""
    name = DRIVERS[kind].create
    if name is None:
        raise ImageError(f"{kind} images cannot be created")
    creator: Creator = _function(name)
    return creator


def committer_for(kind: str) -> Committer | None:
    """The commit function of a type whose images can have a backing file."""
    name = DRIVERS[kind].commit
    return None if name is None else _function(name)


def snapshotter_for(kind: str) -> Snapshotter | None:
    """The internal-snapshot function of a type that keeps snapshots in its own store."""
    name = DRIVERS[kind].snapshot
    return None if name is None else _function(name)


def import_openers() -> None:
    """Import every driver that opens images now rather than at its first open.

    For a process that forks tapdisks (the spawner): its children then share the
    driver modules instead of each importing its own copy.
    """
    for kind in DRIVERS:
        opener_for(kind)


def driver_of(image: Image) -> Driver | None:
    """The driver of the type ``image`` was opened as (None for a type not registered)."""
    return DRIVERS.get(image.spec.partition(":")[0])


def block_status_for(image: Image) -> BlockStatus | None:
    """The image's block status function, if its format maps to host offsets."""
    driver = driver_of(image)
    name = driver.block_status if driver is not None else None
    return None if name is None else _function(name)


def open_image(spec: str, options: OpenOptions | None = None) -> Image:
    """Open ``type:path`` with the matching driver.

    Raises ImageError for a bad spec or bad image, and turns a missing or
    unreadable file into an ImageError that names the path.
    """
    kind, path = parse_spec(spec)
    options = options or OpenOptions()
    if options.direct and kind not in DIRECT_IO | LAYERS:
        raise ImageError(
            f"{spec}: {kind} images cannot bypass the page cache (their metadata I/O is "
            f"not sector aligned); only {', '.join(sorted(DIRECT_IO))} images can"
        )
    try:
        target = path if kind in LAYERS | REMOTE else os.path.abspath(path)
        return opener_for(kind)(target, options)
    except FileNotFoundError as exc:
        raise ImageError(f"{spec}: no such file {exc.filename or path!r}") from exc
    except PermissionError as exc:
        raise ImageError(f"{spec}: permission denied on {exc.filename or path!r}") from exc
    except IsADirectoryError as exc:
        raise ImageError(f"{spec}: {path!r} is a directory") from exc
