#!/usr/bin/env bash
# A throw-away single-node Ceph cluster for the rbd driver's tests and benchmark.
#
#   scripts/ceph-dev.sh start DIR [memstore|bluestore]
#                                   prints DIR/ceph.conf once pool "rbd" takes writes
#   scripts/ceph-dev.sh stop DIR    stops both daemons (SIGTERM, then SIGKILL after 30 s)
#
# One monitor on a free 127.0.0.1 port (msgr2 only) and one OSD, no manager, cephx on (so
# a wrong key is an error a test can provoke), pool "rbd" of size 1.  The OSD's store is
# chosen at the first start: memstore (the default) keeps the data in memory and saves it
# into DIR on a clean stop ("osd fast shutdown = false"), so a SIGTERM and a start again
# keep the data; bluestore writes it to a sparse 8 GiB file in DIR as a real OSD does, so
# even a kill -9 of the OSD loses nothing it acknowledged.  Everything the cluster and its clients write
# (data, keyrings, logs, pid files, admin sockets) stays inside DIR.  Needs Debian 12's
# ceph-mon, ceph-osd and ceph-common.
set -euo pipefail

die() { printf 'ceph-dev: error: %s\n' "$*" >&2; exit 1; }

[ $# -eq 2 ] || [ $# -eq 3 ] || die "usage: $0 start|stop DIR [memstore|bluestore]"
ACTION=$1
STORE=${3:-memstore}
case $STORE in memstore | bluestore) ;; *) die "unknown store $STORE (memstore or bluestore)" ;; esac
DIR=$(mkdir -p "$2" && cd "$2" && pwd)
CONF=$DIR/ceph.conf
# One long timeout for every CLI call: a mistake here fails instead of hanging.
CEPH=(timeout 60 ceph -c "$CONF" --connect-timeout 20)

free_port() {
  /usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

write_conf() {
  local port=$1 fsid=$2
  cat >"$CONF" <<EOF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$port]
mon initial members = a
ms bind msgr1 = false
public network = 127.0.0.0/8
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $DIR/\$name.keyring
run dir = $DIR/run
crash dir = $DIR/crash
log file = $DIR/log/\$name.log
mon cluster log file = $DIR/log/cluster.log
pid file = $DIR/run/\$name.pid
admin socket = $DIR/run/\$name.asok
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
mon data = $DIR/mon/\$name
osd data = $DIR/osd/\$id
osd fast shutdown = false
$(store_conf)
osd max object name len = 256
osd max object namespace len = 64

[client]
log file =
admin socket =
EOF
}

store_conf() {
  if [ "$STORE" = memstore ]; then
    printf '%s\n' "osd objectstore = memstore" "memstore device bytes = 8589934592"
  else
    # A sparse file on DIR's file system; small caches, as the OSD shares a test machine.
    printf '%s\n' "osd objectstore = bluestore" "bluestore block create = true" \
      "bluestore block size = 8589934592" "bluestore fsck on mount = false" \
      "bluestore cache autotune = false" "bluestore cache size = 134217728" \
      "osd memory target = 939524096"
  fi
}

start_daemon() {
  "$@" -c "$CONF" 2>>"$DIR/log/$1.stderr" || die "$1 did not start; see $DIR/log"
}

start() {
  if [ -f "$CONF" ] && [ -d "$DIR/mon/mon.a" ]; then
    restart
    return
  fi
  mkdir -p "$DIR/run" "$DIR/log" "$DIR/crash" "$DIR/mon/mon.a" "$DIR/osd/0"
  local fsid port osd_uuid
  fsid=$(uuidgen)
  port=$(free_port)
  write_conf "$port" "$fsid"
  ceph-authtool --create-keyring "$DIR/mon.a.keyring" --gen-key -n mon. --cap mon 'allow *' \
    >/dev/null
  ceph-authtool --create-keyring "$DIR/client.admin.keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
  ceph-authtool "$DIR/mon.a.keyring" --import-keyring "$DIR/client.admin.keyring" >/dev/null
  monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$port]" "$DIR/monmap" >/dev/null
  ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/mon.a.keyring" \
    >/dev/null 2>&1 || die "ceph-mon --mkfs failed; see $DIR/log"
  start_daemon ceph-mon -i a
  osd_uuid=$(uuidgen)
  monitor osd new "$osd_uuid"
  ceph-osd -c "$CONF" -i 0 --mkfs --mkkey --no-mon-config --osd-uuid "$osd_uuid" \
    >/dev/null 2>&1 ||
    die "ceph-osd --mkfs failed; see $DIR/log"
  monitor auth add osd.0 osd 'allow *' mon 'allow profile osd' -i "$DIR/osd.0.keyring"
  start_daemon ceph-osd -i 0
  monitor osd pool create rbd 8 8
  monitor osd pool application enable rbd rbd
  wait_writable
  echo "$CONF"
}

restart() {
  pgrep -F "$DIR/run/mon.a.pid" >/dev/null 2>&1 || start_daemon ceph-mon -i a
  pgrep -F "$DIR/run/osd.0.pid" >/dev/null 2>&1 || start_daemon ceph-osd -i 0
  wait_writable
  echo "$CONF"
}

# A command to the monitor; a failure or a timeout ends the script saying which command.
monitor() {
  "${CEPH[@]}" "$@" >/dev/null 2>>"$DIR/log/ceph.stderr" ||
    die "'ceph $*' failed or took more than 60 s; see $DIR/log/ceph.stderr"
}

# No manager means no PG statistics to wait on: a write that returns is the proof.
wait_writable() {
  timeout 60 rados -c "$CONF" -p rbd put ceph-dev-ready /dev/null ||
    die "pool rbd does not take writes after 60 s; see $DIR/log"
  timeout 20 rados -c "$CONF" -p rbd rm ceph-dev-ready
}

# The OSD first, while the monitor can still take its goodbye; each gets 30 s to save.
stop() {
  stop_daemon "$DIR/run/osd.0.pid"
  stop_daemon "$DIR/run/mon.a.pid"
}

stop_daemon() {
  local pidfile=$1 pid deadline=$((SECONDS + 30))
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  # Only a ceph daemon that still runs under this DIR's pid file.
  [ -n "$pid" ] && grep -qs ceph- "/proc/$pid/comm" || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}

case $ACTION in
  start) start ;;
  stop) stop ;;
  *) die "usage: $0 start|stop DIR [memstore|bluestore]" ;;
esac
