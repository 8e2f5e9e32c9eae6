"""XCP-ng's storage manager driving the project's tap-ctl against real tapdisks.

``sm_tapctl.SMTapCtl`` calls tap-ctl as SM's ``libs/sm/blktap2.py`` does (argument
lists, output parsing, exit codes); each test walks one of SM's paths: a VDI
activated and deactivated, paused and unpaused around a snapshot, a launch that
fails, and the options SM passes.  The data goes through the NBD socket SM links for
qemu, ``<dir>/nbd<pid>.<minor>``.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from helpers import require, run
from sm_tapctl import CommandFailure, InvalidState, SMTapCtl
from tapctl_helpers import TAP_CTL, alive, nbd_uri, wait_gone

VHD_UTIL = str(Path(TAP_CTL).with_name("vhd-util"))


@pytest.fixture
def sm(tapctl) -> SMTapCtl:
    """SM's calls over the ``tapctl`` fixture's private directory (which stops leftovers)."""
    return SMTapCtl(TAP_CTL, tapctl.dir)


def make_image(tmp_path: Path, kind: str, name: str = "disk") -> Path:
    """An image of SM's types, made as SM makes them: vhd-util for VHD, a file for aio."""
    path = tmp_path / f"{name}.{kind}"
    if kind == "vhd":
        run(VHD_UTIL, "create", "-n", path, "-s", "16")
    else:
        run(require("qemu-img"), "create", "-q", "-f", "raw", path, "16M")
    return path


def nbd_socket(sm: SMTapCtl, pid: int, minor: int) -> str:
    """The socket SM links for qemu (``VDI.linkNBD``)."""
    return f"{sm.directory}/nbd{pid}.{minor}"


def qemu_io(sock: str, *commands: str) -> str:
    args = [arg for command in commands for arg in ("-c", command)]
    out = run(require("qemu-io"), "-f", "raw", *args, nbd_uri(sock))
    assert "Pattern verification failed" not in out, out
    return out


@pytest.mark.parametrize("kind", ["vhd", "aio"])
def test_a_vdi_activated_paused_unpaused_and_deactivated_as_sm_does(sm, tmp_path, kind):
    path = str(make_image(tmp_path, kind))

    # activate: allocate, spawn, attach, open, then find the tapdisk by its minor
    tapdisk = sm.launch(path, kind, {"rdonly": False, "o_direct": False, "timeout": 30})
    assert (tapdisk.type, tapdisk.path, tapdisk.state) == (kind, path, 0)
    assert tapdisk.is_running() and not tapdisk.is_paused()
    assert alive(tapdisk.pid)
    assert sm.find(path=path) == tapdisk
    assert sm.find(pid=tapdisk.pid, minor=tapdisk.minor) == tapdisk
    assert sm.tapdisks(_type=kind) == [tapdisk]
    sock = nbd_socket(sm, tapdisk.pid, tapdisk.minor)
    qemu_io(sock, "write -P 0x5a 1M 64k", "read -P 0x5a 1M 64k")

    # pause (SM checks the 0x30 mask first), then unpause on the same image
    paused = sm.pause_tapdisk(tapdisk)
    assert paused.is_paused() and not paused.is_running()
    with pytest.raises(InvalidState):
        sm.pause_tapdisk(paused)
    running = sm.unpause_tapdisk(paused)
    assert running == tapdisk
    qemu_io(sock, "read -P 0x5a 1M 64k")

    # stats, as SM's lcache and xapi read them
    stats = sm.stats(tapdisk.pid, tapdisk.minor)
    assert stats["name"] == f"{kind}:{path}"
    assert stats["images"][0]["name"] == path
    assert stats["secs"][1] == 128 and stats["images"][0]["hits"][1] == 128
    assert stats["nbd_mirror_failed"] == 0 and stats["reqs_outstanding"] == 0

    # deactivate: close -t 120, detach, free; the tapdisk exits by itself
    sm.shutdown(tapdisk)
    assert wait_gone(tapdisk.pid)
    assert sm.find(path=path) is None
    assert sm.list() == []
    assert not os.path.exists(sock)
    assert not (sm.directory / "tapdisk" / f"tapdisk-{tapdisk.minor}").exists()


def test_an_unpause_onto_a_snapshot_leaf_serves_the_new_leaf(sm, tmp_path):
    base = make_image(tmp_path, "vhd", "base")
    tapdisk = sm.launch(str(base), "vhd", {})
    qemu_io(nbd_socket(sm, tapdisk.pid, tapdisk.minor), "write -P 0x11 0 64k")
    paused = sm.pause_tapdisk(tapdisk)
    leaf = tmp_path / "leaf.vhd"
    run(VHD_UTIL, "snapshot", "-n", leaf, "-p", base)
    running = sm.unpause_tapdisk(paused, str(leaf))
    assert (running.path, running.state) == (str(leaf), 0)
    qemu_io(nbd_socket(sm, tapdisk.pid, tapdisk.minor), "read -P 0x11 0 64k")
    images = sm.stats(tapdisk.pid, tapdisk.minor)["images"]
    assert [image["name"] for image in images] == [str(leaf), str(base)]
    sm.shutdown(running)
    assert wait_gone(tapdisk.pid)


def test_a_launch_that_fails_to_open_leaves_nothing_behind(sm, tmp_path):
    missing = str(tmp_path / "missing.vhd")
    with pytest.raises(CommandFailure) as failure:
        sm.launch(missing, "vhd", {})
    assert failure.value.status != 0
    assert "no such file" in failure.value.errmsg
    assert "\n" not in failure.value.errmsg.strip() and "Traceback" not in failure.value.errmsg
    assert sm.list() == []  # no tapdisk (it exited after the detach), no allocated minor
    assert list((sm.directory / "tapdisk").iterdir()) == []


def test_a_system_error_at_open_is_the_exit_status_sm_reads(sm, tmp_path):
    """SM tells an empty CD drive by status 123 (ENOMEDIUM) from open: tap-ctl exits with
    the errno the tapdisk met, here ELOOP from a symbolic link to itself."""
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(CommandFailure) as failure:
        sm.launch(str(loop), "aio", {})
    assert failure.value.status == errno.ELOOP
    assert "Too many levels of symbolic links" in failure.value.errmsg
    assert sm.list() == []


def test_a_read_only_open_with_a_timeout_is_served_read_only(sm, tapctl, tmp_path):
    path = str(make_image(tmp_path, "aio"))
    tapdisk = sm.launch(path, "aio", {"rdonly": True, "timeout": 7})
    info = json.loads(run(require("nbdinfo"), "--json", nbd_uri(nbd_socket(sm, **_ids(tapdisk)))))
    assert info["exports"][0]["is_read_only"] is True
    [listed] = tapctl.listing()
    assert (listed["read_only"], listed["timeout"]) == (True, 7)
    sm.shutdown(tapdisk)


def _ids(tapdisk) -> dict[str, int]:
    return {"pid": tapdisk.pid, "minor": tapdisk.minor}


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        ({"lcache": True}, "-r"),
        ({"existing_prt": 3}, "-e"),
        ({"key": b"k" * 32}, "-E"),
    ],
)
def test_an_open_with_a_flag_not_done_here_is_refused_in_one_line(sm, tmp_path, options, flag):
    path = str(make_image(tmp_path, "vhd"))
    with pytest.raises(CommandFailure) as failure:
        sm.launch(path, "vhd", options)
    errmsg = failure.value.errmsg
    assert errmsg.startswith(f"tap-ctl: open: {flag} (") and errmsg.endswith("is not supported")
    assert "usage" not in errmsg and ";" not in errmsg  # one line
    assert sm.list() == []


def test_an_unpause_with_a_mirror_copies_every_write_until_the_next_unpause(sm, tmp_path):
    path = str(make_image(tmp_path, "vhd"))
    mirror = make_image(tmp_path, "aio", "mirror")
    tapdisk = sm.pause_tapdisk(sm.launch(path, "vhd", {}))
    sm.unpause(tapdisk.pid, tapdisk.minor, "vhd", path, mirror=f"aio:{mirror}")
    tapdisk = sm.refreshed(tapdisk)
    assert tapdisk.is_running() and (tapdisk.type, tapdisk.path) == ("vhd", path)
    sock = nbd_socket(sm, tapdisk.pid, tapdisk.minor)
    qemu_io(sock, "write -P 0x5a 1M 64k")
    assert sm.stats(tapdisk.pid, tapdisk.minor)["nbd_mirror_failed"] == 0
    with open(mirror, "rb") as f:
        f.seek(1 << 20)
        assert f.read(65536) == b"\x5a" * 65536
    sm.unpause_tapdisk(sm.pause_tapdisk(tapdisk))  # SM's unpause names no mirror: it ends
    qemu_io(sock, "write -P 0x6b 1M 64k")
    with open(mirror, "rb") as f:
        f.seek(1 << 20)
        assert f.read(65536) == b"\x5a" * 65536
    sm.shutdown(sm.refreshed(tapdisk))


def test_a_forced_close_ends_the_vdi_as_a_plain_one_does(sm, tmp_path):
    path = str(make_image(tmp_path, "aio"))
    tapdisk = sm.launch(path, "aio", {})
    sm.shutdown(tapdisk, force=True)
    assert wait_gone(tapdisk.pid)
    assert sm.list() == []


def test_two_vdis_get_two_tapdisks_and_minors(sm, tmp_path):
    first = sm.launch(str(make_image(tmp_path, "vhd", "a")), "vhd", {})
    second = sm.launch(str(make_image(tmp_path, "aio", "b")), "aio", {})
    assert first.pid != second.pid and first.minor != second.minor
    assert sm.tapdisks() == sorted([first, second], key=lambda t: str(t.pid))
    sm.shutdown(first)
    assert wait_gone(first.pid)
    assert sm.tapdisks() == [second]
    sm.shutdown(second)
    assert wait_gone(second.pid)
