"""The spawner: one resident process per control directory that forks new tapdisks.

Most of a tapdisk's memory is the interpreter's imported modules (``import asyncio``
alone is 12 MB PSS).  Forking every tapdisk from one process that imported them once,
and then moved them out of the garbage collector's reach with ``gc.freeze()`` (so
collections in the children do not write to those pages), leaves them shared
copy-on-write among all tapdisks: ``bench/memory.py`` measures the difference.

Lifecycle:
1. ``tap-ctl spawn`` connects to ``<dir>/spawner``; when nobody listens it starts
   ``tapdisk spawner`` under ``<dir>/spawner.lock`` (so one starts) and waits until
   it is ready.
2. It sends one request: the JSON object ``{"config": PATH or null}`` with two file
   descriptors (SCM_RIGHTS): the tapdisk's stderr (its log) and the write end of the
   pipe on which the tapdisk says it is listening.
3. The spawner parses the ``tapdisk daemon`` command line and forks; the child starts a
   new session, takes those descriptors and runs the daemon with those arguments.  The
   spawner answers ``PID\\n``.
4. The spawner reaps its children (a SIGCHLD wakes it) and lives as long as one runs;
   ``LINGER`` seconds after the last is gone it removes its socket and exits.  A client
   that connected in that instant reads EOF and starts a new spawner.

A running spawner forks the modules it imported, so it checks before each fork that
the daemon's code on disk is still what it imported (``code_stamp``); after an upgrade it
removes its socket and exits unanswered instead, and the client starts a new spawner:
``tap-ctl restart`` then runs the new code.  Its tapdisks go on running.

Every page a child writes after the fork becomes its own, so the child does as little
as it can: the spawner builds the argument parser once and parses each child's command
line itself (building and running argparse cost each child 1.1 MB of its own),
imports beforehand the modules every child would import on the way (``PRELOAD``), and
plays one whole tapdisk life itself first (``rehearsal.py``): CPython 3.11 rewrites a
function's bytecode in place during its first calls, so code first run after the fork
is written into by every child.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import NoReturn

import tapdisk
import tapdisk.drivers
from tapdisk.ctl import protocol
from tapdisk.drivers import registry

from .rehearsal import rehearse

log = logging.getLogger("tapdisk.spawner")

#: Seconds the spawner stays after its last tapdisk exited.
LINGER = 5.0
#: Largest request accepted, in bytes.
MAX_REQUEST = 64 * 1024
#: Modules a tapdisk imports on the way, not at the top of another module: imported by the
#: spawner so that every child shares them.  The codecs decode a VHD header's parent name
#: (every VHD) and its parent locators (every VHD with a parent).
PRELOAD = ("encodings.utf_16_be", "encodings.utf_16_le")


def socket_path(directory: str) -> str:
    """Where the spawner of ``directory`` listens."""
    return os.path.join(directory, protocol.SPAWNER_SOCKET)


def serve(
    directory: str,
    ready: int | None,
    parse: Callable[[list[str]], argparse.Namespace],
    start: Callable[[argparse.Namespace], int],
) -> int:
    """Fork tapdisks on request until idle: ``parse(argv)`` (in the spawner) reads a
    ``tapdisk daemon`` command line, ``start(args)`` (in the child) runs that daemon.

    Writes the socket path to ``ready`` (if given) once listening.  The caller must
    have imported the daemon; the drivers are imported here, so that every child
    shares them.
    """
    registry.import_openers()
    stamp = code_stamp()
    for name in PRELOAD:
        importlib.import_module(name)
    rehearse()
    path = socket_path(directory)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    listener.bind(path)
    listener.listen(64)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    gc.collect()
    gc.freeze()
    if ready is not None:
        os.write(ready, f"{path}\n".encode())
        os.close(ready)
    children: set[int] = set()
    idle_since = time.monotonic()
    while children or time.monotonic() - idle_since < LINGER:
        readable = select.select([listener, wake_r], [], [], LINGER)[0]
        if wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 4096)
        if listener in readable:
            if code_stamp() != stamp:
                log.info("spawner: the daemon's code changed on disk; a new spawner takes over")
                break
            connection, _ = listener.accept()
            with connection:
                pid = _fork(
                    connection, directory, (parse, start), (listener, connection), (wake_r, wake_w)
                )
            if pid is not None:
                children.add(pid)
        _reap(children)
        if children:
            idle_since = time.monotonic()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener.close()
    return 0


def code_stamp() -> int:
    """A fingerprint of the daemon's Python files as they are on disk (names, sizes,
    modification times, inodes): it changes when an upgrade replaces or edits one."""
    files = []
    for package in (tapdisk, tapdisk.drivers):
        for root in package.__path__:
            for dirpath, _, names in os.walk(root):
                for name in names:
                    if name.endswith(".py"):
                        path = os.path.join(dirpath, name)
                        st = os.stat(path)
                        files.append((path, st.st_size, st.st_mtime_ns, st.st_ino))
    return hash(tuple(sorted(files)))


def _reap(children: set[int]) -> None:
    """Collect the exit status of every child that has exited."""
    for pid in list(children):
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == 0:
                continue
        children.discard(pid)


def _fork(
    connection: socket.socket,
    directory: str,
    daemon: tuple[Callable[[list[str]], argparse.Namespace], Callable[[argparse.Namespace], int]],
    sockets: tuple[socket.socket, ...],
    fds: tuple[int, ...],
) -> int | None:
    """Serve one request: fork a tapdisk and answer its pid; None if the request was bad."""
    try:
        message, passed, _, _ = socket.recv_fds(connection, MAX_REQUEST, 2)
    except OSError as exc:
        log.error("spawner: bad request: %s", exc)
        return None
    try:
        config = json.loads(message)["config"]
        if len(passed) != 2 or not (config is None or isinstance(config, str)):
            raise ValueError("expected a configuration path and two descriptors")
    except (ValueError, KeyError, TypeError) as exc:
        log.error("spawner: bad request: %s", exc)
        for fd in passed:
            os.close(fd)
        return None
    log_fd, ready_fd = passed
    argv = ["daemon", "--control-dir", directory, "--ready-fd", str(ready_fd)]
    if config is not None:
        argv.append(f"--config={config}")  # one word: a path starting with - is no flag
    parse, start = daemon
    args = parse(argv)
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child(args, log_fd, ready_fd, sockets, fds, start)
    os.close(log_fd)
    os.close(ready_fd)
    with contextlib.suppress(OSError):
        connection.sendall(f"{pid}\n".encode())
    return pid


def _child(
    args: argparse.Namespace,
    log_fd: int,
    ready_fd: int,
    sockets: tuple[socket.socket, ...],
    fds: tuple[int, ...],
    start: Callable[[argparse.Namespace], int],
) -> NoReturn:
    """In the forked child: drop the spawner's sockets and descriptors, become a
    detached ``tapdisk daemon``; never returns."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for sock in sockets:
            sock.close()
        for fd in fds:
            os.close(fd)
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(log_fd, 2)
        os.close(null)
        os.close(log_fd)
        os.set_inheritable(ready_fd, False)
        code = start(args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        logging.getLogger("tapdisk").exception("tapdisk daemon failed")
    finally:
        sys.stderr.flush()
        os._exit(code)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The ``tapdisk spawner`` subcommand (tap-ctl spawn starts it when none runs)."""
    parser = sub.add_parser(
        "spawner",
        help="fork tapdisks for tap-ctl spawn, sharing their imported code (started by tap-ctl)",
        description="Listen on <dir>/spawner and fork a tapdisk daemon per request; exit "
        f"{LINGER:g} s after the last of them exited.",
    )
    protocol.add_control_dir_argument(parser)
    parser.add_argument(
        "--ready-fd",
        type=int,
        metavar="FD",
        help="write the socket path to FD and close it once listening",
    )
