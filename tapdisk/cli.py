"""The ``tapdisk`` command: ``tapdisk serve`` runs an NBD server in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from tapdisk.drivers.base import Image, ImageError
from tapdisk.drivers.registry import DRIVERS, OpenOptions, open_image

from . import busypoll, exporter, logs, service, tls
from . import config as configuration
from .admission import DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_HANDSHAKES, raise_file_limit
from .allocator import tune_allocator
from .budget import MiB, PayloadBudget
from .daemon import command as daemon_command
from .daemon import spawner
from .export import Export
from .loop import run_loop
from .replybudget import DEFAULT_REPLY_BUDGET, ReplyBudget
from .server import HANDSHAKE_TIMEOUT, NBDServer
from .writebudget import DEFAULT_WRITE_BUDGET

log = logging.getLogger("tapdisk")

SERVE_EXAMPLES = """\
examples:
  tapdisk serve --unix /tmp/disk.sock raw:/var/lib/images/disk.img
      then: nbdinfo 'nbd+unix:///?socket=/tmp/disk.sock'
  tapdisk serve --tcp 127.0.0.1:10809 --read-only raw:disk.img
      then: qemu-img convert -O qcow2 nbd://127.0.0.1:10809 copy.qcow2
  tapdisk serve --unix /tmp/s.sock boot=raw:a.img data=raw:b.img
      then: qemu-io -f raw 'nbd+unix:///data?socket=/tmp/s.sock'
"""


TAPDISK_EXAMPLES = """\
examples:
  tapdisk serve --unix /tmp/disk.sock raw:/var/lib/images/disk.img
  tapdisk --log-level debug daemon --control-dir /tmp/td
  tapdisk service --config /etc/tapdisk/tapdisk.yaml
  tapdisk exporter --metrics-listen 127.0.0.1:9847
  tapdisk COMMAND --help     more examples for each command
"""


def parse_tcp_address(text: str) -> tuple[str, int]:
    """``--tcp``: the configuration's ``HOST:PORT`` grammar as an argparse type."""
    try:
        return configuration.parse_host_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_connection_limit(text: str) -> int:
    """``--max-connections``, ``--max-handshakes``: a whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (no limit) or more, got {value}")
    return value


def parse_budget(text: str) -> int:
    """``--write-budget``, ``--reply-budget``: MiB, 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of MiB, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 MiB or more, got {value}")
    return value


def split_export(text: str) -> tuple[str | None, str]:
    """``NAME=TYPE:PATH`` or ``TYPE:PATH`` -> (name or None, spec)."""
    name, sep, spec = text.partition("=")
    if sep and ":" not in name:
        return name, spec
    return None, text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tapdisk",
        description="Userspace block-device daemon serving disk images over NBD.",
        epilog=TAPDISK_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="default info (exporter, service: the configuration's log_level)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="serve images over NBD in the foreground",
        description="Serve one or more images over NBD until SIGTERM or SIGINT. "
        'With one image it is also the default export "". '
        f"Image types: {', '.join(sorted(DRIVERS))}.",
        epilog=SERVE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "--unix",
        metavar="PATH",
        action="append",
        default=[],
        help="listen on a unix socket (repeatable)",
    )
    serve.add_argument(
        "--tcp",
        metavar="HOST:PORT",
        type=parse_tcp_address,
        action="append",
        default=[],
        help="listen on TCP (repeatable; default 127.0.0.1:10809 when no --unix is given)",
    )
    serve.add_argument("--read-only", "-r", action="store_true", help="refuse all writes")
    serve.add_argument("--direct", action="store_true", help="bypass the page cache (O_DIRECT)")
    serve.add_argument(
        "--remote-backing",
        action="store_true",
        help="let qcow2/qcow backing files be NBD URIs (nbd://, nbd+unix://...), opened read-only",
    )
    serve.add_argument(
        "--description",
        metavar="TEXT",
        default="",
        help="what clients that ask are told about each export (nbdinfo shows it); "
        "default none: clients do not learn the server's paths",
    )
    serve.add_argument(
        "--handshake-timeout",
        type=float,
        default=HANDSHAKE_TIMEOUT,
        metavar="SECS",
        help=f"drop clients that take longer to negotiate (default {HANDSHAKE_TIMEOUT:g})",
    )
    serve.add_argument(
        "--max-connections",
        type=parse_connection_limit,
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help="clients past the handshake served at once; more are closed at connect "
        f"(default {DEFAULT_MAX_CONNECTIONS}, 0 = no limit). An idle one costs a few KiB",
    )
    serve.add_argument(
        "--max-handshakes",
        type=parse_connection_limit,
        default=DEFAULT_MAX_HANDSHAKES,
        metavar="N",
        help="clients still negotiating at once; past it the oldest is closed to let a new "
        "one in, so idle sockets cannot lock clients out "
        f"(default {DEFAULT_MAX_HANDSHAKES}, 0 = no limit)",
    )
    serve.add_argument(
        "--write-budget",
        type=parse_budget,
        default=DEFAULT_WRITE_BUDGET // MiB,
        metavar="MIB",
        help="memory for WRITE payloads still arriving, shared by all clients; a client "
        "whose write does not fit waits, others are served "
        f"(default {DEFAULT_WRITE_BUDGET // MiB})",
    )
    serve.add_argument(
        "--reply-budget",
        type=parse_budget,
        default=DEFAULT_REPLY_BUDGET // MiB,
        metavar="MIB",
        help="memory for READ replies clients have not taken yet, shared by all clients "
        "beyond 128 KiB each; a client whose read does not fit waits, small reads are served "
        f"(default {DEFAULT_REPLY_BUDGET // MiB})",
    )
    configuration.add_busy_poll_argument(serve, busypoll.DEFAULT_MAX_US)
    tls.add_arguments(serve)
    serve.add_argument(
        "images",
        nargs="+",
        metavar="[NAME=]TYPE:PATH",
        help="image to serve; its export name is NAME or the file's name",
    )
    daemon_command.add_parser(sub)
    spawner.add_parser(sub)
    service.add_parser(sub)
    exporter.add_parser(sub)
    return parser


def default_export_name(spec: str) -> str:
    """The file's name, or an rbd image's name (its options, such as conf=, left out)."""
    kind, _, path = spec.partition(":")
    if kind == "rbd":
        path = path.partition(":")[0].partition("@")[0]
    return os.path.basename(path)


def open_exports(args: argparse.Namespace) -> list[Export]:
    """Open every image named on the command line; close them all on failure."""
    options = OpenOptions(
        read_only=args.read_only, direct=args.direct, remote_backing=args.remote_backing
    )
    opened: list[Image] = []
    exports: list[Export] = []
    names: set[str] = set()
    try:
        for item in args.images:
            name, spec = split_export(item)
            image = open_image(spec, options)
            opened.append(image)
            name = name if name is not None else default_export_name(spec)
            if name in names:
                raise ImageError(f"two exports named {name!r}; use NAME=TYPE:PATH")
            names.add(name)
            exports.append(
                Export(name, image, read_only=args.read_only, description=args.description)
            )
    except BaseException:
        for image in opened:
            asyncio.run(image.close())
        raise
    return exports


async def serve(
    args: argparse.Namespace, exports: list[Export], server_tls: tls.ServerTLS | None
) -> int:
    poller = busypoll.BusyPoller(args.busy_poll)
    server = NBDServer(
        exports,
        handshake_timeout=args.handshake_timeout,
        poller=poller,
        max_connections=args.max_connections or None,
        max_handshakes=args.max_handshakes or None,
        write_budget=PayloadBudget(args.write_budget * MiB),
        reply_budget=ReplyBudget(args.reply_budget * MiB),
        tls=server_tls,
    )
    raise_file_limit(server.admission)
    uris: list[str] = []
    # libnbd's scheme for a server it must speak TLS to.
    scheme = "nbds" if server_tls is not None and server_tls.mode == tls.TLSMode.REQUIRE else "nbd"
    try:
        for path in args.unix:
            await server.listen_unix(path)
            uris.append(f"{scheme}+unix:///?socket={os.path.abspath(path)}")
        tcp = args.tcp or ([] if args.unix else [("127.0.0.1", 10809)])
        for host, port in tcp:
            bound = await server.listen_tcp(host, port)
            shown = f"[{host}]" if ":" in host else host
            uris.append(f"{scheme}://{shown}:{bound}/")
    except OSError as exc:
        print(f"tapdisk: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        await server.shutdown()
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    for uri in uris:
        print(uri, flush=True)
    for export in exports:
        log.info(
            "serving %s as export %r (%d bytes%s)",
            export.image.spec,
            export.name,
            export.image.size,
            ", read-only" if export.read_only else "",
        )
    await stop.wait()
    log.info("shutting down; %s", poller.summary())
    await server.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "exporter":
        return exporter.run(args, args.log_level)
    tune_allocator()  # everything below serves I/O
    if args.command == "service":
        return service.main(args, args.log_level)
    logs.setup(args.log_level or "info")
    if args.command == "spawner":
        daemon = (parser.parse_args, daemon_command.main)
        return spawner.serve(args.control_dir, args.ready_fd, *daemon)
    if args.command == "serve":
        try:
            server_tls = tls.server_tls(tls.from_arguments(args, tls.TLSSettings()))
        except tls.TLSConfigError as exc:
            print(f"tapdisk: {exc}", file=sys.stderr)
            return 1
        try:
            exports = open_exports(args)
        except ImageError as exc:
            print(f"tapdisk: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"tapdisk: {exc}", file=sys.stderr)
            return 1
        return run_loop(serve(args, exports, server_tls))
    if args.command == "daemon":
        return daemon_command.main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
