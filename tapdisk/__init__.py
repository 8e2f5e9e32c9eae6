"""tapdisk: a userspace block-device daemon serving disk images over NBD."""

__version__ = "0.1.0"
