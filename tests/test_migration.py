"""Live storage migration (``tap-ctl mirror``) through real tapdisk daemons.

libnbd writers keep writing, zeroing, trimming and verifying over the device's NBD socket
while the device is copied; the target is then compared byte for byte with what
the writer wrote, by ``qemu-img compare``.  Failing targets are real: a file
system (a 4 MiB tmpfs) that fills up, and a path that does not exist.
"""

from __future__ import annotations

import json
import signal
import subprocess

import nbd
import pytest
from cbt_helpers import marked, new_log, write_blocks
from helpers import require, run
from migration_helpers import (
    SIZE,
    MiB,
    Writers,
    compare_with,
    holds_open,
    old_target,
    source_qcow2,
)
from tapctl_helpers import TAP_CTL, nbd_uri


def test_a_migration_under_a_verified_writer_switches_to_an_identical_target(tapctl, tmp_path):
    source, ref = source_qcow2(tmp_path)
    target = old_target(tmp_path / "target.img")
    pid, minor, sock = tapctl.spawn_open(f"qcow2:{source}")
    writer = Writers(sock, ref, seed=1)
    result = tapctl("mirror", "-p", str(pid), "-m", str(minor), "-a", f"raw:{target}", "--switch")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[-1]["final"] and lines[-1]["state"] == "switched"
    assert lines[-1]["done"] == lines[-1]["total"] == SIZE
    assert lines[-1]["copied"] + lines[-1]["zeroed"] == SIZE
    assert not any(line["final"] for line in lines[:-1])
    assert not holds_open(pid, source) and holds_open(pid, target)
    [row] = tapctl.listing()
    assert row["spec"] == f"raw:{target}" and row["pid"] == pid
    writer.go_on(10)  # the guest goes on, on the target alone
    writer.finish()
    tapctl("pause", "-p", str(pid), "-m", str(minor))
    compare_with(ref, target, "raw", tmp_path)


def test_a_migration_without_switch_keeps_the_target_in_step(tapctl, tmp_path):
    source, ref = source_qcow2(tmp_path)
    target = old_target(tmp_path / "target.img")
    pid, minor, sock = tapctl.spawn_open(f"qcow2:{source}")
    writer = Writers(sock, ref, seed=2)
    result = tapctl("mirror", "-p", str(pid), "-m", str(minor), "-a", f"raw:{target}")
    assert json.loads(result.stdout.splitlines()[-1])["state"] == "mirroring"
    writer.go_on(10)  # mirrored to both now
    writer.finish()
    [row] = tapctl.listing()
    assert row["spec"] == f"qcow2:{source}"
    stats = json.loads(tapctl.out("stats", "-p", str(pid), "-m", str(minor)))
    assert stats["nbd_mirror_failed"] == 0 and stats["vbd"]["secondary"] == f"raw:{target}"
    tapctl("pause", "-p", str(pid), "-m", str(minor))
    compare_with(ref, target, "raw", tmp_path)
    compare_with(ref, source, "qcow2", tmp_path)


def test_a_target_that_fills_up_leaves_the_device_on_its_source(tapctl, tmp_path, tiny_fs):
    source, ref = source_qcow2(tmp_path)
    target = tiny_fs / "target.img"
    run(require("qemu-img"), "create", "-q", "-f", "raw", target, str(SIZE))
    pid, minor, sock = tapctl.spawn_open(f"qcow2:{source}")
    writer = Writers(sock, ref, seed=3)
    args = ("-p", str(pid), "-m", str(minor), "-a", f"raw:{target}", "--switch")
    result = tapctl("mirror", *args, check=False)
    assert result.returncode == 1
    assert result.stderr.startswith(f"tap-ctl: mirror to raw:{target} failed, the device stays")
    assert "No space left on device" in result.stderr and result.stderr.count("\n") == 1
    assert json.loads(result.stdout.splitlines()[-1])["state"] == "failed"
    writer.go_on(10)
    writer.finish()
    [row] = tapctl.listing()
    assert row["spec"] == f"qcow2:{source}"
    assert not holds_open(pid, target)
    stats = json.loads(tapctl.out("stats", "-p", str(pid), "-m", str(minor)))
    assert stats["nbd_mirror_failed"] == 1 and stats["vbd"]["secondary"] is None
    tapctl("pause", "-p", str(pid), "-m", str(minor))
    compare_with(ref, source, "qcow2", tmp_path)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: f"raw:{tmp / 'missing.img'}", "no such file"),
        (lambda tmp: f"raw:{old_target(tmp / 'small.img', SIZE // 2)}", "same size"),
        (lambda tmp: f"qcow2:{tmp / 'source.qcow2'}", "the device's own image"),
    ],
)
def test_a_target_that_cannot_be_used_is_refused_and_nothing_changes(
    tapctl, tmp_path, make, message
):
    source, ref = source_qcow2(tmp_path)
    pid, minor, sock = tapctl.spawn_open(f"qcow2:{source}")
    spec = make(tmp_path)
    result = tapctl("mirror", "-p", str(pid), "-m", str(minor), "-a", spec, check=False)
    assert result.returncode != 0 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"tap-ctl: mirror to {spec} refused: ")
    assert message in result.stderr, result.stderr
    [row] = tapctl.listing()
    assert row["spec"] == f"qcow2:{source}"
    h = nbd.NBD()
    h.connect_uri(nbd_uri(sock))
    assert h.pread(MiB, 20 * MiB) == ref[20 * MiB : 21 * MiB]
    h.shutdown()


def test_a_switched_device_goes_on_marking_its_cbt_log(tapctl, tmp_path):
    source, _ = source_qcow2(tmp_path)
    target = old_target(tmp_path / "target.img")
    log = new_log(tmp_path / "disk.cbtlog", SIZE)
    pid, minor, sock = tapctl.spawn_open(f"qcow2:{source}", "-C", str(log))
    write_blocks(sock, [1])
    tapctl("mirror", "-p", str(pid), "-m", str(minor), "-a", f"raw:{target}", "--switch")
    write_blocks(sock, [7])
    [row] = tapctl.listing()
    assert row["spec"] == f"raw:{target}" and row["cbt_log"] == str(log)
    assert marked(log) == {1, 7}  # the copy itself marks nothing
    assert not holds_open(pid, source)


def test_an_interrupted_migration_leaves_the_device_on_its_source(tapctl, tmp_path):
    source, ref = source_qcow2(tmp_path)
    target = old_target(tmp_path / "target.img")
    pid, minor, sock = tapctl.spawn_open(f"qcow2:{source}")
    slow = f"fault:ops=write,delay=4:raw:{target}"  # each chunk hangs 4 s, then fails
    proc = subprocess.Popen(
        [TAP_CTL, "mirror", "-p", str(pid), "-m", str(minor), "-a", slow, "--switch"],
        env=tapctl.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C as at a terminal: a test run started in the background (``cmd &``) has
        # SIGINT ignored, which tap-ctl would inherit, and the copy would fail on its own.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert json.loads(proc.stdout.readline())["state"] == "copying"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert err == f"tap-ctl: mirror to {slow} cancelled; the device stays on its source\n"
    final = json.loads(out.splitlines()[-1])
    assert final["final"] and final["state"] == "failed" and final["error"] == "cancelled"
    [row] = tapctl.listing()
    assert row["spec"] == f"qcow2:{source}" and not holds_open(pid, target)
    stats = json.loads(tapctl.out("stats", "-p", str(pid), "-m", str(minor)))
    assert stats["vbd"]["secondary"] is None
    h = nbd.NBD()
    h.connect_uri(nbd_uri(sock))
    h.pwrite(b"\x01" * 4096, 0)
    assert h.pread(MiB, 20 * MiB) == ref[20 * MiB : 21 * MiB]
    h.shutdown()
