#!/usr/bin/env bash
# Set up a tapdisk checkout on Debian 12, from nothing to a working .venv:
#   1. the Debian packages listed in scripts/debian-packages.txt (apt-get, as root or via sudo),
#   2. the virtualenv .venv made from Debian's /usr/bin/python3,
#   3. the project installed editable with its test extras (pip install -e '.[test]'),
#   4. Debian's python3-libnbd binding made importable in the venv (symlinks, so the venv
#      keeps its own site-packages instead of --system-site-packages); likewise
#      python3-rados and python3-rbd, through which the rbd tests check for librbd.
# Every step is skipped when already done, so running it again is cheap. .ci/run,
# scripts/demo.sh and scripts/test.sh all start here, so the README and CI cannot drift.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$ROOT/.venv
SYSTEM_PYTHON=/usr/bin/python3
DIST_PACKAGES=/usr/lib/python3/dist-packages
PACKAGE_LIST=$ROOT/scripts/debian-packages.txt
# pip runs again only when pyproject.toml changes (new dependency, subpackage or script).
STAMP=$VENV/.tapdisk-pyproject.sha256

say() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

install_debian_packages() {
  local wanted missing=() pkg
  wanted=$(sed -e 's/#.*//' "$PACKAGE_LIST" | tr -s ' \t' '\n\n' | sed '/^$/d')
  for pkg in $wanted; do
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null)" = installed ] ||
      missing+=("$pkg")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    say "Debian packages: all $(wc -w <<<"$wanted") in scripts/debian-packages.txt are installed"
    return
  fi
  local sudo=()
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null ||
      die "not root and no sudo; install these Debian packages first: ${missing[*]}"
    sudo=(sudo)
  fi
  say "Debian packages: installing ${missing[*]}"
  "${sudo[@]}" apt-get update -q
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
}

create_venv() {
  # A venv made from another interpreter (pyenv, a different minor version) cannot load
  # Debian's libnbd binding, so it is replaced.
  if [ -x "$VENV/bin/python" ] && grep -qx 'home = /usr/bin' "$VENV/pyvenv.cfg" 2>/dev/null; then
    say "venv: $VENV exists"
    return
  fi
  say "venv: creating $VENV with $SYSTEM_PYTHON"
  rm -rf "$VENV"
  "$SYSTEM_PYTHON" -m venv "$VENV"
}

install_project() {
  local sum
  sum=$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)
  if [ -x "$VENV/bin/tapdisk" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$sum" ]; then
    say "pip: project already installed (pyproject.toml unchanged)"
    return
  fi
  say "pip: installing the project editable with its test extras"
  "$VENV/bin/python" -m pip install -q -e "$ROOT[test]"
  echo "$sum" >"$STAMP"
}

link_libnbd() {
  local site file linked=0
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  for file in "$DIST_PACKAGES"/nbd.py "$DIST_PACKAGES"/nbdsh.py "$DIST_PACKAGES"/libnbdmod*.so; do
    [ -e "$file" ] || die "$file is missing; is python3-libnbd installed?"
    ln -sfn "$file" "$site/$(basename "$file")"
    linked=$((linked + 1))
  done
  "$VENV/bin/python" -c 'import nbd; nbd.NBD()' ||
    die "libnbd's Python binding does not import in $VENV"
  say "libnbd: linked $linked files of python3-libnbd into the venv; 'import nbd' works"
}

link_ceph() {
  local site file
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  for file in "$DIST_PACKAGES"/rados.cpython-*.so "$DIST_PACKAGES"/rbd.cpython-*.so; do
    [ -e "$file" ] || die "$file is missing; are python3-rados and python3-rbd installed?"
    ln -sfn "$file" "$site/$(basename "$file")"
  done
  "$VENV/bin/python" -c 'import rados, rbd' ||
    die "librbd's Python binding does not import in $VENV"
  say "ceph: linked python3-rados and python3-rbd into the venv; 'import rbd' works"
}

install_debian_packages
create_venv
install_project
link_libnbd
link_ceph
