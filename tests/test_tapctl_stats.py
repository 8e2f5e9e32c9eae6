"""``tap-ctl stats`` per image of a VHD chain, as blktap's tapdisk counts them.

blktap's ``images`` list holds, per image of the chain (leaf first), the sectors that image
served itself (``hits``: read, written; a failed one too), those that failed (``fail``), and
its ``driver`` (``{"type": N, "name": ..., "status": ...}``).  A read of a sector the leaf
does not hold is served by the parent that does (or, the root, as zeros): it counts there.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from helpers import require, run
from tapctl_helpers import nbd_uri

VHD_UTIL = str(Path(sys.executable).with_name("vhd-util"))


def opened(tapctl, spec: str) -> tuple[str, int]:
    """A minor opened in SM's order (allocate, spawn, attach, open): (pid, minor)."""
    marker = tapctl.out("allocate")
    minor = int(re.fullmatch(r".*/tapdisk-(\d+)", marker)[1])
    pid = tapctl.out("spawn")
    tapctl.out("attach", "-p", pid, "-m", str(minor))
    tapctl.out("open", "-p", pid, "-m", str(minor), "-a", spec)
    return pid, minor


def qemu_io(tapctl, pid: str, minor: int, *commands: str) -> None:
    args = [arg for command in commands for arg in ("-c", command)]
    run(require("qemu-io"), "-f", "raw", *args, nbd_uri(f"{tapctl.dir}/nbd{pid}.{minor}"))


def closed(tapctl, pid: str, minor: int) -> None:
    for command in ("close", "detach"):
        tapctl.out(command, "-p", pid, "-m", str(minor))
    tapctl.out("free", "-m", str(minor))


def chain(tapctl, tmp_path) -> tuple[str, str]:
    """parent.vhd holding 64 KiB at 64 KiB, and child.vhd over it (vhd-util snapshot)."""
    parent, child = str(tmp_path / "parent.vhd"), str(tmp_path / "child.vhd")
    run(VHD_UTIL, "create", "-n", parent, "-s", "16")
    pid, minor = opened(tapctl, f"vhd:{parent}")
    qemu_io(tapctl, pid, minor, "write -P 7 64k 64k")
    closed(tapctl, pid, minor)
    run(VHD_UTIL, "snapshot", "-n", child, "-p", parent)
    return parent, child


VHD_DRIVER = '"driver": { "type": 4, "name": "vhd", "status": null }'


def test_each_image_of_a_chain_counts_the_sectors_it_served(tapctl, tmp_path):
    parent, child = chain(tapctl, tmp_path)
    pid, minor = opened(tapctl, f"vhd:{child}")
    # 64 KiB written to the child; 128 KiB read: the first half from the child, the second
    # from the parent; 64 KiB at 1 MiB, held by neither: the parent (the root) serves zeros.
    qemu_io(tapctl, pid, minor, "write -P 9 0 64k", "read -P 9 0 64k", "read -P 7 64k 64k")
    qemu_io(tapctl, pid, minor, "read -P 0 1M 64k")
    out = tapctl.out("stats", "-p", pid, "-m", str(minor))
    images = (
        f'"images": [ {{ "name": "{child}", "hits": [ 128, 128 ], "fail": [ 0, 0 ], '
        f"{VHD_DRIVER} }}, "
        f'{{ "name": "{parent}", "hits": [ 256, 0 ], "fail": [ 0, 0 ], {VHD_DRIVER} }} ]'
    )
    assert out.startswith(f'{{ "name": "vhd:{child}", "secs": [ 384, 128 ], {images}, '), out
    stats = json.loads(out)
    assert sum(image["hits"][0] for image in stats["images"]) == stats["secs"][0]


def test_a_grandparent_counts_what_it_served_and_its_child_only_the_rest(tapctl, tmp_path):
    parent, child = chain(tapctl, tmp_path)
    pid, minor = opened(tapctl, f"vhd:{child}")
    qemu_io(tapctl, pid, minor, "write -P 5 128k 64k")
    closed(tapctl, pid, minor)
    leaf = str(tmp_path / "leaf.vhd")
    run(VHD_UTIL, "snapshot", "-n", leaf, "-p", child)
    pid, minor = opened(tapctl, f"vhd:{leaf}")
    qemu_io(tapctl, pid, minor, "read -P 7 64k 64k", "read -P 5 128k 64k")
    stats = json.loads(tapctl.out("stats", "-p", pid, "-m", str(minor)))
    hits = [(image["name"], image["hits"], image["fail"]) for image in stats["images"]]
    assert hits == [
        (leaf, [0, 0], [0, 0]),
        (child, [128, 0], [0, 0]),
        (parent, [128, 0], [0, 0]),
    ]


def test_an_aio_image_reports_blktaps_aio_driver_status(tapctl, raw_image):
    path = raw_image("16M")
    pid, minor = opened(tapctl, f"aio:{path}")
    out = tapctl.out("stats", "-p", pid, "-m", str(minor))
    driver = (
        '"driver": { "type": 0, "name": "aio", "status": { "reqs": { "max": 352, "pending": 0 } } }'
    )
    assert f'"fail": [ 0, 0 ], {driver} }} ]' in out


def test_an_image_type_blktap_does_not_have_has_no_type_number(tapctl, raw_image):
    path = raw_image("16M")
    pid, minor = opened(tapctl, f"raw:{path}")
    [image] = json.loads(tapctl.out("stats", "-p", pid, "-m", str(minor)))["images"]
    assert image["driver"] == {"type": None, "name": "raw", "status": None}
