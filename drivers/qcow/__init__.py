"""Legacy QCOW (version 1) images, ``qcow:/path``: the layout and the ``Image``."""

from .format import create_qcow
from .image import QcowImage, open_qcow

__all__ = ["QcowImage", "create_qcow", "open_qcow"]
