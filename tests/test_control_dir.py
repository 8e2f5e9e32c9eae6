"""The control directory: refused when another user could write it; no symlink inside is followed.

Each test shapes the private directory tap-ctl's fixture uses (``<tmp>/run``,
``<tmp>`` being a fresh 0700 directory under the sticky /tmp) and runs the real
tap-ctl and daemon on it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers import TAPDISK
from tapctl_helpers import alive

NOBODY = 65534


def refused(tapctl, *args: str) -> str:
    """tap-ctl's error for a command that must fail; no tapdisk may be left running."""
    result = tapctl(*args, check=False)
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stderr
    assert tapctl.pids() == []
    return result.stderr


def as_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")


def test_a_world_writable_control_directory_is_refused(tapctl):
    tapctl.dir.mkdir(mode=0o700)
    tapctl.dir.chmod(0o777)
    error = refused(tapctl, "spawn")
    assert f"{tapctl.dir} is writable by group or others (mode 0777)" in error


def test_a_sticky_control_directory_is_refused_too(tapctl):
    tapctl.dir.mkdir(mode=0o700)
    tapctl.dir.chmod(0o1777)  # others may still create entries such as tapdisk.log
    assert "is writable by group or others" in refused(tapctl, "spawn")


def test_a_group_writable_parent_is_refused(tapctl):
    tapctl.dir.parent.chmod(0o770)
    error = refused(tapctl, "spawn")
    assert f"{tapctl.dir.parent} is writable by group or others (mode 0770)" in error


def test_a_sticky_world_writable_parent_is_accepted(tapctl):
    tapctl.dir.parent.chmod(0o1777)  # as /tmp is
    assert int(tapctl.out("spawn")) in tapctl.pids()


def test_a_control_directory_owned_by_another_user_is_refused(tapctl):
    as_root()
    tapctl.dir.mkdir(mode=0o700)
    os.chown(tapctl.dir, NOBODY, NOBODY)
    assert f"{tapctl.dir} belongs to uid {NOBODY}" in refused(tapctl, "spawn")


def test_a_symlink_owned_by_another_user_on_the_way_is_refused(tapctl):
    as_root()
    real = tapctl.dir.parent / "real"
    real.mkdir(mode=0o700)
    tapctl.dir.parent.chmod(0o1777)
    tapctl.dir.symlink_to(real)
    os.lchown(tapctl.dir, NOBODY, NOBODY)  # its owner could point it elsewhere at any time
    assert f"symlink {tapctl.dir} belongs to uid {NOBODY}" in refused(tapctl, "spawn")


def test_a_symlinked_log_is_not_followed(tapctl, tmp_path):
    target = tmp_path / "victim"
    target.write_text("precious\n")
    tapctl.dir.mkdir(mode=0o700)
    (tapctl.dir / "tapdisk.log").symlink_to(target)
    assert "tapdisk.log is a symlink; not following it" in refused(tapctl, "spawn")
    assert target.read_text() == "precious\n"


def test_a_symlinked_minor_marker_is_not_followed(tapctl, tmp_path):
    target = tmp_path / "victim"
    target.write_text("precious\n")
    pid = int(tapctl.out("spawn"))
    (tapctl.dir / "tapdisk").mkdir(mode=0o700, exist_ok=True)
    (tapctl.dir / "tapdisk" / "tapdisk-0").symlink_to(target)
    result = tapctl("attach", "-p", str(pid), "-m", "0", check=False)
    assert result.returncode != 0
    assert "tapdisk-0 is a symlink; not following it" in result.stderr
    assert target.read_text() == "precious\n"  # not truncated, no /dev/nbdN written in
    assert alive(pid)  # the daemon lives on
    assert "Traceback" not in (tapctl.dir / "tapdisk.log").read_text()


def test_a_symlinked_marker_directory_is_not_followed(tapctl, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    tapctl.dir.mkdir(mode=0o700)
    (tapctl.dir / "tapdisk").symlink_to(elsewhere)
    result = tapctl("allocate", check=False)
    assert result.returncode != 0
    assert "tapdisk is a symlink; not following it" in result.stderr
    assert list(elsewhere.iterdir()) == []


def test_the_daemon_itself_refuses_a_world_writable_directory(tmp_path):
    directory = tmp_path / "run"
    directory.mkdir()
    directory.chmod(0o777)
    result = subprocess.run(
        [TAPDISK, "daemon", "--control-dir", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"{directory} is writable by group or others" in result.stderr
    assert not list(Path(directory).iterdir())
