"""blktap's tap-ctl contract, byte for byte: list lines, stats JSON, minors, flags, lifetimes.

The expected texts are written out from blktap's sources (control/tap-ctl.c prints the
list rows, drivers/tapdisk-stats.c spaces the stats JSON, drivers/tapdisk-vbd.h holds
the state bits); test_tapctl_sm.py checks the same through SM's eyes.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from helpers import require, run
from tapctl_helpers import TAP_CTL, alive, nbd_uri, wait_gone


def allocate(tapctl, *flags: str) -> int:
    path = tapctl.out("allocate", *flags)
    match = re.fullmatch(rf"{re.escape(str(tapctl.dir))}/tapdisk/tapdisk-(\d+)", path)
    assert match, path
    return int(match[1])


def attached(tapctl) -> tuple[str, int]:
    """A spawned tapdisk with an allocated minor attached: (pid, minor)."""
    minor = allocate(tapctl)
    pid = tapctl.out("spawn")
    tapctl.out("attach", "-p", pid, "-m", str(minor))
    return pid, minor


def opened(tapctl, spec: str) -> tuple[str, int]:
    """A minor opened in SM's order: allocate, spawn, attach, open; (pid, minor)."""
    pid, minor = attached(tapctl)
    tapctl.out("open", "-p", pid, "-m", str(minor), "-a", spec)
    return pid, minor


# -- list -----------------------------------------------------------------------------


def test_list_lines_follow_a_minor_through_its_life(tapctl, raw_image):
    path = raw_image("16M")
    minor = allocate(tapctl)
    assert tapctl.out("list") == f"minor={minor}"  # allocated, attached to no tapdisk
    pid = tapctl.out("spawn")
    assert tapctl.out("list") == f"pid={pid}\nminor={minor}"
    tapctl.out("attach", "-p", pid, "-m", str(minor))
    assert tapctl.out("list") == f"pid={pid} minor={minor} state=0"
    tapctl.out("open", "-p", pid, "-m", str(minor), "-a", f"aio:{path}")
    assert tapctl.out("list") == f"pid={pid} minor={minor} state=0 args=aio:{path}"
    tapctl.out("pause", "-p", pid, "-m", str(minor))
    assert tapctl.out("list") == f"pid={pid} minor={minor} state=0x2a args=aio:{path}"
    tapctl.out("unpause", "-p", pid, "-m", str(minor))
    assert tapctl.out("list") == f"pid={pid} minor={minor} state=0 args=aio:{path}"
    tapctl.out("close", "-p", pid, "-m", str(minor))
    assert tapctl.out("list") == f"pid={pid} minor={minor} state=0x2"
    tapctl.out("detach", "-p", pid, "-m", str(minor))
    assert wait_gone(int(pid))
    assert tapctl.out("list") == f"minor={minor}"
    tapctl.out("free", "-m", str(minor))
    assert tapctl.out("list") == ""


def test_list_orders_tapdisks_by_socket_name_and_minors_latest_first(tapctl, raw_image):
    a, b = raw_image("16M", name="a.raw"), raw_image("16M", name="b.raw")
    pid, first = opened(tapctl, f"aio:{a}")
    second = allocate(tapctl)
    tapctl.out("attach", "-p", pid, "-m", str(second))
    tapctl.out("open", "-p", pid, "-m", str(second), "-a", f"aio:{b}")
    idle = tapctl.out("spawn")
    spare = allocate(tapctl)
    rows = {
        pid: f"pid={pid} minor={second} state=0 args=aio:{b}\n"
        f"pid={pid} minor={first} state=0 args=aio:{a}",
        idle: f"pid={idle}",
    }
    expected = "\n".join(rows[key] for key in sorted(rows)) + f"\nminor={spare}"
    assert tapctl.out("list") == expected


def test_list_filters_as_blktap_does(tapctl, raw_image):
    path = raw_image("16M")
    pid, minor = opened(tapctl, f"aio:{path}")
    idle = tapctl.out("spawn")
    spare = allocate(tapctl)
    line = f"pid={pid} minor={minor} state=0 args=aio:{path}"
    assert tapctl.out("list", "-m", str(minor)) == line
    assert tapctl.out("list", "-m", str(spare)) == f"minor={spare}"
    assert tapctl.out("list", "-p", pid) == line
    assert tapctl.out("list", "-p", idle) == f"pid={idle}"
    assert tapctl.out("list", "-p", "999999") == ""  # no such tapdisk: nothing, status 0
    assert tapctl.out("list", "-t", "aio") == line
    assert tapctl.out("list", "-t", "vhd") == ""
    assert tapctl.out("list", "-f", str(path)) == line
    assert tapctl.out("list", "-f", "/elsewhere") == ""


def test_list_json_has_the_idle_tapdisks_and_the_unattached_minors(tapctl):
    pid, minor = attached(tapctl)
    idle = int(tapctl.out("spawn"))
    spare = allocate(tapctl)
    listing = json.loads(tapctl.out("list", "--json"))
    assert listing["idle"] == [idle]
    assert listing["unattached"] == [spare]
    [info] = listing["tapdisks"]
    assert info == {
        "pid": int(pid),
        "minor": minor,
        "state": 0,
        **dict.fromkeys(
            ("spec", "size", "read_only", "cbt_log", "timeout", "nbd_socket", "device")
        ),
    }


# -- stats ------------------------------------------------------------------------------


def test_stats_prints_blktaps_json_then_this_projects_counters(tapctl, raw_image):
    path = raw_image("16M")
    pid, minor = opened(tapctl, f"aio:{path}")
    sock = f"{tapctl.dir}/nbd{pid}.{minor}"
    run(require("qemu-io"), "-f", "raw", "-c", "write 0 64k", "-c", "read 0 128k", nbd_uri(sock))
    out = tapctl("stats", "-p", pid, "-m", str(minor)).stdout
    blktap = (
        f'{{ "name": "aio:{path}", "secs": [ 256, 128 ], '
        f'"images": [ {{ "name": "{path}", "hits": [ 256, 128 ], "fail": [ 0, 0 ], '
        '"driver": { "type": 0, "name": "aio", "status": { "reqs": { "max": 352, "pending": 0 } '
        "} } } ], "
        '"FIXME_enospc_redirect_count": 0, "nbd_mirror_failed": 0, "reqs_outstanding": 0, '
        '"read_caching": "true", "vbd": { '
    )
    assert out.startswith(blktap), out
    assert out.endswith(" } }\n") and out.count("\n") == 1
    ours = json.loads(out)["vbd"]
    assert (ours["pid"], ours["minor"], ours["bytes_read"]) == (int(pid), minor, 128 << 10)
    assert '"errors": [  ]' in out  # blktap spaces an empty list so


def test_stats_count_failed_sectors_at_the_leaf_as_blktap_does(tapctl, raw_image):
    path = raw_image("16M")
    pid, minor = opened(tapctl, f"fault:ops=read,errno=ENOSPC:raw:{path}")  # not retried
    sock = f"{tapctl.dir}/nbd{pid}.{minor}"
    subprocess.run(
        [require("qemu-io"), "-f", "raw", "-c", "read 0 4k", nbd_uri(sock)], capture_output=True
    )
    stats = json.loads(tapctl.out("stats", "-p", pid, "-m", str(minor)))
    assert stats["secs"] == [8, 0]  # blktap counts a failed sector too
    [image] = stats["images"]
    assert (image["name"], image["hits"], image["fail"]) == (str(path), [8, 0], [8, 0])


def test_stats_of_a_paused_image_list_no_images(tapctl, raw_image):
    pid, minor = opened(tapctl, f"aio:{raw_image('16M')}")
    tapctl.out("pause", "-p", pid, "-m", str(minor))
    out = tapctl.out("stats", "-p", pid, "-m", str(minor))
    assert '"images": [  ]' in out


# -- minors -----------------------------------------------------------------------------


def test_allocate_takes_the_lowest_free_minor_or_the_one_asked_for(tapctl):
    assert [allocate(tapctl) for _ in range(3)] == [0, 1, 2]
    tapctl.out("free", "-m", "1")
    assert allocate(tapctl) == 1
    assert allocate(tapctl, "-d", "7") == 7
    assert allocate(tapctl, "-d", f"{tapctl.dir}/tapdisk/tapdisk-9") == 9
    proc = tapctl("allocate", "-d", "7", check=False)
    assert (proc.returncode, proc.stderr) == (1, "tap-ctl: minor 7 is already allocated\n")


def test_a_minor_is_attached_to_one_tapdisk_at_a_time(tapctl):
    pid, minor = attached(tapctl)
    other = tapctl.out("spawn")
    proc = tapctl("attach", "-p", other, "-m", str(minor), check=False)
    assert proc.returncode == 1
    assert proc.stderr == f"tap-ctl: minor {minor} is attached to another tapdisk\n"
    proc = tapctl("attach", "-p", pid, "-m", str(minor), check=False)
    assert f"minor {minor} is already attached to tapdisk {pid}" in proc.stderr


def test_attach_of_a_minor_not_allocated_is_refused(tapctl):
    pid = tapctl.out("spawn")
    proc = tapctl("attach", "-p", pid, "-m", "4", check=False)
    assert proc.returncode == 1
    assert proc.stderr == "tap-ctl: minor 4 is not allocated (tap-ctl allocate first)\n"
    assert tapctl.out("list") == f"pid={pid}"


def test_free_of_an_attached_minor_is_refused(tapctl):
    _, minor = attached(tapctl)
    proc = tapctl("free", "-m", str(minor), check=False)
    assert proc.returncode == 1
    assert "is attached to a tapdisk: detach it first" in proc.stderr
    assert (tapctl.dir / "tapdisk" / f"tapdisk-{minor}").exists()
    proc = tapctl("free", "-m", "42", check=False)
    assert proc.stderr == "tap-ctl: minor 42 is not allocated\n"


def test_open_on_a_minor_not_attached_is_refused(tapctl, raw_image):
    pid = tapctl.out("spawn")
    minor = allocate(tapctl)
    proc = tapctl("open", "-p", pid, "-m", str(minor), "-a", f"aio:{raw_image('16M')}", check=False)
    assert proc.returncode == 1
    assert f"minor {minor} is not attached to tapdisk {pid}" in proc.stderr


def test_detach_of_an_open_minor_is_refused(tapctl, raw_image):
    path = raw_image("16M")
    pid, minor = opened(tapctl, f"aio:{path}")
    proc = tapctl("detach", "-p", pid, "-m", str(minor), check=False)
    assert proc.returncode == 1
    assert proc.stderr == f"tap-ctl: minor {minor} has aio:{path} open: close it first\n"
    assert tapctl.out("list") == f"pid={pid} minor={minor} state=0 args=aio:{path}"


def test_attach_and_open_work_without_the_nbd_driver(tapctl, raw_image):
    if Path("/sys/module/nbd").exists():
        pytest.skip("nbd.ko is loaded: tests/kernel covers the connection at open")
    _, minor = opened(tapctl, f"aio:{raw_image('16M')}")
    [info] = tapctl.listing()
    assert info["device"] is None
    assert (tapctl.dir / "tapdisk" / f"tapdisk-{minor}").read_text() == ""


# -- lifetimes ----------------------------------------------------------------------------


def test_a_tapdisk_exits_once_its_last_minor_is_detached(tapctl, raw_image):
    pid, first = opened(tapctl, f"aio:{raw_image('16M', name='a.raw')}")
    second = allocate(tapctl)
    tapctl.out("attach", "-p", pid, "-m", str(second))
    tapctl.out("close", "-p", pid, "-m", str(first))
    tapctl.out("detach", "-p", pid, "-m", str(first))
    assert not wait_gone(int(pid), timeout=1)  # one minor still attached
    tapctl.out("detach", "-p", pid, "-m", str(second))
    assert wait_gone(int(pid))
    assert not (tapctl.dir / f"ctl{pid}").exists()


def test_a_spawned_tapdisk_stays_until_a_minor_came_and_went(tapctl):
    pid = int(tapctl.out("spawn"))
    assert not wait_gone(pid, timeout=1)
    assert alive(pid)


def test_sigterm_frees_the_minors_the_tapdisk_allocated_and_keeps_the_others(tapctl, raw_image):
    pid, minor = attached(tapctl)
    own = tapctl.out("open", "-p", pid, "-a", f"raw:{raw_image('16M')}")
    own_minor = int(own.rsplit(".", 1)[1])
    os.kill(int(pid), 15)
    assert wait_gone(int(pid))
    assert tapctl.out("list") == f"minor={minor}"
    assert not (tapctl.dir / "tapdisk" / f"tapdisk-{own_minor}").exists()


# -- flags ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["close", "-t", "120", "-f"],
        ["pause", "-t", "10"],
        ["destroy", "-t", "120"],
    ],
)
def test_blktaps_timeout_and_force_flags_are_accepted(tapctl, raw_image, command):
    pid, minor = opened(tapctl, f"aio:{raw_image('16M')}")
    name, *flags = command
    tapctl.out(name, "-p", pid, "-m", str(minor), *flags)


def test_open_accepts_no_o_direct(tapctl, raw_image):
    path = raw_image("16M")
    pid, minor = attached(tapctl)
    tapctl.out("open", "-p", pid, "-m", str(minor), "-a", f"aio:{path}", "-D", "-t", "30")
    [info] = tapctl.listing()
    assert (info["spec"], info["timeout"]) == (f"aio:{path}", 30)


def test_create_refuses_the_flags_it_does_not_do_in_one_line(tapctl, raw_image):
    proc = tapctl("create", "-a", f"vhd:{raw_image('16M')}", "-e", "3", check=False)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == (
        "tap-ctl: create: -e (sharing the parent chain of another minor) is not supported\n"
    )
    assert tapctl.pids() == []


def test_an_unknown_flag_is_a_one_line_usage_error_exiting_einval(tapctl):
    proc = tapctl("close", "-p", "1", "-m", "0", "-Z", check=False)
    assert (proc.returncode, proc.stdout) == (errno.EINVAL, "")
    assert proc.stderr == "tap-ctl: unrecognized arguments: -Z\n"
    proc = tapctl("free", "-m", "x", check=False)
    assert (proc.returncode, proc.stdout) == (errno.EINVAL, "")
    assert proc.stderr == "tap-ctl free: argument -m/--minor: invalid int value: 'x'\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["free"], "missing -m MINOR"),
        (["attach", "-m", "0"], "missing -p PID (or -d DEVICE)"),
        (["attach", "-p", "1"], "missing -m MINOR (or -d DEVICE)"),
        (["detach", "-p", "1"], "missing -m MINOR (or -d DEVICE)"),
        (["open", "-p", "1", "-m", "0"], "the following arguments are required: -a/--args"),
        (["open", "-m", "0", "-a", "vhd:/x.vhd"], "missing -p PID (or -d DEVICE)"),
        (["close", "-m", "0"], "missing -p PID (or -d DEVICE)"),
        (["destroy", "-p", "1"], "missing -m MINOR (or -d DEVICE)"),
        (["pause", "-p", "1"], "missing -m MINOR (or -d DEVICE)"),
        (["unpause", "-m", "0"], "missing -p PID (or -d DEVICE)"),
        (["stats", "-m", "0"], "missing -p PID (or -d DEVICE)"),
        (["create"], "the following arguments are required: -a/--args"),
        (["allocate", "-d", "/dev/sda"], "bad minor '/dev/sda'"),
        (["bogus"], "argument COMMAND: invalid choice: 'bogus'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_a_usage_error_exits_einval_as_blktaps_tap_ctl(tapctl, argv, message):
    """blktap's tap-ctl prints its usage and returns EINVAL when -p, -m or -a is missing.
    (For an unknown command or none it prints its help and exits 0: here 22 too.)"""
    proc = tapctl(*argv, check=False)
    assert (proc.returncode, proc.stdout) == (errno.EINVAL, "")
    assert message in proc.stderr and proc.stderr.count("\n") == 1
    assert tapctl.pids() == []


def test_a_timeout_bounds_the_wait_for_a_hung_tapdisk(tapctl, raw_image):
    pid, minor = opened(tapctl, f"aio:{raw_image('16M')}")
    os.kill(int(pid), 19)  # SIGSTOP: the tapdisk accepts nothing more
    try:
        proc = subprocess.run(
            [TAP_CTL, "pause", "-p", pid, "-m", str(minor), "-t", "1"],
            env=tapctl.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        os.kill(int(pid), 18)
    assert proc.returncode == 1
    assert proc.stderr == f"tap-ctl: tapdisk {pid} did not answer pause in time\n"
