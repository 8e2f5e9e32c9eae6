"""The one allowed-directory rule (``drivers/paths.is_inside``) on real files and symlinks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tapdisk.drivers.paths import is_inside


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """allowed/ with a file and a subdirectory, and a sibling allowed-evil/ that only shares a
    prefix with it, as real directories."""
    (tmp_path / "allowed" / "sub").mkdir(parents=True)
    (tmp_path / "allowed" / "disk.img").write_bytes(b"")
    (tmp_path / "allowed-evil").mkdir()
    (tmp_path / "allowed-evil" / "disk.img").write_bytes(b"")
    return tmp_path


def test_a_file_below_an_allowed_directory_is_inside(tree: Path) -> None:
    assert is_inside(str(tree / "allowed" / "disk.img"), [str(tree / "allowed")])
    assert is_inside(str(tree / "allowed" / "sub" / "new.img"), [str(tree / "allowed")])


def test_the_allowed_directory_itself_is_inside(tree: Path) -> None:
    assert is_inside(str(tree / "allowed"), [str(tree / "allowed")])
    assert is_inside(str(tree / "allowed"), [str(tree / "allowed") + "/"])


def test_a_sibling_sharing_the_prefix_is_outside(tree: Path) -> None:
    assert not is_inside(str(tree / "allowed-evil" / "disk.img"), [str(tree / "allowed")])


def test_dot_dot_out_of_the_directory_is_outside(tree: Path) -> None:
    escape = str(tree / "allowed" / ".." / "allowed-evil" / "disk.img")
    assert not is_inside(escape, [str(tree / "allowed")])
    assert is_inside(str(tree / "allowed" / "sub" / ".." / "disk.img"), [str(tree / "allowed")])


def test_a_symlink_inside_pointing_out_is_outside(tree: Path) -> None:
    link = tree / "allowed" / "link.img"
    link.symlink_to(tree / "allowed-evil" / "disk.img")
    assert not is_inside(str(link), [str(tree / "allowed")])
    (tree / "allowed" / "dirlink").symlink_to(tree / "allowed-evil")
    assert not is_inside(str(tree / "allowed" / "dirlink" / "disk.img"), [str(tree / "allowed")])


def test_a_symlink_outside_pointing_in_is_inside(tree: Path) -> None:
    link = tree / "outside-link.img"
    link.symlink_to(tree / "allowed" / "disk.img")
    assert is_inside(str(link), [str(tree / "allowed")])


def test_an_allowed_directory_given_through_a_symlink_is_resolved(tree: Path) -> None:
    (tree / "alias").symlink_to(tree / "allowed")
    assert is_inside(str(tree / "allowed" / "disk.img"), [str(tree / "alias")])
    assert is_inside(str(tree / "alias" / "disk.img"), [str(tree / "allowed")])


def test_a_symlink_loop_is_outside(tree: Path) -> None:
    loop = tree / "allowed" / "loop"
    loop.symlink_to(loop)
    # realpath leaves a looping link unresolved, inside its own directory: the open then fails
    # with ELOOP, but the path does not lead out.
    assert is_inside(str(loop), [str(tree / "allowed")])
    assert not is_inside(str(loop), [str(tree / "allowed-evil")])


def test_any_of_several_directories_admits(tree: Path) -> None:
    roots = [str(tree / "nowhere"), str(tree / "allowed-evil")]
    assert is_inside(str(tree / "allowed-evil" / "disk.img"), roots)
    assert not is_inside(str(tree / "allowed" / "disk.img"), roots)


def test_root_admits_every_absolute_path(tree: Path) -> None:
    assert is_inside(str(tree / "allowed-evil" / "disk.img"), ["/"])


@pytest.mark.parametrize("path", ["", "disk\0.img"])
def test_a_path_that_names_no_file_is_outside(tree: Path, path: str) -> None:
    assert not is_inside(path, [str(tree), "/"])


def test_no_allowed_directory_admits_nothing(tree: Path) -> None:
    assert not is_inside(str(tree / "allowed" / "disk.img"), [])
    assert not is_inside(str(tree / "allowed" / "disk.img"), [""])


def test_a_relative_path_is_taken_from_the_working_directory(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tree / "allowed")
    assert is_inside("disk.img", [str(tree / "allowed")])
    assert not is_inside(os.path.join("..", "allowed-evil", "disk.img"), [str(tree / "allowed")])
