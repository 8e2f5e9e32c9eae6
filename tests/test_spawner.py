"""tap-ctl spawn forks tapdisks from one resident spawner per control directory.

The point is memory: the tapdisks share the code the spawner imported (bench/memory.py
measures it).  These tests check the behaviour around it: who the parent is, that
each tapdisk is a session of its own, and that the spawner goes once idle.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tapctl_helpers import alive, wait_gone

from tapdisk.daemon import spawner as spawner_module
from tapdisk.daemon.spawner import LINGER


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[1])


def session_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[3])


def command_of(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_text().split("\0")


def test_tapdisks_of_one_directory_are_forked_by_one_spawner(tapctl):
    first = int(tapctl.out("spawn"))
    second = int(tapctl.out("spawn"))
    spawner = parent_of(first)
    assert parent_of(second) == spawner
    assert "spawner" in command_of(spawner)
    assert (tapctl.dir / "spawner").is_socket()
    assert session_of(first) == first and session_of(second) == second


def test_the_spawner_exits_once_its_last_tapdisk_is_gone(tapctl):
    pid = int(tapctl.out("spawn"))
    spawner = parent_of(pid)
    tapctl("shutdown", "-p", str(pid))
    assert wait_gone(pid)
    assert alive(spawner)
    assert wait_gone(spawner, timeout=LINGER + 10)
    assert not (tapctl.dir / "spawner").exists()
    again = int(tapctl.out("spawn"))
    assert parent_of(again) != spawner


def test_a_killed_spawner_leaves_its_tapdisks_running_and_is_replaced(tapctl):
    first = int(tapctl.out("spawn"))
    spawner = parent_of(first)
    os.kill(spawner, signal.SIGKILL)
    assert wait_gone(spawner)
    second = int(tapctl.out("spawn"))
    assert alive(first)
    assert parent_of(second) not in (spawner, 1)


def test_the_spawner_rehearses_without_leaving_a_thread_to_fork(tapctl):
    """The rehearsal (a daemon, open, NBD requests) succeeds, logs none of its own lines
    (they name its private directory), and no thread of it is alive at a fork."""
    pid = int(tapctl.out("spawn"))
    spawner = parent_of(pid)
    assert os.listdir(f"/proc/{spawner}/task") == [str(spawner)]
    assert "rehearsal" not in (tapctl.dir / "tapdisk.log").read_text()


def test_a_spawner_whose_code_changed_on_disk_hands_over_to_a_new_one(tapctl):
    """An upgrade reaches the next tapdisk (and so ``tap-ctl restart``): the spawner
    forks no tapdisk from code that is no longer what is installed."""
    first = int(tapctl.out("spawn"))
    spawner = parent_of(first)
    module = Path(spawner_module.__file__)
    before = module.stat()
    os.utime(module, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    try:
        second = int(tapctl.out("spawn"))
    finally:
        os.utime(module, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert parent_of(second) not in (spawner, 1)
    assert wait_gone(spawner)
    assert alive(first)
