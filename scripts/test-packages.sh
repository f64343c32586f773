#!/usr/bin/env bash
# Installs the Debian packages into a throwaway root and runs what they install (root).
#
# The machine is not touched: in a new mount, network and PID namespace an overlay
# over / (upper layer on a tmpfs of at most 1 GiB) becomes the root of a chroot, where
# the real dpkg and the maintainer scripts run. The test checks the installed files
# with owners and modes, runs `systemd-analyze verify` on the installed units, reads
# ExecStart= and User= from them and runs exactly that command, as that user with the
# installed configuration files, for a manager and an agent; enrols the agent with a
# one-time token, pushes a file and compares the agent's copy. Then it installs the
# next version (edits in /etc/baton and the data stay, the manager keeps its key),
# removes (configuration and data stay) and purges (configuration goes, data stays).
# Everything started inside dies with the PID namespace; the whole run is bounded by
# `timeout`, every wait inside by a count of polls.
# Usage: scripts/test-packages.sh [--no-build]   (--no-build: use target/release as it is)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" != "--inside" ]; then
    [ "$(id -u)" -eq 0 ] || { echo "$0: needs root (mount namespace, overlay, chroot)" >&2; exit 1; }
    build=()
    [ "${1:-}" = "--no-build" ] && build=(--no-build)
    debs=$(mktemp -d "${TMPDIR:-/tmp}/baton-debs.XXXXXX")
    mountpoint=$(mktemp -d "${TMPDIR:-/tmp}/baton-root.XXXXXX")
    trap 'rm -rf "$debs"; rmdir "$mountpoint" 2>/dev/null || true' EXIT
    scripts/build-debs.sh "${build[@]}" --out "$debs/now"
    version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
    scripts/build-debs.sh --no-build --uncompressed --version "$version+next1" --out "$debs/next"
    ls -l "$debs"/now/*.deb
    # The machine's package database and users, to show they are untouched afterwards.
    machine_before=$(cat /var/lib/dpkg/status /etc/passwd /etc/group | sha256sum)
    status=0
    timeout --kill-after=5 150 unshare --mount --net --pid --fork --kill-child --propagation private \
        "$0" --inside "$debs" "$mountpoint" || status=$?
    [ "$status" -eq 124 ] && echo "package test: timed out after 150 s" >&2
    if [ "$(cat /var/lib/dpkg/status /etc/passwd /etc/group | sha256sum)" != "$machine_before" ]; then
        echo "package test: FAILED: the machine's dpkg status, users or groups changed" >&2
        exit 1
    fi
    echo "package test: the machine's dpkg status, users and groups are unchanged"
    exit "$status"
fi

# --- inside the namespaces: PID 1 here, so everything below dies when this script ends.
debs="$2"
mountpoint="$3"
mount -t tmpfs -o size=1G,mode=0700 baton-test "$mountpoint"
mkdir "$mountpoint/upper" "$mountpoint/work" "$mountpoint/root"
root="$mountpoint/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$mountpoint/upper,workdir=$mountpoint/work" "$root"
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
mount --rbind /sys "$root/sys"
mount -t tmpfs tmpfs "$root/tmp"
mount -t tmpfs tmpfs "$root/run"
cp -r "$debs/now" "$debs/next" "$root/tmp/"
ip link set lo up

in_root() { chroot "$root" "$@"; }
fail() { echo "package test: FAILED: $*" >&2; exit 1; }
# expect_stat PATH "OWNER:GROUP MODE"
expect_stat() {
    local got
    got=$(in_root stat -c '%U:%G %a' "$1") || fail "$1 is missing"
    [ "$got" = "$2" ] || fail "$1 is $got, expected $2"
    echo "  $1: $got"
}
expect_absent() { [ ! -e "$root$1" ] || fail "$1 is still there"; }
# unit_value UNIT KEY: the value of KEY= in the installed unit.
unit_value() { sed -n "s/^$2=//p" "$root/lib/systemd/system/$1" | tail -1; }
# run_unit UNIT LOG: starts the unit's ExecStart= as its User= (with its Group= and
# UMask=) in the background, as systemd would; sets $started.
run_unit() {
    local exec_start user group
    exec_start=$(unit_value "$1" ExecStart)
    user=$(unit_value "$1" User)
    group=$(unit_value "$1" Group)
    [ -n "$exec_start" ] && [ -n "$user" ] || fail "$1 has no ExecStart= or User="
    echo "  $1: as $user: $exec_start"
    # shellcheck disable=SC2086 # ExecStart= is split on spaces, as systemd does here.
    chroot "$root" sh -c 'umask 077; exec "$@"' sh \
        setpriv --reuid="$user" --regid="$group" --init-groups --reset-env --no-new-privs \
        -- $exec_start >"$root/tmp/$1.log" 2>&1 &
    started=$!
}
# as_user USER COMMAND...: runs COMMAND in the root as USER.
as_user() {
    local user="$1"; shift
    in_root setpriv --reuid="$user" --regid="$user" --init-groups --reset-env -- "$@"
}
# wait_for SECONDS DESCRIPTION TEST...: polls TEST every 0.2 s.
wait_for() {
    local tries=$(($1 * 5)) what="$2"; shift 2
    for _ in $(seq "$tries"); do
        "$@" && return 0
        sleep 0.2
    done
    fail "$what (waited $((tries / 5)) s)"
}
# stop PID NAME: SIGTERM, up to 10 s, then SIGKILL.
stop() {
    kill -TERM "$1" 2>/dev/null || return 0
    for _ in $(seq 50); do
        kill -0 "$1" 2>/dev/null || { wait "$1" 2>/dev/null || true; return 0; }
        sleep 0.2
    done
    kill -KILL "$1" 2>/dev/null || true
    fail "$2 did not stop within 10 s of SIGTERM"
}
show_logs() {
    for log in "$root"/tmp/*.log; do
        [ -f "$log" ] && { echo "--- $log"; tail -20 "$log"; }
    done
}
trap 'status=$?; [ "$status" -eq 0 ] || show_logs' EXIT

echo "== dpkg -i (first install)"
export DEBIAN_FRONTEND=noninteractive
in_root sh -c "dpkg -i /tmp/now/*.deb"

echo "== installed files, owners, modes"
expect_stat /usr/bin/baton "root:root 755"
expect_stat /usr/bin/baton-agent "root:root 755"
expect_stat /lib/systemd/system/baton.service "root:root 644"
expect_stat /lib/systemd/system/baton-agent.service "root:root 644"
expect_stat /etc/baton/manager.toml "root:root 644"
expect_stat /etc/baton/agent.toml "root:root 644"
expect_stat /var/lib/baton "baton:baton 700"
expect_stat /var/lib/baton-agent "baton-agent:baton-agent 700"
for user in baton baton-agent; do
    shell=$(in_root getent passwd "$user" | cut -d: -f7)
    [ "$shell" = /usr/sbin/nologin ] || fail "user $user has shell $shell"
done
echo "  users baton, baton-agent: system users without a login shell"

echo "== systemd-analyze verify (inside the root)"
in_root systemd-analyze verify /lib/systemd/system/baton.service \
    /lib/systemd/system/baton-agent.service

echo "== the manager, as its unit runs it"
# An administrator's edit: a content directory to push from.
sed -i 's|^# content-dir = .*|content-dir = ["/srv/baton-test"]|' "$root/etc/baton/manager.toml"
grep -q '^content-dir = \["/srv/baton-test"\]' "$root/etc/baton/manager.toml" ||
    fail "could not edit manager.toml"
install -d -m 0755 "$root/srv/baton-test"
head -c 3000000 /dev/urandom >"$root/srv/baton-test/firmware.bin"
chmod 0644 "$root/srv/baton-test/firmware.bin"
# Content trust, made "offline" (as root, outside the manager's reach): a root key, a
# publisher key, and the trust document listing the publisher, signed by the root; the
# manager only stores and relays the document (key `trust` in its configuration).
install -d -m 0700 "$root/root/baton-keys"
root_key=$(in_root baton keys new --out /root/baton-keys/root.key)
publisher_key=$(in_root baton keys new --out /root/baton-keys/publisher.key)
[ ${#root_key} -eq 64 ] && [ ${#publisher_key} -eq 64 ] || fail "baton keys new printed no key"
in_root baton trust init --root "$root_key" --out /root/baton-keys/trust.bin >/dev/null
in_root baton trust add-publisher /root/baton-keys/trust.bin --key "$publisher_key" \
    --names 'firmware*' >/dev/null
in_root baton trust sign /root/baton-keys/trust.bin --key /root/baton-keys/root.key >/dev/null
install -m 0644 "$root/root/baton-keys/trust.bin" "$root/etc/baton/trust.bin"
echo 'trust = "/etc/baton/trust.bin"' >>"$root/etc/baton/manager.toml"
run_unit baton.service
manager=$started
wait_for 30 "the manager did not write /var/lib/baton/serve.json" test -s "$root/var/lib/baton/serve.json"
expect_stat /var/lib/baton/manager.key "baton:baton 600"
manager_key=$(sed -n 's/.*"manager_key": *"\([0-9a-f]*\)".*/\1/p' "$root/var/lib/baton/serve.json")
[ ${#manager_key} -eq 64 ] || fail "no manager key in serve.json"

echo "== enrolment token, agent configuration"
token=$(as_user baton baton enroll --token --id pkg-agent --expires 10m --data-dir /var/lib/baton)
[ -n "$token" ] || fail "no enrolment token"
install -m 600 /dev/null "$root/etc/baton/agent.token"
echo "$token" >"$root/etc/baton/agent.token"
in_root chown baton-agent:baton-agent /etc/baton/agent.token
cat >>"$root/etc/baton/agent.toml" <<EOF
manager = "127.0.0.1:7700"
manager-key = "$manager_key"
root-key = ["$root_key"]
id = "pkg-agent"
token-file = "/etc/baton/agent.token"
export = "/var/lib/baton-agent/firmware.bin"
discovery-broadcast = "127.255.255.255"
EOF
run_unit baton-agent.service
agent=$started
connected() { as_user baton baton agents --json --data-dir /var/lib/baton 2>/dev/null | grep -q '"connected": *true'; }
wait_for 30 "the agent did not connect" connected

echo "== push a file end to end"
# Signed offline by the publisher, published by the manager as it is.
in_root baton sign /srv/baton-test/firmware.bin --key /root/baton-keys/publisher.key \
    --name firmware --out /srv/baton-test/firmware.bin.manifest >/dev/null
chmod 0644 "$root/srv/baton-test/firmware.bin.manifest"
as_user baton timeout 60 baton push /srv/baton-test/firmware.bin \
    --manifest /srv/baton-test/firmware.bin.manifest --agents pkg-agent --wait \
    --data-dir /var/lib/baton
wait_for 10 "the agent did not export the content" test -s "$root/var/lib/baton-agent/firmware.bin"
cmp "$root/srv/baton-test/firmware.bin" "$root/var/lib/baton-agent/firmware.bin" ||
    fail "the agent's copy differs"
expect_stat /var/lib/baton-agent/identity.key "baton-agent:baton-agent 600"
echo "  the agent's copy matches (3000000 bytes)"

echo "== systemctl reload, as the unit does it: ExecReload= as User="
reload=$(unit_value baton.service ExecReload | sed "s/\$MAINPID/$manager/")
echo "  baton.service: as baton: $reload"
sed -i 's|^http = .*|http = "127.0.0.1:7781"|' "$root/etc/baton/manager.toml"
# shellcheck disable=SC2086 # ExecReload= is split on spaces, as systemd does here.
as_user baton $reload
reloaded() { grep -q "SIGHUP: configuration reloaded" "$root/tmp/baton.service.log"; }
wait_for 10 "the manager did not reload its configuration" reloaded
grep -q "take effect at the next restart: http" "$root/tmp/baton.service.log" ||
    fail "the reload did not name the setting that waits for a restart"
kill -0 "$manager" || fail "the manager ended on SIGHUP"
connected || fail "the agent's session ended on the reload"
sed -i 's|^http = .*|http = "127.0.0.1:7780"|' "$root/etc/baton/manager.toml"
echo "  reloaded; the change of http waits for a restart; the agent stays connected"
stop "$agent" baton-agent
stop "$manager" "baton serve"

echo "== dpkg -i (the next version): edits and data stay"
key_before=$(sha256sum <"$root/var/lib/baton/manager.key")
in_root sh -c "dpkg -i --force-confold /tmp/next/*.deb"
in_root dpkg-query -W baton baton-agent
grep -q '^content-dir = \["/srv/baton-test"\]' "$root/etc/baton/manager.toml" ||
    fail "the upgrade lost the edit to manager.toml"
grep -q '^id = "pkg-agent"' "$root/etc/baton/agent.toml" ||
    fail "the upgrade lost the edit to agent.toml"
[ "$(sha256sum <"$root/var/lib/baton/manager.key")" = "$key_before" ] ||
    fail "the upgrade changed manager.key"
expect_stat /var/lib/baton "baton:baton 700"
expect_stat /var/lib/baton/baton.db "baton:baton 600"
rm -f "$root/var/lib/baton/serve.json"
run_unit baton.service
manager=$started
wait_for 30 "the upgraded manager did not start" test -s "$root/var/lib/baton/serve.json"
grep -q "\"manager_key\": *\"$manager_key\"" "$root/var/lib/baton/serve.json" ||
    fail "the upgraded manager has another key"
as_user baton baton jobs --data-dir /var/lib/baton | grep -qw firmware ||
    fail "the upgraded manager lost the job"
echo "  the upgraded manager runs with the same key and remembers the job"
stop "$manager" "baton serve"

echo "== dpkg -r: configuration and data stay"
in_root dpkg -r baton baton-agent
expect_absent /usr/bin/baton
expect_absent /usr/bin/baton-agent
expect_absent /lib/systemd/system/baton.service
expect_stat /etc/baton/manager.toml "root:root 644"
expect_stat /etc/baton/agent.toml "root:root 644"
expect_stat /var/lib/baton/manager.key "baton:baton 600"
expect_stat /var/lib/baton-agent/identity.key "baton-agent:baton-agent 600"

echo "== dpkg -P: configuration goes, data stays"
in_root dpkg -P baton baton-agent
expect_absent /etc/baton/manager.toml
expect_absent /etc/baton/agent.toml
expect_stat /var/lib/baton/manager.key "baton:baton 600"
if in_root dpkg-query -W baton >/dev/null 2>&1; then fail "dpkg still knows baton"; fi
echo "package test: passed"
