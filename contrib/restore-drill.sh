#!/usr/bin/env bash
# A restore drill on a live node: rebuild the database from the backup into a temp dir,
# check it, and compare its data_version with the node's. Safe to run from cron: it takes
# no lock and writes nothing to the backup or the node.
#   usage: restore-drill.sh file:///mnt/backup/node.bkp ~/.lightning/bitcoin
set -euo pipefail
url=$1; ldir=$2
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
backup-cli verify "$url"
backup-cli restore "$url" "$tmp"
restored=$(sqlite3 "$tmp/lightningd.sqlite3" "SELECT intval FROM vars WHERE name='data_version'")
live=$(sqlite3 "file:$ldir/lightningd.sqlite3?mode=ro" "SELECT intval FROM vars WHERE name='data_version'")
echo "restored data_version $restored, live node $live"
# The backup may be one ahead (a transaction in flight) and the node may have moved on.
[ "$restored" -ge $((live - 1000)) ] || { echo "backup far behind the node" >&2; exit 1; }
