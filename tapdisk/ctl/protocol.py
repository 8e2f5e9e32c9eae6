"""The control-socket protocol between ``tap-ctl`` and a tapdisk daemon (sans-IO).

No sockets here: ``encode`` turns a message into bytes, ``Decoder.feed`` turns
bytes into messages, and ``parse_request``/``parse_response`` validate them.
The daemon (``tapdisk/daemon/``) and its callers (``tapdisk/ctl/client.py``, which
tap-ctl and the exporter use) share this module, and ``minors.py`` for the minors.

Transport
---------
One unix stream socket per tapdisk process, ``<dir>/ctl<pid>``, mode 0600;
``<dir>`` is blktap's ``/run/blktap-control`` unless ``--control-dir``,
``$TAPDISK_CONTROL_DIR`` or the configuration's ``control_dir`` says otherwise (in that
order).  Minors are blktap's marker files ``<dir>/tapdisk/tapdisk-<minor>``
(``tapdisk/ctl/minors.py``), and each opened VBD is served over NBD at
``<dir>/nbd<pid>.<minor>``.  Every message is a 4-byte big-endian length followed by
that many bytes of UTF-8 JSON holding one object, at most ``MAX_MESSAGE`` bytes;
``Infinity``, ``NaN`` and numbers too large for a float are not JSON and are refused.
A client sends requests; the daemon answers each, in order, with one response.  A
frame it cannot decode gets one ``invalid`` error response (id 0), then the daemon
closes that connection.

Requests and responses
----------------------
Request: ``{"id": INT, "op": NAME, "args": {...}}``.  Response:
``{"id": INT, "ok": true, "result": ...}`` or
``{"id": INT, "ok": false, "error": {"kind": KIND, "message": TEXT}}``, where KIND
is one of ``ERROR_KINDS``; an ``os`` error also has ``"errno": INT``, the error of the
system call that failed (tap-ctl exits with it, as blktap's does).  Operations
(``OPS`` lists their arguments):

==========  ==============================================  ==============================
op          args                                            result
==========  ==============================================  ==============================
pid         --                                              {"pid": INT, "config": PATH}
list        --                                              [VBD-INFO, ...] (attach order)
attach      minor                                           VBD-INFO (nothing open yet)
detach      minor                                           {"attached": INT}
open        spec, [minor], [read_only], [timeout],          VBD-INFO
            [cbt_log], [secondary], [standby]
close       minor                                           null
connect     minor, [index], [connections], [timeout]        VBD-INFO (with "device")
disconnect  minor                                           VBD-INFO
takeover    minor, index, [connections]                     VBD-INFO (serving /dev/nbd<index>)
release     minor                                           null
adopt       pid, [recover]                                  [VBD-INFO, ...] (taken over)
handover    pid                                             HANDOVER-STATE, descriptors
                                                            attached; then ``confirm``
pause       minor                                           VBD-INFO
unpause     minor, [spec], [cbt_log], [secondary],          VBD-INFO
            [standby]
snapshot    minor, path, [format]                           VBD-INFO (running on the overlay;
                                                            format rbd: path is a snapshot
                                                            name, "snapshot" its spec)
stats       [minor]                                         STATS, or [STATS, ...] without minor
mirror      minor, spec, [switch]                           MIRROR-STATUS (the copy started)
mirror_status  minor                                        MIRROR-STATUS
mirror_cancel  minor                                        MIRROR-STATUS (once stopped)
commit      minor, path                                     COMMIT-STATUS (the copy started)
commit_status  minor                                        COMMIT-STATUS
commit_cancel  minor                                        COMMIT-STATUS (once stopped)
shutdown    --                                              null (the process then exits)
==========  ==============================================  ==============================

Minors follow blktap: ``attach`` binds an allocated minor to the daemon (locking its
marker), ``open`` opens an image on it, ``close`` closes the image and ``detach``
unbinds the minor; ``detach``'s result counts the minors still attached, and a daemon
left with none exits, as blktap's tapdisk does (``tapdisk service`` excepted).  An
``open`` without ``minor`` allocates and attaches a minor itself, which the daemon
frees when it shuts down.  ``open`` on a minor attached first (SM's order) also
connects it to the kernel when nbd.ko is loaded; a failure to connect is logged, the
image stays served over NBD.

``timeout`` is the per-request retry deadline in seconds (tap-ctl ``-t``), more
than 0 and at most ``MAX_SECONDS`` (one day, the configuration's cap too), as is
connect's; ``index`` is at most ``MAX_DEVICE_INDEX``.  No string argument may
contain a NUL byte.
``cbt_log`` is the absolute path of a CBT log (made by cbt-util) in which the
device marks every block it writes (tap-ctl ``open -C``, ``unpause -c``); a
missing log fails the request.  Pause releases the log; unpause without
``cbt_log`` stops tracking, with one tracks into it, read afresh from the file.
``connect`` gives an opened VBD to the kernel's nbd driver: ``index`` asks for
``/dev/nbd<index>`` (without it the kernel picks a free one), and its ``timeout`` is
the kernel's request timeout (default: the retry deadline plus 60 s); a connected
minor's marker holds ``/dev/nbdN``.  ``disconnect`` takes it back, the VBD stays open.

``secondary`` (tap-ctl ``-2``) is a ``TYPE:PATH`` of the device's size that every
write, write-zeroes, trim and flush also goes to (drivers/mirror.py); one that fails
or hangs is dropped and STATS' ``nbd_mirror_failed`` becomes 1 until an unpause with
the secondary ``null``.  With ``standby`` (``-s``) it is only held open, and takes
over when the image runs out of space.  Pause closes it; unpause without it runs
without.

``mirror`` migrates a running device (tapdisk/migration.py): it opens the target
``spec``, mirrors to it, copies the device's allocated data in the background and,
with ``switch``, runs the device on the target and closes the source; it answers
once mirroring has begun, ``mirror_status`` tells how far it got, ``mirror_cancel``
stops it (the device stays on its source).  MIRROR-STATUS: ``{"state":
"copying|switching|mirroring|switched|failed", "target": SPEC, "switch": BOOL,
"total": INT, "done": INT, "copied": INT, "zeroed": INT, "seconds": NUM, "error":
TEXT or null}``; ``done`` bytes of ``total`` are copied (``copied`` of them as data,
``zeroed`` as zeroes); ``mirroring``: copied, the mirror kept on; ``switched``: the
device runs on the target.

``commit`` merges ``path``, a QCOW2 image below the leaf of a running device's chain,
into its parent and then drops it from the chain (tapdisk/commitjob.py): it answers
once the copy has begun, ``commit_status`` tells how far it got, ``commit_cancel``
stops it (the chain stays as it was).  COMMIT-STATUS: ``{"state":
"undefined|running|concluded|failed|cancelled", "path": PATH or null, "total": INT,
"done": INT, "error": TEXT or null}``: ``done`` bytes of ``total`` (the image's virtual
size) scanned; ``concluded``: the image is out of the chain.  A job that has ended is
reported once, then forgotten (``undefined``: no job), as blktap's query does.

``takeover`` and ``release`` restart a tapdisk under a live device (tap-ctl
restart): the old daemon pauses the VBD, then ``release`` cuts its kernel
sockets and closes the VBD *without* a kernel DISCONNECT; the new daemon, which
opened the same image, then ``takeover``s ``/dev/nbd<index>`` with fresh
sockets (nbd RECONFIGURE, presenting the device's backend identifier), by
default as many as the device has connections.  Requests the kernel had sent
to the old daemon are resent once the kernel's request timeout fires.

``adopt`` and ``handover`` move every VBD of a tapdisk to a successor with its live
sockets (tap-ctl restart; ``tapdisk/daemon/handover.py`` has the whole conversation):
tap-ctl sends ``adopt`` with the predecessor's pid to a freshly spawned tapdisk, which
sends ``handover`` with its own pid to the predecessor.  The predecessor stops reading
new requests, answers those it read, pauses its VBDs and answers with
HANDOVER-STATE, its descriptors attached (SCM_RIGHTS) to the first bytes of that
answer; it then waits on the same connection for a request ``confirm`` (no args),
answers it and exits.  Until it has answered ``confirm`` it serves on if anything
fails.  HANDOVER-STATE is private to the two tapdisks (same version on both sides).
``adopt`` with ``recover`` takes the VBDs of a tapdisk that is gone from their records
(``records.py``): it opens each recorded image on its minor, listens on its recorded
NBD socket path and takes its recorded ``/dev/nbdN`` over with RECONFIGURE (the
fallback of tap-ctl restart, ``tapdisk/daemon/recovery.py``).

VBD-INFO: ``{"pid": INT, "minor": INT, "state": INT, "spec": "TYPE:PATH",
"size": INT, "read_only": BOOL, "cbt_log": PATH or null, "timeout": NUM,
"nbd_socket": PATH, "device": "/dev/nbdN" or null}``, ``timeout`` being the retry
deadline, ``cbt_log`` the CBT log marked (while paused, the one marked before the
pause) and ``spec`` the image as it was given (``aio:`` stays ``aio:``); a minor
with nothing open has null in every field but pid, minor and state.  ``state`` is an
OR of blktap's VBD flags, the ``STATE_*`` bits below: 0 while running (or attached,
nothing opened yet), 0x2 once closed, 0x14 while a pause drains, 0x2a paused, 0x40
added while closing, 0x200 added after a failed unpause.

STATS (one VBD): blktap's keys, then this project's counters under ``vbd``::

    {
      "name": "TYPE:PATH",      # the spec as listed
      "secs": [INT, INT],       # 512-byte sectors read, written (failed or not)
      "images": [{"name": PATH, "hits": [INT, INT], "fail": [INT, INT],
                  "driver": {"type": INT or null, "name": TYPE, "status": {...} or null}}, ...],
                                # the chain, leaf first: sectors each image served itself,
                                # read and written (failed or not), and those that failed;
                                # writes go to the leaf, a read to the image holding the
                                # data (the root for data none holds).  ``driver``: blktap's
                                # disk type number (aio 0, vhd 4, qcow 6; null for types
                                # blktap lacks), and for aio ``{"reqs": {"max", "pending"}}``
      "FIXME_enospc_redirect_count": 0,
      "nbd_mirror_failed": 0 or 1,   # a secondary failed and was dropped
      "reqs_outstanding": INT,  # requests queued or in flight
      "read_caching": "true|false",   # reads go through the page cache
      "vbd": VBD-STATS
    }

VBD-STATS (plain counters since the VBD was opened, never reset)::

    {
      "pid": INT, "minor": INT, "device": "/dev/nbdN" or null, "connections": INT,
      "spec": "TYPE:PATH", "format": "raw|vhd|qcow2|...", "size": INT,
      "read_only": BOOL, "paused": BOOL, "cbt_log": PATH or null,
      "secondary": "TYPE:PATH" or null,   # the image mirrored to or held in standby
      "reads": INT, "writes": INT, "flushes": INT, "discards": INT, "write_zeroes": INT,
      "bytes_read": INT, "bytes_written": INT,
      "read_time_us": INT, "write_time_us": INT, "flush_time_us": INT,
      "discard_time_us": INT, "write_zeroes_time_us": INT,
                              # summed latency of the requests of each kind completed
      "io_time_us": INT,      # time with at least one request in flight (busy time)
      "merges": INT,          # requests absorbed into a neighbour's I/O
      "read_merges": INT, "write_merges": INT,    # the same, reads and writes apart
      "retries": INT,         # attempts repeated after a transient error
      "in_flight": INT,       # requests holding a queue slot now (gauge)
      "queued": INT,          # of those, not yet dispatched (gauge; all of them while paused)
      "errors": [{"op": "read|write|flush|discard|write_zeroes|extents|cache",
                  "errno": "EIO", "count": INT}, ...],   # requests failed to the client
      "latency_us": {"count": INT, "sum": INT, "max": INT,
                     "buckets": [[50, INT], [100, INT], ..., ["+Inf", INT]]}
    }

Latency is from the request's arrival at the VBD to its completion, in
microseconds; ``buckets`` are cumulative ``[upper bound, count]`` pairs as in a
Prometheus histogram.  Requests answered inline from the page cache count with
the measured time of their copy (a few microseconds, often under one, which
rounds to 0).  Only requests completed successfully add to the ``*_time_us``
counters; failed ones are counted in ``errors`` and in ``latency_us``.
``io_time_us`` includes the current busy period and time spent queued while
paused, like the kernel's io_ticks.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Final

#: Length prefix of every message.
HEADER: Final = struct.Struct(">I")
#: Largest message body accepted, in bytes.
MAX_MESSAGE: Final = 1 << 20
#: Default directory of control and NBD sockets and of the minors (blktap's), and its
#: environment override.
DEFAULT_DIR: Final = "/run/blktap-control"
DIR_ENV: Final = "TAPDISK_CONTROL_DIR"

#: Longest retry deadline (and kernel request timeout) anyone may ask for, here or in
#: the configuration: one day.
MAX_SECONDS: Final = 86400
#: Highest /dev/nbdN index, here or in the configuration.
MAX_DEVICE_INDEX: Final = 65535
#: Socket of the process that forks new tapdisks, in that directory (tapdisk.daemon.spawner).
SPAWNER_SOCKET: Final = "spawner"

# VBD state bits reported by list (``state=0x..``): blktap's (tapdisk-vbd.h), which SM
# reads (paused: 0x20; running: neither 0x10 nor 0x20).  blktap's DEAD (0x1), LOCKING
# (0x80) and LOG_DROPPED (0x100) are never set here.
STATE_CLOSED: Final = 0x2  # no image open: closed, or paused
STATE_QUIESCE_REQUESTED: Final = 0x4  # requests are being drained
STATE_QUIESCED: Final = 0x8  # requests drained, new ones held
STATE_PAUSE_REQUESTED: Final = 0x10
STATE_PAUSED: Final = 0x20
STATE_SHUTDOWN_REQUESTED: Final = 0x40  # a close is under way
STATE_RESUME_FAILED: Final = 0x200  # the last unpause failed; still paused

ERROR_KINDS: Final = frozenset(
    {
        "invalid",  # malformed request or argument
        "not-found",  # no VBD with that minor, or the minor is not allocated
        "state",  # not possible in the VBD's state (unpause while running...)
        "image",  # the image cannot be opened or used
        "os",  # a system call failed
        "unsupported",  # the kernel has no nbd support, or a format lacks a feature
        "internal",  # a bug in the daemon
    }
)

_INT = (int,)
_NUM = (int, float)
_STR = (str,)
_BOOL = (bool,)

#: op -> {argument: (accepted types, required)}.
OPS: Final[dict[str, dict[str, tuple[tuple[type, ...], bool]]]] = {
    "pid": {},
    "list": {},
    "attach": {"minor": (_INT, True)},
    "detach": {"minor": (_INT, True)},
    "open": {
        "spec": (_STR, True),
        "minor": (_INT, False),
        "read_only": (_BOOL, False),
        "timeout": (_NUM, False),
        "cbt_log": (_STR, False),
        "secondary": (_STR, False),
        "standby": (_BOOL, False),
    },
    "close": {"minor": (_INT, True)},
    "connect": {
        "minor": (_INT, True),
        "index": (_INT, False),
        "connections": (_INT, False),
        "timeout": (_NUM, False),
    },
    "disconnect": {"minor": (_INT, True)},
    "takeover": {"minor": (_INT, True), "index": (_INT, True), "connections": (_INT, False)},
    "release": {"minor": (_INT, True)},
    "adopt": {"pid": (_INT, True), "recover": (_BOOL, False)},
    "handover": {"pid": (_INT, True)},
    "pause": {"minor": (_INT, True)},
    "unpause": {
        "minor": (_INT, True),
        "spec": (_STR, False),
        "cbt_log": (_STR, False),
        "secondary": (_STR, False),
        "standby": (_BOOL, False),
    },
    "snapshot": {"minor": (_INT, True), "path": (_STR, True), "format": (_STR, False)},
    "stats": {"minor": (_INT, False)},
    "mirror": {"minor": (_INT, True), "spec": (_STR, True), "switch": (_BOOL, False)},
    "mirror_status": {"minor": (_INT, True)},
    "mirror_cancel": {"minor": (_INT, True)},
    "commit": {"minor": (_INT, True), "path": (_STR, True)},
    "commit_status": {"minor": (_INT, True)},
    "commit_cancel": {"minor": (_INT, True)},
    "shutdown": {},
}


def add_control_dir_argument(parser: argparse.ArgumentParser) -> None:
    """``--control-dir``, defaulting to ``$TAPDISK_CONTROL_DIR``, then ``DEFAULT_DIR``
    (the daemon and the spawner; tap-ctl also reads the configuration's)."""
    parser.add_argument(
        "--control-dir",
        metavar="DIR",
        default=os.environ.get(DIR_ENV, DEFAULT_DIR),
        help=f"socket directory (default ${DIR_ENV} or {DEFAULT_DIR})",
    )


class ControlProtocolError(Exception):
    """Bytes or a message that break the protocol; the message says how."""


def _check_value(op: str, name: str, value: Any) -> None:
    """Refuse an argument of the right type but outside the configuration's limits."""
    if isinstance(value, str) and "\0" in value:
        raise ControlProtocolError(f"{op}: argument {name!r} contains a NUL byte")
    if name == "timeout" and not 0 < value <= MAX_SECONDS:
        raise ControlProtocolError(
            f"{op}: argument 'timeout' must be more than 0 and at most {MAX_SECONDS} "
            f"seconds, got {value!r}"
        )
    if name == "index" and not 0 <= value <= MAX_DEVICE_INDEX:
        raise ControlProtocolError(
            f"{op}: argument 'index' must be from 0 to {MAX_DEVICE_INDEX}, got {value!r}"
        )


def _refuse_constant(name: str) -> Any:
    raise ControlProtocolError(f"message body is not JSON: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ControlProtocolError(f"message body has a number out of range: {text[:40]}")
    return value


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    op: str
    args: dict[str, Any] = field(default_factory=dict)

    def to_message(self) -> dict[str, Any]:
        return {"id": self.id, "op": self.op, "args": self.args}


@dataclass(frozen=True, slots=True)
class Response:
    id: int
    ok: bool
    result: Any = None
    kind: str = ""
    message: str = ""
    errno: int | None = None

    @classmethod
    def success(cls, request_id: int, result: Any = None) -> Response:
        return cls(request_id, True, result)

    @classmethod
    def failure(
        cls, request_id: int, kind: str, message: str, errno: int | None = None
    ) -> Response:
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown error kind {kind!r}")
        return cls(request_id, False, kind=kind, message=message, errno=errno)

    def to_message(self) -> dict[str, Any]:
        if self.ok:
            return {"id": self.id, "ok": True, "result": self.result}
        error: dict[str, Any] = {"kind": self.kind, "message": self.message}
        if self.errno is not None:
            error["errno"] = self.errno
        return {"id": self.id, "ok": False, "error": error}


def encode(message: Request | Response | dict[str, Any]) -> bytes:
    """One framed message."""
    if isinstance(message, Request | Response):
        message = message.to_message()
    try:
        body = json.dumps(message, separators=(",", ":"), allow_nan=False).encode()
    except ValueError as exc:  # Infinity and NaN are not JSON: never send them
        raise ControlProtocolError(f"message cannot be sent as JSON: {exc}") from None
    if len(body) > MAX_MESSAGE:
        raise ControlProtocolError(
            f"message of {len(body)} bytes exceeds the {MAX_MESSAGE}-byte limit"
        )
    return HEADER.pack(len(body)) + body


class Decoder:
    """Reassembles framed messages from a byte stream fed in arbitrary pieces."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add bytes; return every complete message (JSON objects) they finish."""
        self._buf += data
        messages: list[dict[str, Any]] = []
        while len(self._buf) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buf)
            if length > MAX_MESSAGE:
                raise ControlProtocolError(
                    f"length prefix {length} exceeds the {MAX_MESSAGE}-byte limit"
                )
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            body = bytes(self._buf[HEADER.size : end])
            del self._buf[:end]
            try:
                message = json.loads(
                    body, parse_constant=_refuse_constant, parse_float=_finite_float
                )
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ControlProtocolError(f"message body is not JSON: {exc}") from None
            if not isinstance(message, dict):
                raise ControlProtocolError(
                    f"message is a JSON {type(message).__name__}, not an object"
                )
            messages.append(message)
        return messages

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held back."""
        return len(self._buf)


def _check_id(message: dict[str, Any]) -> int:
    request_id = message.get("id")
    if type(request_id) is not int:
        raise ControlProtocolError(f"field 'id' must be an integer, got {request_id!r}")
    return request_id


def parse_request(message: dict[str, Any]) -> Request:
    """Validate a decoded request: known op, known arguments of the right types."""
    request_id = _check_id(message)
    op = message.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise ControlProtocolError(
            f"field 'op': unknown operation {op!r} (known: {', '.join(OPS)})"
        )
    args = message.get("args", {})
    if not isinstance(args, dict):
        raise ControlProtocolError(f"field 'args' of {op} must be an object")
    schema = OPS[op]
    for name, value in args.items():
        if name not in schema:
            raise ControlProtocolError(f"{op}: unknown argument {name!r}")
        types, _ = schema[name]
        # bool is an int subclass; accept it only where a bool is wanted.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            wanted = "/".join(t.__name__ for t in types)
            raise ControlProtocolError(f"{op}: argument {name!r} must be {wanted}, got {value!r}")
        _check_value(op, name, value)
    for name, (_, required) in schema.items():
        if required and name not in args:
            raise ControlProtocolError(f"{op}: missing argument {name!r}")
    return Request(request_id, op, dict(args))


def parse_response(message: dict[str, Any]) -> Response:
    """Validate a decoded response."""
    request_id = _check_id(message)
    ok = message.get("ok")
    if ok is True:
        return Response(request_id, True, message.get("result"))
    if ok is not False:
        raise ControlProtocolError(f"field 'ok' must be true or false, got {ok!r}")
    error = message.get("error")
    if not isinstance(error, dict):
        raise ControlProtocolError("failed response has no 'error' object")
    kind, text, code = error.get("kind"), error.get("message"), error.get("errno")
    if kind not in ERROR_KINDS or not isinstance(text, str):
        raise ControlProtocolError(f"bad error object {error!r}")
    if code is not None and type(code) is not int:
        raise ControlProtocolError(f"bad errno in error object {error!r}")
    return Response(request_id, False, kind=kind, message=text, errno=code)


def control_socket(directory: str, pid: int) -> str:
    """Path of the control socket of tapdisk ``pid``."""
    return f"{directory}/ctl{pid}"


def nbd_socket(directory: str, pid: int, minor: int) -> str:
    """Path of the NBD socket serving ``minor`` of tapdisk ``pid``."""
    return f"{directory}/nbd{pid}.{minor}"
