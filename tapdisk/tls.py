"""NBD over TLS, server side: the settings, the certificates they name, the upgrade.

The layout of the certificate directory is nbdkit's (and qemu's ``tls-creds-x509``):
``server-cert.pem`` and ``server-key.pem``, and ``ca-cert.pem``, the authority that
client certificates must chain to when peers are verified.  Everything is loaded
and checked when the server starts, so a missing or unreadable file stops it with
one line naming the file, not at the first client.

Lifecycle of a TLS connection:
1. The handshake (nbd/handshake.py) answers STARTTLS with an ACK and returns ``StartTLS``.
2. The connection calls ``ServerTLS.upgrade``: the event loop's ``start_tls`` runs the
   TLS handshake on the same socket and hands back a transport carrying plain text.
3. The NBD handshake carries on over it, from a clean slate, as the spec wants.

``ssl`` is imported here only when TLS is configured (asyncio loads the module itself,
so that costs no memory), and only servers with TLS on load certificates: every tapdisk is
one process per virtual disk, and most serve only the kernel, in plain.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from .nbd.handshake import TLSMode

if TYPE_CHECKING:
    import ssl

    from .config import Config

CA_CERTIFICATE: Final = "ca-cert.pem"
SERVER_CERTIFICATE: Final = "server-cert.pem"
SERVER_KEY: Final = "server-key.pem"
#: Seconds a client may take over the TLS handshake (within the NBD handshake's own limit).
HANDSHAKE_TIMEOUT: Final = 30.0


class TLSConfigError(Exception):
    """The TLS settings or a certificate file are unusable; the message names the file."""


@dataclass(frozen=True)
class TLSSettings:
    """``--tls``, ``--tls-certificates`` and ``--tls-verify-peer`` (or the YAML keys)."""

    mode: TLSMode = TLSMode.OFF
    certificates: str | None = None
    verify_peer: bool = False


#: TLS handshakes under way (the event loop keeps only weak references to tasks).
_UPGRADES: set[asyncio.Task[None]] = set()


def in_background(upgrade: Coroutine[Any, Any, None]) -> None:
    """Run a connection's TLS upgrade as a task kept alive until it ends."""
    task = asyncio.get_running_loop().create_task(upgrade)
    _UPGRADES.add(task)
    task.add_done_callback(_UPGRADES.discard)


@dataclass(frozen=True)
class ServerTLS:
    """What a server with TLS on hands its connections: the mode and a ready context."""

    mode: TLSMode
    context: ssl.SSLContext

    async def upgrade(
        self, transport: asyncio.Transport, protocol: asyncio.BufferedProtocol
    ) -> asyncio.Transport:
        """Run the TLS handshake on ``transport``; the transport to use from now on.

        ``protocol`` gets the decrypted bytes once the caller holds the new transport:
        a client may send its next option with its last handshake message, and the
        reply must not go out through the old one.  Raises OSError (``ssl.SSLError``
        is one) or TimeoutError when the handshake fails; the socket is then closed.
        """
        loop = asyncio.get_running_loop()
        early = _Early()
        wrapped = await loop.start_tls(
            transport,
            early,
            self.context,
            server_side=True,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
        )
        assert wrapped is not None
        wrapped.set_protocol(protocol)
        loop.call_soon(early.replay, protocol)  # before anything the loop reads next
        return _Coalescing(wrapped)


class _Coalescing(asyncio.Transport):
    """A TLS transport whose ``writelines`` makes one TLS record of many replies.

    The event loops' TLS transports encrypt each buffer handed to ``writelines`` on
    its own: the replies a connection batches (and each reply's header and data) would
    each cost a record and its encryption, a fifth of the server's CPU time at 4 KiB reads.
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        super().__init__()
        self._transport = transport

    def writelines(self, list_of_data) -> None:  # type: ignore[no-untyped-def]
        self._transport.write(b"".join(list_of_data))

    def write(self, data) -> None:  # type: ignore[no-untyped-def]
        self._transport.write(data)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def close(self) -> None:
        self._transport.close()

    def abort(self) -> None:
        self._transport.abort()

    def get_extra_info(self, name, default=None):  # type: ignore[no-untyped-def]
        return self._transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def write_eof(self) -> None:
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()


class _Early(asyncio.Protocol):
    """Holds what arrives between the end of the TLS handshake and the switch."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.lost: tuple[Exception | None] | None = None

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = (exc,)

    def replay(self, protocol: asyncio.BufferedProtocol) -> None:
        view = memoryview(self.data)
        while view:
            target = protocol.get_buffer(len(view))
            count = min(len(target), len(view))
            target[:count] = view[:count]
            protocol.buffer_updated(count)
            view = view[count:]
        if self.lost is not None:
            protocol.connection_lost(self.lost[0])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--tls``, ``--tls-certificates`` and ``--tls-verify-peer``, defaulting to None so
    that, where a configuration file applies, only flags actually given override it."""
    parser.add_argument(
        "--tls",
        choices=[mode.value for mode in TLSMode],
        help="off (default): plain NBD; on: STARTTLS offered, plain clients served too; "
        "require: clients must start TLS before anything else",
    )
    parser.add_argument(
        "--tls-certificates",
        metavar="DIR",
        help=f"directory holding {SERVER_CERTIFICATE}, {SERVER_KEY} and "
        f"(with --tls-verify-peer) {CA_CERTIFICATE}, as nbdkit and qemu lay it out",
    )
    parser.add_argument(
        "--tls-verify-peer",
        action="store_true",
        default=None,
        help=f"require client certificates signed by {CA_CERTIFICATE}",
    )


def configured(config: Config) -> TLSSettings:
    """The settings of the configuration's ``tls``, ``tls_certificates`` and ``tls_verify_peer``."""
    return TLSSettings(config.tls, config.tls_certificates, config.tls_verify_peer)


def from_arguments(args: argparse.Namespace, base: TLSSettings) -> TLSSettings:
    """``base`` (the configuration's settings) with the flags given on top."""
    return TLSSettings(
        TLSMode(args.tls) if args.tls is not None else base.mode,
        args.tls_certificates if args.tls_certificates is not None else base.certificates,
        base.verify_peer if args.tls_verify_peer is None else args.tls_verify_peer,
    )


def server_tls(settings: TLSSettings) -> ServerTLS | None:
    """The TLS a server uses, or None when off; raises TLSConfigError naming the bad file."""
    if settings.mode == TLSMode.OFF:
        return None
    if settings.certificates is None:
        raise TLSConfigError(f"--tls {settings.mode} needs --tls-certificates DIR")
    import ssl

    directory = settings.certificates
    certificate = _readable(directory, SERVER_CERTIFICATE)
    key = _readable(directory, SERVER_KEY)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        context.load_cert_chain(certificate, key)
    except ssl.SSLError as exc:
        raise TLSConfigError(
            f"{certificate} and {key}: not a PEM certificate and its private key "
            f"({exc.reason or exc})"
        ) from None
    if settings.verify_peer:
        authority = _readable(directory, CA_CERTIFICATE)
        try:
            context.load_verify_locations(cafile=authority)
        except ssl.SSLError as exc:
            raise TLSConfigError(
                f"{authority}: not a PEM certificate authority ({exc.reason or exc})"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return ServerTLS(settings.mode, context)


def _readable(directory: str, name: str) -> str:
    """The path of ``name`` in ``directory``, once it is known to be a readable file."""
    path = os.path.join(directory, name)
    try:
        with open(path, "rb") as file:
            file.read(1)
    except OSError as exc:
        raise TLSConfigError(f"cannot read {path}: {exc.strerror}") from None
    return path
