"""The README's incremental backup recipe, run as it stands, and what it must have done."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

from cbt_helpers import BLOCK
from helpers import require, run

README = Path(__file__).parents[1] / "README.md"
MiB = 1 << 20


def recipe() -> str:
    """The first sh block under the README's "### Incremental backup" heading."""
    text = README.read_text()
    section = text[text.index("\n### Incremental backup\n") :]
    start = section.index("```sh\n") + len("```sh\n")
    return section[start : section.index("```\n", start)]


def test_the_readme_incremental_backup_recipe_copies_only_the_changed_blocks(tapctl, tmp_path):
    for tool in ("qemu-img", "qemu-io", "nbdinfo", "nbdcopy"):
        require(tool)
    script = tmp_path / "recipe.sh"
    script.write_text(recipe())
    env = {**tapctl.env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr  # its last step compares the disks
    # The guest's writes, whole 64 KiB blocks: 64k at 1M, 1M of zeros at 16M, 200k at 300M.
    changed = [(MiB, BLOCK), (16 * MiB, MiB), (300 * MiB, 4 * BLOCK)]
    listed = [line.split() for line in (tmp_path / "changed.map").read_text().splitlines()]
    assert [(int(o), int(n)) for o, n, flag, _ in listed if flag == "1"] == changed
    # The incremental holds those blocks and nothing else.
    layers = json.loads(run("qemu-img", "map", "--output=json", tmp_path / "incremental.qcow2"))
    assert [(e["start"], e["length"]) for e in layers if e["depth"] == 0] == changed
    disk, restored = tmp_path / "disk.raw", tmp_path / "restored.raw"
    assert filecmp.cmp(disk, restored, shallow=False)
    assert not filecmp.cmp(tmp_path / "full.raw", restored, shallow=False)
