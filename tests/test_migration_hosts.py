"""Live migration between two hosts, simulated on one machine.

Host B (the destination) is ``tapdisk serve`` of a raw target over TCP, TLS required and
client certificates verified, in its own network namespace joined to this one by a veth
pair (or, always, on a TCP port of this namespace).  Host A is a tap-ctl daemon whose VBD
runs a qcow2 source under libnbd writers that verify what they read; ``tap-ctl mirror
--switch`` moves it onto ``nbd:nbds://B:PORT/``.  Then the source can be deleted, I/O goes
on, and the target file is compared byte for byte with the writers' model.  A destination
that dies mid-copy, and a client without TLS, leave the VBD on its source.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nbd
import pytest
from helpers import run
from migration_helpers import SIZE, MiB, Writers, compare_with, old_target, source_qcow2
from nbd_servers import make_certificates
from tapctl_helpers import TAP_CTL, nbd_uri

TAPDISK = str(Path(TAP_CTL).with_name("tapdisk"))


@dataclass
class Host:
    """Where host B's server listens, and how its commands are run (``ip netns exec`` or not)."""

    address: str
    prefix: list[str]


@pytest.fixture(params=["netns", "tcp"])
def host_b(request) -> Iterator[Host]:
    """Host B: a network namespace joined to this one by a veth pair, or this namespace."""
    if request.param == "tcp":
        yield Host("127.0.0.1", [])
        return
    name = f"tdb{os.getpid() % 100000}"
    veth = f"tdv{os.getpid() % 100000}"
    subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
    if shutil.which("ip") is None:
        pytest.skip("no ip command (iproute2) to make a network namespace")
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot make a network namespace: {made.stderr.strip()}")
    try:
        run("ip", "link", "add", veth + "a", "type", "veth", "peer", "name", veth + "b")
        run("ip", "link", "set", veth + "b", "netns", name)
        run("ip", "addr", "add", f"{subnet}.1/30", "dev", veth + "a")
        run("ip", "link", "set", veth + "a", "up")
        inside = ["ip", "netns", "exec", name]
        run(*inside, "ip", "addr", "add", f"{subnet}.2/30", "dev", veth + "b")
        run(*inside, "ip", "link", "set", veth + "b", "up")
        run(*inside, "ip", "link", "set", "lo", "up")
        yield Host(f"{subnet}.2", inside)
    finally:
        subprocess.run(["ip", "link", "del", veth + "a"], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def pki(tmp_path: Path, host_b: Host) -> dict[str, Path]:
    """Host B's directory (CA, server certificate) and host A's (CA, client certificate)."""
    made = make_certificates(tmp_path / "pki", host_b.address)
    dirs = {}
    for role in ("server", "client"):
        dirs[role] = tmp_path / f"{role}-tls"
        dirs[role].mkdir()
        for name in ("ca-cert.pem", f"{role}-cert.pem", f"{role}-key.pem"):
            (dirs[role] / name).write_bytes((made / name).read_bytes())
            (dirs[role] / name).chmod(0o600)
    return dirs


class Destination:
    """``tapdisk serve`` of ``image`` on host B, TLS required and client certificates checked."""

    def __init__(self, host: Host, image: Path, certificates: Path) -> None:
        self.host = host
        argv = [TAPDISK, "serve", "--tcp", f"{host.address}:0", "--tls", "require"]
        argv += ["--tls-certificates", str(certificates), "--tls-verify-peer", f"raw:{image}"]
        self.proc = subprocess.Popen(
            [*host.prefix, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        uri = self.proc.stdout.readline().strip()
        assert uri, f"tapdisk serve did not start: {self.proc.communicate(timeout=20)[1]}"
        self.port = int(uri.rsplit(":", 1)[1].split("/")[0])

    def spec(self, certificates: Path) -> str:
        return f"nbd:nbds://{self.host.address}:{self.port}/?tls-certificates={certificates}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.communicate(timeout=20)


@pytest.fixture
def destination(host_b: Host) -> Iterator[Callable[[Path, Path], Destination]]:
    started: list[Destination] = []

    def start(image: Path, certificates: Path) -> Destination:
        started.append(Destination(host_b, image, certificates))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def holders(path: Path) -> list[int]:
    """Every process with ``path`` open."""
    found = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(str(fd.readlink()) == str(path) for fd in fd_dir.iterdir()):
                found.append(int(fd_dir.parent.name))
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
    return found


def mirror(tapctl, pid: int, minor: int, spec: str, *flags: str) -> subprocess.CompletedProcess:
    return tapctl("mirror", "-p", str(pid), "-m", str(minor), "-a", spec, *flags, check=False)


def test_a_vbd_migrates_to_another_host_over_tls_under_a_verified_writer(
    tapctl, tmp_path, pki, destination
):
    source, ref = source_qcow2(tmp_path)
    target = old_target(tmp_path / "host-b.img")
    server = destination(target, pki["server"])
    pid, minor, sock = tapctl.spawn_open(f"qcow2:{source}")
    writer = Writers(sock, ref, seed=11)
    spec = server.spec(pki["client"])
    ops = writer.ops
    result = mirror(tapctl, pid, minor, spec, "--switch")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    final = lines[-1]
    assert final["final"] and final["state"] == "switched" and final["done"] == SIZE
    assert writer.ops > ops  # the guest wrote during the migration
    [row] = tapctl.listing()
    assert row["spec"] == spec and row["pid"] == pid
    assert holders(source) == []
    source.unlink()
    writer.go_on(10)  # on host B alone now
    writer.finish()
    tapctl("pause", "-p", str(pid), "-m", str(minor))
    server.stop()
    assert target.read_bytes() == ref
    compare_with(ref, target, "raw", tmp_path)


def test_a_destination_that_dies_mid_copy_leaves_the_vbd_on_its_source(
    tapctl, tmp_path, pki, destination
):
    source, ref = source_qcow2(tmp_path)
    target = old_target(tmp_path / "host-b.img")
    server = destination(target, pki["server"])
    pid, minor, sock = tapctl.spawn_open(f"qcow2:{source}")
    writer = Writers(sock, ref, seed=12)
    spec = server.spec(pki["client"])
    proc = subprocess.Popen(
        [TAP_CTL, "mirror", "-p", str(pid), "-m", str(minor), "-a", spec, "--switch"],
        env=tapctl.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    first = json.loads(proc.stdout.readline())
    server.proc.send_signal(signal.SIGSTOP)  # host B freezes mid-copy, then dies
    assert first["state"] == "copying" and first["done"] < SIZE
    server.proc.kill()
    server.proc.wait(20)
    died = time.monotonic()
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - died < 15
    assert proc.returncode == 1
    assert err.startswith(f"tap-ctl: mirror to {spec} failed, the device stays on its source: ")
    assert err.count("\n") == 1 and err.endswith("connection lost\n"), err
    assert json.loads(out.splitlines()[-1])["state"] == "failed"
    writer.go_on(10)
    writer.finish()
    [row] = tapctl.listing()
    assert row["spec"] == f"qcow2:{source}"
    stats = json.loads(tapctl.out("stats", "-p", str(pid), "-m", str(minor)))
    assert stats["vbd"]["secondary"] is None
    tapctl("pause", "-p", str(pid), "-m", str(minor))
    compare_with(ref, source, "qcow2", tmp_path)


def test_a_client_without_tls_is_refused_and_the_vbd_is_untouched(
    tapctl, tmp_path, pki, destination
):
    source, ref = source_qcow2(tmp_path)
    target = old_target(tmp_path / "host-b.img")
    server = destination(target, pki["server"])
    pid, minor, sock = tapctl.spawn_open(f"qcow2:{source}")
    spec = f"nbd:nbd://{server.host.address}:{server.port}/"
    started = time.monotonic()
    result = mirror(tapctl, pid, minor, spec, "--switch")
    assert time.monotonic() - started < 15
    assert result.returncode != 0 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"tap-ctl: mirror to {spec} refused: "), result.stderr
    assert "server requires TLS" in result.stderr, result.stderr
    [row] = tapctl.listing()
    assert row["spec"] == f"qcow2:{source}"
    h = nbd.NBD()
    h.connect_uri(nbd_uri(sock))
    assert h.pread(MiB, 20 * MiB) == ref[20 * MiB : 21 * MiB]
    h.shutdown()
    assert target.read_bytes() == bytes([0x99]) * SIZE


@pytest.mark.parametrize("host_b", ["tcp"], indirect=True)
@pytest.mark.parametrize("remote_images", [False, True])
def test_a_daemon_confined_by_allowed_dirs_migrates_to_another_host_only_if_configured(
    tapctl, tmp_path, pki, destination, remote_images
):
    images = tmp_path / "images"
    images.mkdir()
    source, ref = source_qcow2(images)
    target = old_target(tmp_path / "host-b.img")
    server = destination(target, pki["server"])
    config = tmp_path / "tapdisk.yaml"
    config.write_text(f"allowed_dirs: [{images}]\nremote_images: {str(remote_images).lower()}\n")
    pid = int(tapctl.out("spawn", "--config", str(config)))
    sock = tapctl.out("open", "-p", str(pid), "-a", f"qcow2:{source}")
    minor = int(sock.rsplit(".", 1)[1])
    spec = server.spec(pki["client"])
    result = mirror(tapctl, pid, minor, spec, "--switch")
    [row] = tapctl.listing()
    if not remote_images:
        assert result.returncode != 0
        assert result.stderr == (
            f"tap-ctl: mirror to {spec} refused: {spec}: a remote NBD export, refused while "
            "allowed_dirs is set (remote_images: true in the configuration allows them)\n"
        )
        assert row["spec"] == f"qcow2:{source}"
        return
    assert result.returncode == 0, result.stderr
    assert row["spec"] == spec
    tapctl("pause", "-p", str(pid), "-m", str(minor))
    compare_with(ref, target, "raw", tmp_path)
    unix = f"nbd:nbd+unix:///{images}/x?socket={tmp_path}/other.sock"
    result = tapctl("unpause", "-p", str(pid), "-m", str(minor), "-a", unix, check=False)
    assert result.returncode != 0 and "socket" in result.stderr and "outside" in result.stderr
