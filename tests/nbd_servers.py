"""Real NBD servers for the NBD client tests: nbdkit, qemu-nbd, and TLS certificates."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from helpers import require, run


@dataclass
class Upstream:
    """A foreground NBD server on a Unix socket, restartable with the same command."""

    argv: list[str]
    socket: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Upstream:
        self.socket.unlink(missing_ok=True)
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{' '.join(self.argv)} did not start")
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(20)

    def stop(self) -> None:
        """SIGTERM; SIGKILL if it still waits for a client after a few seconds (nbdkit does)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()

    def uri(self, export: str = "") -> str:
        return f"nbd+unix:///{export}?socket={self.socket}"


def nbdkit(socket: Path, *plugin: str, tls_dir: Path | None = None) -> Upstream:
    """``nbdkit PLUGIN ARGS`` in the foreground on ``socket`` (TLS required with ``tls_dir``)."""
    tls = ["--tls=require", f"--tls-certificates={tls_dir}"] if tls_dir else []
    return Upstream([require("nbdkit"), "-f", "-U", str(socket), *tls, *plugin], socket).start()


def qemu_nbd(socket: Path, image: Path, fmt: str = "raw") -> Upstream:
    """``qemu-nbd`` serving ``image`` (writable, one client after another) on ``socket``."""
    argv = [require("qemu-nbd"), "-f", fmt, "-k", str(socket), "--persistent", "--shared=8"]
    return Upstream([*argv, "--cache=writeback", str(image)], socket).start()


def make_certificates(directory: Path, address: str = "127.0.0.1") -> Path:
    """A CA, a server certificate for localhost and ``address`` and a client certificate, in
    the layout nbdkit, qemu's tls-creds-x509 and libnbd read."""
    openssl = require("openssl")
    directory.mkdir()
    d = directory
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"]
    run(openssl, *f"req -x509 -keyout {d}/ca-key.pem -out {d}/ca-cert.pem".split(), *key,
        "-subj", "/CN=test CA")  # fmt: skip
    run(openssl, *f"req -keyout {d}/server-key.pem -out {d}/server.csr".split(), *key,
        "-subj", "/CN=localhost")  # fmt: skip
    (d / "ext.cnf").write_text(
        f"subjectAltName=DNS:localhost,IP:{address}\nextendedKeyUsage=serverAuth\n"
    )
    sign = f"x509 -req -in {d}/server.csr -CA {d}/ca-cert.pem -CAkey {d}/ca-key.pem -CAcreateserial"
    run(openssl, *sign.split(), *f"-days 2 -out {d}/server-cert.pem -extfile {d}/ext.cnf".split())
    # A client certificate too (libnbd presents it): qemu-nbd verifies its peer by default.
    run(openssl, *f"req -keyout {d}/client-key.pem -out {d}/client.csr".split(), *key,
        "-subj", "/CN=client")  # fmt: skip
    (d / "ext.cnf").write_text("extendedKeyUsage=clientAuth\n")
    sign = f"x509 -req -in {d}/client.csr -CA {d}/ca-cert.pem -CAkey {d}/ca-key.pem -CAcreateserial"
    run(openssl, *sign.split(), *f"-days 2 -out {d}/client-cert.pem -extfile {d}/ext.cnf".split())
    os.chmod(directory / "server-key.pem", 0o600)
    os.chmod(directory / "client-key.pem", 0o600)
    return directory


def random_file(path: Path, size: int, seed: int = 1) -> Path:
    """``size`` bytes of repeatable pseudo-random data, with a hole-like zero run in the middle."""
    import random

    data = bytearray(random.Random(seed).randbytes(size))
    data[size // 4 : size // 2] = bytes(size // 4)
    path.write_bytes(data)
    return path
