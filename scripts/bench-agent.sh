#!/usr/bin/env bash
# The agent loop's own cost per step and 100 concurrent runs (issue 13):
# a real server, an edge agent whose `echo` is the stub-speed tool and a
# heavy node whose `llm` plugin reaches a scripted OpenAI-compatible stub
# (scripts/bench/agent_loop.py has the details). Figures go to
# BENCHMARKS.md by hand.
#
#   scripts/bench-agent.sh [--runs N] [--calls K] [--concurrent C]
#
# Release builds by default; OPENCLAW_BENCH_PROFILE=dev uses the test build.
set -euo pipefail
# shellcheck source=scripts/lib/err-trap.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/err-trap.sh"
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/openclaw/target}"
profile="${OPENCLAW_BENCH_PROFILE:-release}"
cargo build --profile "$profile" --quiet --features llm --bin openclaw-agent --bin openclaw-server
bin="$CARGO_TARGET_DIR/$([ "$profile" = dev ] && echo debug || echo "$profile")"
echo "== $profile build, $(nproc) cores, $(date -u '+%Y-%m-%d %H:%M UTC')"
exec python3 scripts/bench/agent_loop.py "$bin" "$@"
