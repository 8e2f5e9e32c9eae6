"""Sector bitmaps and the batmap: MSB-first bit arrays, one bit per sector or block."""

from __future__ import annotations

from collections.abc import Iterator


def test_bit(bits: bytes | bytearray, i: int) -> bool:
    return bool(bits[i >> 3] & (0x80 >> (i & 7)))


def set_bit(bits: bytearray, i: int) -> None:
    bits[i >> 3] |= 0x80 >> (i & 7)


def _mask(nbits: int, start: int, end: int) -> int:
    """Big-integer mask of bits [start, end) for an MSB-first array of ``nbits`` bits."""
    return ((1 << (end - start)) - 1) << (nbits - end)


def all_set(bits: bytes | bytearray, start: int, end: int) -> bool:
    """True when every bit in [start, end) is set."""
    nbits = len(bits) * 8
    m = _mask(nbits, start, end)
    return int.from_bytes(bits, "big") & m == m


def set_range(bits: bytearray, start: int, end: int) -> bool:
    """Set bits [start, end); True if any bit changed."""
    nbits = len(bits) * 8
    old = int.from_bytes(bits, "big")
    new = old | _mask(nbits, start, end)
    if new == old:
        return False
    bits[:] = new.to_bytes(len(bits), "big")
    return True


def is_full(bits: bytes | bytearray, count: int) -> bool:
    """True when the first ``count`` bits are all set."""
    return all_set(bits, 0, count)


def runs(bits: bytes | bytearray, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
    """Maximal runs ``(first, stop, is_set)`` of equal bits covering [start, end)."""
    i = start
    while i < end:
        value = test_bit(bits, i)
        j = i + 1
        while j < end:
            if j & 7 == 0 and j + 8 <= end:
                byte = bits[j >> 3]
                if byte == (0xFF if value else 0):
                    j += 8
                    continue
            if test_bit(bits, j) != value:
                break
            j += 1
        yield i, j, value
        i = j
