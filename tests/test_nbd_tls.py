"""NBD over TLS: real clients (nbdinfo, nbdcopy, libnbd, qemu-img, qemu-io) against
``tapdisk serve --tls`` and a spawned daemon's NBD socket, with certificates made here
by the openssl command-line tool."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import ssl
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest
import uvloop
from helpers import TAPDISK, require, run
from tapctl_helpers import TapCtl
from tapdisk.drivers.raw import RawImage

from tapdisk.config import ConfigError, parse
from tapdisk.export import DirectAttach, Export
from tapdisk.nbd.constants import TransmissionFlag
from tapdisk.nbd.errors import ProtocolError
from tapdisk.nbd.handshake import ExportInfo, Handshake, Negotiated, StartTLS, TLSMode
from tapdisk.server import NBDServer
from tapdisk.tls import TLSSettings, add_arguments, configured, from_arguments, server_tls

MiB = 1 << 20
IHAVEOPT = 0x49484156454F5054
OPT_STARTTLS, OPT_EXPORT_NAME, OPT_LIST = 5, 1, 3
REP_ACK, REP_ERR_TLS_REQD = 1, 0x80000005


def openssl(*args: str | Path) -> None:
    run(require("openssl"), *args)


def make_authority(directory: Path, name: str) -> None:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate,
    in the layout nbdkit, qemu and libnbd read."""
    directory.mkdir()
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca_key, ca = directory / "ca-key.pem", directory / "ca-cert.pem"
    openssl(
        "req", "-x509", *key, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", f"/CN={name}"
    )
    uses = {
        "server": "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        "client": "extendedKeyUsage=clientAuth\n",
    }
    for role, extensions in uses.items():
        request, ext = directory / f"{role}.csr", directory / f"{role}.ext"
        ext.write_text(extensions + "keyUsage=digitalSignature,keyEncipherment\n")
        openssl(
            "req",
            *key,
            "-keyout",
            directory / f"{role}-key.pem",
            "-out",
            request,
            "-subj",
            f"/CN={name}-{role}",
        )
        openssl(
            "x509",
            "-req",
            "-in",
            request,
            "-CA",
            ca,
            "-CAkey",
            ca_key,
            "-CAcreateserial",
            "-out",
            directory / f"{role}-cert.pem",
            "-days",
            "2",
            "-extfile",
            ext,
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """``server``: the server's directory; ``client``: a client's with a certificate of the
    same CA; ``anonymous``: the CA only; ``stranger``: a certificate of another CA."""
    base = tmp_path_factory.mktemp("pki")
    make_authority(base / "ours", "ours")
    make_authority(base / "theirs", "theirs")
    dirs = {"server": base / "ours"}
    for role, files in {
        "client": [base / "ours" / "client-cert.pem", base / "ours" / "client-key.pem"],
        "anonymous": [],
        "stranger": [base / "theirs" / "client-cert.pem", base / "theirs" / "client-key.pem"],
    }.items():
        dirs[role] = base / role
        dirs[role].mkdir()
        for source in [base / "ours" / "ca-cert.pem", *files]:
            (dirs[role] / source.name).write_bytes(source.read_bytes())
    return dirs


class Server:
    """``tapdisk serve`` on a unix socket and a TCP port, with the given TLS flags."""

    def __init__(self, tmp_path: Path, image: Path, *flags: str) -> None:
        self.socket = tmp_path / "tls.sock"
        self.proc = subprocess.Popen(
            [
                TAPDISK,
                "serve",
                "--unix",
                str(self.socket),
                "--tcp",
                "127.0.0.1:0",
                *flags,
                f"raw:{image}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.unix_uri = self.proc.stdout.readline().strip()
        self.tcp_uri = self.proc.stdout.readline().strip()
        assert self.tcp_uri, f"tapdisk serve {flags} did not start: {self.stop()}"
        self.port = int(self.tcp_uri.rsplit(":", 1)[1].rstrip("/"))

    def tls_uri(self, certificates: Path, unix: bool = False) -> str:
        if unix:
            return f"nbds+unix:///?socket={self.socket}&tls-certificates={certificates}"
        return f"nbds://127.0.0.1:{self.port}/?tls-certificates={certificates}"

    def stop(self) -> str:
        """Stop the server; its stderr."""
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=20)
        return err


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(os.urandom(4 * MiB) + bytes(4 * MiB))
    return path


@pytest.fixture
def serve_tls(tmp_path: Path, image: Path, pki) -> Iterator:
    servers: list[Server] = []

    def start(mode: str, *flags: str) -> Server:
        server = Server(
            tmp_path, image, "--tls", mode, "--tls-certificates", str(pki["server"]), *flags
        )
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.proc.poll() is None:
            server.stop()


def libnbd(uri: str, tls: int = nbd.TLS_REQUIRE) -> nbd.NBD:
    handle = nbd.NBD()
    handle.set_tls(tls)
    handle.set_uri_allow_local_file(True)  # tls-certificates=DIR
    handle.connect_uri(uri)
    return handle


def negotiate_plain(port: int) -> socket.socket:
    """A TCP connection through the NBD greeting, client flags sent (fixed newstyle)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    greeting = recv_exactly(sock, 18)
    assert greeting[:16] == b"NBDMAGICIHAVEOPT"
    sock.sendall(struct.pack(">I", 3))
    return sock


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return data


def send_option(sock: socket.socket, option: int, data: bytes = b"") -> None:
    sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)


def option_reply(sock: socket.socket) -> tuple[int, int, bytes]:
    """(option, reply type, data) of one option reply."""
    _, option, reply, length = struct.unpack(">QIII", recv_exactly(sock, 20))
    return option, reply, recv_exactly(sock, length)


# --- the real clients -------------------------------------------------------------------


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
def test_nbdcopy_round_trip_over_tls(serve_tls, pki, image, tmp_path, unix):
    server = serve_tls("require")
    uri = server.tls_uri(pki["client"], unix)
    assert server.tcp_uri.startswith("nbds://") and server.unix_uri.startswith("nbds+unix://")
    copy = tmp_path / "copy.raw"
    run(require("nbdcopy"), uri, copy)
    assert copy.read_bytes() == image.read_bytes()
    fresh = os.urandom(2 * MiB)
    (tmp_path / "fresh.raw").write_bytes(fresh)
    run(require("nbdcopy"), tmp_path / "fresh.raw", uri)
    assert image.read_bytes()[: 2 * MiB] == fresh


def test_nbdinfo_sees_tls_negotiated(serve_tls, pki):
    server = serve_tls("require")
    out = run(require("nbdinfo"), server.tls_uri(pki["client"]))
    assert "with TLS" in out and f"export-size: {8 * MiB}" in out


def test_qemu_io_writes_and_qemu_img_reads_over_tls(serve_tls, pki, image, tmp_path):
    server = serve_tls("require")
    creds = f"tls-creds-x509,id=tls0,endpoint=client,dir={pki['client']}"
    target = f"driver=nbd,host=127.0.0.1,port={server.port},tls-creds=tls0"
    run(require("qemu-io"), "--object", creds, "--image-opts", target, "-c", "write -P 0xa5 1M 64k")
    assert image.read_bytes()[MiB : MiB + 65536] == b"\xa5" * 65536
    copy = tmp_path / "copy.raw"
    run(
        require("qemu-img"), "convert", "--object", creds, "--image-opts", target, "-O", "raw", copy
    )
    assert copy.read_bytes() == image.read_bytes()


def test_qemu_img_without_credentials_is_told_tls_is_required(serve_tls):
    server = serve_tls("require")
    result = subprocess.run(
        [require("qemu-img"), "info", f"nbd://127.0.0.1:{server.port}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "TLS negotiation required" in result.stderr


# --- plain clients against a server requiring TLS ---------------------------------------


def test_plain_libnbd_client_is_refused(serve_tls):
    server = serve_tls("require")
    with pytest.raises(nbd.Error, match="requires TLS") as caught:
        libnbd(f"nbd://127.0.0.1:{server.port}/", nbd.TLS_DISABLE)
    assert caught.value.errno == "ENOTSUP"


def test_every_option_before_starttls_gets_tls_required(serve_tls):
    server = serve_tls("require")
    with negotiate_plain(server.port) as sock:
        send_option(sock, OPT_LIST)
        assert option_reply(sock)[:2] == (OPT_LIST, REP_ERR_TLS_REQD)
        go = struct.pack(">I", 0) + struct.pack(">H", 0)
        send_option(sock, 7, go)
        assert option_reply(sock)[:2] == (7, REP_ERR_TLS_REQD)


def test_export_name_before_starttls_is_hung_up_on_without_data(serve_tls):
    server = serve_tls("require")
    with negotiate_plain(server.port) as sock:
        send_option(sock, OPT_EXPORT_NAME)
        assert sock.recv(1024) == b""  # no size, no flags: the connection is closed


def test_tls_1_2_is_refused(serve_tls, pki):
    server = serve_tls("require")
    with negotiate_plain(server.port) as sock:
        send_option(sock, OPT_STARTTLS)
        assert option_reply(sock)[:2] == (OPT_STARTTLS, REP_ACK)
        context = ssl.create_default_context(cafile=str(pki["client"] / "ca-cert.pem"))
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises((ssl.SSLError, ConnectionError)):
            context.wrap_socket(sock, server_hostname="localhost")


# --- modes and peers -----------------------------------------------------------------


def test_tls_on_serves_plain_and_tls_clients(serve_tls, pki):
    server = serve_tls("on")
    assert server.tcp_uri.startswith("nbd://")
    plain = libnbd(f"nbd://127.0.0.1:{server.port}/", nbd.TLS_DISABLE)
    assert not plain.get_tls_negotiated()
    secure = libnbd(server.tls_uri(pki["client"]))
    assert secure.get_tls_negotiated()
    assert plain.pread(4096, 0) == secure.pread(4096, 0)


def test_tls_off_never_offers_starttls(tmp_path, image):
    server = Server(tmp_path, image)
    try:
        plain = libnbd(f"nbd://127.0.0.1:{server.port}/", nbd.TLS_ALLOW)
        assert not plain.get_tls_negotiated()
        with pytest.raises(nbd.Error):
            libnbd(f"nbd://127.0.0.1:{server.port}/", nbd.TLS_REQUIRE)
    finally:
        server.stop()


def test_verify_peer_accepts_our_client_certificate(serve_tls, pki):
    server = serve_tls("require", "--tls-verify-peer")
    assert libnbd(server.tls_uri(pki["client"])).get_tls_negotiated()


@pytest.mark.parametrize("client", ["anonymous", "stranger"])
def test_verify_peer_refuses_other_clients(serve_tls, pki, client):
    server = serve_tls("require", "--tls-verify-peer")
    with pytest.raises(nbd.Error):
        libnbd(server.tls_uri(pki[client])).pread(4096, 0)
    assert libnbd(server.tls_uri(pki["client"])).get_tls_negotiated()  # still serving
    assert "TLS handshake failed" in server.stop()


# --- start-up errors -----------------------------------------------------------------


def serve_fails(*args: str) -> tuple[int, str]:
    proc = subprocess.run([TAPDISK, "serve", *args], capture_output=True, text=True, timeout=20)
    assert proc.stdout == "", "a failing server must not print a URI"
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("name", ["server-cert.pem", "server-key.pem", "ca-cert.pem"])
def test_missing_certificate_file_stops_the_server(tmp_path, pki, image, name):
    certificates = tmp_path / "certs"
    certificates.mkdir()
    for source in pki["server"].glob("*.pem"):
        if source.name != name:
            (certificates / source.name).write_bytes(source.read_bytes())
    status, err = serve_fails(
        "--tcp",
        "127.0.0.1:0",
        "--tls",
        "require",
        "--tls-verify-peer",
        "--tls-certificates",
        str(certificates),
        f"raw:{image}",
    )
    assert status != 0
    assert err == f"tapdisk: cannot read {certificates / name}: No such file or directory\n"


def test_unreadable_key_stops_the_server(tmp_path, pki, image):
    certificates = tmp_path / "certs"
    certificates.mkdir()
    (certificates / "server-cert.pem").write_bytes((pki["server"] / "server-cert.pem").read_bytes())
    (certificates / "server-key.pem").mkdir()
    status, err = serve_fails(
        "--tls", "on", "--tls-certificates", str(certificates), f"raw:{image}"
    )
    assert status != 0
    assert err.count("\n") == 1 and f"{certificates / 'server-key.pem'}" in err


def test_key_of_another_certificate_stops_the_server(tmp_path, pki, image):
    certificates = tmp_path / "certs"
    certificates.mkdir()
    (certificates / "server-cert.pem").write_bytes((pki["server"] / "server-cert.pem").read_bytes())
    (certificates / "server-key.pem").write_bytes((pki["client"] / "client-key.pem").read_bytes())
    status, err = serve_fails(
        "--tls", "on", "--tls-certificates", str(certificates), f"raw:{image}"
    )
    assert status != 0 and err.count("\n") == 1 and "server-key.pem" in err


def test_tls_without_certificates_is_an_error(image):
    status, err = serve_fails("--tls", "require", f"raw:{image}")
    assert status != 0 and "--tls-certificates" in err


# --- the daemon's NBD sockets, configured in YAML ------------------------------------


def test_daemon_socket_requires_tls_from_the_configuration(tmp_path, pki, image):
    config = tmp_path / "tapdisk.yaml"
    config.write_text(f"tls: require\ntls_certificates: {pki['server']}\ntls_verify_peer: true\n")
    tapctl = TapCtl(tmp_path / "ctl")
    (tmp_path / "ctl").mkdir()
    try:
        pid = int(tapctl.out("spawn", "--config", str(config)))
        sock = tapctl.out("open", "-p", str(pid), "-a", f"raw:{image}")
        secure = libnbd(f"nbds+unix:///?socket={sock}&tls-certificates={pki['client']}")
        assert secure.pread(4096, 0) == image.read_bytes()[:4096]
        with pytest.raises(nbd.Error, match="requires TLS"):
            libnbd(f"nbd+unix:///?socket={sock}", nbd.TLS_DISABLE)
        with pytest.raises(nbd.Error):
            libnbd(f"nbds+unix:///?socket={sock}&tls-certificates={pki['anonymous']}").pread(
                4096, 0
            )
    finally:
        tapctl.cleanup()


def test_daemon_with_a_missing_key_does_not_start(tmp_path, image):
    config = tmp_path / "tapdisk.yaml"
    config.write_text(f"tls: on\ntls_certificates: {tmp_path}\n")
    tapctl = TapCtl(tmp_path / "ctl")
    (tmp_path / "ctl").mkdir()
    try:
        result = tapctl("spawn", "--config", str(config), check=False)
        assert result.returncode != 0
        assert f"cannot read {tmp_path / 'server-cert.pem'}" in result.stderr
    finally:
        tapctl.cleanup()


# --- in-process: both event loops, and the kernel's socketpairs ------------------------


def serve_in_process(image: Path, pki, use_uvloop: bool, scenario) -> None:
    """Run ``scenario(server)`` against an in-process server requiring TLS."""

    async def main() -> None:
        settings = TLSSettings(TLSMode.REQUIRE, str(pki["server"]))
        server = NBDServer([Export("disk", RawImage(str(image)))], tls=server_tls(settings))
        try:
            await scenario(server)
        finally:
            await server.shutdown()

    (uvloop.run if use_uvloop else asyncio.run)(main())


@pytest.mark.parametrize("use_uvloop", [False, True], ids=["asyncio", "uvloop"])
def test_both_event_loops_serve_tls(tmp_path, pki, image, use_uvloop):
    copy = tmp_path / "copy.raw"

    async def scenario(server: NBDServer) -> None:
        port = await server.listen_tcp("127.0.0.1", 0)
        uri = f"nbds://127.0.0.1:{port}/?tls-certificates={pki['client']}"
        proc = await asyncio.create_subprocess_exec(require("nbdcopy"), uri, str(copy))
        assert await proc.wait() == 0

    serve_in_process(image, pki, use_uvloop, scenario)
    assert copy.read_bytes() == image.read_bytes()


def test_kernel_socketpair_stays_plain_when_tls_is_required(pki, image):
    async def scenario(server: NBDServer) -> None:
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        await server.serve_socket(ours, DirectAttach("disk"))
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(theirs, struct.pack(">IHHQQI", 0x25609513, 0, 0, 7, 0, 4096))
        reply = b""
        while len(reply) < 16 + 4096:
            reply += await asyncio.wait_for(loop.sock_recv(theirs, 65536), 10)
        assert struct.unpack(">IIQ", reply[:16]) == (0x67446698, 0, 7)
        assert reply[16:] == image.read_bytes()[:4096]
        theirs.close()

    serve_in_process(image, pki, True, scenario)


# --- the handshake codec (sans-IO) --------------------------------------------------------


def codec(mode: TLSMode) -> Handshake:
    info = ExportInfo("disk", MiB, TransmissionFlag.HAS_FLAGS)
    handshake = Handshake({"disk": info}, "disk", mode)
    handshake.take_output()  # the greeting
    handshake.receive(struct.pack(">I", 3))
    return handshake


def option(code: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data


def replies(handshake: Handshake) -> list[int]:
    """The reply types of the option replies queued so far."""
    out, types = handshake.take_output(), []
    while out:
        _, _, reply, length = struct.unpack_from(">QIII", out)
        types.append(reply)
        out = out[20 + length :]
    return types


def test_codec_off_answers_starttls_unsupported():
    handshake = codec(TLSMode.OFF)
    assert handshake.receive(option(OPT_STARTTLS)) is None
    assert replies(handshake) == [0x80000001]


def test_codec_starttls_forgets_what_was_negotiated_before():
    handshake = codec(TLSMode.ON)
    assert handshake.receive(option(8)) is None  # STRUCTURED_REPLY
    assert replies(handshake) == [REP_ACK]
    assert isinstance(handshake.receive(option(OPT_STARTTLS)), StartTLS)
    assert replies(handshake) == [REP_ACK]
    negotiated = handshake.receive(option(7, struct.pack(">IH", 0, 0)))  # GO
    assert isinstance(negotiated, Negotiated) and not negotiated.structured


@pytest.mark.parametrize(
    ("mode", "before"), [(TLSMode.ON, b""), (TLSMode.REQUIRE, option(OPT_STARTTLS))]
)
def test_codec_second_starttls_and_starttls_with_data_are_invalid(mode, before):
    handshake = codec(mode)
    handshake.receive(before)
    handshake.take_output()
    assert handshake.receive(option(OPT_STARTTLS, b"x")) is None
    assert replies(handshake) == [0x80000003]
    if before:
        assert handshake.receive(option(OPT_STARTTLS)) is None
        assert replies(handshake) == [0x80000003]


def test_codec_bytes_after_starttls_are_a_protocol_error():
    handshake = codec(TLSMode.REQUIRE)
    with pytest.raises(ProtocolError):
        handshake.receive(option(OPT_STARTTLS) + option(OPT_LIST))


# --- configuration and flags --------------------------------------------------------------


@pytest.mark.parametrize(("text", "mode"), [("on", "on"), ("off", "off"), ("require", "require")])
def test_yaml_tls_modes(text, mode):
    config = parse(f"tls: {text}\ntls_certificates: /etc/tapdisk/pki\ntls_verify_peer: true\n")
    assert configured(config) == TLSSettings(TLSMode(mode), "/etc/tapdisk/pki", True)


def test_yaml_bad_tls_mode_names_key_and_line():
    with pytest.raises(ConfigError, match=r"t.yaml: line 2: tls: expected off, on or require"):
        parse("log_level: info\ntls: maybe\n", "t.yaml")


def test_flags_override_the_configuration():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = TLSSettings(TLSMode.ON, "/etc/tapdisk/pki", True)
    assert from_arguments(parser.parse_args([]), base) == base
    flags = parser.parse_args(["--tls", "require", "--tls-certificates", "/srv/pki"])
    assert from_arguments(flags, base) == TLSSettings(TLSMode.REQUIRE, "/srv/pki", True)
