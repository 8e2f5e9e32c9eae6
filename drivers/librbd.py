"""librados and librbd through ctypes: the calls the rbd driver makes, errors as OSError.

Why not Debian's Python binding for the I/O path: it runs every completion's Python
callback on librbd's thread, which has to take the GIL from the event loop (twice for a
read: the binding asks librbd for the result with the GIL dropped), it allocates a read's
bytes and a write needs bytes, so each request was copied once more.  Here no librbd
thread ever runs Python: librbd writes to an eventfd when completions are ready
(``rbd_set_image_notification``) and the event loop collects them with
``rbd_poll_io_events``; reads land in the caller's buffer and writes leave from it.

The libraries are loaded on first use, so a tapdisk serving files never maps them.
"""

from __future__ import annotations

import ctypes
import os
from ctypes import POINTER, byref, c_char_p, c_int, c_size_t, c_ssize_t, c_uint8, c_uint64
from functools import cache
from types import SimpleNamespace
from typing import Any

#: Every librados/librbd handle (rados_t, rados_ioctx_t, rbd_image_t, completions).
handle = ctypes.c_void_p

#: ``rbd_set_image_notification``'s kind of file descriptor (librbd.h: EVENT_TYPE_EVENTFD).
EVENT_TYPE_EVENTFD = 2
#: ``rbd_aio_write_zeroes``'s flag for a zeroed range left allocated (librbd.h).
WRITE_ZEROES_FLAG_THICK_PROVISION = 1
#: ``rbd_diff_iterate2``'s callback: (offset, length, exists, arg) -> 0 to go on.
DIFF_CALLBACK = ctypes.CFUNCTYPE(c_int, c_uint64, c_size_t, c_int, handle)

_PROTOTYPES: dict[str, tuple[Any, list[Any]]] = {
    # librados
    "rados_create": (c_int, [POINTER(handle), c_char_p]),
    "rados_conf_read_file": (c_int, [handle, c_char_p]),
    "rados_conf_set": (c_int, [handle, c_char_p, c_char_p]),
    "rados_conf_get": (c_int, [handle, c_char_p, c_char_p, c_size_t]),
    "rados_connect": (c_int, [handle]),
    "rados_shutdown": (None, [handle]),
    "rados_ioctx_create": (c_int, [handle, c_char_p, POINTER(handle)]),
    "rados_ioctx_set_namespace": (None, [handle, c_char_p]),
    "rados_ioctx_destroy": (None, [handle]),
    "rados_mon_command": (
        c_int,
        [handle, POINTER(c_char_p), c_size_t, c_char_p, c_size_t]
        + [POINTER(handle), POINTER(c_size_t)] * 2,
    ),
    "rados_buffer_free": (None, [handle]),
    # librbd: images
    "rbd_image_options_create": (None, [POINTER(handle)]),
    "rbd_image_options_destroy": (None, [handle]),
    "rbd_create4": (c_int, [handle, c_char_p, c_uint64, handle]),
    "rbd_open": (c_int, [handle, c_char_p, POINTER(handle), c_char_p]),
    "rbd_open_read_only": (c_int, [handle, c_char_p, POINTER(handle), c_char_p]),
    "rbd_close": (c_int, [handle]),
    "rbd_get_size": (c_int, [handle, POINTER(c_uint64)]),
    "rbd_snap_create": (c_int, [handle, c_char_p]),
    "rbd_diff_iterate2": (
        c_int,
        [handle, c_char_p, c_uint64, c_uint64, c_uint8, c_uint8, DIFF_CALLBACK, handle],
    ),
    # librbd: asynchronous I/O
    "rbd_set_image_notification": (c_int, [handle, c_int, c_int]),
    "rbd_poll_io_events": (c_int, [handle, POINTER(handle), c_int]),
    "rbd_aio_create_completion": (c_int, [handle, handle, POINTER(handle)]),
    "rbd_aio_read2": (c_int, [handle, c_uint64, c_size_t, handle, handle, c_int]),
    "rbd_aio_write2": (c_int, [handle, c_uint64, c_size_t, handle, handle, c_int]),
    "rbd_aio_discard": (c_int, [handle, c_uint64, c_uint64, handle]),
    "rbd_aio_write_zeroes": (c_int, [handle, c_uint64, c_size_t, handle, c_int, c_int]),
    "rbd_aio_flush": (c_int, [handle, handle]),
    "rbd_aio_get_return_value": (c_ssize_t, [handle]),
    "rbd_aio_release": (None, [handle]),
}


@cache
def lib() -> Any:
    """librados and librbd with their prototypes, as attributes named like the C calls;
    loaded once per process."""
    rados = ctypes.CDLL("librados.so.2", use_errno=True)
    rbd = ctypes.CDLL("librbd.so.1", use_errno=True)
    calls = SimpleNamespace()
    for name, (restype, argtypes) in _PROTOTYPES.items():
        function = getattr(rados if name.startswith("rados_") else rbd, name)
        function.restype, function.argtypes = restype, argtypes
        setattr(calls, name, function)
    return calls


def check(result: int, what: str) -> int:
    """``result`` if it is not a negative errno, else OSError naming ``what``."""
    if result < 0:
        raise OSError(-result, f"{what}: {os.strerror(-result)}")
    return result


def encode(text: str | None) -> bytes | None:
    return None if text is None else text.encode()


def mon_command(cluster: Any, command: str) -> bytes:
    """Send a JSON ``command`` to the monitors (blocking, up to ``rados_mon_op_timeout``);
    its output, or OSError with the monitor's status line."""
    calls = lib()
    argv = (c_char_p * 1)(command.encode())
    out, out_len, status, status_len = handle(), c_size_t(), handle(), c_size_t()
    result = calls.rados_mon_command(
        cluster, argv, 1, b"", 0, byref(out), byref(out_len), byref(status), byref(status_len)
    )
    try:
        if result < 0:
            said = ctypes.string_at(status.value, status_len.value) if status.value else b""
            raise OSError(-result, said.decode(errors="replace") or os.strerror(-result))
        return ctypes.string_at(out.value, out_len.value) if out.value else b""
    finally:
        for buffer in (out, status):
            if buffer.value:
                calls.rados_buffer_free(buffer)
