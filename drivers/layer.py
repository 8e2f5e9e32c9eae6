"""The base of the stackable layers: an ``Image`` over another that forwards every call to it.

A layer (fault injection, changed-block tracking, mirroring) subclasses ``Layer`` and
overrides only the calls it changes, as an nbdkit filter does; everything else reaches
``inner`` as it is, so a call the ``Image`` interface gains is forwarded by every layer
rather than answered by the interface's default.

``spec``, ``size``, ``read_only`` and ``block_size`` are copied from ``inner`` when the
layer is made, plain attributes the hot path reads without a call.  ``inner`` may be
replaced later (a standby takeover, a mirror put under the CBT layer) by an image of the
same size.  An override that forwards calls ``self.inner`` directly, not ``super()``, so a
request costs one call per layer, as before.
"""

from __future__ import annotations

from .base import Capabilities, Extent, Image, IoDone


class Layer(Image):
    """Forwards every call to ``inner``; a subclass overrides what it changes."""

    def __init__(self, inner: Image) -> None:
        self.inner = inner
        self.spec = inner.spec
        self.size = inner.size
        self.read_only = inner.read_only
        self.block_size = inner.block_size

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    @property
    def format_name(self) -> str:
        return self.inner.format_name

    def read_nowait(self, offset: int, buf: memoryview) -> bool:
        return self.inner.read_nowait(offset, buf)

    async def read(self, offset: int, buf: memoryview) -> None:
        await self.inner.read(offset, buf)

    def start_read(self, offset: int, buf: memoryview, done: IoDone) -> bool:
        return self.inner.start_read(offset, buf, done)

    def start_write(self, offset: int, data: memoryview, fua: bool, done: IoDone) -> bool:
        return self.inner.start_write(offset, data, fua, done)

    def write_nowait(self, offset: int, data: memoryview) -> bool:
        return self.inner.write_nowait(offset, data)

    async def write(self, offset: int, data: memoryview, fua: bool = False) -> None:
        await self.inner.write(offset, data, fua)

    async def flush(self) -> None:
        await self.inner.flush()

    async def discard(self, offset: int, length: int, fua: bool = False) -> None:
        await self.inner.discard(offset, length, fua)

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_unmap: bool = True,
        fast_only: bool = False,
        fua: bool = False,
    ) -> None:
        await self.inner.write_zeroes(
            offset, length, may_unmap=may_unmap, fast_only=fast_only, fua=fua
        )

    async def extents(self, offset: int, length: int) -> list[Extent]:
        return await self.inner.extents(offset, length)

    async def cache(self, offset: int, length: int) -> None:
        await self.inner.cache(offset, length)

    async def close(self) -> None:
        await self.inner.close()
