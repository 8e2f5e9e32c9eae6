"""Opening backing files safely, and the one guard every backing chain goes through.

A backing file named inside an image is untrusted input.  For QCOW v1 and
QCOW2 (``open_backing``) it is resolved relative to the image's directory,
must lie inside the allowed directories and be a regular file or block device
(``paths.open_disk``: never a FIFO, socket or character device), and is
opened read-only through the driver registry with the format the image names
(probed from magic numbers when it names none).  VHD finds its backing file through parent locators
(``vhd/chain.py``) but opens it under the same guard: ``chain_guard`` refuses
a file already in the chain being opened (compared by device and inode, so no
symlink or hard link hides a loop) and a chain deeper than ``MAX_CHAIN_DEPTH``,
whatever formats the chain mixes.

A backing file named by an NBD URI (what qemu writes for an overlay of an NBD
export: ``nbd://HOST:PORT/EXPORT``, ``nbd+unix:///EXPORT?socket=PATH``, and the
``nbds`` forms) is refused unless ``OpenOptions.remote_backing`` allows it; then
it opens as ``nbd:URI``, read-only.  Being untrusted, such a name may carry no
query parameter but ``socket``, and the socket must lie inside the allowed
directories like any backing file (an image must not make tapdisk talk to an
arbitrary local socket, nor read local files through ``tls-psk-file``).

A backing name that is an image in a cluster (``rbd:POOL/[NAMESPACE/]IMAGE[@SNAP]``,
a golden image in Ceph under a local qcow2 overlay) is no path: it is opened
read-only through the registry with the daemon's own cluster and identity
(``OpenOptions.ceph_conf``/``ceph_id``).  The cluster that identity may read plays
the part of the allowed directories; a backing name carrying options (``:conf=``,
``:id=``, monitor addresses...) is refused, so an image never chooses which file
librados reads or whom it connects to.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import os
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager

from .base import Image, ImageError, ImageFormatError
from .paths import is_inside, open_disk
from .registry import DRIVERS, FORMAT_ALIASES, OpenOptions, open_image

#: Image types that live in a cluster, which a backing name may name (``rbd:POOL/IMAGE``).
CLUSTER_KINDS = frozenset({"rbd"})

#: URI schemes of NBD exports that a backing file name may use.
NBD_SCHEMES = frozenset({"nbd", "nbds", "nbd+unix", "nbds+unix"})

#: Most images in one chain, the top one included; deeper chains are almost certainly hostile
#: (and would exhaust Python's recursion limit long before any real chain needs more).
MAX_CHAIN_DEPTH = 64

FileIdentity = tuple[int, int]

#: (st_dev, st_ino) of each image of the chain being opened, from the top down.
_opening: contextvars.ContextVar[tuple[FileIdentity, ...]] = contextvars.ContextVar(
    "tapdisk_backing_chain", default=()
)


def file_identity(path: str) -> FileIdentity:
    """(st_dev, st_ino): one file whatever name, hard link or symlink leads to it."""
    file_stat = os.stat(path)
    return file_stat.st_dev, file_stat.st_ino


def extend_chain(
    chain: tuple[FileIdentity, ...], child: str, backing: str, named_by: str
) -> tuple[FileIdentity, ...]:
    """``chain`` (identities from the top down, ending with ``child``'s) with ``backing`` added.

    Refuses a backing file already in the chain and one that would make the chain deeper
    than ``MAX_CHAIN_DEPTH``; walks that follow a chain step by step (``vhd-util check``,
    ``query -d``) call this directly, recursive opens through ``chain_guard``.
    """
    identity = file_identity(backing)
    if identity in chain:
        raise ImageFormatError(
            f"{child}: {named_by} loops back to {backing}, which is already in the chain"
        )
    if len(chain) >= MAX_CHAIN_DEPTH:
        raise ImageFormatError(
            f"{child}: {named_by} would make the chain deeper than {MAX_CHAIN_DEPTH} images"
        )
    return (*chain, identity)


@contextmanager
def chain_guard(child: str, backing: str, named_by: str) -> Iterator[None]:
    """Let ``child`` open ``backing`` (which its ``named_by`` names) inside the block.

    The chain being opened is checked by ``extend_chain``; while the block runs,
    ``backing`` is part of the chain its own backing file is checked against.
    """
    chain = _opening.get() or (file_identity(child),)
    token = _opening.set(extend_chain(chain, child, backing, named_by))
    try:
        yield
    finally:
        _opening.reset(token)


def resolve_backing(child: str, name: str, options: OpenOptions) -> str:
    """Absolute path of a backing file, refused if outside the allowed directories."""
    if "\0" in name or not name:
        raise ImageFormatError(f"{child}: backing_file name {name!r} is not a path")
    if name.startswith(("json:", "nbd:", "http:", "https:")) or "://" in name:
        raise ImageFormatError(f"{child}: backing_file {name!r} is not a local file name")
    base = os.path.dirname(child)
    path = os.path.realpath(os.path.join(base, name))
    allowed = options.allowed_dirs or (base,)
    if is_inside(path, allowed):
        return path
    raise ImageFormatError(
        f"{child}: backing_file {name!r} resolves to {path}, outside the allowed directories "
        f"({', '.join(allowed)})"
    )


def probe_format(path: str) -> str:
    """Guess a backing file's format from its magic numbers (raw if none matches)."""
    fd = open_disk(path, os.O_RDONLY)
    try:
        head = os.pread(fd, 8, 0)
        if head[:4] == b"QFI\xfb":
            return "qcow" if int.from_bytes(head[4:8], "big") == 1 else "qcow2"
        if head == b"conectix":
            return "vhd"
        size = os.lseek(fd, 0, os.SEEK_END)
        if size >= 512 and os.pread(fd, 8, size - 512) == b"conectix":
            return "vhd"
    finally:
        os.close(fd)
    return "raw"


def remote_backing_spec(child: str, name: str, options: OpenOptions) -> str | None:
    """``nbd:URI`` for a backing file named by an NBD URI (None for any other name).

    Raises ImageFormatError when remote backing files are not allowed, or the URI
    carries more than a socket inside the allowed directories.
    """
    scheme, sep, _ = name.partition("://")
    if not sep or scheme not in NBD_SCHEMES:
        return None
    if not options.remote_backing:
        raise ImageFormatError(
            f"{child}: backing_file {name!r} is a remote NBD export, and remote backing files "
            "are not allowed (remote_backing: true in the configuration allows them)"
        )
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(name).query, keep_blank_values=True)
    extra = sorted(set(query) - {"socket"})
    if extra:
        raise ImageFormatError(
            f"{child}: backing_file {name!r}: parameter {extra[0]!r} is not allowed in a "
            "backing file name (only socket=)"
        )
    base = os.path.dirname(child)
    for socket in query.get("socket", []):
        allowed = options.allowed_dirs or (base,)
        if not is_inside(os.path.join(base, socket), allowed):
            raise ImageFormatError(
                f"{child}: backing_file {name!r}: socket {socket!r} is outside the allowed "
                f"directories ({', '.join(allowed)})"
            )
    return f"nbd:{name}"


def is_remote_backing(name: str) -> bool:
    """Whether a backing name is an image in a cluster (``rbd:...``) rather than a path.

    Only cluster images: an NBD export as a backing goes through ``remote_backing_spec``'s
    checks, and blktap's ``nbd:/path/to/socket`` is no backing name at all.
    """
    return name.partition(":")[0] in CLUSTER_KINDS


def refuse_cluster_options(child: str, name: str) -> None:
    """ImageFormatError unless the cluster image ``name`` that ``child`` names is bare:
    options (``:conf=``, ``:id=``...) or escapes would let an image choose the file librados
    reads or the cluster it connects to."""
    rest = name.partition(":")[2]
    if ":" in rest or "\\" in rest:
        raise ImageFormatError(
            f"{child}: backing_file {name!r} carries options; a backing image in a cluster "
            "is opened with the daemon's own ceph_conf and ceph_id"
        )


def open_remote_backing(child: str, name: str, fmt: str | None, options: OpenOptions) -> Image:
    """Open the cluster image ``name`` that image ``child`` names as its backing, read-only;
    a failure names ``child`` too (the image a user asked for, which names this one)."""
    kind = name.partition(":")[0]
    refuse_cluster_options(child, name)
    if fmt not in (None, "raw", kind):
        raise ImageFormatError(f"{child}: backing file format {fmt!r} of {name!r} is not raw")
    try:
        return open_image(name, dataclasses.replace(options, read_only=True, direct=False))
    except ImageError as exc:
        raise ImageError(f"{child}: backing file {exc}") from None


def close_unserved(image: Image) -> None:
    """Close ``image`` in a thread of its own, where no event loop runs: an open that fails
    after a backing image in a cluster opened below it (librados's connection and threads
    would otherwise outlive the failed open)."""
    worker = threading.Thread(target=asyncio.run, args=(image.close(),), name="close-backing")
    worker.start()
    worker.join()


def open_backing(child: str, name: str, fmt: str | None, options: OpenOptions) -> Image:
    """Open the backing file ``name`` of image ``child`` read-only."""
    remote = remote_backing_spec(child, name, options)
    if remote is not None:
        if fmt not in (None, "raw"):
            raise ImageFormatError(
                f"{child}: backing file {name!r} of format {fmt!r}: an NBD export is raw"
            )
        return open_image(remote, OpenOptions(read_only=True))
    if is_remote_backing(name):
        return open_remote_backing(child, name, fmt, options)
    path = resolve_backing(child, name, options)
    if not os.path.exists(path):
        raise ImageError(f"{child}: backing file {path} does not exist")
    kind = FORMAT_ALIASES.get(fmt, fmt) if fmt else probe_format(path)
    if kind not in DRIVERS:
        raise ImageFormatError(f"{child}: backing file format {fmt!r} is not supported")
    with chain_guard(child, path, f"backing_file {name!r}"):
        return open_image(
            f"{kind}:{path}",
            dataclasses.replace(options, read_only=True, direct=False),
        )
