"""``tap-img``: create, inspect, check, snapshot, commit, convert and map disk images.

Speaks qemu-img's vocabulary for raw, qcow2, qcow and vhd images; the work is
done by ``tapdisk.drivers.imageops`` and the format packages, which tapdisk
and vhd-util share.  Exit codes: 0 success, 1 error; ``check`` uses qemu-img's
0 clean / 2 corrupt / 3 leaks only / 63 no check for this format.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from tapdisk.drivers import imageops
from tapdisk.drivers.base import Image, ImageError
from tapdisk.drivers.registry import REMOTE, OpenOptions, open_image
from tapdisk.drivers.sizes import parse_size


def progress_bar(enabled: bool) -> Callable[[int, int], None] | None:
    """A qemu-img style ``(xx.xx/100%)`` line on stderr, only when it is a terminal."""
    if not enabled or not sys.stderr.isatty():  # never into logs or pipes
        return None
    last = [-1]

    def show(done: int, total: int) -> None:
        pct = int(10000 * done / total) if total else 10000
        if pct != last[0]:
            last[0] = pct
            end = "\n" if done >= total else ""
            sys.stderr.write(f"\r    ({pct / 100:.2f}/100%){end}")
            sys.stderr.flush()

    return show


def remote_spec(name: str) -> tuple[str, str] | None:
    """(type, rest) of a name that is itself a spec of an image in a cluster (``rbd:...``).

    qemu-img's rule: ``rbd:POOL/IMAGE`` says its type, whatever ``-f``/``-O`` say (raw).
    """
    kind, sep, rest = name.partition(":")
    return (kind, rest) if sep and kind in REMOTE else None


def spec_of(path: str, fmt: str | None) -> str:
    if remote_spec(path) is not None:
        return path
    fmt = imageops.normalise_format(fmt) if fmt else imageops.detect_format(path)
    return f"{fmt}:{path}"


def parse_options(text: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        out[key] = value
    return out


def open_ro(spec: str, allowed: tuple[str, ...]) -> Image:
    return open_image(spec, OpenOptions(read_only=True, allowed_dirs=allowed))


def info_dict(image: Image, path: str) -> dict[str, Any]:
    from tapdisk.drivers.qcow2.format import COMPRESSION_NAMES, INCOMPAT_CORRUPT, INCOMPAT_DIRTY
    from tapdisk.drivers.qcow2.image import Qcow2Image

    out: dict[str, Any] = {
        "filename": path,
        "format": image.format_name,
        "virtual-size": image.size,
    }
    if remote_spec(path) is None:
        out["actual-size"] = os.stat(path).st_blocks * 512
    backing = image.backing
    if isinstance(image, Qcow2Image):
        hdr = image.header
        out["cluster-size"] = image.cluster_size
        out["dirty-flag"] = bool(hdr.incompatible_features & INCOMPAT_DIRTY)
        if image.backing_name is not None:
            out["backing-filename"] = image.backing_name
            if image.ext.backing_format:
                out["backing-filename-format"] = image.ext.backing_format
        if image.snapshots:
            out["snapshots"] = [
                {
                    "id": s.id,
                    "name": s.name,
                    "vm-state-size": s.vm_state_size,
                    "date-sec": s.date_sec,
                    "date-nsec": s.date_nsec,
                    "vm-clock-nsec": s.vm_clock_nsec,
                }
                for s in image.snapshots
            ]
        out["format-specific"] = {
            "type": "qcow2",
            "data": {
                "compat": "1.1" if image.v3 else "0.10",
                "compression-type": COMPRESSION_NAMES[hdr.compression_type],
                "lazy-refcounts": bool(hdr.compatible_features & 1),
                "refcount-bits": 1 << hdr.refcount_order,
                "corrupt": bool(hdr.incompatible_features & INCOMPAT_CORRUPT),
                "extended-l2": image.extended_l2,
            },
        }
    elif backing is not None:
        out["backing-filename"] = name_of(backing.spec)
        out["backing-filename-format"] = backing.format_name
    if backing is not None:
        out["full-backing-filename"] = name_of(backing.spec)
    return out


def name_of(spec: str) -> str:
    """How qemu-img names an image: a file by its path, a cluster image by its spec."""
    return spec if remote_spec(spec) is not None else spec.partition(":")[2]


def print_info(d: dict[str, Any]) -> None:
    print(f"image: {d['filename']}")
    print(f"file format: {d['format']}")
    print(f"virtual size: {d['virtual-size']} bytes")
    if "actual-size" in d:
        print(f"disk size: {d['actual-size']} bytes")
    if "cluster-size" in d:
        print(f"cluster_size: {d['cluster-size']}")
    if "backing-filename" in d:
        print(f"backing file: {d['backing-filename']}")
        if "backing-filename-format" in d:
            print(f"backing file format: {d['backing-filename-format']}")
    if d.get("snapshots"):
        print("Snapshot list:")
        print(f"{'ID':<8}{'TAG':<20}{'VM SIZE':>10}")
        for s in d["snapshots"]:
            print(f"{s['id']:<8}{s['name']:<20}{s['vm-state-size']:>10}")
    spec = d.get("format-specific")
    if spec:
        print("Format specific information:")
        for key, value in spec["data"].items():
            print(f"    {key}: {str(value).lower() if isinstance(value, bool) else value}")


def cmd_info(args: argparse.Namespace) -> int:
    chain: list[dict[str, Any]] = []
    image = open_ro(spec_of(args.filename, args.f), tuple(args.allowed_dir))
    try:
        current: Image | None = image
        path = args.filename if remote_spec(args.filename) else os.path.abspath(args.filename)
        while current is not None:
            chain.append(info_dict(current, path))
            if not args.backing_chain:
                break
            current = current.backing
            if current is not None:
                path = name_of(current.spec)
    finally:
        asyncio.run(image.close())
    if args.output == "json":
        print(json.dumps(chain if args.backing_chain else chain[0], indent=4))
    else:
        for i, d in enumerate(chain):
            if i:
                print()
            print_info(d)
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    size = parse_size(args.size) if args.size else None
    fmt, path = remote_spec(args.filename) or (args.f, args.filename)
    imageops.create_image(
        fmt,
        path,
        size,
        backing=args.b,
        backing_fmt=args.F,
        options=parse_options(args.o),
    )
    if not args.q:
        print(f"Formatting '{args.filename}', fmt={args.f} size={size or 'of backing file'}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    spec = spec_of(args.filename, args.f)
    fmt, _, path = spec.partition(":")
    if fmt == "vhd":
        from tapdisk.drivers.vhd.check import check_vhd

        problems = check_vhd(path)
        for p in problems:
            print(p)
        if not problems:
            print("No errors were found on the image.")
        return 2 if problems else 0
    if fmt != "qcow2":
        print(f"This image format ({fmt}) does not support checks")
        return 63
    from tapdisk.drivers.qcow2 import check
    from tapdisk.drivers.qcow2.format import INCOMPAT_CORRUPT
    from tapdisk.drivers.qcow2.image import Qcow2Image

    image = open_ro(spec, tuple(args.allowed_dir))
    try:
        assert isinstance(image, Qcow2Image)
        result = check.check(image)
        marked_corrupt = bool(image.header.incompatible_features & INCOMPAT_CORRUPT)
    finally:
        asyncio.run(image.close())
    if args.r and (result.corruptions or result.leaks or marked_corrupt):
        check.repair(path)
        print("The following inconsistencies were found and repaired:")
        print(f"    {len(result.leaks)} leaked clusters")
        print(f"    {len(result.corruptions)} corruptions\n")
        image = open_ro(spec, tuple(args.allowed_dir))
        try:
            assert isinstance(image, Qcow2Image)
            result = check.check(image)
        finally:
            asyncio.run(image.close())
    for line in result.corruptions:
        print(line)
    for line in result.leaks:
        print(line)
    if result.corruptions:
        print(f"\n{len(result.corruptions)} errors were found on the image.")
    elif result.leaks:
        print(f"\n{len(result.leaks)} leaked clusters were found on the image.")
    else:
        print("No errors were found on the image.")
    print(f"Image end offset: {result.image_end_offset}")
    return result.exit_code


def cmd_snapshot(args: argparse.Namespace) -> int:
    """New overlay ``overlay`` over ``base`` (format of the overlay: -f, default qcow2); a
    base in a cluster (``rbd:...``) is recorded by its spec."""
    if remote_spec(args.base) is not None:
        imageops.create_image(args.f or "qcow2", args.overlay, None, backing=args.base)
        return 0
    base_fmt = imageops.normalise_format(args.F) if args.F else imageops.detect_format(args.base)
    fmt = args.f or ("vhd" if base_fmt == "vhd" else "qcow2")
    overlay_dir = os.path.dirname(os.path.abspath(args.overlay))
    backing = os.path.relpath(os.path.abspath(args.base), overlay_dir)
    imageops.create_image(fmt, args.overlay, None, backing=backing, backing_fmt=base_fmt)
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    spec = spec_of(args.filename, args.f)
    base = imageops.commit(spec, progress=progress_bar(True), allowed_dirs=tuple(args.allowed_dir))
    if not args.q:
        print(f"Image committed into {name_of(base)}.")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    fmt, target = remote_spec(args.target) or (args.O, args.target)
    imageops.convert(
        spec_of(args.source, args.f),
        target,
        imageops.normalise_format(fmt),
        progress=progress_bar(True),
        options=parse_options(args.o),
        allowed_dirs=tuple(args.allowed_dir),
    )
    return 0


def cmd_map(args: argparse.Namespace) -> int:
    image = open_ro(spec_of(args.filename, args.f), tuple(args.allowed_dir))
    try:
        entries = imageops.map_image(image)
    finally:
        asyncio.run(image.close())
    if args.output == "json":
        rows = []
        for e in entries:
            row: dict[str, Any] = {
                "start": e.start,
                "length": e.length,
                "depth": e.depth,
                "present": e.present,
                "zero": e.zero,
                "data": e.data,
            }
            if e.offset is not None:
                row["offset"] = e.offset
            rows.append(row)
        print(json.dumps(rows))
    else:
        print(f"{'Offset':<20}{'Length':<20}{'Depth':<8}State")
        for e in entries:
            state = "data" if e.data else ("zero" if e.present else "unallocated")
            print(f"{e.start:<#20x}{e.length:<#20x}{e.depth:<8}{state}")
    return 0


EXAMPLES = """\
examples:
  tap-img create -f qcow2 disk.qcow2 20G
  tap-img create -f qcow2 -b disk.qcow2 -F qcow2 leaf.qcow2
  tap-img info --backing-chain --output=json leaf.qcow2
  tap-img convert -f vhd -O qcow2 disk.vhd disk.qcow2      progress bar on a terminal
  tap-img commit leaf.qcow2                                merge leaf into disk.qcow2
  tap-img map --output=json leaf.qcow2
  tap-img check disk.qcow2
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tap-img",
        description="Create, inspect and convert raw, qcow2, qcow and vhd images.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> Any:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        p.add_argument(
            "--allowed-dir",
            action="append",
            default=[],
            metavar="DIR",
            help="directory backing files may live in (default: the image's own)",
        )
        return p

    p = add("create", cmd_create, "create a new image")
    p.add_argument("-f", required=True, metavar="FMT", help="raw, qcow2, qcow or vhd")
    p.add_argument("-b", metavar="BACKING", help="backing file (relative to the new image)")
    p.add_argument("-F", metavar="BFMT", help="format of the backing file")
    p.add_argument("-o", metavar="OPTS", help="cluster_size=, compat=0.10|1.1, refcount_bits=")
    p.add_argument("-q", action="store_true", help="quiet")
    p.add_argument("filename")
    p.add_argument("size", nargs="?", help="virtual size, e.g. 10G (default: the backing's)")

    p = add("info", cmd_info, "show an image's format, size, backing file and snapshots")
    p.add_argument("-f", metavar="FMT")
    p.add_argument("--output", choices=["human", "json"], default="human")
    p.add_argument("--backing-chain", action="store_true")
    p.add_argument("filename")

    p = add("check", cmd_check, "check an image's metadata for consistency")
    p.add_argument("-f", metavar="FMT")
    p.add_argument(
        "-r", choices=["leaks", "all"], help="repair; both modes rebuild the qcow2 refcounts"
    )
    p.add_argument("filename")

    p = add("snapshot", cmd_snapshot, "create a new overlay image on top of an image")
    p.add_argument("-f", metavar="FMT", help="format of the overlay (default qcow2, vhd for vhd)")
    p.add_argument("-F", metavar="BFMT", help="format of the base image")
    p.add_argument("base")
    p.add_argument("overlay")

    p = add("commit", cmd_commit, "merge an image's own data into its backing file")
    p.add_argument("-f", metavar="FMT")
    p.add_argument(
        "-p",
        action="store_true",
        help="accepted for qemu-img compatibility; progress shows on a terminal",
    )
    p.add_argument("-q", action="store_true", help="quiet")
    p.add_argument("filename")

    p = add("convert", cmd_convert, "copy an image into a new image of another format")
    p.add_argument("-f", metavar="FMT")
    p.add_argument("-O", required=True, metavar="FMT")
    p.add_argument("-o", metavar="OPTS")
    p.add_argument(
        "-p",
        action="store_true",
        help="accepted for qemu-img compatibility; progress shows on a terminal",
    )
    p.add_argument("source")
    p.add_argument("target")

    p = add("map", cmd_map, "show where each range of the disk is stored")
    p.add_argument("-f", metavar="FMT")
    p.add_argument("--output", choices=["human", "json"], default="human")
    p.add_argument("filename")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ImageError, OSError) as exc:
        print(f"tap-img: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
