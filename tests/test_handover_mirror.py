"""tap-ctl restart of a mirrored VBD after its secondary failed, or after a standby took over.

A secondary dropped after a failure stays dropped in the new tapdisk, and STATS still
says ``nbd_mirror_failed`` 1.  A standby (``-s``) that took over when the primary filled
up is the image ``list`` and ``stats`` name, and the one the new tapdisk opens: the
primary, full and missing every write since, is never served again.
"""

from __future__ import annotations

import json

from helpers import require, run
from test_handover import restart
from test_mirror import SIZE, MiB, connect, raw, stats


def test_restart_keeps_a_failed_secondary_dropped_and_reported(tapctl, tmp_path):
    primary, secondary = raw(tmp_path / "p.img"), raw(tmp_path / "s.img")
    spec = f"fault:ops=write,errno=EIO:raw:{secondary}"
    pid, minor, sock = tapctl.spawn_open(f"raw:{primary}", "-2", spec)
    h = connect(sock)
    h.pwrite(b"\x01" * 4096, 0)  # fails on the secondary: dropped
    assert stats(tapctl, pid, minor)["nbd_mirror_failed"] == 1
    new = restart(tapctl, pid)
    after = stats(tapctl, new, minor)
    assert (after["nbd_mirror_failed"], after["vbd"]["secondary"]) == (1, None)
    h.pwrite(b"\x02" * 4096, 4096)
    h.flush()
    assert primary.read_bytes()[:8192] == b"\x01" * 4096 + b"\x02" * 4096
    assert secondary.read_bytes()[:8192] == bytes(8192)
    tapctl("pause", "-p", str(new), "-m", str(minor))
    tapctl("unpause", "-p", str(new), "-m", str(minor))
    assert stats(tapctl, new, minor)["nbd_mirror_failed"] == 1  # until an unpause with -2 null
    h.shutdown()


def test_after_a_standby_takeover_list_stats_and_restart_follow_the_standby(
    tapctl, tmp_path, tiny_fs
):
    primary = raw(tiny_fs / "p.img")
    overlay = tmp_path / "overlay.qcow2"
    run(require("qemu-img"), "create", "-q", "-f", "qcow2", "-b", primary, "-F", "raw", overlay)
    pid, minor, sock = tapctl.spawn_open(f"raw:{primary}", "-2", f"qcow2:{overlay}", "-s")
    [row] = tapctl.listing()
    assert row["spec"] == f"raw:{primary}"
    h = connect(sock)
    data = [bytes([i + 1]) * MiB for i in range(8)]
    for i in range(8):
        h.pwrite(data[i], i * MiB)  # the primary fills up at about 4 MiB: the overlay takes over
    h.flush()
    [row] = tapctl.listing()
    assert row["spec"] == f"qcow2:{overlay}"
    assert stats(tapctl, pid, minor)["name"] == f"qcow2:{overlay}"
    new = restart(tapctl, pid)
    [row] = tapctl.listing()
    assert (row["pid"], row["spec"]) == (new, f"qcow2:{overlay}")
    assert stats(tapctl, new, minor)["name"] == f"qcow2:{overlay}"
    assert h.pread(8 * MiB, 0) == b"".join(data)
    h.pwrite(b"\x09" * MiB, 9 * MiB)
    h.flush()
    h.shutdown()
    tapctl("pause", "-p", str(new), "-m", str(minor))
    [row] = tapctl.listing()
    assert row["spec"] == f"qcow2:{overlay}"  # paused: unpause reopens the overlay too
    expected = raw(tmp_path / "expected.img")
    content = b"".join(data) + bytes(MiB) + b"\x09" * MiB
    expected.write_bytes(content + bytes(SIZE - len(content)))
    result = run(require("qemu-img"), "compare", "-F", "raw", overlay, expected, check=False)
    assert result.startswith("Images are identical"), result


def test_a_snapshot_after_a_standby_takeover_overlays_the_standby(tapctl, tmp_path, tiny_fs):
    primary = raw(tiny_fs / "p.img")
    standby = tmp_path / "standby.qcow2"
    run(require("qemu-img"), "create", "-q", "-f", "qcow2", "-b", primary, "-F", "raw", standby)
    pid, minor, sock = tapctl.spawn_open(f"raw:{primary}", "-2", f"qcow2:{standby}", "-s")
    h = connect(sock)
    data = b"".join(bytes([i + 1]) * MiB for i in range(8))
    h.pwrite(data, 0)  # the standby takes over at about 4 MiB
    h.flush()
    overlay = tmp_path / "snap.qcow2"
    tapctl("snapshot", "-p", str(pid), "-m", str(minor), "-a", f"qcow2:{overlay}")
    info = json.loads(run(require("qemu-img"), "info", "--output=json", overlay))
    assert info["backing-filename"] == str(standby)
    assert h.pread(8 * MiB, 0) == data
    h.shutdown()
