"""One line of ``vhd-util scan`` output, for a file (``queries``) or a volume (``volumes``)."""

from __future__ import annotations

import os


class ScanImage:
    """One line of ``vhd-util scan`` output."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.error: tuple[int, str] | None = None
        self.capacity = self.size = self.hidden = self.marker = 0
        self.keyhash = ""
        self.parent: str | None = None

    def line(self, verbose: bool, markers: bool, tab: int, pretty_missing: bool) -> str:
        pad = " " * tab
        if self.error:
            return (
                f"{pad}vhd={self.path} scan-error={self.error[0]} error-message='{self.error[1]}'"
            )
        name = self.path if verbose else os.path.basename(self.path)
        parent = "none"
        if self.parent:
            parent = self.parent if verbose else os.path.basename(self.parent)
        note = " (not found in scan)" if pretty_missing and self.parent else ""
        if markers:
            return (
                f"{pad}vhd={name} capacity={self.capacity} size={self.size} hidden={self.hidden} "
                f"marker={self.marker} keyhash={self.keyhash} parent={parent}{note}"
            )
        return (
            f"{pad}vhd={name} capacity={self.capacity} size={self.size} hidden={self.hidden} "
            f"parent={parent}{note}"
        )
