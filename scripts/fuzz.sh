#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time on stable Rust.
#
# cargo-fuzz asks for nightly only for sanitizer flags (-Z...); with
# `-s none` what remains is stable codegen options plus `--cfg fuzzing`,
# and RUSTC_BOOTSTRAP=1 lets stable accept the rest. No AddressSanitizer
# then: libFuzzer still finds panics, failed assertions, aborts, timeouts
# and out-of-memory. A crash fails this script; the input is saved under
# fuzz/artifacts/TARGET/ (and printed in base64 by libFuzzer). Turn each
# one into a regression test in the module it broke.
#
#   scripts/fuzz.sh                 # every target, FUZZ_SECONDS each (default 45)
#   scripts/fuzz.sh submit_json 300 # one target, 300 s
#   scripts/fuzz.sh --build         # install cargo-fuzz, build every target, run none
set -euo pipefail
# shellcheck source=scripts/lib/err-trap.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/err-trap.sh"
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
build_only=""
if [ "${1:-}" = --build ]; then build_only=1; shift; fi
seconds="${2:-${FUZZ_SECONDS:-45}}"
cache="$HOME/.cache/openclaw"
target_dir="$cache/fuzz-target"

# The main build's target dir would be rebuilt with fuzz flags each time
# (and `cargo install` would build cargo-fuzz there).
unset CARGO_TARGET_DIR

if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION (into ~/.cargo/bin)"
  cargo install --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi
command -v g++ >/dev/null 2>&1 || { echo "g++ is needed to build libFuzzer (apt-get install g++)" >&2; exit 1; }

if [ $# -ge 1 ]; then
  targets=("$1")
else
  targets=(envelope_decode segment_recovery config_parse submit_json auth_parse release_manifest)
fi

# Longest input per target. The wire decoders get the whole 1 MiB payload
# limit (DEFAULT_MAX_PAYLOAD): libFuzzer's default (the longest seed, or
# 4 KiB) could never build the 100 KB nesting that overflowed the server's
# stack (issue 15). The others keep libFuzzer's default.
max_len() {
  case "$1" in
    envelope_decode|submit_json) echo 1048576 ;;
    *) echo 0 ;;
  esac
}

export RUSTC_BOOTSTRAP=1
if [ -n "$build_only" ]; then
  # The same flags as `cargo fuzz run` below, so that run finds them built.
  cargo fuzz build -s none --target-dir "$target_dir"
  echo "== fuzz targets built: ${targets[*]}"
  exit 0
fi
for t in "${targets[@]}"; do
  corpus="$cache/fuzz-corpus/$t"
  mkdir -p "$corpus"
  dirs=("$corpus")
  [ -d "fuzz/seeds/$t" ] && dirs+=("fuzz/seeds/$t")
  echo "== fuzz $t for ${seconds}s (corpus $corpus, max_len $(max_len "$t"))"
  cargo fuzz run -s none --target-dir "$target_dir" "$t" "${dirs[@]}" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -max_len="$(max_len "$t")"
done
echo "== fuzzing: no crash in ${#targets[@]} target(s), ${seconds}s each"
