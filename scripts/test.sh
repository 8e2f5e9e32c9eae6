#!/usr/bin/env bash
# Run tapdisk's test suite: set up (scripts/setup.sh, cheap when already done), then pytest
# over tests/ except tests/kernel, which needs nbd.ko and runs inside a VM (see .ci/run).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k handshake -x`.
# This is the command the README gives and the one .ci/run ends with.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh

status=0
.venv/bin/python -m pytest -q --ignore=tests/kernel "$@" || status=$?
if [ "$status" -eq 5 ]; then
  # pytest's "no tests ran": a broken collection or a filter that matches nothing, never a pass.
  echo "test.sh: error: pytest collected no tests" >&2
fi
exit "$status"
