#!/usr/bin/env bash
# OpenClaw demo: the main job, end to end, on one machine.
#
# Builds the three binaries, starts a central node (embedded MQTT broker,
# SQLite task store, scheduler, HTTP API) and one simulated edge agent, waits
# until the agent is online, runs a `sysinfo` and an `echo` task through the
# scheduler, lists the devices, and measures submit-to-result latency.
# Everything lives in a temporary directory that is removed on exit, and both
# processes are stopped on exit, including on Ctrl-C or an error.
#
# Usage: scripts/demo.sh            (from anywhere; honours CARGO_TARGET_DIR)
# Env:   DEMO_BENCH_TASKS=200       tasks for the latency benchmark
set -euo pipefail
# shellcheck source=scripts/lib/err-trap.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/err-trap.sh"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bench_tasks="${DEMO_BENCH_TASKS:-200}"

say() { printf '\n== %s\n' "$*"; }
die() { printf 'demo: error: %s\n' "$*" >&2; exit 1; }

# --- 1. Toolchain -----------------------------------------------------------
if ! command -v cargo >/dev/null 2>&1; then
    cat >&2 <<'EOF'
demo: `cargo` is not installed (or not on PATH).

OpenClaw needs Rust 1.91 or newer; Debian 12's packaged rustc is too old, so
install the toolchain with rustup. Download the installer, read it, then run it:

    sudo apt-get install -y build-essential curl ca-certificates
    curl --proto '=https' --tlsv1.2 -sSf -o rustup-init.sh https://sh.rustup.rs
    less rustup-init.sh            # check what it does
    sh rustup-init.sh -y --profile minimal
    . "$HOME/.cargo/env"

(see https://rustup.rs for other ways). Then run scripts/demo.sh again.
EOF
    exit 1
fi
if ! command -v cc >/dev/null 2>&1; then
    echo "demo: warning: no C compiler (\`cc\`) found; the bundled SQLite needs one:" >&2
    echo "      sudo apt-get install -y build-essential" >&2
fi

# --- 2. Build ---------------------------------------------------------------
say "building openclaw-server, openclaw-agent, openclaw-admin for speed (cargo build --release --bins: opt-level 3, fat LTO)"
cd "$repo"
# Ask cargo where it put the binaries (this honours CARGO_TARGET_DIR and any
# target-dir setting in .cargo/config.toml) instead of guessing.
# The release profile is what users run on the PC (Cargo.toml: opt-level 3,
# fat LTO, one codegen unit); boards get `edge` from `openclaw-admin build`.
build_json="$(cargo build --release --bins --message-format=json-render-diagnostics)"
bin_path() {
    local p
    p="$(printf '%s\n' "$build_json" |
        grep -o "\"executable\":\"[^\"]*/$1\"" | tail -n 1 | sed 's/^"executable":"//; s/"$//')"
    if [[ -z "$p" ]]; then
        p="${CARGO_TARGET_DIR:-$repo/target}/release/$1"
    fi
    [[ -x "$p" ]] || die "built binary $1 not found (looked at $p)"
    printf '%s\n' "$p"
}
server_bin="$(bin_path openclaw-server)"
agent_bin="$(bin_path openclaw-agent)"
admin_bin="$(bin_path openclaw-admin)"

# --- 3. Scratch space and clean-up ------------------------------------------
tmp="$(mktemp -d "${TMPDIR:-/tmp}/openclaw-demo.XXXXXX")"
server_pid=""
agent_pid=""
ok=0

stop() { # stop PID NAME: SIGTERM, wait up to 10 s, then SIGKILL
    local pid="$1" name="$2" i
    [[ -n "$pid" ]] || return 0
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "demo: $name (pid $pid) did not stop on SIGTERM; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ $ok -ne 1 && -d "$tmp" ]]; then
        for log in server.log agent.log; do
            if [[ -s "$tmp/$log" ]]; then
                echo "---- last lines of $log ----" >&2
                tail -n 25 "$tmp/$log" >&2 || true
            fi
        done
    fi
    # The agent first, so it says goodbye to a live server.
    stop "$agent_pid" openclaw-agent
    stop "$server_pid" openclaw-server
    rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- 4. Central node --------------------------------------------------------
say "starting openclaw-server (HTTP and MQTT on free ports, data in $tmp/server)"
# Loopback only: the demo's broker has no device credentials yet. The HTTP
# API needs a token (http.auth = "required" by default): the first one is
# made offline, straight into the server's data dir.
# No per-token rate limit: the demo's `bench latency` sends faster than the
# default 200/s on a release build (429 found by scripts/fresh-check.sh).
printf '[http]\nrate_limit_per_s = 0.0\n[mqtt]\nhost = "127.0.0.1"\n' >"$tmp/server.toml"
say "openclaw-admin token create --role operator --data-dir $tmp/server"
OPENCLAW_TOKEN="$("$admin_bin" token create --role operator --name demo --data-dir "$tmp/server")" ||
    die "could not create an API token"
export OPENCLAW_TOKEN
"$server_bin" --host 127.0.0.1 --port 0 --mqtt-port 0 --config "$tmp/server.toml" \
    --data-dir "$tmp/server" >"$tmp/server.out" 2>"$tmp/server.log" &
server_pid=$!

ready=""
for ((i = 0; i < 600; i++)); do # 60 s
    ready="$(grep -m 1 '^openclaw-server ready ' "$tmp/server.out" || true)"
    [[ -n "$ready" ]] && break
    kill -0 "$server_pid" 2>/dev/null || die "openclaw-server exited before it was ready"
    sleep 0.1
done
[[ -n "$ready" ]] || die "openclaw-server did not print its ready line within 60 s"
echo "$ready"

# "openclaw-server ready http=0.0.0.0:PORT mqtt=HOST:PORT"
http_addr="$(sed -n 's/.* http=\([^ ]*\).*/\1/p' <<<"$ready")"
mqtt_addr="$(sed -n 's/.* mqtt=\([^ ]*\).*/\1/p' <<<"$ready")"
http_port="${http_addr##*:}"
http_host="${http_addr%:*}"
[[ "$http_port" =~ ^[0-9]+$ && -n "$mqtt_addr" ]] || die "cannot parse the ready line: $ready"
# The server listens on every interface (0.0.0.0); a client dials loopback.
case "$http_host" in
    0.0.0.0 | "" ) http_host=127.0.0.1 ;;
    "[::]" ) http_host="[::1]" ;;
esac
server_url="http://$http_host:$http_port"
admin() { "$admin_bin" --server "$server_url" "$@"; }

# --- 5. Edge agent (simulated board) ----------------------------------------
# On-device voice activity detection needs the Silero VAD model, which comes
# from its PyPI wheel (sha256-checked); without a network the demo skips it.
vad=0
if "$admin_bin" models fetch --models-dir "$repo/models" silero_vad >"$tmp/fetch.log" 2>&1; then
    vad=1
    printf '[plugins.echo]\n[plugins.sysinfo]\n[plugins.vad]\nmodels_dir = "%s"\naudio_root = "%s"\n' \
        "$repo/models" "$repo/models/golden" >"$tmp/agent.toml"
else
    echo "demo: could not fetch the VAD model (openclaw-admin models fetch; see $tmp/fetch.log); skipping the VAD task" >&2
    tail -n 3 "$tmp/fetch.log" >&2 || true
    printf '[plugins.echo]\n[plugins.sysinfo]\n' >"$tmp/agent.toml"
fi
say "starting openclaw-agent demo-sim (board sim, broker mqtt://$mqtt_addr)"
"$agent_bin" --config "$tmp/agent.toml" --board sim --id demo-sim --broker "mqtt://$mqtt_addr" \
    --data-dir "$tmp/agent" >"$tmp/agent.log" 2>&1 &
agent_pid=$!

online=0
for ((i = 0; i < 300; i++)); do # 30 s
    kill -0 "$agent_pid" 2>/dev/null || die "openclaw-agent exited (see its log above)"
    kill -0 "$server_pid" 2>/dev/null || die "openclaw-server exited"
    # Pretty JSON: "id" comes before "online" in each device object.
    if admin devices --json 2>/dev/null | awk '
        /"id":/ { id = $2 }
        /"online": true/ && id ~ /"demo-sim"/ { found = 1 }
        END { exit found ? 0 : 1 }'; then
        online=1
        break
    fi
    sleep 0.1
done
[[ $online -eq 1 ]] || die "device demo-sim did not come online within 30 s"
echo "device demo-sim is online at $server_url"

# --- 6. The main job ----------------------------------------------------------
say "openclaw-admin submit --plugin sysinfo --wait"
admin submit --plugin sysinfo --wait

say "openclaw-admin submit --plugin echo --input '{\"hello\":\"edge\"}' --wait"
admin submit --plugin echo --input '{"hello":"edge"}' --wait

if [[ $vad -eq 1 ]]; then
    say "openclaw-admin submit --plugin vad --input '{\"wav\": \"vad_speech_16k.wav\"}' --wait   (speech segments, on the agent, with tract)"
    admin submit --plugin vad --input '{"wav": "vad_speech_16k.wav"}' --wait
fi

say "openclaw-admin devices"
admin devices

say "openclaw-admin bench latency --tasks $bench_tasks"
admin bench latency --tasks "$bench_tasks"

ok=1
say "demo finished: stopping the agent and the server"
