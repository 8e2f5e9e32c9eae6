"""``vhd-util key``: the hash of the key a VHD's data is encrypted with.

blktap keeps it in the batmap header (a VHD without one: in an extended
attribute) as a 32-byte nonce and SHA-256(nonce + key), and names key files
``<VHD name without .vhd>,aes-xts-plain,<512|256>.key``.  SM prints the hash of
every VHD it scans (``key -p``: ``none``, or ``NONCE HASH``) and sets it on the VHDs
it creates in an encrypted SR (``key -s -H``).  The hash is metadata only: this
tapdisk cannot encrypt, and its VHD driver refuses to serve a VHD that has one.
"""

from __future__ import annotations

import errno
import hashlib
import os

from tapdisk.drivers.paths import open_disk
from tapdisk.drivers.vhd import edit
from tapdisk.drivers.vhd.edit import EditError

from .args import UsageError, no_operands, parse_options
from .chain import open_meta

USAGE = (
    "usage:\n"
    "-C -k KEYPATH [-N NONCE]: calculate keyhash for KEYPATH\n"
    "-s -n NAME <-k KEYPATH> | -H HASH> [-N NONCE]: set keyhash for NAME\n"
    "-c -n NAME <-k KEYPATH>: check keyhash for NAME\n"
    "-p -n NAME: print keyhash for NAME\n"
    "-h help"
)
#: Key sizes blktap's crypto takes, in bits, in the order it tries key file names.
KEY_BITS = (512, 256)
#: The longest key blktap reads.
MAX_KEY_BYTES = 64


def cmd_key(argv: list[str]) -> int:
    o, rest = parse_options(argv, "n:k:N:H:scCph", USAGE)
    no_operands(rest, USAGE)
    nonce = _hex(o["N"], "nonce") if "N" in o else bytes(32)
    if "C" in o:
        if "k" not in o:
            raise UsageError(USAGE)
        print(keyhash(nonce, read_key(o["k"], 0)).hex())
        return 0
    name = o.get("n")
    if name is None:
        raise UsageError(USAGE)
    if "s" in o:
        if "c" in o or ("k" in o) == ("H" in o):
            raise UsageError(USAGE)
        if "H" in o:
            digest = _hex(o["H"], "hash")
        else:
            digest = keyhash(nonce, read_key(o["k"], key_bits(name, o["k"]) // 8))
        edit.set_keyhash(name, nonce, digest)
    elif "c" in o:
        if "k" not in o or "N" in o or "H" in o:
            raise UsageError(USAGE)
        _check(name, o["k"])
    elif "p" not in o:
        raise UsageError(USAGE)
    if "p" in o:
        cookie, stored_nonce, digest = _stored(name)
        print(f"{stored_nonce.hex()} {digest.hex()}" if cookie == 1 else "none")
    return 0


def keyhash(nonce: bytes, key: bytes) -> bytes:
    return hashlib.sha256(nonce + key).digest()


def _hex(text: str, what: str) -> bytes:
    """32 bytes from 64 hex digits."""
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise EditError(f"the {what} must be 64 hex digits, not {text!r}")
    return raw


def key_bits(vhd_name: str, key_path: str) -> int:
    """The key size a key file's name declares; its name must match the VHD's."""
    base = os.path.basename(vhd_name)
    base = base[: base.find(".vhd")] if ".vhd" in base else base
    for bits in KEY_BITS:
        if os.path.basename(key_path).startswith(f"{base},aes-xts-plain,{bits}.key"):
            return bits
    # blktap fails this with -1: exit status 1.
    raise EditError(
        f"invalid key name {key_path}: expected {base},aes-xts-plain,{KEY_BITS[0]}.key "
        f"or ...,{KEY_BITS[1]}.key",
        errno.EPERM,
    )


def read_key(path: str, size: int) -> bytes:
    """A key file's bytes: all of it, at most 64, exactly ``size`` when ``size`` is set."""
    with open(path, "rb") as f:
        key = f.read(MAX_KEY_BYTES + 1)
    if len(key) > MAX_KEY_BYTES:
        raise EditError(f"{path}: a key is at most {MAX_KEY_BYTES} bytes", errno.EIO)
    if size and len(key) != size:
        raise EditError(f"{path}: incorrect key size: {size} != {len(key)}")
    return key


def _stored(name: str) -> tuple[int, bytes, bytes]:
    fd = open_disk(name, os.O_RDONLY)
    try:
        return edit.get_keyhash(fd, open_meta(name))
    finally:
        os.close(fd)


def _check(name: str, key_path: str) -> None:
    cookie, nonce, digest = _stored(name)
    if cookie != 1:
        raise EditError(f"{name} has no keyhash")
    key = read_key(key_path, key_bits(name, key_path) // 8)
    if keyhash(nonce, key) != digest:
        raise EditError(f"{name}: its hash does not match the key in {key_path}")
