"""Sizes written by people (``512``, ``64k``, ``1.5G``, ``1MiB``) turned into bytes.

One grammar for every size a person types: ``tap-img`` image sizes, creation
options such as ``cluster_size=64k``, and the configuration file's
``merge_size``.  A size is a decimal number, optionally with a fraction, then
optional spaces and an optional unit ``K``, ``M``, ``G``, ``T`` or ``P`` (any
case, binary multiples as in qemu-img), which may be followed by ``B`` or
``iB``; a bare ``B`` means bytes.  A fraction of a byte is dropped, as
qemu-img does.  Signs, exponents and digit separators are refused.
"""

from __future__ import annotations

import re

from .base import ImageError

_SIZE = re.compile(r"(\d+\.?\d*|\.\d+)\s*(?:([KMGTP])(?:i?B)?|B)?", re.IGNORECASE | re.ASCII)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str) -> int:
    """Bytes in ``text`` (``64M``, ``1.5G``, ``512``, ``1MiB``); ImageError if it is no size."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ImageError(f"bad size {text!r}: expected a number and an optional unit, e.g. 64M")
    whole, _, fraction = match[1].partition(".")
    scale = _UNITS[(match[2] or "").upper()]
    # Integer arithmetic: a float would lose bytes above 2**53.
    return int(whole or "0") * scale + int(fraction or "0") * scale // 10 ** len(fraction)
