#!/usr/bin/env bash
# Set up tapdisk (scripts/setup.sh), create a 256 MiB demo image with some data in it and serve
# it with `tapdisk serve` in the foreground. The NBD URI to connect to is printed once the server
# listens; Ctrl-C (or SIGTERM) stops it and removes the socket. Extra arguments go to
# `tapdisk serve`, e.g. `bash scripts/demo.sh --read-only` or `--tcp 127.0.0.1:10809`.
# TAPDISK_DEMO_DIR (default /tmp/tapdisk-demo) holds the image and the socket.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEMO_DIR=${TAPDISK_DEMO_DIR:-/tmp/tapdisk-demo}
IMAGE=$DEMO_DIR/disk.raw
SOCKET=$DEMO_DIR/disk.sock

bash "$ROOT/scripts/setup.sh"

mkdir -p "$DEMO_DIR"
if [ ! -e "$IMAGE" ]; then
  # 1 MiB of 0x11 at the start and 64 KiB of 0xaa at 128 MiB; the rest stays a hole, so
  # `nbdinfo --map` has both data and holes to show.
  qemu-img create -q -f raw "$IMAGE" 256M
  qemu-io -f raw -c 'write -q -P 0x11 0 1M' -c 'write -q -P 0xaa 128M 64k' "$IMAGE"
  echo "demo: created $IMAGE" >&2
fi
echo "demo: serving $IMAGE; connect to the URI below, Ctrl-C stops" >&2
exec "$ROOT/.venv/bin/tapdisk" serve --unix "$SOCKET" "$@" "raw:$IMAGE"
