"""How XCP-ng's storage manager drives tap-ctl, re-written for the tests from SM's code.

SM (github.com/xapi-project/sm, ``libs/sm/blktap2.py``, classes ``TapCtl``, ``Tapdisk``
and ``Blktap``) runs ``tap-ctl`` as a subprocess.  This module does what SM does, in our
own words, so that a test fails where SM would:

- the argument lists SM builds for each command, every value passed through ``str``;
- the output SM reads: the first line of stdout only (``allocate``, ``spawn``,
  ``stats``), ``list`` lines split in at most four space-separated ``key=value`` fields
  (``pid`` and ``minor`` read as decimal, ``state`` as hexadecimal), and the minor
  taken from allocate's path ``<dir>/tapdisk/tapdisk-<N>`` by a regular expression;
- exit codes: any non-zero status is a ``CommandFailure`` carrying it and stderr.

The one change: SM's paths are under ``/run/blktap-control``; here, under the
tests' private control directory.  SM's retry loops (spawn on status 1, list on
EPROTO/ENOENT) are left out, so that a flaky tap-ctl fails the tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The image types SM accepts in a listing (``Tapdisk.TYPES``).
SM_TYPES = ("aio", "vhd")
#: blktap's state bits SM reads.
PAUSE_REQUESTED = 0x10
PAUSED = 0x20


class CommandFailure(Exception):
    """tap-ctl exited non-zero (SM's ``TapCtl.CommandFailure``)."""

    def __init__(self, argv: list[str], status: int, errmsg: str) -> None:
        super().__init__(f"{' '.join(argv)} failed: status={status}, errmsg={errmsg}")
        self.status = status
        self.errmsg = errmsg


class InvalidState(Exception):
    """SM's ``TapdiskInvalidState``: pause of a tapdisk not running, unpause of one not paused."""


@dataclass
class Tapdisk:
    """One row of ``tap-ctl list`` with every field, as SM's ``Tapdisk`` keeps it."""

    pid: int
    minor: int
    type: str
    path: str
    state: int

    def is_paused(self) -> bool:
        return bool(self.state & PAUSED)

    def is_running(self) -> bool:
        return not self.state & (PAUSED | PAUSE_REQUESTED)


@dataclass
class SMTapCtl:
    """tap-ctl called the way SM calls it, over a private control directory."""

    binary: str
    directory: Path

    # -- TapCtl: running the command ------------------------------------------------

    def _popen(self, args: list[Any], binary_input: bool) -> subprocess.Popen:  # type: ignore[type-arg]
        argv = [self.binary, *(str(arg) for arg in args)]
        env = {**os.environ, "TAPDISK_CONTROL_DIR": str(self.directory)}
        return subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=not binary_input,
        )

    def _wait(self, proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
        status = proc.wait(120)
        if status != 0:
            stderr = proc.stderr.read() if proc.stderr else ""
            if isinstance(stderr, bytes):
                stderr = stderr.decode()
            errmsg = "; ".join(line.rstrip() for line in stderr.splitlines())
            raise CommandFailure(proc.args, status, errmsg)  # type: ignore[arg-type]

    def pread(self, args: list[Any], key: bytes | None = None) -> str:
        """Run tap-ctl, read the first line of its output, check its exit status."""
        proc = self._popen(args, binary_input=key is not None)
        assert proc.stdin is not None and proc.stdout is not None
        if key is not None:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(key)
                proc.stdin.close()
        line = proc.stdout.readline()
        if isinstance(line, bytes):
            line = line.decode()
        output = line.rstrip()
        self._wait(proc)
        return output

    def list(self, **filters: Any) -> list[dict[str, Any]]:
        args: list[Any] = ["list"]
        for option, name in (("-m", "minor"), ("-p", "pid"), ("-t", "_type"), ("-f", "path")):
            if filters.get(name) is not None:
                args += [option, filters[name]]
        proc = self._popen(args, binary_input=False)
        assert proc.stdout is not None
        rows = []
        for line in proc.stdout:
            row: dict[str, Any] = {}
            for field in line.rstrip().split(" ", 3):
                parts = field.split("=")
                if len(parts) != 2:
                    continue  # SM logs and ignores such a field
                key, value = parts
                if key in ("pid", "minor"):
                    row[key] = int(value, 10)
                elif key == "state":
                    row[key] = int(value, 16)
                else:
                    row[key] = value
            rows.append(row)
        self._wait(proc)
        return rows

    # -- TapCtl: the commands -------------------------------------------------------

    def allocate(self) -> int:
        """``Blktap.allocate``: the minor, read off the marker path tap-ctl prints."""
        devname = self.pread(["allocate"])
        match = re.search(rf"{re.escape(str(self.directory))}/tapdisk/tapdisk-(\d+)$", devname)
        if not match:
            raise AssertionError(f"malformed tap device: {devname!r}")
        return int(match.group(1))

    def free(self, minor: int) -> None:
        self.pread(["free", "-m", minor])

    def spawn(self) -> int:
        return int(self.pread(["spawn"]))

    def attach(self, pid: int, minor: int) -> None:
        self.pread(["attach", "-p", pid, "-m", minor])

    def detach(self, pid: int, minor: int) -> None:
        self.pread(["detach", "-p", pid, "-m", minor])

    def open(self, pid: int, minor: int, kind: str, path: str, options: dict[str, Any]) -> None:
        args: list[Any] = ["open", "-p", pid, "-m", minor, "-a", f"{kind}:{path}"]
        if options.get("rdonly"):
            args.append("-R")
        if options.get("lcache"):
            args.append("-r")
        if options.get("existing_prt") is not None:
            args += ["-e", str(options["existing_prt"])]
        if options.get("secondary"):
            args += ["-2", options["secondary"]]
        if options.get("standby"):
            args.append("-s")
        if options.get("timeout"):
            args += ["-t", str(options["timeout"])]
        if not options.get("o_direct", True):
            args.append("-D")
        key = options.get("key")
        if key:
            args.append("-E")
        self.pread(args, key=key)

    def close(self, pid: int, minor: int, force: bool = False) -> None:
        self.pread(["close", "-p", pid, "-m", minor, "-t", "120", *(["-f"] if force else [])])

    def pause(self, pid: int, minor: int) -> None:
        self.pread(["pause", "-p", pid, "-m", minor])

    def unpause(
        self, pid: int, minor: int, kind: str | None = None, path: str | None = None, **extra: str
    ) -> None:
        args: list[Any] = ["unpause", "-p", pid, "-m", minor]
        if extra.get("mirror"):
            args += ["-2", extra["mirror"]]
        if kind and path:
            args += ["-a", f"{kind}:{path}"]
        self.pread(args)

    def stats(self, pid: int, minor: int) -> dict[str, Any]:
        return json.loads(self.pread(["stats", "-p", pid, "-m", minor]))  # type: ignore[no-any-return]

    # -- Tapdisk ----------------------------------------------------------------------

    def tapdisks(self, **filters: Any) -> list[Tapdisk]:
        """Rows with pid, minor, state and args; SM skips the others."""
        found = []
        for row in self.list(**filters):
            if not {"pid", "minor", "state", "args"} <= row.keys():
                continue
            kind, sep, path = row["args"].partition(":")
            if not sep or kind not in SM_TYPES:
                raise AssertionError(f"SM refuses the image {row['args']!r}")
            found.append(Tapdisk(row["pid"], row["minor"], kind, path, row["state"]))
        return found

    def find(self, **filters: Any) -> Tapdisk | None:
        found = self.tapdisks(**filters)
        if len(found) > 1:
            raise AssertionError(f"SM's TapdiskNotUnique: {found}")
        return found[0] if found else None

    def launch(self, path: str, kind: str, options: dict[str, Any]) -> Tapdisk:
        """``Tapdisk.launch``: allocate, spawn, attach, open, and undo on failure."""
        if self.find(path=path):
            raise AssertionError(f"SM's TapdiskExists: {path}")
        minor = self.allocate()
        try:
            pid = self.spawn()
            try:
                self.attach(pid, minor)
                try:
                    self.open(pid, minor, kind, path, options)
                    tapdisk = self.find(minor=minor)
                    if tapdisk is None:
                        self.close(pid, minor)
                        raise AssertionError(f"SM's TapdiskNotRunning: minor={minor}")
                    return tapdisk
                except BaseException:
                    self.detach(pid, minor)
                    raise
            except BaseException:
                with contextlib.suppress(OSError):  # SM's TapCtl.shutdown, best effort
                    os.kill(pid, signal.SIGTERM)
                raise
        except BaseException:
            self.free(minor)
            raise

    def shutdown(self, tapdisk: Tapdisk, force: bool = False) -> None:
        """``Tapdisk.shutdown``: close, detach, free."""
        self.close(tapdisk.pid, tapdisk.minor, force)
        self.detach(tapdisk.pid, tapdisk.minor)
        self.free(tapdisk.minor)

    def pause_tapdisk(self, tapdisk: Tapdisk) -> Tapdisk:
        if not tapdisk.is_running():
            raise InvalidState(str(tapdisk))
        self.pause(tapdisk.pid, tapdisk.minor)
        return self.refreshed(tapdisk)

    def unpause_tapdisk(self, tapdisk: Tapdisk, path: str | None = None) -> Tapdisk:
        """``Tapdisk.unpause``: SM always names the image, the same one by default."""
        if not tapdisk.is_paused():
            raise InvalidState(str(tapdisk))
        self.unpause(tapdisk.pid, tapdisk.minor, tapdisk.type, path or tapdisk.path)
        return self.refreshed(tapdisk)

    def refreshed(self, tapdisk: Tapdisk) -> Tapdisk:
        """SM's ``_refresh``: the tapdisk listed again by its minor."""
        again = self.find(minor=tapdisk.minor)
        if again is None:
            raise AssertionError(f"SM's TapdiskNotRunning: minor={tapdisk.minor}")
        return again
