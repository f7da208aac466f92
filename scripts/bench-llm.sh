#!/usr/bin/env bash
# Decode speed and time to first token of a language model through the whole
# path (HTTP, server, MQTT, heavy node, SSE: `openclaw-admin chat`) against
# the engine alone (llama.cpp through llama-cpp-2 in one process, the same
# model, prompt length and threads), in one session, as ratios; then the
# aggregate tokens/s of 1, 4 and 8 concurrent streams on one model against
# 8 requests one after another. Figures go to BENCHMARKS.md by hand.
#
#   scripts/bench-llm.sh [MODEL] [TOKENS] [THREADS]
#
# Release builds (OPENCLAW_BENCH_PROFILE=dev: the test build, whose
# llama.cpp is the same optimized C++ build, our code unoptimized); the
# model must be fetched (openclaw-admin models fetch).
set -euo pipefail
# shellcheck source=scripts/lib/err-trap.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/err-trap.sh"
cd "$(dirname "$0")/.."
model="${1:-qwen2.5-coder-0.5b-instruct}"
tokens="${2:-128}"
threads="${3:-1}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/openclaw/target}"
profile="${OPENCLAW_BENCH_PROFILE:-release}"
cargo build --profile "$profile" --quiet --features llm --bin openclaw-agent --bin openclaw-server --bin openclaw-admin
bin="$CARGO_TARGET_DIR/$([ "$profile" = dev ] && echo debug || echo "$profile")"
work="$(mktemp -d)"
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
pids=()
trap cleanup EXIT

echo "== the engine alone (cargo bench --profile $profile --features llm --bench llm -- $model $threads $tokens)"
cargo bench --profile "$profile" --quiet --features llm --bench llm -- "$model" "$threads" "$tokens" | tee "$work/engine.txt"

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mqtt=$(port); http=$(port)
cat > "$work/server.toml" <<EOF
[http]
host = "127.0.0.1"
port = $http
auth = "off"
[mqtt]
host = "127.0.0.1"
port = $mqtt
[storage]
data_dir = "$work/srv"
EOF
"$bin/openclaw-server" --config "$work/server.toml" 2>"$work/server.log" &
pids+=($!)
cat > "$work/node.toml" <<EOF
[plugins.llm]
models_dir = "$PWD/models/llm"
threads = $threads
[plugins.llm.models."$model"]
context = 2048
slots = 8
EOF
"$bin/openclaw-agent" --board pc --config "$work/node.toml" --id bench-heavy \
  --broker "mqtt://127.0.0.1:$mqtt" --data-dir "$work/node" 2>"$work/node.log" &
pids+=($!)
admin=("$bin/openclaw-admin" --server "http://127.0.0.1:$http")
for _ in $(seq 1 600); do
  "${admin[@]}" models list 2>/dev/null | grep -q "^$model " && break
  sleep 0.2
done
prompt="Write a long story about a lighthouse keeper."
chat() { "${admin[@]}" --json chat --model "$model" --max-tokens "$tokens" --temperature 0 "$prompt"; }
chat >/dev/null # warm: the model loads on its first request

echo "== the whole path (openclaw-admin chat, 5 runs)"
for i in 1 2 3 4 5; do chat; done | tee "$work/path.jsonl" | python3 -c '
import json, sys, statistics
runs = [json.loads(l) for l in sys.stdin]
dec = [(r["completion_tokens"] - 1) / ((r["total_ms"] - r["first_piece_ms"]) / 1e3) for r in runs]
ttft = [r["first_piece_ms"] for r in runs]
print(f"whole path: decode {statistics.median(dec):.1f} tokens/s (median of {len(dec)}), first piece {statistics.median(ttft):.0f} ms")
'

echo "== concurrency: aggregate tokens/s"
for n in 1 4 8; do
  start=$(date +%s.%N)
  chats=()
  for k in $(seq 1 "$n"); do chat > "$work/c$n.$k.json" & chats+=($!); done
  wait "${chats[@]}"
  end=$(date +%s.%N)
  total=$(cat "$work"/c$n.*.json | python3 -c 'import json,sys; print(sum(json.loads(l)["completion_tokens"] for l in sys.stdin))')
  python3 -c "print(f'$n concurrent: {$total} tokens in {$end-$start:.2f} s = {$total/($end-$start):.1f} tokens/s')"
done
start=$(date +%s.%N)
for _ in $(seq 1 8); do chat; done > "$work/seq.jsonl"
end=$(date +%s.%N)
total=$(python3 -c 'import json,sys; print(sum(json.loads(l)["completion_tokens"] for l in open(sys.argv[1])))' "$work/seq.jsonl")
python3 -c "print(f'8 one after another: {$total} tokens in {$end-$start:.2f} s = {$total/($end-$start):.1f} tokens/s')"
