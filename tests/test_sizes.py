"""The one size grammar (``drivers/sizes.parse_size``) shared by tap-img and the configuration."""

from __future__ import annotations

import pytest
from tapdisk.drivers.base import ImageError
from tapdisk.drivers.sizes import parse_size

from tapdisk.config import parse as parse_config


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("512", 512),
        ("512B", 512),
        ("64k", 64 << 10),
        ("64K", 64 << 10),
        ("64KB", 64 << 10),
        ("64KiB", 64 << 10),
        ("2M", 2 << 20),
        ("3mb", 3 << 20),
        ("1 MiB", 1 << 20),
        (" 5G ", 5 << 30),
        ("2T", 2 << 40),
        ("1P", 1 << 50),
    ],
)
def test_numbers_with_binary_units_are_bytes(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_fractions_of_a_unit_are_accepted() -> None:
    assert parse_size("1.5G") == 3 << 29
    assert parse_size(".5K") == 512
    assert parse_size("2.") == 2


def test_a_fraction_of_a_byte_is_dropped_as_qemu_img_does() -> None:
    assert parse_size("0.3K") == 307
    assert parse_size("1.5") == 1


def test_large_byte_counts_are_exact() -> None:
    assert parse_size("9007199254740993") == 2**53 + 1


@pytest.mark.parametrize(
    "text", ["", " ", "K", "B", "-1", "+1", "1e3", "inf", "nan", "1_000", "1.5.5", "1E", "1 2", "٣"]
)
def test_anything_else_is_refused_naming_the_text(text: str) -> None:
    with pytest.raises(ImageError, match="bad size"):
        parse_size(text)


def test_the_configuration_uses_the_same_grammar() -> None:
    assert parse_config("merge_size: 1.5M\n").merge_size == 3 << 19
    assert parse_config("merge_size: 64k\n").merge_size == 64 << 10
    assert parse_config("merge_size: 65536\n").merge_size == 65536
