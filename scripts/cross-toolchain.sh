#!/usr/bin/env bash
# Installs the toolchain that cross-builds openclaw-agent for ARM on a fresh
# Debian 12 (bookworm) x86_64 machine, from Debian's own packages only (no
# rustup download needed), then proves it with a hello-world built for aarch64
# and run under qemu. See docs/cross.md.
#
#   scripts/cross-toolchain.sh            # as root, or a user with sudo
#
# What it does (idempotent, non-interactive; re-run it after an apt upgrade of
# rustc-web so the ARM std matches the compiler again):
#   1. makes sure the bookworm-security suite is a source: it carries
#      rustc-web/cargo-web 1.96 (bookworm main has 1.85, too old for this crate);
#   2. installs rustc-web, cargo-web (as /usr/bin/rustc, /usr/bin/cargo),
#      gcc-aarch64-linux-gnu, gcc-arm-linux-gnueabihf, qemu-user-static;
#   3. fetches Debian's ARM std of exactly the same version
#      (libstd-rust-web-dev + libstd-rust-web-1.96 for arm64, and for armhf
#      when the mirror offers it) with `apt-get download`, unpacks it and puts
#      usr/lib/rustlib/<triple> into /usr/lib/rustlib/. Installing those
#      packages with apt does not work (multiarch version constraints), which
#      is why they are unpacked instead. The foreign dpkg architectures needed
#      to download them are removed again afterwards if this script added them,
#      so later `apt-get update` runs are not affected by foreign indexes;
#   4. builds a hello-world for aarch64-unknown-linux-gnu (static) with
#      /usr/bin/cargo and runs it with qemu-aarch64-static (and armv7 too when
#      its std was installed).
#
# Environment:
#   OPENCLAW_RUST_DEB_VERSION  Debian version of rustc-web to use
#                              (default: the candidate of rustc-web, which must
#                              be 1.91 or newer)
#   OPENCLAW_CROSS_ARCHES      Debian architectures to fetch std for
#                              (default "arm64 armhf"; arm64 is required)
set -euo pipefail
# shellcheck source=scripts/lib/err-trap.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/err-trap.sh"

export DEBIAN_FRONTEND=noninteractive
export LC_ALL=C

log() { printf '== %s\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die() { printf 'ERROR: %s\n' "$*" >&2; exit 1; }

if [ "$(id -u)" -eq 0 ]; then
  as_root() { "$@"; }
else
  command -v sudo >/dev/null 2>&1 || die "run this as root, or install sudo"
  as_root() { sudo env DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@"; }
fi

# shellcheck disable=SC1091
. /etc/os-release
if [ "${VERSION_CODENAME:-}" != "bookworm" ]; then
  warn "this script is written for Debian 12 (bookworm); this is ${PRETTY_NAME:-unknown}. Trying anyway."
fi
HOST_ARCH=$(dpkg --print-architecture)
[ "$HOST_ARCH" = amd64 ] || warn "host architecture is $HOST_ARCH, tested on amd64 only"

MIN_RUST=1.91
CROSS_ARCHES=${OPENCLAW_CROSS_ARCHES:-"arm64 armhf"}
installed=()   # what this run installed or changed, printed at the end
missing=()     # what could not be had, printed at the end

deb_triple() {
  case "$1" in
    arm64) echo aarch64-unknown-linux-gnu ;;
    armhf) echo armv7-unknown-linux-gnueabihf ;;
    *) die "unsupported architecture $1" ;;
  esac
}

# apt-get update restricted to the host and one foreign architecture. A
# failing index of one architecture (the bookworm-security armhf index is
# sometimes caught mid-sync: "File has unexpected size ... Mirror sync in
# progress?") makes apt drop the fresh lists of the whole suite, so each
# foreign architecture is fetched on its own.
apt_update_for() {
  local args=(-o "APT::Architectures::=$HOST_ARCH")
  [ -n "${1:-}" ] && args+=(-o "APT::Architectures::=$1")
  as_root apt-get update -q "${args[@]}" >/tmp/openclaw-apt-update.log 2>&1 || {
    grep -E '^(E|Err):' /tmp/openclaw-apt-update.log | head -5 >&2 || true
    return 1
  }
}

# --- 1. bookworm-security -----------------------------------------------------
if ! grep -rqsE '^[^#]*(bookworm-security|bookworm/updates)' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  log "adding the bookworm-security apt source"
  as_root tee /etc/apt/sources.list.d/openclaw-bookworm-security.sources >/dev/null <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  installed+=("apt source /etc/apt/sources.list.d/openclaw-bookworm-security.sources")
fi

log "apt-get update"
apt_update_for "" || warn "apt-get update reported errors (see above); going on with what was fetched"

# --- 2. host packages -----------------------------------------------------------
V=${OPENCLAW_RUST_DEB_VERSION:-$(apt-cache policy rustc-web | awk '/Candidate:/ {print $2}')}
[ -n "$V" ] && [ "$V" != "(none)" ] || die "no rustc-web package found; is bookworm-security reachable?"
if dpkg --compare-versions "$V" lt "$MIN_RUST"; then
  die "rustc-web candidate is $V, but this crate needs Rust $MIN_RUST or newer: bookworm-security is missing or stale. apt-cache policy rustc-web:
$(apt-cache policy rustc-web)"
fi
log "Debian Rust toolchain version: $V"

# Installed version of a package, or nothing. dpkg-query exits 1 for a package
# that is not installed; under pipefail that used to kill the script inside
# this command substitution without a word on a fresh machine (issue 14).
pkg_version() { { dpkg-query -W -f='${db:Status-Abbrev} ${Version}' "$1" 2>/dev/null || true; } | awk '$1=="ii" {print $2}'; }
want=()
for p in "rustc-web=$V" "cargo-web=$V" gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf \
         libc6-dev-arm64-cross libc6-dev-armhf-cross qemu-user-static; do
  name=${p%%=*}
  have=$(pkg_version "$name")
  if [ "$name" != "$p" ]; then
    [ "$have" = "${p#*=}" ] || want+=("$p")
  else
    [ -n "$have" ] || want+=("$p")
  fi
done
if [ ${#want[@]} -gt 0 ]; then
  log "installing ${want[*]}"
  as_root apt-get install -y -q --no-install-recommends "${want[@]}" >/tmp/openclaw-apt-install.log 2>&1 || {
    tail -20 /tmp/openclaw-apt-install.log >&2
    die "apt-get install failed"
  }
  installed+=("${want[@]}")
else
  log "host packages already installed"
fi
[ "$(/usr/bin/rustc --version | awk '{print $2}')" = "${V%%+*}" ] \
  || die "/usr/bin/rustc is $(/usr/bin/rustc --version), expected ${V%%+*}"

# --- 3. ARM standard libraries ------------------------------------------------------
SYSROOT=$(/usr/bin/rustc --print sysroot)
RUSTLIB="$SYSROOT/lib/rustlib"
have_std=()
added_arches=()
cleanup() {
  # Leave dpkg's architecture list as we found it: a foreign architecture
  # whose index fails to sync would make every later `apt-get update` fail.
  local a
  for a in "${added_arches[@]}"; do
    as_root dpkg --remove-architecture "$a" 2>/dev/null || warn "could not remove dpkg architecture $a"
  done
  [ -n "${WORK:-}" ] && rm -rf "$WORK"
}
trap cleanup EXIT
WORK=$(mktemp -d /tmp/openclaw-cross.XXXXXX)
chmod 755 "$WORK"

# Each target whose std could not be had leaves its reason here, for
# scripts/test-arm.sh and scripts/test.sh to report (and nothing else to
# guess at); a later run that gets it removes the file.
status_dir=${OPENCLAW_CROSS_STATUS:-$HOME/.cache/openclaw/cross-status}
mkdir -p "$status_dir"
rm -f "$status_dir"/unavailable-*
for arch in $CROSS_ARCHES; do
  triple=$(deb_triple "$arch")
  stamp="$RUSTLIB/$triple/.openclaw-debian-version"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$V" ]; then
    log "$triple std $V already installed"
    have_std+=("$triple")
    continue
  fi
  if ! dpkg --print-foreign-architectures | grep -qx "$arch"; then
    as_root dpkg --add-architecture "$arch"
    added_arches+=("$arch")
  fi
  ok=""
  # A mirror in the middle of a sync serves an index of the wrong size
  # ("Mirror sync in progress?"), for minutes: wait it out (about 6 min).
  tries=${CROSS_APT_TRIES:-6}
  for attempt in $(seq 1 "$tries"); do
    apt_update_for "$arch" || true
    if apt-cache madison "libstd-rust-web-dev:$arch" 2>/dev/null | awk -F'|' '{gsub(/ /,"",$2); print $2}' | grep -qxF "$V"; then
      ok=1
      break
    fi
    warn "the $arch index of bookworm-security does not offer libstd-rust-web-dev:$arch $V (try $attempt of $tries)"
    if [ "$attempt" -lt "$tries" ]; then sleep $((attempt * 20)); fi
  done
  if [ -z "$ok" ]; then
    offered=$({ apt-cache madison "libstd-rust-web-dev:$arch" 2>/dev/null || true; } | awk -F'|' '{gsub(/ /,"",$2); print $2}' | paste -sd, -)
    msg="$triple: Debian std $V for $arch is not available from the mirror right now (offered: ${offered:-nothing}); the compiler is $V so an older std cannot be used. Re-run this script later."
    warn "$msg"
    missing+=("$msg")
    echo "$msg" >"$status_dir/unavailable-$triple"
    [ "$arch" = arm64 ] && die "$msg"
    continue
  fi
  dir="$WORK/$arch"
  mkdir -p "$dir"
  chmod 777 "$dir"   # apt downloads as the _apt user
  (cd "$dir" && apt-get download -q "libstd-rust-web-dev:$arch=$V" "libstd-rust-web-${V%.*}:$arch=$V" >/dev/null 2>"$dir/download.log") \
    || (cd "$dir" && as_root apt-get download -q "libstd-rust-web-dev:$arch=$V" "libstd-rust-web-${V%.*}:$arch=$V" >/dev/null) \
    || { cat "$dir/download.log" >&2; die "apt-get download of the $arch std failed"; }
  for deb in "$dir"/*.deb; do dpkg-deb -x "$deb" "$dir/root"; done
  [ -d "$dir/root/usr/lib/rustlib/$triple/lib" ] || die "the $arch std package has no usr/lib/rustlib/$triple"
  as_root rm -rf "$RUSTLIB/$triple"
  as_root cp -R --preserve=mode,timestamps "$dir/root/usr/lib/rustlib/$triple" "$RUSTLIB/"
  echo "$V" | as_root tee "$stamp" >/dev/null
  installed+=("$RUSTLIB/$triple (from libstd-rust-web-dev:$arch $V)")
  have_std+=("$triple")
done

# --- 4. prove it: hello-world under qemu --------------------------------------------
runner_for() {
  case "$1" in
    aarch64-*) echo "qemu-aarch64-static -L /usr/aarch64-linux-gnu" ;;
    armv7-*) echo "qemu-arm-static -L /usr/arm-linux-gnueabihf" ;;
  esac
}
linker_for() {
  case "$1" in
    aarch64-*) echo aarch64-linux-gnu-gcc ;;
    armv7-*) echo arm-linux-gnueabihf-gcc ;;
  esac
}
hello="$WORK/hello"
mkdir -p "$hello/src"
cat >"$hello/Cargo.toml" <<'EOF'
[package]
name = "hello-cross"
version = "0.1.0"
edition = "2021"
[dependencies]
EOF
cat >"$hello/src/main.rs" <<'EOF'
fn main() {
    let v: Vec<String> = std::env::args().skip(1).collect();
    let t = std::thread::spawn(move || v.join(" "));
    println!("hello from {} {}", std::env::consts::ARCH, t.join().unwrap());
}
EOF
for triple in "${have_std[@]}"; do
  log "verifying: hello-world for $triple under qemu"
  upper=$(echo "$triple" | tr 'a-z-' 'A-Z_')
  out=$(cd "$hello" && env RUSTC=/usr/bin/rustc CARGO_TARGET_DIR="$hello/target" \
          "CARGO_TARGET_${upper}_LINKER=$(linker_for "$triple")" \
          "CARGO_TARGET_${upper}_RUSTFLAGS=-C target-feature=+crt-static" \
          "CARGO_TARGET_${upper}_RUNNER=$(runner_for "$triple")" \
          /usr/bin/cargo run -q --offline --target "$triple" -- works 2>&1) \
    || { echo "$out" >&2; die "hello-world cross build or run for $triple failed"; }
  echo "   $out"
  case "$out" in *"hello from"*works*) ;; *) die "unexpected output for $triple: $out" ;; esac
  file -b "$hello/target/$triple/debug/hello-cross" 2>/dev/null | sed 's/^/   /' || true
done

log "summary"
echo "compiler:   $(/usr/bin/rustc --version)  ($(command -v /usr/bin/cargo): $(/usr/bin/cargo --version))"
echo "ARM std:    ${have_std[*]:-none}"
if [ ${#installed[@]} -gt 0 ]; then
  echo "installed:"; printf '  - %s\n' "${installed[@]}"
else
  echo "installed:  nothing (already up to date)"
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "NOT available:"; printf '  - %s\n' "${missing[@]}"
fi
echo "build the agent with: scripts/build-arm.sh --board rpi4 [--release]"
