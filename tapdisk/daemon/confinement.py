"""``Confinement``: the images, secondaries and CBT logs a daemon may open.

With ``allowed_dirs`` set (the YAML key of that name, or ``--allowed-dir``), every file
an operation names must lie inside one of them (``drivers.paths.is_inside`` is the
rule; the drivers check the parents an image names itself).  An ``nbd:`` export has
its own rule (``remotes``); an image in a cluster (``rbd:``) is no file: its cluster's
authentication governs it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tapdisk.drivers.paths import is_inside

from .. import config as configuration
from .errors import ControlError
from .remotes import remote_refusal


@dataclass(frozen=True)
class Confinement:
    """Where the daemon's images may lie; nothing is refused when ``allowed_dirs`` is empty."""

    allowed_dirs: tuple[str, ...] = ()
    #: ``nbd:`` specs may name exports over TCP (``remotes``).
    remote_images: bool = False

    def check_spec(self, spec: str) -> None:
        """Refuse an image spec whose file is outside ``allowed_dirs``."""
        self.check_image(spec, configuration.image_path(spec))

    def check_secondary(self, spec: str | None) -> None:
        """Refuse a mirror's secondary (``-2``) outside ``allowed_dirs``; ``null`` is none."""
        if spec is not None and spec != "null":
            self.check_spec(spec)

    def check_image(self, what: str, path: str | None) -> None:
        """Refuse ``what``, an image at ``path``, outside ``allowed_dirs``.

        ``path`` is None for a spec whose path is relative: it cannot be checked.
        """
        if not self.allowed_dirs:
            return
        if what.startswith("nbd:"):
            refusal = remote_refusal(what, self.allowed_dirs, self.remote_images)
            if refusal is not None:
                raise ControlError("image", f"{what}: {refusal}")
            return
        if configuration.is_remote(what):
            return
        if path is not None and is_inside(path, self.allowed_dirs):
            return
        raise ControlError(
            "image",
            f"{what}: the image is outside the allowed directories "
            f"({', '.join(self.allowed_dirs)}); give an absolute path inside one of them",
        )

    def check_log(self, path: str) -> None:
        """A CBT log must be named by an absolute path (and lie inside ``allowed_dirs``)."""
        if not os.path.isabs(path):
            raise ControlError("invalid", f"CBT log {path!r}: give an absolute path")
        if self.allowed_dirs and not is_inside(path, self.allowed_dirs):
            raise ControlError(
                "image",
                f"CBT log {path}: outside the allowed directories ({', '.join(self.allowed_dirs)})",
            )
