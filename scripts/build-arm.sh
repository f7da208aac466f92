#!/usr/bin/env bash
# Cross-builds openclaw-agent for a board, from its profile in boards/.
#
#   scripts/build-arm.sh [--board NAME|FILE] [--arch aarch64|armv7] [--release | --profile NAME]
#                        [--inference | --no-inference]
#
#   --board    board profile name (boards/NAME.toml) or a profile file;
#              default generic-aarch64 (runs on any 64-bit ARM Linux board)
#   --arch     build the board for another architecture than its profile's:
#              armv7 for a Pi 3 or Zero 2 W on a 32-bit OS image
#   --release  build with the `edge` profile (release at opt-level z: fat
#              LTO, strip, unwinding kept), what boards get
#   --profile  any other cargo profile
#   --inference / --no-inference
#              build with or without on-device inference (tract); default:
#              with it when the board profile lists models
#
# The profile's `target` picks the Rust target, its `cpu` adds
# `-C target-cpu=<cpu>` unless it is `generic`. Linker, +crt-static and the
# qemu runner come from .cargo/config.toml. The agent is built alone, with
# `--no-default-features --features agent`, so no server-only crate is in it.
#
# Environment:
#   CARGO_TARGET_DIR  default $HOME/.cache/openclaw/cross-target
#   CROSS_CARGO       cargo to use (default /usr/bin/cargo, Debian's cargo-web)
#   CROSS_RUSTC       rustc to use (default /usr/bin/rustc, Debian's rustc-web)
#                     e.g. CROSS_CARGO=cargo CROSS_RUSTC=rustc with a rustup
#                     toolchain that has the target installed
#   NICE              niceness of the build (default 15)
#
# Install the toolchain first with scripts/cross-toolchain.sh. See docs/cross.md.
set -euo pipefail
# shellcheck source=scripts/lib/err-trap.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/err-trap.sh"
cd "$(dirname "$0")/.."
ROOT=$(pwd)

die() { printf 'build-arm: %s\n' "$*" >&2; exit 1; }

board=generic-aarch64
arch=""
profile=dev
inference=auto
while [ $# -gt 0 ]; do
  case "$1" in
    --inference) inference=yes; shift ;;
    --no-inference) inference=no; shift ;;
    --board) [ $# -ge 2 ] || die "--board needs a value"; board=$2; shift 2 ;;
    --board=*) board=${1#*=}; shift ;;
    --arch) [ $# -ge 2 ] || die "--arch needs a value"; arch=$2; shift 2 ;;
    --arch=*) arch=${1#*=}; shift ;;
    --release) profile=edge; shift ;;
    --profile) [ $# -ge 2 ] || die "--profile needs a value"; profile=$2; shift 2 ;;
    --profile=*) profile=${1#*=}; shift ;;
    -h|--help) sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

if [ -f "$board" ]; then
  board_file=$board
elif [ -f "boards/$board.toml" ]; then
  board_file="boards/$board.toml"
else
  die "no board profile '$board' (have: $(cd boards && ls ./*.toml | sed 's|^\./||; s/\.toml$//' | paste -sd' ' -))"
fi

# Top-level `key = "value"` of the profile (before its first [section]).
board_key() {
  awk -v k="$1" '
    /^[[:space:]]*\[/ { exit }
    $0 ~ "^[[:space:]]*" k "[[:space:]]*=" {
      sub(/^[^=]*=[[:space:]]*/, ""); sub(/[[:space:]]*(#.*)?$/, ""); gsub(/"/, ""); print; exit
    }' "$board_file"
}
target=$(board_key target)
cpu=$(board_key cpu)
[ -n "$target" ] || die "$board_file has no target"
[ -n "$cpu" ] || cpu=generic
# --arch: the board on another architecture than its profile's (a Pi 3 or
# Zero 2 W running a 32-bit OS image), as `openclaw-admin build --arch` does.
case "$arch" in
  "") ;;
  aarch64|arm64) target=aarch64-unknown-linux-gnu ;;
  armv7|armhf) target=armv7-unknown-linux-gnueabihf ;;
  *) die "unknown --arch $arch (known: aarch64, armv7)" ;;
esac
if [ "$inference" = auto ]; then
  if grep -Eq '^[[:space:]]*models[[:space:]]*=[[:space:]]*\[[[:space:]]*"' "$board_file"; then
    inference=yes
  else
    inference=no
  fi
fi
features=agent
[ "$inference" = yes ] && features=agent,inference

case "$target" in
  aarch64-*|armv7-*|arm-*) ;;
  *) die "board $board is for $target, not ARM: build it with plain 'cargo build --bins'" ;;
esac

CARGO=${CROSS_CARGO:-/usr/bin/cargo}
RUSTC_BIN=${CROSS_RUSTC:-/usr/bin/rustc}
command -v "$CARGO" >/dev/null 2>&1 || die "$CARGO not found: run scripts/cross-toolchain.sh first"
command -v "$RUSTC_BIN" >/dev/null 2>&1 || die "$RUSTC_BIN not found: run scripts/cross-toolchain.sh first"
sysroot=$("$RUSTC_BIN" --print sysroot)
[ -d "$sysroot/lib/rustlib/$target/lib" ] \
  || die "no Rust std for $target in $sysroot/lib/rustlib: run scripts/cross-toolchain.sh (it says when Debian's std for this target is not available)"

case "$target" in
  aarch64-*) linker=aarch64-linux-gnu-gcc ;;
  *) linker=arm-linux-gnueabihf-gcc ;;
esac
command -v "$linker" >/dev/null 2>&1 || die "$linker not found: run scripts/cross-toolchain.sh first"

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/openclaw/cross-target}
export RUSTC=$RUSTC_BIN
if [ -n "${RUSTFLAGS:-}${CARGO_ENCODED_RUSTFLAGS:-}" ]; then
  echo "build-arm: ignoring RUSTFLAGS from the environment (it would override .cargo/config.toml's +crt-static)" >&2
  unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS
fi

args=(build --target "$target" --no-default-features --features "$features" --bin openclaw-agent --profile "$profile")
if [ "$cpu" != generic ]; then
  # Appended to the target's rustflags from .cargo/config.toml.
  args+=(--config "target.$target.rustflags=['-C','target-cpu=$cpu']")
fi

echo "build-arm: board $(basename "$board_file" .toml): target $target, cpu $cpu, profile $profile, features $features"
echo "build-arm: RUSTC=$RUSTC $CARGO ${args[*]}"
echo "build-arm: CARGO_TARGET_DIR=$CARGO_TARGET_DIR"
start=$(date +%s)
nice -n "${NICE:-15}" "$CARGO" "${args[@]}"
secs=$(( $(date +%s) - start ))

case "$profile" in dev|test) dir=debug ;; bench) dir=release ;; *) dir=$profile ;; esac
bin="$CARGO_TARGET_DIR/$target/$dir/openclaw-agent"
[ -f "$bin" ] || die "build finished but $bin is missing"

strip_tool=${linker%-gcc}-strip
size=$(stat -c %s "$bin")
stripped=""
if command -v "$strip_tool" >/dev/null 2>&1; then
  tmp=$(mktemp)
  "$strip_tool" -o "$tmp" "$bin" && stripped=$(stat -c %s "$tmp")
  rm -f "$tmp"
fi
mib() { awk -v b="$1" 'BEGIN { printf "%.2f MiB", b / 1048576 }'; }
echo
echo "binary:   $bin"
echo "size:     $size bytes ($(mib "$size"))${stripped:+, stripped $stripped bytes ($(mib "$stripped"))}"
command -v file >/dev/null 2>&1 && echo "file:     $(file -b "$bin" | cut -d, -f1-5)"
echo "built in: ${secs}s (profile $profile, cargo wall time including up-to-date checks)"
case "$target" in
  aarch64-*) echo "try it:   qemu-aarch64-static $bin --board $(basename "$board_file" .toml) --print-config" ;;
  *) echo "try it:   qemu-arm-static $bin --board $(basename "$board_file" .toml) --print-config" ;;
esac
