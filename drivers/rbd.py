"""Ceph RBD images: ``rbd:POOL/[NAMESPACE/]IMAGE[@SNAP][:conf=PATH][:id=NAME][:KEY=VALUE]``.

The spec is qemu's, so one string works in ``qemu-img`` and here; any other
``KEY=VALUE`` is a Ceph option set on the connection, as qemu does, and ``\\:``
escapes a colon.  Cluster and identity default to the ``OpenOptions`` (the YAML
configuration's ``ceph_conf``/``ceph_id``), then to Ceph's own
(``/etc/ceph/ceph.conf``, ``client.admin``).

I/O goes through librbd's asynchronous calls: each request is submitted from the
event loop, librbd completes it on its own thread, and the completion is handed
back with ``loop.call_soon_threadsafe``, so many requests are in flight with no
thread per request.  Block status comes from RBD's diff iteration (an object map
makes it cheap).  A snapshot (``@SNAP``) opens read-only.

Connecting is bounded: librados waits ``client_mount_timeout`` for the monitors
(300 s by default; we lower it), and data operations time out after
``rados_osd_op_timeout`` with ETIMEDOUT, which the VBD retries until its
deadline, so an OSD or monitor restart during I/O reaches no client.  ``rados``
and ``rbd`` are imported on first open: a tapdisk serving files never loads them.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .base import Capabilities, Extent, ExtentFlags, Image, ImageError
from .registry import NewBacking, OpenOptions

#: Seconds to reach the monitors and authenticate before an open fails.
MOUNT_TIMEOUT = 10
#: Seconds a monitor command (pool lookup) may take before it fails.
MON_OP_TIMEOUT = 10
#: Seconds an OSD operation may wait for an OSD before it fails with ETIMEDOUT (retried).
OSD_OP_TIMEOUT = 15
#: Largest range one block status call walks, so a huge image answers in pieces.
EXTENTS_WINDOW = 1 << 30
_NAME = re.compile(r"[^/@\s]+")
_OPTION = re.compile(r"[A-Za-z][A-Za-z0-9_ ]*")


@dataclass(frozen=True)
class RbdName:
    """A parsed ``rbd:`` spec: where the image is and how to reach its cluster."""

    pool: str
    image: str
    namespace: str = ""
    snapshot: str | None = None
    conf: str | None = None
    user: str | None = None
    #: Further Ceph options (``KEY=VALUE``) set on the connection.
    options: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def __str__(self) -> str:
        where = f"{self.pool}/{self.namespace + '/' if self.namespace else ''}{self.image}"
        return where + (f"@{self.snapshot}" if self.snapshot else "")


def _split_escaped(text: str, sep: str) -> list[str]:
    """Split at ``sep`` except where a backslash escapes it (qemu's rule); unescape."""
    parts, current, chars = [], [], iter(text)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def parse_name(path: str) -> RbdName:
    """Parse what follows ``rbd:``; raise ImageError naming the part that is wrong."""
    spec = f"rbd:{path}"
    location, *pairs = _split_escaped(path, ":")
    location, at, snapshot = location.partition("@")
    parts = location.split("/")
    if len(parts) not in (2, 3) or not all(_NAME.fullmatch(p) for p in parts):
        raise ImageError(f"bad rbd spec {spec!r}: expected rbd:POOL/[NAMESPACE/]IMAGE[@SNAP]")
    if at and not _NAME.fullmatch(snapshot):
        raise ImageError(f"bad rbd spec {spec!r}: empty or bad snapshot name")
    values: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not _OPTION.fullmatch(key) or key in values:
            raise ImageError(f"bad rbd spec {spec!r}: option {pair!r} is not a single KEY=VALUE")
        values[key] = value
    conf, user = values.pop("conf", None), values.pop("id", None)
    return RbdName(
        pool=parts[0],
        image=parts[-1],
        namespace=parts[1] if len(parts) == 3 else "",
        snapshot=snapshot or None,
        conf=conf,
        user=user,
        options=tuple(values.items()),
    )


def connect(name: RbdName, options: OpenOptions) -> Any:
    """A connected ``rados.Rados`` for ``name``, within ``MOUNT_TIMEOUT`` seconds."""
    import rados

    conf = name.conf or options.ceph_conf
    user = name.user or options.ceph_id
    cluster = rados.Rados(rados_id=user)
    try:
        cluster.conf_read_file(conf)
        # Ceph's defaults wait 300 s for a cluster that is not there, and forever for an
        # OSD; ours are bounded, and a value the spec gives wins.
        cluster.conf_set("client_mount_timeout", str(MOUNT_TIMEOUT))
        cluster.conf_set("rados_mon_op_timeout", str(MON_OP_TIMEOUT))
        cluster.conf_set("rados_osd_op_timeout", str(OSD_OP_TIMEOUT))
        # librbd's cache acknowledges a write before the OSD has it and reports a failure
        # at the next flush; the VBD retries a failed flush, which then finds nothing to
        # do: a write that timed out would be lost while acknowledged.  Without the cache
        # every write's own completion says whether it is on the OSD.
        cluster.conf_set("rbd_cache", "false")
        for key, value in name.options:
            cluster.conf_set(key, value)
        cluster.connect()
    except rados.Error as exc:
        cluster.shutdown()
        where = f"the Ceph cluster of {conf or 'the default ceph.conf'} as {user or 'admin'}"
        raise ImageError(f"rbd:{name}: cannot connect to {where}: {_reason(exc)}") from None
    return cluster


def _reason(exc: Exception) -> str:
    """The one-line cause of a rados/rbd error, in words a person can act on."""
    code = getattr(exc, "errno", None)
    if code in (errno.ETIMEDOUT, errno.EINTR):
        return f"no answer within {MOUNT_TIMEOUT} s (are the monitors up and the address right?)"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied (wrong key or missing capabilities?)"
    if code == errno.ENOENT:
        return "a file it names does not exist (conf or keyring)"
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _open_pool(cluster: Any, name: RbdName) -> Any:
    """The ``rados.Ioctx`` of the image's pool and namespace; ImageError if there is none."""
    import rados

    try:
        ioctx = cluster.open_ioctx(name.pool)
    except rados.ObjectNotFound:
        raise ImageError(f"rbd:{name}: no pool {name.pool!r} in the cluster") from None
    ioctx.set_namespace(name.namespace)
    return ioctx


def create_rbd(path: str, size: int, backing: NewBacking | None, options: dict[str, str]) -> None:
    """Creator registered for ``rbd:``: a new image with Ceph's default features."""
    if backing is not None:
        raise ImageError(f"rbd:{path}: an rbd image has no backing file here (use rbd clone)")
    name = parse_name(path)
    if name.snapshot is not None:
        raise ImageError(f"rbd:{name}: create the image, then snapshot it")
    import rbd

    cluster = connect(name, OpenOptions())
    try:
        ioctx = _open_pool(cluster, name)
        try:
            rbd.RBD().create(ioctx, name.image, size)
        except rbd.ImageExists:
            raise ImageError(f"rbd:{name}: the image already exists") from None
        finally:
            ioctx.close()
    finally:
        cluster.shutdown()


def open_rbd(path: str, options: OpenOptions) -> RbdImage:
    """Opener registered for ``rbd:``: connect, open the pool and the image."""
    name = parse_name(path)
    import rados
    import rbd

    cluster = connect(name, options)
    try:
        ioctx = _open_pool(cluster, name)
        read_only = options.read_only or name.snapshot is not None
        try:
            handle = rbd.Image(ioctx, name.image, snapshot=name.snapshot, read_only=read_only)
        except rbd.ImageNotFound:
            ioctx.close()
            what = f"snapshot {name.snapshot!r} of " if name.snapshot else ""
            raise ImageError(f"rbd:{name}: no {what}image {str(name).split('@')[0]!r}") from None
        except (rbd.Error, rados.Error) as exc:
            ioctx.close()
            raise ImageError(f"rbd:{name}: cannot open the image: {_reason(exc)}") from None
    except BaseException:
        cluster.shutdown()
        raise
    return RbdImage(path, name, cluster, ioctx, handle, read_only=read_only)


def create_snapshot(spec: str, name: str, options: OpenOptions) -> str:
    """Snapshotter registered for ``rbd:``: RBD snapshot ``name`` of the image of ``spec``."""
    kind, _, path = spec.partition(":")
    image = parse_name(path)
    if kind != "rbd" or image.snapshot is not None:
        raise ImageError(f"{spec}: only an rbd image's head can be snapshotted")
    if not _NAME.fullmatch(name):
        raise ImageError(f"{spec}: bad snapshot name {name!r}")
    opened = open_rbd(path, options)
    try:
        opened.snapshot(name)
    finally:
        opened._release()
    cut = _location_end(path)
    return f"rbd:{path[:cut]}@{name}{path[cut:]}"


def _location_end(path: str) -> int:
    """Index of the first unescaped ``:`` in ``path`` (where the options start), or its end."""
    i = 0
    while i < len(path):
        if path[i] == "\\":
            i += 2
            continue
        if path[i] == ":":
            return i
        i += 1
    return len(path)


class RbdImage(Image):
    """An RBD image (or snapshot) open through librbd."""

    def __init__(
        self, path: str, name: RbdName, cluster: Any, ioctx: Any, handle: Any, *, read_only: bool
    ) -> None:
        self.spec = f"rbd:{path}"
        self.name = name
        self.read_only = read_only
        self.size = handle.size()
        self._cluster = cluster
        self._ioctx = ioctx
        self._handle = handle
        self._completions: Completions | None = None
        #: librbd caches writes (a spec turned rbd_cache back on): FUA needs a flush.
        #: Without the cache a write completes once the OSDs have committed it.
        self._cached = cluster.conf_get("rbd_cache") == "true"
        writable = not read_only
        self._caps = Capabilities(
            trim=writable, zero=writable, fast_zero=writable, extents=True, multi_conn=True
        )

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    @property
    def format_name(self) -> str:
        return "rbd"

    def _submit(self, start: Callable[[Callable[..., None]], Any]) -> asyncio.Future[Any]:
        """Start one librbd aio call; the future gets its result on the event loop.

        ``start(oncomplete)`` submits the call.  librbd runs ``oncomplete`` on its own
        thread, which only queues the completion for the loop (``Completions``).
        """
        completions = self._completions
        if completions is None:
            completions = self._completions = Completions(asyncio.get_running_loop())
        future: asyncio.Future[Any] = completions.loop.create_future()

        def oncomplete(completion: Any, data: Any = None) -> None:
            completions.push(future, completion, data)

        start(oncomplete)
        return future

    async def read(self, offset: int, buf: memoryview) -> None:
        length = len(buf)
        data = await self._submit(lambda done: self._handle.aio_read(offset, length, done))
        buf[:] = data

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        payload = bytes(data)  # librbd's binding takes bytes only
        await self._submit(lambda done: self._handle.aio_write(payload, offset, done))
        if fua and self._cached:
            await self.flush()

    async def flush(self) -> None:
        await self._submit(self._handle.aio_flush)

    async def discard(self, offset: int, length: int, fua: bool = False) -> None:
        await self._submit(lambda done: self._handle.aio_discard(offset, length, done))
        if fua and self._cached:
            await self.flush()

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_unmap: bool = True,
        fast_only: bool = False,
        fua: bool = False,
    ) -> None:
        # librbd zeroes by deallocating whole objects and zeroing partial ones: always fast.
        await self._submit(lambda done: self._handle.aio_write_zeroes(offset, length, done))
        if fua and self._cached:
            await self.flush()

    async def extents(self, offset: int, length: int) -> list[Extent]:
        length = min(length, EXTENTS_WINDOW, self.size - offset)
        return await asyncio.to_thread(self._diff, offset, length)

    def _diff(self, offset: int, length: int) -> list[Extent]:
        """Allocated runs from RBD's diff iteration, with the gaps between them as holes."""
        import rbd

        runs: list[tuple[int, int]] = []

        def allocated(start: int, run: int, exists: bool) -> int:
            if exists:
                runs.append((start, run))
            return 0

        try:
            self._handle.diff_iterate(offset, length, None, allocated, include_parent=True)
        except rbd.Error as exc:
            raise OSError(getattr(exc, "errno", None) or errno.EIO, str(exc)) from None
        result: list[Extent] = []
        pos, end = offset, offset + length
        for start, run in sorted(runs):
            if start > pos:
                result.append(Extent(start - pos, ExtentFlags.HOLE | ExtentFlags.ZERO))
            stop = min(start + run, end)
            if stop > max(start, pos):
                result.append(Extent(stop - max(start, pos), ExtentFlags.DATA))
            pos = max(pos, stop)
        if pos < end:
            result.append(Extent(end - pos, ExtentFlags.HOLE | ExtentFlags.ZERO))
        return result

    def snapshot(self, name: str) -> None:
        """Create RBD snapshot ``name`` (blocking); ImageError naming it when librbd refuses."""
        import rbd

        try:
            self._handle.create_snap(name)
        except rbd.ImageExists:
            raise ImageError(f"{self.spec}: snapshot {name!r} already exists") from None
        except rbd.Error as exc:
            raise ImageError(f"{self.spec}: cannot snapshot as {name!r}: {_reason(exc)}") from None

    async def close(self) -> None:
        await asyncio.to_thread(self._release)

    def _release(self) -> None:
        try:
            self._handle.close()
            self._ioctx.close()
        finally:
            self._cluster.shutdown()


class Completions:
    """librbd's completions, handed from its thread to the event loop in batches.

    Every completion that arrives while a hand-over is pending joins it, so under load
    one wake-up of the loop (one write to its self-pipe) settles many requests.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._done: collections.deque[tuple[asyncio.Future[Any], Any, Any]] = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def push(self, future: asyncio.Future[Any], completion: Any, data: Any) -> None:
        """On librbd's thread: queue one completion, waking the loop if none is pending.

        Nothing here calls into librbd: each such call drops and retakes the GIL, and
        retaking it waits for the loop thread; the loop reads the result instead.
        """
        self._done.append((future, completion, data))
        with self._lock:
            if self._scheduled:
                return
            self._scheduled = True
        # A plain try (no contextlib.suppress): this runs once per batch.
        try:  # noqa: SIM105
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop closed under a late completion
            pass

    def _drain(self) -> None:
        """On the loop: settle every queued completion."""
        with self._lock:
            self._scheduled = False
        done = self._done
        while done:
            _settle(*done.popleft())


def _settle(future: asyncio.Future[Any], completion: Any, data: Any) -> None:
    """On the loop: finish ``future`` with librbd's result (a negative errno fails it).

    A read's data is None only on failure, so a successful read asks librbd nothing.
    """
    if future.done():
        return
    result = 0 if data is not None else completion.get_return_value()
    if result < 0:
        future.set_exception(OSError(-result, f"rbd: {os.strerror(-result)}"))
    else:
        future.set_result(data)
