"""systemd integration: the units in systemd/, sd_notify, and ``tapdisk service``.

The units are checked by systemd's own tools (``systemd-analyze verify`` and
``security --offline``, ``systemd-tmpfiles``), which work on unit files without systemd
running as PID 1.  Readiness is checked by receiving the real datagrams on a notify
socket, as systemd would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TAPDISK, require, run

UNITS = Path(__file__).parents[1] / "systemd"
BIN = Path(sys.executable).parent
SERVICES = ("tapdisk.service", "tapdisk-exporter.service")


def installed_units(tmp_path: Path) -> list[Path]:
    """The units with ExecStart= pointing at this checkout's console scripts.

    ``verify`` checks that every command exists; the shipped units name the commands
    without a directory (systemd searches /usr/local/bin, /usr/bin...), where the test
    machine may not have them.
    """
    paths = []
    for name in SERVICES:
        text = (UNITS / name).read_text()
        path = tmp_path / name
        path.write_text(text.replace("\nExecStart=tapdisk", f"\nExecStart={BIN}/tapdisk"))
        paths.append(path)
    return paths


def verify(*units: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require("systemd-analyze"), "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_units_pass_systemd_analyze_verify_without_warnings(tmp_path):
    result = verify(*installed_units(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_verify_reports_a_misspelt_option(tmp_path):
    # verify exits 0 on unknown keys, which is why the test above demands silence.
    service, _ = installed_units(tmp_path)
    service.write_text(service.read_text().replace("ProtectHome=", "ProtectHom="))
    assert "Unknown key 'ProtectHom'" in verify(service).stderr


@pytest.mark.parametrize(("unit", "threshold"), [("tapdisk.service", 3.5), (SERVICES[1], 2.0)])
def test_units_are_sandboxed(tmp_path, unit, threshold):
    # systemd's exposure score: 10 is an unconfined service, below 4 counts as "OK".
    path = next(p for p in installed_units(tmp_path) if p.name == unit)
    result = subprocess.run(
        [
            require("systemd-analyze"),
            "security",
            "--offline=yes",
            f"--threshold={int(threshold * 10)}",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout[-400:] + result.stderr


def test_service_is_type_notify_and_restarts_on_failure():
    text = (UNITS / "tapdisk.service").read_text().splitlines()
    assert "Type=notify" in text
    assert "Restart=on-failure" in text
    assert "ExecStart=tapdisk service" in text


def test_tmpfiles_creates_blktaps_runtime_directories_for_root_only(tmp_path):
    run(require("systemd-tmpfiles"), "--create", f"--root={tmp_path}", UNITS / "tapdisk.tmpfiles")
    for directory in ("run/blktap-control", "run/blktap-control/tapdisk"):
        st = (tmp_path / directory).stat()
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o700, 0, 0), directory


# --- sd_notify -------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(60)
    yield sock
    sock.close()


def fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().splitlines())


def notify_from_process(code: str, address: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NOTIFY_SOCKET": address}
    return subprocess.run(
        [sys.executable, "-c", f"from tapdisk import sdnotify\n{code}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_ready_reaches_the_notify_socket(tmp_path, notify_socket):
    proc = notify_from_process(
        "import os; print(os.getpid(), sdnotify.ready('2 devices attached'))",
        str(tmp_path / "notify"),
    )
    pid, sent = proc.stdout.split()
    assert sent == "True"
    message = fields(notify_socket.recv(4096))
    assert message == {"READY": "1", "MAINPID": pid, "STATUS": "2 devices attached"}


def test_abstract_notify_socket_is_supported():
    name = f"tapdisk-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(60)
        proc = notify_from_process("print(sdnotify.status('attaching'))", "@" + name)
        assert proc.stdout.strip() == "True"
        assert fields(sock.recv(4096)) == {"STATUS": "attaching"}


def test_without_a_notify_socket_nothing_is_sent(tmp_path):
    assert notify_from_process("print(sdnotify.ready())", "").stdout.strip() == "False"
    gone = str(tmp_path / "nobody-listens")
    assert notify_from_process("print(sdnotify.ready())", gone).stdout.strip() == "False"


# --- tapdisk service ---------------------------------------------------------------------


def start_service(tmp_path: Path, config: str, notify: str) -> subprocess.Popen[str]:
    path = tmp_path / "tapdisk.yaml"
    path.write_text(config)
    env = {**os.environ, "NOTIFY_SOCKET": notify}
    return subprocess.Popen(
        [TAPDISK, "service", "--config", str(path), "--control-dir", str(tmp_path / "run")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_service_reports_ready_and_stops_cleanly_on_sigterm(tmp_path, notify_socket):
    proc = start_service(tmp_path, "log_level: debug\ndevices: []\n", str(tmp_path / "notify"))
    try:
        message = fields(notify_socket.recv(4096))
        assert message["READY"] == "1"
        assert message["MAINPID"] == str(proc.pid)
        assert message["STATUS"] == "0 devices attached"
        control = tmp_path / "run" / f"ctl{proc.pid}"
        assert control.is_socket()
        listed = run(BIN / "tap-ctl", "list", "--control-dir", tmp_path / "run", "--json")
        assert str(proc.pid) in listed
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert not control.exists()


def test_service_that_cannot_open_a_device_exits_1_naming_it(tmp_path, notify_socket):
    missing = tmp_path / "missing.img"
    proc = start_service(tmp_path, f"devices:\n  - spec: raw:{missing}\n", str(tmp_path / "notify"))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert f"device 1 (raw:{missing})" in err
    assert "no such file" in err
    notify_socket.settimeout(0)
    sent = []
    with contextlib.suppress(BlockingIOError):
        while True:
            sent.append(fields(notify_socket.recv(4096)))
    assert sent == [{"STATUS": f"attaching raw:{missing} (1 of 1)"}]  # and never READY=1
    assert list((tmp_path / "run").glob("ctl*")) == []


def test_service_with_an_invalid_configuration_exits_1_naming_key_and_line(tmp_path):
    proc = start_service(tmp_path, "queue_depth: 8\nretry_deadline: soon\n", "")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "line 2: retry_deadline: expected a number of seconds, got 'soon'" in err


def test_service_and_tapdisk_help_have_examples():
    assert "examples:" in run(TAPDISK, "service", "--help")
    assert "examples:" in run(TAPDISK, "--help")
