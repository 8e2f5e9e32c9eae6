"""The ``rbd:`` spec (qemu's): ``POOL/[NAMESPACE/]IMAGE[@SNAP][:conf=PATH][:id=NAME][:KEY=VALUE]``.

Parsed into an ``RbdName``; ``\\:`` escapes a colon, as in qemu.  Kept apart from the driver
so that naming an image needs neither librados nor librbd.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .base import ImageError

#: A pool, namespace, image or snapshot name.
_NAME = re.compile(r"[^/@\s]+")
#: A Ceph option's name.
_OPTION = re.compile(r"[A-Za-z][A-Za-z0-9_ ]*")


@dataclass(frozen=True)
class RbdName:
    """A parsed ``rbd:`` spec: where the image is and how to reach its cluster."""

    pool: str
    image: str
    namespace: str = ""
    snapshot: str | None = None
    conf: str | None = None
    user: str | None = None
    #: Further Ceph options (``KEY=VALUE``) set on the connection.
    options: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def __str__(self) -> str:
        where = f"{self.pool}/{self.namespace + '/' if self.namespace else ''}{self.image}"
        return where + (f"@{self.snapshot}" if self.snapshot else "")


def _split_escaped(text: str, sep: str) -> list[str]:
    """Split at ``sep`` except where a backslash escapes it (qemu's rule); unescape."""
    parts, current, chars = [], [], iter(text)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def parse_name(path: str) -> RbdName:
    """Parse what follows ``rbd:``; raise ImageError naming the part that is wrong."""
    spec = f"rbd:{path}"
    location, *pairs = _split_escaped(path, ":")
    location, at, snapshot = location.partition("@")
    parts = location.split("/")
    if len(parts) not in (2, 3) or not all(_NAME.fullmatch(p) for p in parts):
        raise ImageError(f"bad rbd spec {spec!r}: expected rbd:POOL/[NAMESPACE/]IMAGE[@SNAP]")
    if at and not _NAME.fullmatch(snapshot):
        raise ImageError(f"bad rbd spec {spec!r}: empty or bad snapshot name")
    values: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not _OPTION.fullmatch(key) or key in values:
            raise ImageError(f"bad rbd spec {spec!r}: option {pair!r} is not a single KEY=VALUE")
        values[key] = value
    conf, user = values.pop("conf", None), values.pop("id", None)
    return RbdName(
        pool=parts[0],
        image=parts[-1],
        namespace=parts[1] if len(parts) == 3 else "",
        snapshot=snapshot or None,
        conf=conf,
        user=user,
        options=tuple(values.items()),
    )


def location_end(path: str) -> int:
    """Index of the first unescaped ``:`` in ``path`` (where the options start), or its end."""
    i = 0
    while i < len(path):
        if path[i] == "\\":
            i += 2
            continue
        if path[i] == ":":
            return i
        i += 1
    return len(path)


def valid_name(text: str) -> bool:
    """Whether ``text`` can name a pool, namespace, image or snapshot in a spec."""
    return _NAME.fullmatch(text) is not None
