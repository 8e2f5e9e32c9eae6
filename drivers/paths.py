"""The one rule for which files a path may lead to.

Paths come from people (image specs given to the daemon, the configuration's
devices) and from images (qcow2/qcow backing files, VHD parent locators); the
second kind is untrusted input.  Every caller asks the same question here: with
every symlink resolved, is the path one of the allowed directories or below one?
Comparing resolved paths by whole components keeps ``/srv/images-evil`` out of
``/srv/images``, and a symlink inside an allowed directory cannot lead out of it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable


def is_inside(path: str, allowed_dirs: Iterable[str]) -> bool:
    """Whether ``path``, symlinks resolved, is an allowed directory or lies below one.

    A path that cannot name a file (empty, or holding a NUL byte) is inside nothing.
    """
    if not path or "\0" in path:
        return False
    real = os.path.realpath(path)
    for top in allowed_dirs:
        if not top or "\0" in top:
            continue
        root = os.path.realpath(top)
        if real == root or real.startswith(root.rstrip("/") + "/"):
            return True
    return False
