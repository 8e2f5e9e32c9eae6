"""tapdisk/kernel.py on the host: real netlink sockets, no nbd driver needed.

The nbd driver itself is exercised in tests/kernel (inside a VM).  Here: the
netlink I/O shell against the host kernel's generic netlink controller, the
errors when the nbd driver is absent, and the argument checks made before
anything is sent.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator

import pytest

from tapdisk import kernel
from tapdisk.kernel import KernelAttachError
from tapdisk.nbd.constants import TransmissionFlag

FLAGS = int(TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH)


def nbd_installed() -> bool:
    """True when this host could load nbd.ko (then its absence cannot be tested)."""
    if os.path.exists("/sys/module/nbd"):
        return True
    modinfo = shutil.which("modinfo") or "/sbin/modinfo"
    try:
        return subprocess.run([modinfo, "nbd"], capture_output=True).returncode == 0
    except OSError:
        return False


without_nbd = pytest.mark.skipif(nbd_installed(), reason="this host has an nbd driver")


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


def test_controller_family_resolves_over_a_real_netlink_socket() -> None:
    with kernel.GenlSocket() as sock:
        family = sock.family("nlctrl")
    assert family.id == 0x10  # GENL_ID_CTRL
    assert family.name == "nlctrl"


def test_unknown_family_is_enoent() -> None:
    with kernel.GenlSocket() as sock, pytest.raises(KernelAttachError) as missing:
        sock.family("no-such-family")
    assert missing.value.errno == errno.ENOENT


@without_nbd
def test_requests_without_the_nbd_driver_say_how_to_load_it() -> None:
    with pytest.raises(KernelAttachError) as missing:
        kernel.status()
    assert missing.value.errno == errno.ENOENT
    assert "modprobe nbd" in str(missing.value)


@without_nbd
def test_ensure_module_reports_a_kernel_without_nbd_support() -> None:
    with pytest.raises(KernelAttachError) as missing:
        kernel.ensure_module()
    assert missing.value.errno == errno.ENOENT
    assert "no nbd support" in str(missing.value)


def test_two_sockets_need_multi_conn(pair: tuple[socket.socket, socket.socket]) -> None:
    with pytest.raises(KernelAttachError, match="CAN_MULTI_CONN") as refused:
        kernel.connect(list(pair), 1 << 20, server_flags=FLAGS, backend_id="t")
    assert refused.value.errno == errno.EINVAL


def test_block_size_must_be_a_power_of_two(pair: tuple[socket.socket, socket.socket]) -> None:
    with pytest.raises(KernelAttachError, match="block size 1000"):
        kernel.connect([pair[0]], 1 << 20, server_flags=FLAGS, backend_id="t", block_size=1000)


def test_zero_timeout_is_refused(pair: tuple[socket.socket, socket.socket]) -> None:
    with pytest.raises(KernelAttachError, match="timeout 0"):
        kernel.connect([pair[0]], 1 << 20, server_flags=FLAGS, backend_id="t", timeout=0)


def test_connect_needs_a_socket() -> None:
    with pytest.raises(KernelAttachError, match="no sockets"):
        kernel.connect([], 1 << 20, server_flags=FLAGS, backend_id="t")


def test_datagram_socket_is_refused() -> None:
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as dgram,
        pytest.raises(KernelAttachError, match="not a stream socket"),
    ):
        kernel.connect([dgram], 1 << 20, server_flags=FLAGS, backend_id="t")


@without_nbd
def test_link_dead_watcher_without_the_nbd_driver_is_enoent() -> None:
    with pytest.raises(KernelAttachError) as missing:
        kernel.LinkDeadWatcher()
    assert missing.value.errno == errno.ENOENT


def test_backend_of_a_missing_device_is_none() -> None:
    assert kernel.backend(4000) is None
