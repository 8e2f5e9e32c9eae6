#!/usr/bin/env bash
# Run the kernel test group (tests/kernel) inside ONE VM booted by kvm-nbd.sh, which gives
# the real Linux nbd.ko. Run as root from anywhere; extra arguments go to pytest:
#   tests/kernel/run.sh [-k NAME] [-x] ...
# Writes OUT/kernel.xml (junit) and OUT/kernel-prepare.log; OUT is $KERNEL_TESTS_OUT or .ci-out.
# $KERNEL_TESTS_TIMEOUT bounds the whole VM run (default 1800 s).
#
# Exit status:
#   0     passed, or SKIPPED because the VM cannot run here (kvm-nbd.sh prepare failed: no
#         qemu, no apt, no kernel package); the reason is printed and recorded in kernel.xml
#   124   INFRASTRUCTURE failure: the VM hit the timeout (qemu killed)
#   125   INFRASTRUCTURE failure: the guest died or never reported (panic, qemu failed)
#   other pytest's own status (1 = test failures)
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
cd "$ROOT"
OUT=${KERNEL_TESTS_OUT:-$ROOT/.ci-out}
TIMEOUT=${KERNEL_TESTS_TIMEOUT:-1800}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

say() { echo "kernel tests: $*"; }

skip() {   # skip REASON: say why, and leave a junit file that records the skip
  local reason=$1 esc
  esc=$(printf '%s' "$reason" | sed -e 's/&/\&amp;/g' -e 's/</\&lt;/g' -e 's/>/\&gt;/g' -e 's/"/\&quot;/g')
  cat > "$OUT/kernel.xml" <<EOF
<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="kernel" tests="1" skipped="1" failures="0" errors="0">
<testcase classname="tests.kernel" name="kernel_group"><skipped message="$esc"/></testcase>
</testsuite></testsuites>
EOF
  say "SKIPPED: $reason"
  exit 0
}

start=$SECONDS
if ! "$HERE/kvm-nbd.sh" prepare > "$OUT/kernel-prepare.log" 2>&1; then
  why=$(grep -m1 'ERROR' "$OUT/kernel-prepare.log" || tail -n 1 "$OUT/kernel-prepare.log")
  skip "the VM cannot run here: 'kvm-nbd.sh prepare' failed (${why:-no output}); see $OUT/kernel-prepare.log"
fi
say "VM ready to boot after $((SECONDS - start)) s of preparation"

rc=0
# The guest's /tmp is a tmpfs in its RAM: a passed test's files are removed as it ends (each
# test fills images with fio and ext4; kept, they ran the guest out of space).
"$HERE/kvm-nbd.sh" run --timeout "$TIMEOUT" --rw "$OUT" -- \
  "$PYTHON" -m pytest -p no:cacheprovider -o tmp_path_retention_policy=failed tests/kernel \
  --junitxml="$OUT/kernel.xml" "$@" || rc=$?

took=$((SECONDS - start))
case $rc in
  0) say "passed in $took s" ;;
  124) say "INFRASTRUCTURE FAILURE (not a test failure): the VM timed out after $TIMEOUT s (exit 124)" ;;
  125) say "INFRASTRUCTURE FAILURE (not a test failure): the guest died or never reported (exit 125); the console tail is above" ;;
  *) say "FAILED: pytest exited $rc after $took s" ;;
esac
exit "$rc"
