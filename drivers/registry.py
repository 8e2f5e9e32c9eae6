"""Image specs (``type:path``) and the table of drivers that open them.

Drivers are imported lazily so that a tool that only touches raw images does
not pay for importing the qcow2 code, and so that a driver module is only ever
imported through this one table.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Protocol

from .base import Image, ImageError

#: Spec type -> "module:function" of its opener, relative to this package.
DRIVERS: dict[str, str] = {
    "raw": "raw:open_raw",
    "aio": "raw:open_raw",
    "vhd": "vhd.image:open_vhd",
    "qcow2": "qcow2.image:open_qcow2",
    "qcow": "qcow:open_qcow",
    "fault": "fault:open_fault",
}

#: Layer types: their argument is ``OPTIONS:INNER-SPEC``, not a path.
LAYERS: frozenset[str] = frozenset({"fault"})
#: Formats that can bypass the page cache (``OpenOptions.direct``).  The others do small,
#: unaligned metadata I/O, which O_DIRECT refuses; asking them for it is an error, not a no-op.
DIRECT_IO: frozenset[str] = frozenset({"raw", "aio"})


@dataclass(frozen=True)
class OpenOptions:
    """How to open an image (and, for chains, its parents).

    ``allowed_dirs``: directories a parent or backing file may live in; empty
    means only the child's own directory.  ``direct``: bypass the page cache.
    """

    read_only: bool = False
    direct: bool = False
    allowed_dirs: tuple[str, ...] = field(default_factory=tuple)


class Opener(Protocol):
    def __call__(self, path: str, options: OpenOptions) -> Image: ...


def parse_spec(spec: str) -> tuple[str, str]:
    """Split ``type:path`` into its parts; raise ImageError naming what is wrong."""
    kind, sep, path = spec.partition(":")
    if not sep or not kind or not path:
        raise ImageError(f"bad image spec {spec!r}: expected TYPE:PATH, e.g. raw:/path/disk.img")
    if kind not in DRIVERS:
        known = ", ".join(sorted(DRIVERS))
        raise ImageError(f"unknown image type {kind!r} in {spec!r} (known: {known})")
    return kind, path


def opener_for(kind: str) -> Opener:
    """The open function registered for a spec type."""
    module_name, _, func = DRIVERS[kind].partition(":")
    module = importlib.import_module(f"{__package__}.{module_name}")
    opener: Opener = getattr(module, func)
    return opener


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
        target = path if kind in LAYERS else os.path.abspath(path)
        return opener_for(kind)(target, options)
    except FileNotFoundError as exc:
        raise ImageError(f"{spec}: no such file {exc.filename or path!r}") from exc
    except PermissionError as exc:
        raise ImageError(f"{spec}: permission denied on {exc.filename or path!r}") from exc
    except IsADirectoryError as exc:
        raise ImageError(f"{spec}: {path!r} is a directory") from exc
