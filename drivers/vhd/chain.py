"""Finding a differencing image's parent: locators, allowed directories, UUID check.

Parent locators are tried relative ones first (W2ru, then MacX and W2ku when
they hold relative paths, as blktap writes them), then absolute ones, then the
header's parent name beside the child.  A candidate that resolves outside the
allowed directories, or that is not a regular file or block device (a FIFO, a
socket, a character device), is never opened.  The caller opens the parent under
``backing.chain_guard`` (loops, depth) and checks its UUID with
``check_parent_uuid``.

A parent may also be an image in a cluster (``cluster_parent``): a golden image in
Ceph under a local VHD.  Such a child records a raw parent (a null parent UUID) and
the cluster image's spec, as it is, in a MacX locator and the header's parent name.
blktap's tools read that as a raw parent they cannot find.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from errno import ENOENT

from ..backing import is_remote_backing
from ..base import ImageFormatError
from ..paths import is_inside, refused_kind
from .format import PLAT_MACX, PLAT_W2KU, PLAT_W2RU, Footer
from .meta import Metadata, read_at


class MissingParentError(ImageFormatError):
    """No locator of a differencing image leads to an existing file (tools exit ENOENT)."""

    errno = ENOENT


def decode_locator(code: int, data: bytes) -> str | None:
    """The path a locator holds, with ``/`` separators; None for unusable codes."""
    try:
        if code == PLAT_MACX:
            text = data.decode("utf-8").rstrip("\x00")
            return text.removeprefix("file://")
        if code in (PLAT_W2KU, PLAT_W2RU):
            text = data.decode("utf-16-le").rstrip("\x00")
            return text.replace("\\", "/")
    except UnicodeDecodeError:
        return None
    return None


def locator_paths(fd: int, meta: Metadata) -> list[tuple[str, str]]:
    """(field name, path as stored) for each readable locator, relative paths first."""
    assert meta.header is not None
    found: list[tuple[str, str]] = []
    for i, loc in enumerate(meta.header.locators):
        if loc.code not in (PLAT_MACX, PLAT_W2KU, PLAT_W2RU) or loc.data_length == 0:
            continue
        text = decode_locator(loc.code, read_at(fd, loc.data_offset, loc.data_length))
        if text:
            found.append((f"header.locator[{i}]", text))

    def rank(item: tuple[str, str]) -> int:
        return 1 if _is_absolute(item[1]) else 0

    found.sort(key=rank)
    if meta.header.parent_name:
        found.append(("header.parent_name", os.path.basename(meta.header.parent_name)))
    return found


def cluster_parent(fd: int, meta: Metadata) -> str | None:
    """The spec (``rbd:POOL/IMAGE[@SNAP]``) of the cluster image a differencing image has
    as its raw parent, or None when its parent is a file."""
    if meta.header is None or meta.header.parent_uuid != bytes(16):
        return None
    for _, text in locator_paths(fd, meta):
        if is_remote_backing(text):
            return text
    return None


def _is_absolute(path: str) -> bool:
    return path.startswith("/") or (len(path) > 1 and path[1] == ":")


def find_parent(child: str, fd: int, meta: Metadata, allowed_dirs: Iterable[str] = ()) -> str:
    """Absolute path of the parent of differencing image ``child``.

    Raises ImageFormatError naming the locator when a candidate escapes the
    allowed directories or is no disk, MissingParentError when every candidate is
    missing.
    """
    base = os.path.dirname(os.path.abspath(child))
    roots = list(allowed_dirs) or [base]
    escaped: list[str] = []
    refused: list[str] = []
    tried: list[str] = []
    for field_name, stored in locator_paths(fd, meta):
        candidate = os.path.normpath(os.path.join(base, stored))
        if not is_inside(candidate, roots):
            escaped.append(f"{field_name} {stored!r}")
            continue
        if candidate not in tried:
            tried.append(candidate)
        try:
            kind = refused_kind(os.stat(candidate).st_mode)
        except OSError:
            continue
        if kind is None:
            return candidate
        refused.append(f"{field_name} names {candidate}, {kind}")
    if escaped:
        raise ImageFormatError(
            f"{child}: parent {', '.join(escaped)} escapes the allowed directories "
            f"({', '.join(roots)})"
        )
    if refused:
        raise ImageFormatError(
            f"{child}: parent {'; '.join(refused)}, not a regular file or block device"
        )
    name = meta.header.parent_name if meta.header else ""
    raise MissingParentError(
        f"{child}: parent {name!r} not found (tried {', '.join(tried) or 'no locators'})"
    )


def check_parent_uuid(child: str, meta: Metadata, parent: str, parent_footer: Footer) -> None:
    """The parent found must be the image the child was made from: its UUID matches."""
    assert meta.header is not None
    if parent_footer.uuid != meta.header.parent_uuid:
        raise ImageFormatError(
            f"{child}: header.parent_uuid {uuid_text(meta.header.parent_uuid)} does not "
            f"match the UUID {parent_footer.uuid_str} of parent {parent}"
        )


def uuid_text(raw: bytes) -> str:
    return str(uuid.UUID(bytes=raw))
