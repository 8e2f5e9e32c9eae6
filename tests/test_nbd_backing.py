"""An NBD export as the backing file of a qcow2 overlay (``nbd+unix://…`` as qemu writes it).

Allowed only with ``remote_backing`` (``tapdisk serve --remote-backing``); the socket a
backing name points at must lie inside the allowed directories, like any backing file.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from helpers import TAPDISK, require, run
from nbd_servers import Upstream, qemu_nbd


def base_and_overlay(tmp_path: Path) -> tuple[Path, Upstream, Path]:
    """A sparse raw base served by qemu-nbd, and a qcow2 overlay naming it by URI."""
    base = tmp_path / "base.raw"
    run(require("qemu-img"), "create", "-q", "-f", "raw", base, "8M")
    qemu_io = require("qemu-io")
    run(qemu_io, "-f", "raw", "-c", "write -P 0x21 1M 1M", "-c", "write -P 0x22 6M 64k", base)
    up = qemu_nbd(tmp_path / "base.sock", base)
    overlay = tmp_path / "overlay.qcow2"
    run(require("qemu-img"), "create", "-q", "-f", "qcow2", "-F", "raw", "-b", up.uri(), overlay)
    return base, up, overlay


def serve_result(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TAPDISK, "serve", "--unix", "/nonexistent-dir/x.sock", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_overlay_reads_its_nbd_backing_and_writes_stay_in_it(serve, tmp_path: Path) -> None:
    base, up, overlay = base_and_overlay(tmp_path)
    try:
        ours = serve("--remote-backing", f"qcow2:{overlay}")
        qemu_io = require("qemu-io")
        run(qemu_io, "-f", "raw", "-c", "write -P 0x33 1M 64k", ours.uri())
        out = run(
            qemu_io, "-f", "raw", "-r", "-c", "read -P 0x33 1M 64k",
            "-c", "read -P 0x21 1088k 960k", "-c", "read -P 0x22 6M 64k", "-c", "read -P 0 0 1M",
            ours.uri(),
        )  # fmt: skip
        assert "Pattern verification failed" not in out, out
        check = run(qemu_io, "-f", "raw", "-r", "-c", "read -P 0x21 1M 1M", base)
        assert "Pattern verification failed" not in check
        # Block status through the chain: what qemu-nbd says of the same chain.
        ours_map = run(require("nbdinfo"), "--map", ours.uri())
        assert "hole,zero" in ours_map
        sock = tmp_path / "qemu-overlay.sock"
        qemu = Upstream(
            [require("qemu-nbd"), "-r", "-f", "qcow2", "-k", str(sock), str(overlay)], sock
        )
        try:
            assert ours_map == run(require("nbdinfo"), "--map", qemu.start().uri())
        finally:
            qemu.stop()
    finally:
        up.stop()


def test_nbd_backing_is_refused_unless_allowed(tmp_path: Path) -> None:
    _, up, overlay = base_and_overlay(tmp_path)
    try:
        proc = serve_result(f"qcow2:{overlay}")
        assert proc.returncode != 0
        assert "remote NBD export" in proc.stderr and "remote_backing" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    finally:
        up.stop()


def test_nbd_backing_socket_outside_allowed_dirs_is_refused(tmp_path: Path) -> None:
    _, up, overlay = base_and_overlay(tmp_path)
    try:
        elsewhere = tmp_path / "images"
        elsewhere.mkdir()
        moved = elsewhere / "overlay.qcow2"
        overlay.rename(moved)
        proc = serve_result("--remote-backing", f"qcow2:{moved}")
        assert proc.returncode != 0
        assert "outside the allowed directories" in proc.stderr, proc.stderr
    finally:
        up.stop()


def test_nbd_backing_may_carry_no_tls_file_parameters(tmp_path: Path) -> None:
    overlay = tmp_path / "overlay.qcow2"
    name = f"nbds+unix:///?socket={tmp_path}/s.sock&tls-psk-file=/etc/shadow"
    run(require("qemu-img"), "create", "-q", "-f", "qcow2", "-F", "raw", "-u", "-b", name,
        overlay, "8M")  # fmt: skip
    proc = serve_result("--remote-backing", f"qcow2:{overlay}")
    assert proc.returncode != 0
    assert "'tls-psk-file' is not allowed" in proc.stderr, proc.stderr
