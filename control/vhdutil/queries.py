"""The ``vhd-util`` subcommands that only look at images: query, check and scan.

Their output is blktap's, line for line, so scripts that parse it run unchanged.
"""

from __future__ import annotations

import errno
import glob
import os
import sys
from collections.abc import Iterator

from tapdisk.drivers.base import ImageError
from tapdisk.drivers.vhd import edit
from tapdisk.drivers.vhd.check import CheckOptions, ImageCheck, check_chain
from tapdisk.drivers.vhd.format import FOOTER_SIZE
from tapdisk.drivers.vhd.meta import Metadata

from . import volumes
from .args import UsageError, no_operands, parse_options, require
from .chain import ANYWHERE, chain_depth, open_meta, parent_of
from .scanline import ScanImage


def cmd_query(argv: list[str]) -> int:
    usage = (
        "options: <-n name> [-v print virtual size (in MB)] [-s print physical utilization "
        "(bytes)] [-p print parent] [-f print fields] [-m print marker] [-d print chain depth] "
        "[-S print max virtual size (MB) for fast resize] [-a print allocated block count] "
        "[-u don't resolve parent path]"
    )
    o, rest = parse_options(argv, "n:vspfdSmauh", usage)
    require(o, usage, "n")
    no_operands(rest, usage)
    name = o["n"]
    meta = open_meta(name)
    err = 0
    if "v" in o:
        print(meta.footer.current_size >> 20)
    if "s" in o:
        print(_phys_size(meta))
    if "p" in o:
        if not meta.is_diff:
            print(f"{name} has no parent")
        else:
            try:
                print(parent_of(name, meta, resolve="u" not in o))
            except (ImageError, OSError, IndexError) as exc:
                print("query failed")
                print(f"vhd-util query: {exc}", file=sys.stderr)
                err = err or getattr(exc, "errno", None) or errno.EINVAL
    if "f" in o:
        print(f"hidden: {meta.footer.hidden}")
    if "m" in o:
        print(f"marker: {edit.get_marker(meta)}")
    if "d" in o:
        try:
            print(f"chain depth: {chain_depth(name)}")
        except (ImageError, OSError) as exc:
            code = getattr(exc, "errno", None) or errno.EINVAL
            print(f"error checking chain depth: -{code}")
            print(f"vhd-util query: {exc}", file=sys.stderr)
            err = err or code
    if "a" in o:
        if meta.is_fixed:
            print(f"error reading bat: -{errno.EINVAL}")
            print(f"vhd-util query: {name}: a fixed VHD has no BAT", file=sys.stderr)
            err = err or errno.EINVAL
        else:
            print(meta.allocated_blocks())
    if "S" in o:
        print(meta.header.max_table_entries * meta.header.block_size >> 20 if meta.header else 0)
    return err


def _phys_size(meta: Metadata) -> int:
    """blktap's physical utilisation: end of data plus the footer."""
    if meta.is_fixed:
        return meta.footer.current_size + FOOTER_SIZE
    return meta.data_end + FOOTER_SIZE


def cmd_check(argv: list[str]) -> int:
    usage = (
        "options: -n <file> [-i ignore missing primary footers] [-I ignore parent uuids] "
        "[-t ignore timestamps] [-B do not check BAT for overlapping (precludes -s, -b)] "
        "[-p check parents] [-b check bitmaps] [-s stats] [-h help]"
    )
    o, rest = parse_options(argv, "n:iItpbBsh", usage)
    require(o, usage, "n")
    no_operands(rest, usage)
    if "B" in o and ("s" in o or "b" in o):
        raise UsageError(usage)
    # -B lets blktap skip its quadratic overlap check; loading sorts the BAT and checks
    # overlaps in n log n, so it stays on.
    options = CheckOptions(
        parents="p" in o,
        bitmaps="b" in o,
        ignore_footer="i" in o,
        ignore_parent_uuid="I" in o,
        ignore_timestamps="t" in o,
        stats="s" in o,
    )
    checked: list[ImageCheck] = []
    status = 0
    for result in check_chain(o["n"], options, ANYWHERE):
        if not result.valid:
            for line in result.problems:
                print(line)
            print(f"{result.path} appears invalid", file=sys.stderr)
            status = result.errno
            break
        checked.append(result)
        if not options.stats and not result.fixed:  # blktap says nothing of a fixed VHD
            print(f"{result.path} is valid")
    if options.stats and checked:
        for line in stats_lines(checked):
            print(line)
    return status


def stats_lines(chain: list[ImageCheck]) -> list[str]:
    """blktap's ``check -s`` report, base image first: sectors each image holds, and of
    those how many its parent and all its ancestors lack."""

    def pct(part: int, whole: int) -> str:
        return f"{100.0 * part / whole if whole else 0.0:.2f}%"

    def name(path: str) -> str:
        return os.path.basename(path.rstrip("/")) or path

    lines: list[str] = []
    below: dict[int, int] = {}
    parent: dict[int, int] = {}
    dynamic = [img for img in chain if not img.fixed]
    for depth, img in enumerate(reversed(dynamic)):
        written = sum(m.bit_count() for m in img.written.values())
        line = (
            f"{name(img.path)}: secs allocated: {img.sectors_allocated:#x} "
            f"secs written: {written:#x} ({pct(written, img.sectors_allocated)})"
        )
        if depth:
            up = sum((m & ~parent.get(b, 0)).bit_count() for b, m in img.written.items())
            uc = sum((m & ~below.get(b, 0)).bit_count() for b, m in img.written.items())
            line += (
                f" secs not in parent: {up:#x} ({pct(up, written)})"
                f" secs not in ancestors: {uc:#x} ({pct(uc, written)})"
            )
        lines.append(line)
        for b, m in img.written.items():
            below[b] = below.get(b, 0) | m
        parent = img.written
    return lines


def cmd_scan(argv: list[str]) -> int:
    usage = (
        "usage: [OPTIONS] FILES\noptions: [-m match filter] [-f fast] [-c continue on failure] "
        "[-l LVM volume] [-p pretty print] [-a scan parents] [-v verbose] [-h help] "
        "[-M show markers]"
    )
    o, files = parse_options(argv, "m:fcl:pavMh", usage)
    if "m" not in o and not files:
        raise UsageError(usage)
    verbose, markers = "v" in o, "M" in o
    if "l" in o:
        if markers:
            raise ImageError("markers of LVM volumes (-M with -l) are not supported")
        patterns = ([o["m"]] if "m" in o else []) + files
        found = volumes.scan(o["l"], patterns, "f" in o and "p" not in o, "a" in o)
        if "p" not in o:
            return _print_in_order(found, verbose, "c" in o)
        images = {img.path: img for img, _ in found}
    else:
        images = _scan_files(o, files)
    failed = False
    if "p" in o:
        children: dict[str, list[ScanImage]] = {}
        for img in images.values():
            if img.parent in images:
                children.setdefault(img.parent, []).append(img)

        def tree(img: ScanImage, depth: int) -> None:
            print(img.line(verbose, markers, depth * 3, pretty_missing=False))
            kids = sorted(children.get(img.path, []), key=lambda i: i.path)
            for kid in [k for k in kids if not k.hidden] + [k for k in kids if k.hidden]:
                tree(kid, depth + 1)

        for img in sorted(images.values(), key=lambda i: i.path):
            if img.parent not in images:
                print(img.line(verbose, markers, 0, pretty_missing=True))
                kids = sorted(children.get(img.path, []), key=lambda i: i.path)
                for kid in [k for k in kids if not k.hidden] + [k for k in kids if k.hidden]:
                    tree(kid, 1)
            failed |= img.error is not None
    else:
        for img in sorted(images.values(), key=lambda i: i.path):
            print(img.line(verbose, markers, 0, pretty_missing=False))
            failed |= img.error is not None
    return errno.EINVAL if failed and "c" not in o else 0


def _scan_files(o: dict[str, str], files: list[str]) -> dict[str, ScanImage]:
    """The files named and matched by ``-m``, and with ``-a`` their parents, by path."""
    names = set(os.path.abspath(f) for f in files)
    if "m" in o:
        names.update(os.path.abspath(f) for f in glob.glob(o["m"]))
    images = {n: _scan_one(n) for n in names}
    if "a" in o:
        todo = [i for i in images.values() if i.parent]
        while todo:
            img = todo.pop()
            if img.parent and img.parent not in images:
                images[img.parent] = _scan_one(img.parent)
                todo.append(images[img.parent])
    return images


def _print_in_order(
    found: Iterator[tuple[ScanImage, bool]], verbose: bool, keep_going: bool
) -> int:
    """Print volume lines as they are scanned; stop after a failure unless ``keep_going``."""
    for img, failure in found:
        print(img.line(verbose, False, 0, pretty_missing=False), flush=True)
        if failure and not keep_going:
            return errno.EINVAL
    return 0


def _scan_one(path: str) -> ScanImage:
    img = ScanImage(path)
    try:
        meta = open_meta(path)
        img.capacity = meta.footer.current_size
        img.size = os.stat(path).st_size
        img.hidden = meta.footer.hidden
        img.marker = edit.get_marker(meta)
        if meta.batmap_header is not None and meta.batmap_header.keyhash_cookie == 1:
            img.keyhash = meta.batmap_header.keyhash.hex()
        if meta.is_diff:
            img.parent = parent_of(path, meta)
    except (ImageError, OSError) as exc:
        code = getattr(exc, "errno", None) or errno.EINVAL
        img.error = (-code, str(exc).replace("'", '"'))
    return img
