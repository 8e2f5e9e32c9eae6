"""The image tools' --help shows examples (issue 6: every command's --help has examples)."""

import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "argv",
    [["vhd-util", "--help"], ["tap-img", "--help"], ["tapdisk", "serve", "--help"]],
)
def test_help_has_examples(argv):
    proc = subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "examples:" in proc.stdout
    assert f"{argv[0]} " in proc.stdout.split("examples:", 1)[1]
