"""The allocator tuning is accepted by this machine's C library (glibc)."""

from tapdisk.allocator import tune_allocator


def test_glibc_accepts_the_thresholds():
    # mallopt returns 0 for a value out of its range (e.g. an mmap threshold
    # above glibc's maximum); tune_allocator then reports False.
    assert tune_allocator() is True
