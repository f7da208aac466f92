#!/usr/bin/env bash
# The agent loop's own cost per step and 100 concurrent runs (issue 13):
# a real server, an edge agent whose `echo` is the stub-speed tool and a
# heavy node whose `llm` plugin reaches a scripted OpenAI-compatible stub
# (scripts/bench/agent_loop.py has the details). Figures go to
# BENCHMARKS.md by hand.
#
#   scripts/bench-agent.sh [--runs N] [--calls K] [--concurrent C]
#
# The server (what the loop cost is measured in) is a release build by
# default (OPENCLAW_BENCH_PROFILE=dev: the test build); the agents are the
# test build with `llm` (their speed is outside the measured gaps, and a
# release llama.cpp is another ~15 minutes of a 2-core machine), unless
# OPENCLAW_BENCH_AGENT_PROFILE says otherwise.
set -euo pipefail
# shellcheck source=scripts/lib/err-trap.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/err-trap.sh"
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/openclaw/target}"
profile="${OPENCLAW_BENCH_PROFILE:-release}"
agent_profile="${OPENCLAW_BENCH_AGENT_PROFILE:-dev}"
dir_of() { echo "$CARGO_TARGET_DIR/$([ "$1" = dev ] && echo debug || echo "$1")"; }
cargo build --profile "$profile" --quiet --bin openclaw-server
cargo build --profile "$agent_profile" --quiet --features llm --bin openclaw-agent
echo "== server: $profile build, agents: $agent_profile build, $(nproc) cores, $(date -u '+%Y-%m-%d %H:%M UTC')"
exec python3 scripts/bench/agent_loop.py --server-bin "$(dir_of "$profile")" "$(dir_of "$agent_profile")" "$@"
