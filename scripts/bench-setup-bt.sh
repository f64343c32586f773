#!/usr/bin/env bash
# Installs what `baton lab --baseline bt` runs (a bench set-up, not a dependency of Baton):
# the Debian packages aria2 (the BitTorrent peers), opentracker (the tracker) and mktorrent
# (makes the .torrent). Needs root, like the lab.
#
#   scripts/bench-setup-bt.sh
#   target/release/baton lab --agents 32 --size 64MiB --profile sym --baseline bt
set -euo pipefail
missing=()
for pair in aria2c:aria2 opentracker:opentracker mktorrent:mktorrent; do
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair##*:}")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "aria2c, opentracker and mktorrent are installed"
    exit 0
fi
echo "installing ${missing[*]}"
DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
