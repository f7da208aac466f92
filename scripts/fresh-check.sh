#!/usr/bin/env bash
# The README's two commands on a machine that has never seen this project:
# builds a minimal Debian 12 root with debootstrap, puts a clean clone of this
# repository (its HEAD commit) in it, and runs `scripts/demo.sh` and then
# `CI=true scripts/test.sh` inside it with chroot (/proc, /sys, /dev,
# /dev/pts and /dev/shm mounted). Nothing of this machine's caches goes in:
# no target dirs, no cargo registry, no pip cache, no model files, no cross
# toolchain. The one thing the root is given is the Rust toolchain the README
# assumes a user has installed (rustup's, bind-mounted read-only from this
# machine), because rustup's own servers are not reachable from here.
#
#   sudo scripts/fresh-check.sh            # about an hour on 2 cores
#
# Too slow for CI; run it before resolving an issue that touches an install
# step. Prints the time of each command, the number of tests passed, failed
# and ignored, and every test that said it skipped (with its reason). Exits
# non-zero if either command fails.
#
# Environment:
#   FRESH_DIR       work directory (default $HOME/.cache/openclaw/fresh-check;
#                   the root is rebuilt in it every run; debootstrap's package
#                   cache under it is kept, which changes nothing inside)
#   FRESH_MIRROR    Debian mirror (default http://deb.debian.org/debian)
#   FRESH_KEEP=1    keep the root afterwards (for a look inside)
#   FRESH_NICE      niceness of the commands in the root (default 10)
set -euo pipefail
# shellcheck source=scripts/lib/err-trap.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/err-trap.sh"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() { printf 'fresh-check: %s\n' "$*" >&2; exit 1; }
say() { printf '\n== fresh-check: %s\n' "$*"; }

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, chroot and mounts)"
if ! command -v debootstrap >/dev/null 2>&1; then
  say "installing debootstrap"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null 2>&1 \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; } \
    || die "debootstrap is not installed and apt-get could not install it"
fi
for tool in debootstrap chroot mount git; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found"
done
rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
cargo_home=${CARGO_HOME:-$HOME/.cargo}
[ -x "$cargo_home/bin/cargo" ] && [ -d "$rustup_home/toolchains" ] \
  || die "no rustup toolchain in $rustup_home and $cargo_home/bin (the README assumes one)"

work=${FRESH_DIR:-$HOME/.cache/openclaw/fresh-check}
mirror=${FRESH_MIRROR:-http://deb.debian.org/debian}
nice_level=${FRESH_NICE:-10}
root="$work/root"
mkdir -p "$work/debs"
commit=$(git -C "$repo" rev-parse HEAD)
if [ -n "$(git -C "$repo" status --porcelain --untracked-files=no)" ]; then
  echo "fresh-check: note: the working tree has uncommitted changes; the root gets HEAD ($commit) only" >&2
fi

mounted=()
cleanup() {
  local i
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
    umount -l "${mounted[$i]}" 2>/dev/null || true
  done
  # Processes a test left behind in the root would keep its mounts busy.
  if [ -d "$root" ]; then
    for pid in $(ls /proc | grep -E '^[0-9]+$'); do
      [ "$(readlink "/proc/$pid/root" 2>/dev/null)" = "$root" ] && kill -9 "$pid" 2>/dev/null || true
    done
  fi
  # Mounts the tests made inside the root (`ip netns add` bind-mounts
  # /run/netns onto itself), deepest first.
  if [ -d "$root" ]; then
    awk -v r="$root/" 'index($2, r) == 1 { print $2 }' /proc/mounts | sort -r \
      | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  fi
  if [ "${FRESH_KEEP:-}" != 1 ] && [ -d "$root" ]; then
    # Only once nothing is mounted below it any more.
    if ! grep -q " $root/" /proc/mounts; then rm -rf "$root"; fi
  fi
}
trap cleanup EXIT

bind() { # bind SRC DST [ro]
  mkdir -p "$2"
  mount --bind "$1" "$2"
  mounted+=("$2")
  if [ "${3:-}" = ro ]; then mount -o remount,bind,ro "$2"; fi
}

# --- 1. a minimal Debian 12 root ----------------------------------------------
if grep -q " $root/" /proc/mounts; then die "something is still mounted under $root; unmount it first"; fi
rm -rf "$root"
say "debootstrap bookworm (minbase) into $root"
t0=$(date +%s)
debootstrap --variant=minbase --include=ca-certificates,git,sudo \
  --cache-dir="$work/debs" bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 \
  || { tail -20 "$work/debootstrap.log" >&2; die "debootstrap failed (log: $work/debootstrap.log)"; }
echo "root built in $(( $(date +%s) - t0 )) s"
# The same apt sources a Debian 12 install has, security updates included.
cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
cp /etc/resolv.conf "$root/etc/resolv.conf"
# Site configuration a machine of this network has from its installer: the
# local certificate authorities (a TLS-inspecting egress proxy signs what
# crates.io, PyPI and Debian serve here). Without them nothing downloads.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  mkdir -p "$root/usr/local/share/ca-certificates"
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates >/dev/null 2>&1 \
    || die "update-ca-certificates failed in the root"
fi
echo fresh-check >"$root/etc/hostname"
# Loopback name resolution as on an installed system (the ARM test reaches
# the broker as `localhost`).
printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n127.0.1.1 fresh-check\n' >"$root/etc/hosts"

# --- 2. a clean clone and the user's Rust toolchain ---------------------------------
say "clean clone of $commit"
git clone -q --no-hardlinks "$repo" "$root/root/openclaw"
git -C "$root/root/openclaw" checkout -q "$commit"
# The root a mount point of its own, as / is on an installed system:
# `ip netns exec` makes / a slave mount in its new namespace (`mount
# --make-rslave /`), which fails with EINVAL on a plain directory (the
# partition test of tests/faults.rs failed so).
mount --bind "$root" "$root"; mounted+=("$root")
bind /proc "$root/proc"
# With what is mounted below it: the cgroup v2 hierarchy under
# /sys/fs/cgroup that the agent puts process plugins in.
mkdir -p "$root/sys"
mount --rbind /sys "$root/sys"; mount --make-rslave "$root/sys"; mounted+=("$root/sys")
bind /dev "$root/dev"
bind /dev/pts "$root/dev/pts"
mkdir -p "$root/dev/shm"
mount -t tmpfs -o mode=1777 tmpfs "$root/dev/shm"; mounted+=("$root/dev/shm")
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"; mounted+=("$root/tmp")
bind "$rustup_home" "$root/opt/rustup" ro
# Only rustup and its proxies (cargo, rustc, rustfmt, clippy...: the same
# program under other names), not tools this machine has installed since.
mkdir -p "$root/opt/cargo-bin"
cp "$cargo_home/bin/rustup" "$root/opt/cargo-bin/rustup"
for f in "$cargo_home"/bin/*; do
  [ "$(basename "$f")" = rustup ] && continue
  cmp -s "$f" "$cargo_home/bin/rustup" && ln "$root/opt/cargo-bin/rustup" "$root/opt/cargo-bin/$(basename "$f")"
done

inside() { # inside LOGNAME COMMAND...: runs COMMAND in the root as root
  local log="$work/$1.log"; shift
  chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb CI=true \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    RUSTUP_HOME=/opt/rustup CARGO_HOME=/root/.cargo \
    PATH=/root/.cargo/bin:/opt/cargo-bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    nice -n "$nice_level" bash -c 'cd /root/openclaw && "$@"' inside "$@" </dev/null 2>&1 | tee "$log"
  return "${PIPESTATUS[0]}"
}

# The README says: install build-essential (the bundled SQLite needs a C
# compiler), then run the two commands. A fresh minbase root has no compiler.
say "apt-get install build-essential (the README's prerequisite)"
inside apt bash -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential python3 python3-pip >/dev/null && echo ok'

status=0
say "scripts/demo.sh"
t0=$(date +%s)
demo_rc=0
inside demo bash scripts/demo.sh || demo_rc=$?
[ "$demo_rc" -eq 0 ] || { status=1; echo "fresh-check: scripts/demo.sh FAILED (exit $demo_rc)" >&2; }
demo_s=$(( $(date +%s) - t0 ))

say "CI=true scripts/test.sh"
t0=$(date +%s)
test_rc=0
inside test bash scripts/test.sh || test_rc=$?
[ "$test_rc" -eq 0 ] || { status=1; echo "fresh-check: scripts/test.sh FAILED (exit $test_rc)" >&2; }
test_s=$(( $(date +%s) - t0 ))

# --- 3. what ran -------------------------------------------------------------------
# From cargo's "test result:" lines only: the tests' logs say "N failed"
# of other things (an OTA rollout's devices), which were counted as tests.
sum() { { grep -E '^test result:' "$work/test.log" | grep -Eo "[0-9]+ $1" || true; } | awk '{s += $1} END {print s + 0}'; }
say "result for $commit"
echo "scripts/demo.sh: exit $demo_rc after $demo_s s"
echo "scripts/test.sh: exit $test_rc after $test_s s: $(sum passed) passed, $(sum failed) failed, $(sum ignored) ignored"
echo "skipped by the tests themselves (with their reasons):"
grep -E 'SKIPPED' "$work/test.log" | sed 's/^/  /' || echo "  none"
grep -E "^test .* \.\.\. ignored" "$work/test.log" | sed 's/^/  ignored: /' || true
echo "logs: $work/{debootstrap,apt,demo,test}.log"
exit "$status"
