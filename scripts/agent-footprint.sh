#!/usr/bin/env bash
# Idle resident memory of an openclaw-agent binary, connected to a broker.
#
#   scripts/agent-footprint.sh BINARY [SECONDS]
#
# Starts Debian's mosquitto on a free loopback port, runs the agent (under
# qemu-user when BINARY is an ARM ELF) with the default config plus the
# board of BINARY's kind (sim natively, rpi4 under qemu), waits until it is
# connected, lets it idle SECONDS (default 20), then prints VmRSS, VmHWM and
# the thread count from /proc. Under qemu the emulator's own floor is
# measured the same way on a static "sleep" built with the cross gcc, and the
# difference is printed as the agent's share (an estimate: qemu's code and
# translation cache are in the first figure, the guest's pages in both).
set -euo pipefail
# shellcheck source=scripts/lib/err-trap.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/err-trap.sh"

bin=${1:?usage: scripts/agent-footprint.sh BINARY [SECONDS]}
idle=${2:-20}
[ -x "$bin" ] || { echo "agent-footprint: $bin is not an executable" >&2; exit 1; }
mosq=$(command -v mosquitto || echo /usr/sbin/mosquitto)
[ -x "$mosq" ] || { echo "agent-footprint: mosquitto is needed (apt-get install mosquitto)" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$port" >"$work/m.conf"
"$mosq" -c "$work/m.conf" >/dev/null 2>&1 &
pids+=($!)

machine=$(od -An -t x2 -j 18 -N 2 "$bin" | tr -d ' ')
case "$machine" in
  00b7) runner=(qemu-aarch64-static); board=rpi4; cross=aarch64-linux-gnu-gcc ;;
  0028) runner=(qemu-arm-static); board=generic-aarch64; cross=arm-linux-gnueabihf-gcc ;;
  *) runner=(); board=sim; cross="" ;;
esac

rss() { # pid -> "VmRSS VmHWM Threads" in kB
  awk '/^VmRSS/{r=$2} /^VmHWM/{h=$2} /^Threads/{t=$2} END{print r, h, t}' "/proc/$1/status"
}

"${runner[@]}" "$bin" --board "$board" --id footprint --broker "mqtt://127.0.0.1:$port" \
  --data-dir "$work/data" >"$work/agent.log" 2>&1 &
apid=$!
pids+=($apid)
for _ in $(seq 1 300); do
  grep -q "connected" "$work/agent.log" && break
  kill -0 "$apid" 2>/dev/null || { cat "$work/agent.log" >&2; exit 1; }
  sleep 0.1
done
grep -q "connected" "$work/agent.log" || { echo "agent did not connect" >&2; cat "$work/agent.log" >&2; exit 1; }
sleep "$idle"
read -r r h t < <(rss "$apid")
size=$(stat -c %s "$bin")
echo "binary:  $bin ($size bytes)"
echo "runner:  ${runner[*]:-native} (board $board, idle ${idle} s after connecting)"
echo "agent:   VmRSS ${r} kB, VmHWM ${h} kB, ${t} threads"

if [ ${#runner[@]} -gt 0 ]; then
  printf '#include <unistd.h>\nint main(void){sleep(3600);return 0;}\n' >"$work/sleep.c"
  "$cross" -static -O2 -o "$work/sleep" "$work/sleep.c"
  "${runner[@]}" "$work/sleep" &
  spid=$!
  pids+=($spid)
  sleep 2
  read -r fr fh ft < <(rss "$spid")
  echo "floor:   VmRSS ${fr} kB (qemu running a static sleep)"
  echo "share:   ~$(( r - fr )) kB of the agent's VmRSS is above the emulator's floor"
fi
