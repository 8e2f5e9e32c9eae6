"""tap-ctl finds the control directory in the configuration file, as the service does.

Order: ``--control-dir``, then ``$TAPDISK_CONTROL_DIR``, then ``control_dir`` of the
file named by ``--config``.  Every test runs real tap-ctl and tapdisk processes with
``$TAPDISK_CONTROL_DIR`` removed from their environment.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

TAPCTL = str(Path(sys.executable).with_name("tap-ctl"))
ENV = {k: v for k, v in os.environ.items() if k != "TAPDISK_CONTROL_DIR"}


def tapctl(*args: str, env: dict[str, str] = ENV) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TAPCTL, *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def control_dir(tmp_path: Path) -> Iterator[Path]:
    """A private control directory; tapdisks left in it are stopped afterwards."""
    path = tmp_path / "run"
    yield path
    for sock in path.glob("ctl*"):
        if sock.name[3:].isdigit():
            pid = int(sock.name[3:])
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.05)


def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tapdisk.yaml"
    path.write_text(text)
    return path


def test_spawn_and_list_use_the_configured_control_dir(tmp_path, control_dir):
    config = config_file(tmp_path, f"control_dir: {control_dir}\n")
    spawned = tapctl("spawn", "--config", str(config))
    assert spawned.returncode == 0, spawned.stderr
    pid = int(spawned.stdout)
    assert (control_dir / f"ctl{pid}").exists()
    listed = tapctl("list", "--config", str(config))
    assert listed.stdout == f"pid={pid}\n"


def test_control_dir_flag_wins_over_the_configuration(tmp_path, control_dir):
    config = config_file(tmp_path, "control_dir: /nonexistent/tapdisk\n")
    pid = int(tapctl("spawn", "--control-dir", str(control_dir)).stdout)
    listed = tapctl("list", "--config", str(config), "--control-dir", str(control_dir))
    assert listed.stdout == f"pid={pid}\n"


def test_environment_wins_over_the_configuration(tmp_path, control_dir):
    config = config_file(tmp_path, "control_dir: /nonexistent/tapdisk\n")
    env = {**ENV, "TAPDISK_CONTROL_DIR": str(control_dir)}
    pid = int(tapctl("spawn", env=env).stdout)
    listed = tapctl("list", "--config", str(config), env=env)
    assert listed.stdout == f"pid={pid}\n"


def test_invalid_configuration_is_an_error_naming_key_and_line(tmp_path):
    config = config_file(tmp_path, "log_level: info\ncontrol_dir: run/tapdisk\n")
    result = tapctl("list", "--config", str(config))
    assert result.returncode == 1
    assert result.stderr.startswith(
        f"tap-ctl: {config}: line 2: control_dir: must be an absolute path"
    )


def test_create_hands_the_configuration_to_the_tapdisk_it_spawns(tmp_path, control_dir):
    allowed = tmp_path / "images"
    allowed.mkdir()
    outside = tmp_path / "disk.raw"
    outside.write_bytes(bytes(1 << 20))
    config = config_file(tmp_path, f"control_dir: {control_dir}\nallowed_dirs: [{allowed}]\n")
    result = tapctl("create", "--config", str(config), "--no-connect", "-a", f"raw:{outside}")
    assert result.returncode == 1
    assert "outside the allowed directories" in result.stderr
    assert list(control_dir.glob("ctl*")) == []  # the spawned tapdisk is gone again
